//! The cell-key method on one trust's partial states: every count a state carries, and the
//! group's patient count, moves by the count table's adjustment for its value and the cell key
//! of the patients it counts; every sum by the magnitude table's, scaled by its largest
//! contribution. The cell keys themselves stay at the trust.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema, UInt64Type};

use crate::cellkey::{CellKey, CellKeyTables};
use crate::release::sdc::{Tops, column_as_f64, column_as_i64, internal};
use crate::release::{Moment, PartialAnswer, ReleaseError, Role};

/// Every released column of `answer` perturbed (every row; the caller keeps the released
/// ones), without the columns that stay at the trust.
pub(super) fn perturbed(
    answer: &PartialAnswer,
    roles: &[Role],
    reads: &[Option<usize>],
    tables: &CellKeyTables,
    tops: &Tops,
) -> Result<RecordBatch, ReleaseError> {
    let batch = &answer.batch;
    let mut group = None;
    let mut by_aggregate: HashMap<usize, Vec<Option<u64>>> = HashMap::new();
    for (index, role) in roles.iter().enumerate() {
        if *role != Role::CellKey {
            continue;
        }
        let keys: Vec<Option<u64>> = batch
            .column(index)
            .as_primitive_opt::<UInt64Type>()
            .ok_or(internal("a cell key is not UInt64"))?
            .iter()
            .collect();
        match answer.columns[index].aggregate {
            None => group = Some(keys),
            Some(a) => {
                by_aggregate.insert(a, keys);
            }
        }
    }
    let group = group.ok_or(internal("the cell-key method without the group's cell key"))?;
    // The cell keys of the patients an aggregate reads: its count's (shared by aggregates of
    // the same argument), or the group's.
    let keys_of = |aggregate: Option<usize>| -> &[Option<u64>] {
        aggregate
            .and_then(|a| reads.get(a).copied().flatten().or(Some(a)))
            .and_then(|a| by_aggregate.get(&a))
            .unwrap_or(&group)
    };

    let largest_of = |index: usize| {
        tops.iter()
            .find(|(c, _)| *c == index)
            .map(|(_, t)| t.as_slice())
            .ok_or(internal("a sum without its largest contributions"))
    };
    // A variance's count, exact and perturbed, for its mean and m2.
    let moment_count = |aggregate: Option<usize>| -> Result<(usize, ArrayRef), ReleaseError> {
        let index = (0..roles.len())
            .find(|&i| {
                roles[i] == Role::Moment(Moment::Count) && answer.columns[i].aggregate == aggregate
            })
            .ok_or(internal("a variance without its count"))?;
        Ok((index, counts(batch, index, keys_of(aggregate), tables)?))
    };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(roles.len());
    let mut fields = Vec::with_capacity(roles.len());
    for (index, role) in roles.iter().enumerate() {
        let column = batch.column(index);
        let aggregate = answer.columns[index].aggregate;
        let released = match role {
            Role::AggregatePatients | Role::CellKey => continue,
            // Curves are rounded cumulatively afterwards ([`super::survival`]).
            Role::Key | Role::GroupingId | Role::Other | Role::Curve(_) => Arc::clone(column),
            Role::Patients => counts(batch, index, &group, tables)?,
            Role::Count | Role::Moment(Moment::Count) => {
                counts(batch, index, keys_of(aggregate), tables)?
            }
            Role::Moment(Moment::Mean) => {
                let (n, released_n) = moment_count(aggregate)?;
                means(
                    column,
                    &column_as_i64(batch, n)?,
                    &released_n,
                    keys_of(aggregate),
                    largest_of(index)?,
                    tables,
                )?
            }
            Role::Moment(Moment::M2) => {
                let (n, released_n) = moment_count(aggregate)?;
                squares(column, &column_as_i64(batch, n)?, &released_n)?
            }
            Role::Sum => sums(column, keys_of(aggregate), largest_of(index)?, tables)?,
        };
        columns.push(released);
        fields.push(batch.schema().field(index).clone());
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|_| internal("could not rebuild the answer"))
}

