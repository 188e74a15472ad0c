//! Differential privacy's release arithmetic: how much one patient can move each state, the
//! variance moments turned into sums whose sensitivity the clamping bounds, and OpenDP's noise.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Float64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type};

use crate::contribution::Clamp;
use crate::noise::{Noisy, Selection, add_noise};
use crate::release::{DpNeeds, DpReport, Moment, NoisyColumn, PartialAnswer, ReleaseError, Role};

fn internal(what: &'static str) -> ReleaseError {
    ReleaseError::Internal(what)
}

/// Adds calibrated noise to every state and chooses the groups to release.
pub(crate) fn release_dp(
    needs: &DpNeeds,
    answer: &PartialAnswer,
    max_groups: usize,
) -> Result<(RecordBatch, DpReport), ReleaseError> {
    let bounded = &needs.bounded;
    let columns = &answer.columns;
    if columns.len() != answer.batch.num_columns() {
        return Err(internal("column descriptions do not match the answer"));
    }
    let keys = columns.iter().filter(|c| c.role() == Role::Key).count();
    // How much one patient can move each column, over all groups together.
    let m = bounded.max_rows as f64;
    let mut noisy = Vec::new();
    let mut key_columns = Vec::new();
    let mut patients = None;
    for (index, column) in columns.iter().enumerate() {
        let clamp = || {
            column
                .aggregate
                .and_then(|a| bounded.clamp.get(a).copied().flatten())
        };
        let sensitivity = match column.role() {
            Role::Key => {
                key_columns.push(index);
                continue;
            }
            Role::GroupingId => return Err(internal("grouping sets under differential privacy")),
            Role::AggregatePatients | Role::CellKey => {
                return Err(internal(
                    "per-aggregate patient counts or cell keys in a DP answer",
                ));
            }
            // Measured only to choose groups by threshold; otherwise released as null.
            Role::Patients => {
                patients = Some(index);
                if needs.public || keys == 0 {
                    continue;
                }
                m
            }
            Role::Count => m,
            // Moments about the centre: n, Σy and Σy², |y| ≤ half the range.
            Role::Moment(moment) => {
                let c = clamp().ok_or(internal("a variance has no clamping bounds"))?;
                match moment {
                    Moment::Count => m,
                    Moment::Mean => m * c.half_width(),
                    Moment::M2 => m * c.half_width().powi(2),
                }
            }
            Role::Sum => {
                m * clamp()
                    .ok_or(internal("a sum has no clamping bounds"))?
                    .max_abs()
            }
            Role::Curve(_) => return Err(internal("a survival curve under differential privacy")),
            Role::Other if column.is_moment_aggregate() => {
                return Err(internal("an unknown variance state"));
            }
            Role::Other => m,
        };
        noisy.push(Noisy {
            column: index,
            sensitivity,
        });
    }
    let patients = patients.ok_or(internal("no patient count"))?;
    let moments = moment_columns(answer, needs)?;
    let batch = to_sums(&answer.batch, &moments)?;
    let selection = match (&bounded.public_domain, needs.public) {
        (Some(domain), true) => Selection::Public(domain),
        _ => Selection::Threshold,
    };
    let released = add_noise(
        &batch,
        &key_columns,
        patients,
        &noisy,
        bounded.max_rows,
        selection,
        needs.epsilon,
        needs.delta,
        max_groups,
    )
    .map_err(|e| ReleaseError::Noise(e.to_string()))?;
    let batch = from_sums(&released.batch, &moments)?;
    let noise = noisy
        .iter()
        .zip(&released.report.scales)
        .map(|(n, scale)| NoisyColumn {
            column: n.column,
            scale: *scale,
            centre: moments
                .iter()
                .find(|([_, mean, m2], _)| n.column == *mean || n.column == *m2)
                .map(|(_, clamp)| clamp.centre()),
        })
        .collect();
    // A preview releases only what the answer would cost and how noisy it would be.
    let batch = if needs.preview {
        batch.slice(0, 0)
    } else {
        batch
    };
    let report = DpReport {
        threshold: released.report.threshold,
        noise,
    };
    Ok((batch, report))
}

/// The (count, mean, m2) columns of each VAR/STDDEV aggregate, with its clamping range.
fn moment_columns(
    answer: &PartialAnswer,
    needs: &DpNeeds,
) -> Result<Vec<([usize; 3], Clamp)>, ReleaseError> {
    let mut aggregates: Vec<usize> = answer
        .columns
        .iter()
        .filter(|c| matches!(c.role(), Role::Moment(_)))
        .filter_map(|c| c.aggregate)
        .collect();
    aggregates.dedup();
    let mut out = Vec::new();
    for a in aggregates {
        let find = |moment: Moment| {
            answer
                .columns
                .iter()
                .position(|c| c.aggregate == Some(a) && c.role() == Role::Moment(moment))
                .ok_or(internal("a variance state is missing"))
        };
        let clamp = needs
            .bounded
            .clamp
            .get(a)
            .copied()
            .flatten()
            .ok_or(internal("a variance has no clamping bounds"))?;
        out.push((
            [find(Moment::Count)?, find(Moment::Mean)?, find(Moment::M2)?],
            clamp,
        ));
    }
    Ok(out)
}

