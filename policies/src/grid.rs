//! The public grid of a query's keys: every combination of each key's public codes and null,
//! the last key varying fastest. DP mode releases every cell of it; pooled mode lays every
//! member's states over it. Derived from the schema's code sets, never from the data.

use arrow::array::{ArrayRef, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::error::ArrowError;

/// The number of cells of the grid over `domain`, or `None` if it does not fit a `usize`.
pub(crate) fn cells(domain: &[Vec<String>]) -> Option<usize> {
    domain
        .iter()
        .try_fold(1usize, |n, codes| n.checked_mul(codes.len() + 1))
}

/// The grid over `domain`, one array per key in its type (`types`, in key order).
pub(crate) fn public_grid(
    domain: &[Vec<String>],
    types: &[DataType],
) -> Result<Vec<ArrayRef>, ArrowError> {
    let size = cells(domain)
        .ok_or_else(|| ArrowError::ComputeError("the grid has too many cells".into()))?;
    let mut repeat = size;
    let mut grid = Vec::with_capacity(domain.len());
    for (codes, data_type) in domain.iter().zip(types) {
        let values: Vec<Option<&str>> = codes
            .iter()
            .map(|c| Some(c.as_str()))
            .chain(std::iter::once(None))
            .collect();
        repeat /= values.len();
        let cycle = size / (repeat * values.len());
        let column: StringArray = (0..cycle)
            .flat_map(|_| {
                values
                    .iter()
                    .flat_map(move |v| std::iter::repeat_n(*v, repeat))
            })
            .collect();
        grid.push(cast(&column, data_type)?);
    }
    Ok(grid)
}