/// A count column, each row moved by the count table.
fn counts(
    batch: &RecordBatch,
    index: usize,
    keys: &[Option<u64>],
    tables: &CellKeyTables,
) -> Result<ArrayRef, ReleaseError> {
    let values = column_as_i64(batch, index)?;
    if keys.len() != values.len() {
        return Err(internal("cell keys do not match the answer"));
    }
    let perturbed: Int64Array = values
        .iter()
        .zip(keys)
        .map(|(value, key)| {
            let value = (*value)?;
            // A count without patients has no key, and zero stays zero.
            let key = CellKey(key.unwrap_or(0));
            let n = u64::try_from(value.max(0)).unwrap_or(0);
            Some(i64::try_from(tables.count(n, key)).unwrap_or(i64::MAX))
        })
        .collect();
    // Back to the accumulator's own type, so DataFusion can merge the state.
    cast(&perturbed, batch.column(index).data_type())
        .map_err(|_| internal("could not restore a count's type"))
}

/// A sum column, each row moved by the magnitude table, in its own type (integer sums to the
/// nearest integer).
fn sums(
    column: &ArrayRef,
    keys: &[Option<u64>],
    largest: &[Option<f64>],
    tables: &CellKeyTables,
) -> Result<ArrayRef, ReleaseError> {
    let values = column_as_f64(column)?;
    if keys.len() != values.len() || largest.len() != values.len() {
        return Err(internal("cell keys do not match the answer"));
    }
    let integer = column.data_type().is_integer();
    let perturbed = values
        .iter()
        .zip(keys)
        .zip(largest)
        .map(|((value, key), largest)| match value {
            None => Ok(None),
            Some(sum) => {
                let largest = largest.ok_or(internal("a group's sum has no contributions"))?;
                let moved = tables.sum(*sum, largest, CellKey(key.unwrap_or(0)));
                Ok(Some(if integer { moved.round() } else { moved }))
            }
        })
        .collect::<Result<Float64Array, ReleaseError>>()?;
    let target = column.data_type();
    let nulls = perturbed.null_count();
    let restored = match target {
        DataType::Float64 => Arc::new(perturbed) as ArrayRef,
        _ => cast(&perturbed, target).map_err(|_| internal("could not restore a sum's type"))?,
    };
    if restored.null_count() != nulls {
        // A perturbed sum that does not fit its type is not released as missing.
        return Err(internal("a perturbed sum does not fit its type"));
    }
    Ok(restored)
}

/// A variance's mean, as the perturbed sum (the magnitude table, as for SUM) over the perturbed
/// count: an exact mean beside a perturbed count would give the exact count back.
fn means(
    column: &ArrayRef,
    counts: &[Option<i64>],
    released: &ArrayRef,
    keys: &[Option<u64>],
    largest: &[Option<f64>],
    tables: &CellKeyTables,
) -> Result<ArrayRef, ReleaseError> {
    let values = column_as_f64(column)?;
    let released = column_as_f64(released)?;
    if [counts.len(), released.len(), keys.len(), largest.len()]
        .iter()
        .any(|&l| l != values.len())
    {
        return Err(internal("cell keys do not match the answer"));
    }
    let moved: Float64Array = (0..values.len())
        .map(|r| {
            let (mean, n, released) = (values[r]?, counts[r]? as f64, released[r]?);
            if released <= 0.0 {
                return Some(0.0);
            }
            let sum = tables.sum(mean * n, largest[r]?, CellKey(keys[r].unwrap_or(0)));
            Some(sum / released)
        })
        .collect();
    cast(&moved, column.data_type()).map_err(|_| internal("could not restore a mean's type"))
}

/// A variance's sum of squared deviations, scaled to the perturbed count so that the sample
/// variance (m2 / (n − 1)) is the group's own and no second count can be read from it.
fn squares(
    column: &ArrayRef,
    counts: &[Option<i64>],
    released: &ArrayRef,
) -> Result<ArrayRef, ReleaseError> {
    let values = column_as_f64(column)?;
    let released = column_as_f64(released)?;
    if counts.len() != values.len() || released.len() != values.len() {
        return Err(internal("cell keys do not match the answer"));
    }
    let scaled: Float64Array = (0..values.len())
        .map(|r| {
            let (m2, n, released) = (values[r]?, counts[r]? as f64, released[r]?);
            Some(if n > 1.0 && released > 1.0 {
                m2 * (released - 1.0) / (n - 1.0)
            } else {
                0.0
            })
        })
        .collect();
    cast(&scaled, column.data_type()).map_err(|_| internal("could not restore a variance's type"))
}
