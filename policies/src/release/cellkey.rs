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

    let mut columns: Vec<ArrayRef> = Vec::with_capacity(roles.len());
    let mut fields = Vec::with_capacity(roles.len());
    for (index, role) in roles.iter().enumerate() {
        let column = batch.column(index);
        let aggregate = answer.columns[index].aggregate;
        let released = match role {
            Role::AggregatePatients | Role::CellKey => continue,
            Role::Key | Role::GroupingId | Role::Other => column.clone(),
            Role::Patients => counts(batch, index, &group, tables)?,
            Role::Count | Role::Moment(Moment::Count) => {
                counts(batch, index, keys_of(aggregate), tables)?
            }
            Role::Moment(_) => return Err(internal("a variance under the cell-key method")),
            Role::Sum => {
                let largest = tops
                    .iter()
                    .find(|(c, _)| *c == index)
                    .map(|(_, t)| t)
                    .ok_or(internal("a sum without its largest contributions"))?;
                sums(column, keys_of(aggregate), largest, tables)?
            }
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