fn floats(array: &ArrayRef) -> Result<Vec<f64>, ReleaseError> {
    let array = cast(array, &DataType::Float64).map_err(|_| internal("a moment is not numeric"))?;
    Ok(array
        .as_primitive::<Float64Type>()
        .iter()
        .map(|v| v.unwrap_or(0.0))
        .collect())
}

fn replace(
    batch: &RecordBatch,
    values: Vec<(usize, Vec<f64>)>,
) -> Result<RecordBatch, ReleaseError> {
    let mut columns = batch.columns().to_vec();
    for (index, v) in values {
        columns[index] = Arc::new(Float64Array::from(v));
    }
    RecordBatch::try_new(batch.schema(), columns).map_err(|_| internal("could not rebuild moments"))
}

/// DataFusion's variance state (n, mean, m2) as moments about the range's centre c:
/// Σ(x−c) = n·(mean−c) in the mean column and Σ(x−c)² = m2 + n·(mean−c)² in the m2 column,
/// sums whose sensitivity the clamping bounds.
pub(crate) fn to_sums(
    batch: &RecordBatch,
    moments: &[([usize; 3], Clamp)],
) -> Result<RecordBatch, ReleaseError> {
    let mut values = Vec::new();
    for ([count, mean, m2], clamp) in moments {
        let n = floats(batch.column(*count))?;
        let means = floats(batch.column(*mean))?;
        let m2s = floats(batch.column(*m2))?;
        let c = clamp.centre();
        let s1: Vec<f64> = n.iter().zip(&means).map(|(n, m)| n * (m - c)).collect();
        let s2: Vec<f64> = n
            .iter()
            .zip(&means)
            .zip(&m2s)
            .map(|((n, m), q)| q + n * (m - c) * (m - c))
            .collect();
        values.push((*mean, s1));
        values.push((*m2, s2));
    }
    replace(batch, values)
}

/// Noisy moments back into DataFusion's variance state; m2 cannot be negative (post-processing).
pub(crate) fn from_sums(
    batch: &RecordBatch,
    moments: &[([usize; 3], Clamp)],
) -> Result<RecordBatch, ReleaseError> {
    let mut values = Vec::new();
    for ([count, mean, m2], clamp) in moments {
        // The noisy count is a denominator, already at least 1.
        let n: Vec<f64> = floats(batch.column(*count))?
            .into_iter()
            .map(|n| n.max(1.0))
            .collect();
        let s1 = floats(batch.column(*mean))?;
        let s2 = floats(batch.column(*m2))?;
        let c = clamp.centre();
        let means = n.iter().zip(&s1).map(|(n, s)| s / n + c).collect();
        let m2s = n
            .iter()
            .zip(&s1)
            .zip(&s2)
            .map(|((n, s), q)| (q - s * s / n).max(0.0))
            .collect();
        values.push((*mean, means));
        values.push((*m2, m2s));
    }
    replace(batch, values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::UInt64Array;
    use arrow::datatypes::{Field, Schema};

    /// Without noise, moments about the centre turn back into the same variance state.
    #[test]
    fn variance_states_round_trip_through_moments() {
        let schema = Schema::new(vec![
            Field::new("var(x)[count]", DataType::UInt64, true),
            Field::new("var(x)[mean]", DataType::Float64, true),
            Field::new("var(x)[m2]", DataType::Float64, true),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(UInt64Array::from(vec![4, 10])),
                Arc::new(Float64Array::from(vec![62.5, 40.0])),
                Arc::new(Float64Array::from(vec![1250.0, 90.0])),
            ],
        )
        .expect("batch");
        let moments = [(
            [0, 1, 2],
            Clamp {
                lower: 0.0,
                upper: 110.0,
            },
        )];
        let sums = to_sums(&batch, &moments).expect("to sums");
        // Σ(x−55) = 4 × 7.5; Σ(x−55)² = 1250 + 4 × 7.5².
        assert_eq!(sums.column(1).as_primitive::<Float64Type>().value(0), 30.0);
        assert_eq!(
            sums.column(2).as_primitive::<Float64Type>().value(0),
            1475.0
        );
        let back = from_sums(&sums, &moments).expect("from sums");
        for (column, expected) in [(1, [62.5, 40.0]), (2, [1250.0, 90.0])] {
            let got = back.column(column).as_primitive::<Float64Type>();
            for (row, want) in expected.iter().enumerate() {
                assert!((got.value(row) - want).abs() < 1e-9, "{column}/{row}");
            }
        }
    }
}
