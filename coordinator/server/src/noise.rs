//! What a researcher is told about the noise in a differentially private answer.
//!
//! Each trust reports the Laplace scale of every state it made noisy. A COUNT or SUM of the
//! result is a sum of those states, so its noise has the summed variance, the same for every
//! row. A mean is a noisy sum over a noisy count: its interval differs by row, and is found
//! by the delta method from each group's merged count and the variances of the trusts that
//! have the group.

use std::collections::HashMap;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type};
use arrow::row::{RowConverter, SortField};
use trustql_merge::{AggregateOutput, Prepared};
use trustql_wire::{AnswerMeta, OutputNoise};

/// z for a two-sided 95% normal interval.
const Z95: f64 = 1.96;

/// Noise variance per aggregate, summed over the trusts that answered.
#[derive(Default)]
pub(crate) struct NoiseSum {
    /// aggregate index → (variance, largest Laplace scale, trusts).
    by_aggregate: HashMap<usize, (f64, f64, usize)>,
}

impl NoiseSum {
    pub(crate) fn add(&mut self, meta: &AnswerMeta) {
        let Some(dp) = &meta.dp else { return };
        for noise in &dp.noise {
            let Some(aggregate) = meta.columns.get(noise.column).and_then(|c| c.aggregate) else {
                continue;
            };
            let entry = self.by_aggregate.entry(aggregate).or_default();
            // Laplace(b) has variance 2b².
            entry.0 += 2.0 * noise.scale * noise.scale;
            entry.1 = entry.1.max(noise.scale);
            entry.2 += 1;
        }
    }

    /// Noise of the result columns that are a COUNT or SUM (a mean's is not one number).
    pub(crate) fn outputs(&self, outputs: &[AggregateOutput]) -> Vec<OutputNoise> {
        outputs
            .iter()
            .filter(|o| o.function == "count" || o.function == "sum")
            .filter_map(|o| {
                let (variance, scale, trusts) = *self.by_aggregate.get(&o.aggregate)?;
                let sd = variance.sqrt();
                // One trust: the exact Laplace interval b·ln(20); several: the normal one.
                let ci95 = if trusts == 1 {
                    scale * 20f64.ln()
                } else {
                    1.96 * sd
                };
                Some(OutputNoise {
                    column: o.column.clone(),
                    sd: Some(sd),
                    ci95: Some(ci95),
                    ci95_by_row: Vec::new(),
                })
            })
            .collect()
    }
}

/// Per-row 95% intervals of the AVG columns of `result`, from the conformed noisy states of
/// each trust and its metadata (empty when the keys do not reach the result unchanged).
pub(crate) fn mean_intervals(
    prepared: &Prepared,
    noisy: &[(RecordBatch, AnswerMeta)],
    result: &[RecordBatch],
) -> Vec<OutputNoise> {
    let (Some(keys), Some(first)) = (prepared.key_outputs(), result.first()) else {
        return Vec::new();
    };
    let Ok(result) = concat_batches(&first.schema(), result) else {
        return Vec::new();
    };
    let partial = prepared.partial_schema();
    let key_types: Vec<DataType> = (0..keys.len())
        .map(|k| partial.field(k).data_type().clone())
        .collect();
    let Some(converter) = converter(&key_types) else {
        return Vec::new();
    };
    let Some(result_keys) = keys
        .iter()
        .zip(&key_types)
        .map(|(name, ty)| {
            let column = result.column_by_name(name)?;
            cast(column, ty).ok()
        })
        .collect::<Option<Vec<ArrayRef>>>()
    else {
        return Vec::new();
    };
    let Some(result_rows) = rows(&converter, &result_keys, result.num_rows()) else {
        return Vec::new();
    };

    let mut out = Vec::new();
    for output in prepared
        .aggregate_outputs()
        .iter()
        .filter(|o| o.function == "avg")
    {
        let count = format!("{}[count]", output.state);
        let sum = format!("{}[sum]", output.state);
        // Per group: (merged noisy count, variance of the sum's noise, of the count's noise).
        let mut groups: HashMap<Vec<u8>, (f64, f64, f64)> = HashMap::new();
        for (states, meta) in noisy {
            let (Some(var_n), Some(var_s)) = (variance(meta, &count), variance(meta, &sum)) else {
                continue;
            };
            let Some(n) = states
                .column_by_name(&count)
                .and_then(|c| cast(c, &DataType::Float64).ok())
            else {
                continue;
            };
            let n = n.as_primitive::<Float64Type>();
            let state_keys: Vec<ArrayRef> =
                (0..keys.len()).map(|k| states.column(k).clone()).collect();
            let Some(state_rows) = rows(&converter, &state_keys, states.num_rows()) else {
                continue;
            };
            for (row, key) in state_rows.into_iter().enumerate() {
                let entry = groups.entry(key).or_default();
                entry.0 += if n.is_null(row) { 0.0 } else { n.value(row) };
                entry.1 += var_s;
                entry.2 += var_n;
            }
        }
        if groups.is_empty() {
            continue;
        }
        let Some(means) = result
            .column_by_name(&output.column)
            .and_then(|c| cast(c, &DataType::Float64).ok())
        else {
            continue;
        };
        let means = means.as_primitive::<Float64Type>();
        let ci95_by_row = result_rows
            .iter()
            .enumerate()
            .map(|(row, key)| {
                let (n, var_s, var_n) = *groups.get(key)?;
                if n < 1.0 || means.is_null(row) {
                    return None;
                }
                let mean = means.value(row);
                // Var(S/N) ≈ (Var S + mean² Var N) / N².
                let ci = Z95 * (var_s + mean * mean * var_n).sqrt() / n;
                ci.is_finite().then_some(ci)
            })
            .collect();
        out.push(OutputNoise {
            column: output.column.clone(),
            sd: None,
            ci95: None,
            ci95_by_row,
        });
    }
    out
}

/// The noise variance (2b²) a trust put on its state column `name`, if it made it noisy.
fn variance(meta: &AnswerMeta, name: &str) -> Option<f64> {
    let dp = meta.dp.as_ref()?;
    let column = meta.columns.iter().position(|c| c.name == name)?;
    let scale = dp.noise.iter().find(|n| n.column == column)?.scale;
    Some(2.0 * scale * scale)
}

fn converter(types: &[DataType]) -> Option<RowConverter> {
    RowConverter::new(types.iter().map(|t| SortField::new(t.clone())).collect()).ok()
}

/// Each row's keys, encoded alike for any batch (one empty key when there is no GROUP BY).
fn rows(converter: &RowConverter, keys: &[ArrayRef], n: usize) -> Option<Vec<Vec<u8>>> {
    if keys.is_empty() {
        return Some(vec![Vec::new(); n]);
    }
    let rows = converter.convert_columns(keys).ok()?;
    Some((0..n).map(|r| rows.row(r).as_ref().to_vec()).collect())
}
