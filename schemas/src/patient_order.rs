//! Whether a table's file keeps its patients in order: each patient's rows in one row group,
//! and patient keys ascending through the file. A node that reads such a file in row groups
//! sees each patient's rows as one run, so it can count a group's patients by comparing each
//! row with the last (see the node's `patients` module) instead of keeping a set of them.

use std::fs::File;
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::SchemaError;

/// Whether the Int64 column `column` of the Parquet file at `path` ascends through the file and
/// no value appears in two row groups. Nulls are not patients and may sit anywhere. A file
/// without that column, or with it in another type, is not in order.
pub fn patients_in_order(path: &Path, column: &str) -> Result<bool, SchemaError> {
    let read = |reason: String| SchemaError::Io {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| read(e.to_string()))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| read(e.to_string()))?;
    let Ok(index) = builder.schema().index_of(column) else {
        return Ok(false);
    };
    if builder.schema().field(index).data_type() != &DataType::Int64 {
        return Ok(false);
    }
    // The first row of each row group after the first, as a row number in the file.
    let mut group_starts = Vec::new();
    let mut rows = 0i64;
    for group in builder.metadata().row_groups() {
        rows += group.num_rows();
        group_starts.push(rows);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| read(e.to_string()))?;

    let mut row = 0i64;
    let mut group = 0usize;
    // The last patient seen and the row group it was in.
    let mut last: Option<(i64, usize)> = None;
    for batch in reader {
        let batch = batch.map_err(|e| read(e.to_string()))?;
        let Some(ids) = batch.column(0).as_primitive_opt::<Int64Type>() else {
            return Ok(false);
        };
        for i in 0..ids.len() {
            while group_starts.get(group).is_some_and(|&end| row >= end) {
                group += 1;
            }
            row += 1;
            if ids.is_null(i) {
                continue;
            }
            let id = ids.value(i);
            match last {
                Some((before, _)) if id < before => return Ok(false),
                Some((before, in_group)) if id == before && in_group != group => return Ok(false),
                _ => {}
            }
            last = Some((id, group));
        }
    }
    Ok(true)
}
