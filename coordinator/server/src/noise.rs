//! What a researcher is told about the noise in a differentially private answer.
//!
//! Each trust reports the Laplace scale of every state it made noisy. A COUNT or SUM of the
//! result is a sum of those states, so its noise has the summed variance, the same for every
//! row. A mean is a noisy sum over a noisy count, and a variance comes from noisy moments:
//! their intervals differ by row, and are found by the delta method from each group's merged
//! count and the noise of the trusts that have the group.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type};
use arrow::row::{RowConverter, SortField};
use trustql_merge::{AggregateOutput, Prepared};
use trustql_protocol::{AnswerMeta, OutputNoise};

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
                    Z95 * sd
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

/// One trust's share of one group of a mean or variance: its noisy count and mean, and the
/// noise variances of its states (count; sum or Σ(x−c); Σ(x−c)²) with the centre c.
#[derive(Debug, Clone, Copy, Default)]
struct Share {
    n: f64,
    mean: f64,
    centre: f64,
    var_n: f64,
    var_first: f64,
    var_second: f64,
}

/// Per-row 95% intervals of the AVG, VAR and STDDEV columns of `result`, from the conformed
/// noisy states of each trust and its metadata (none when the keys do not reach the result
/// unchanged).
pub(crate) fn value_intervals(
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
    for output in prepared.aggregate_outputs() {
        let kind = match output.function.as_str() {
            "avg" => Kind::Mean,
            "var" => Kind::Variance { sample: true },
            "var_pop" => Kind::Variance { sample: false },
            "stddev" => Kind::StdDev { sample: true },
            "stddev_pop" => Kind::StdDev { sample: false },
            _ => continue,
        };
        let groups = shares(output, kind, noisy, &converter, keys.len());
        if groups.is_empty() {
            continue;
        }
        let Some(values) = result
            .column_by_name(&output.column)
            .and_then(|c| cast(c, &DataType::Float64).ok())
        else {
            continue;
        };
        let values = values.as_primitive::<Float64Type>();
        let ci95_by_row = result_rows
            .iter()
            .enumerate()
            .map(|(row, key)| {
                let shares = groups.get(key)?;
                if values.is_null(row) {
                    return None;
                }
                let sd = kind.noise_sd(values.value(row), shares)?;
                let ci = Z95 * sd;
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

/// Which per-row statistic a result column is.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Mean,
    Variance { sample: bool },
    StdDev { sample: bool },
}

impl Kind {
    /// The state names of `output` (count, then sum or mean, then m2).
    fn states(self, output: &AggregateOutput) -> [String; 3] {
        let state = |s: &str| format!("{}[{s}]", output.state);
        match self {
            Kind::Mean => [state("count"), state("sum"), String::new()],
            _ => [state("count"), state("mean"), state("m2")],
        }
    }

    /// Standard deviation of the noise in `value` by the delta method, from every trust's share.
    fn noise_sd(self, value: f64, shares: &[Share]) -> Option<f64> {
        let n: f64 = shares.iter().map(|s| s.n).sum();
        if n < 2.0 {
            return None;
        }
        let variance = match self {
            // Var(S/N) ≈ (Var S + mean² Var N) / N².
            Kind::Mean => {
                let var_s: f64 = shares.iter().map(|s| s.var_first).sum();
                let var_n: f64 = shares.iter().map(|s| s.var_n).sum();
                (var_s + value * value * var_n) / (n * n)
            }
            Kind::Variance { sample } | Kind::StdDev { sample } => {
                let f = match self {
                    Kind::StdDev { .. } => value * value,
                    _ => value,
                };
                let mean = shares.iter().map(|s| s.n * s.mean).sum::<f64>() / n;
                let denominator = if sample { n - 1.0 } else { n };
                // f = (ΣS2 − …)/(N−1): with d = mean − c for a trust's moments about c,
                // ∂f/∂S2 = 1/D, ∂f/∂S1 = −2d/D, ∂f/∂N = (d² − f)/D.
                let var_f: f64 = shares
                    .iter()
                    .map(|s| {
                        let d = mean - s.centre;
                        (s.var_second + 4.0 * d * d * s.var_first + (d * d - f).powi(2) * s.var_n)
                            / (denominator * denominator)
                    })
                    .sum();
                match self {
                    // sd = √f: Var(sd) ≈ Var(f) / 4f.
                    Kind::StdDev { .. } if f > 0.0 => var_f / (4.0 * f),
                    Kind::StdDev { .. } => return None,
                    _ => var_f,
                }
            }
        };
        Some(variance.sqrt())
    }
}

/// Per group (encoded keys), each noisy trust's share of `output`.
fn shares(
    output: &AggregateOutput,
    kind: Kind,
    noisy: &[(RecordBatch, AnswerMeta)],
    converter: &RowConverter,
    keys: usize,
) -> HashMap<Vec<u8>, Vec<Share>> {
    let [count, first, second] = kind.states(output);
    let mut groups: HashMap<Vec<u8>, Vec<Share>> = HashMap::new();
    for (states, meta) in noisy {
        let (Some((var_n, _)), Some((var_first, centre))) =
            (noise_of(meta, &count), noise_of(meta, &first))
        else {
            continue;
        };
        let var_second = match kind {
            Kind::Mean => 0.0,
            _ => match noise_of(meta, &second) {
                Some((v, _)) => v,
                None => continue,
            },
        };
        let column = |name: &str| {
            states
                .column_by_name(name)
                .and_then(|c| cast(c, &DataType::Float64).ok())
        };
        let (Some(n), Some(means)) = (column(&count), column(&first)) else {
            continue;
        };
        let (n, means) = (
            n.as_primitive::<Float64Type>(),
            means.as_primitive::<Float64Type>(),
        );
        let state_keys: Vec<ArrayRef> = (0..keys).map(|k| Arc::clone(states.column(k))).collect();
        let Some(state_rows) = rows(converter, &state_keys, states.num_rows()) else {
            continue;
        };
        for (row, key) in state_rows.into_iter().enumerate() {
            let value = |a: &arrow::array::Float64Array| {
                if a.is_null(row) { 0.0 } else { a.value(row) }
            };
            groups.entry(key).or_default().push(Share {
                n: value(n),
                mean: value(means),
                centre: centre.unwrap_or(0.0),
                var_n,
                var_first,
                var_second,
            });
        }
    }
    groups
}

/// The noise variance (2b²) a trust put on its state column `name`, and the centre of its
/// moments, if it made the column noisy.
fn noise_of(meta: &AnswerMeta, name: &str) -> Option<(f64, Option<f64>)> {
    let dp = meta.dp.as_ref()?;
    let column = meta.columns.iter().position(|c| c.name == name)?;
    let noise = dp.noise.iter().find(|n| n.column == column)?;
    Some((2.0 * noise.scale * noise.scale, noise.centre))
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
