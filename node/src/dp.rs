//! Answering a project in differential-privacy mode: bounded, noisy, and charged before release.
//!
//! The query is rewritten so each patient brings a bounded number of rows, runs as the usual
//! reduced partial aggregation, and every state gets OpenDP noise calibrated to what one
//! patient can change. The release is written to the budget ledger (fsync'd) before it is
//! returned; a repeat of the same query is answered from the ledger at no cost, so asking again
//! cannot average the noise away.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Float64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use datafusion::common::Column;
use datafusion::logical_expr::{Aggregate, LogicalPlan};
use sha2::{Digest, Sha256};
use trustql_budget::Charge;
use trustql_policies::{
    BoundedQuery, Clamp, ColumnRole, MOMENT_AGGREGATES, Noisy, ProjectDp, Refusal, Rule, Selection,
    Vetted, add_noise, bound_contributions, now_rfc3339,
};
use trustql_wire::{
    ANSWER_META_KEY, AnswerColumn, AnswerMeta, ColumnKind, ColumnNoise, DpMeta, SiteRequest,
};

use crate::engine::{SiteAnswer, SiteEngine, Timings, fingerprint, hex, state_suffix};
use crate::error::NodeError;

/// Room for floating-point sums of ε when comparing with the budget.
const SLACK: f64 = 1e-9;

impl SiteEngine {
    /// Answers a request of a project in differential-privacy mode.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn answer_dp(
        &self,
        request: &SiteRequest,
        project: &str,
        dp: ProjectDp,
        aggregate: &Aggregate,
        optimized: &LogicalPlan,
        vetted: &Vetted,
        patient_key: &Column,
        deadline: tokio::time::Instant,
    ) -> Result<SiteAnswer, NodeError> {
        let policy = &self.policy.policy;
        let epsilon = match request.epsilon {
            None => dp.epsilon_per_query,
            Some(e) if e.is_finite() && e > 0.0 && e <= dp.epsilon_per_query + SLACK => e,
            Some(_) => {
                return Err(Refusal::new(
                    Rule::Budget,
                    format!(
                        "a query of this project may spend ε above 0 and at most {} at this trust",
                        dp.epsilon_per_query
                    ),
                )
                .into());
            }
        };
        let bounding = tokio::time::Instant::now();
        let bounded = bound_contributions(&self.schema, &policy.dp, aggregate, optimized, vetted)?;
        let keys = aggregate.group_expr.len();
        let public = bounded.public_domain.as_ref().filter(|domain| {
            let size = domain
                .iter()
                .fold(1usize, |n, codes| n.saturating_mul(codes.len() + 1));
            size <= policy.query.max_groups
        });
        let selection = match public {
            Some(domain) => Selection::Public(domain),
            None => Selection::Threshold,
        };
        let delta = if public.is_none() && keys > 0 {
            dp.delta_per_query
        } else {
            0.0
        };
        let plan_fingerprint = fingerprint(optimized);
        let query_key = query_key(
            &plan_fingerprint,
            epsilon,
            &self.policy.hash,
            &self.data_version,
        );
        let Some(ledger) = self.ledger.clone() else {
            return Err(NodeError::Budget(
                "this node keeps no budget ledger, so it cannot answer in DP mode".into(),
            ));
        };

        // Check, release and record as one step: two queries may not both pass the check.
        let _turn = tokio::time::timeout_at(deadline, self.dp_turn.lock())
            .await
            .map_err(|_| NodeError::Timeout(self.timeout_ms()))?;
        let spent = ledger.spent(project);
        let left = (
            (dp.epsilon_budget - spent.epsilon).max(0.0),
            (dp.delta_budget - spent.delta).max(0.0),
        );
        if !request.preview
            && let Some(bytes) = ledger.cached(project, &query_key)
        {
            return repeat(&bytes, request, left, plan_fingerprint);
        }
        if !request.preview && (epsilon > left.0 + SLACK || delta > left.1 + SLACK * 1e-6) {
            return Err(Refusal::new(
                Rule::Budget,
                format!(
                    "project {project} has ε {:.4} and δ {:e} left at trust {}; this query needs \
                     ε {epsilon} and δ {delta:e} (ask for a smaller ε with the \
                     x-trustql-epsilon header, or ask the data controller for more budget)",
                    left.0, left.1, self.trust
                ),
            )
            .into());
        }

        let bounding = bounding.elapsed();
        let executing = tokio::time::Instant::now();
        let (batch, columns, roles) = self
            // The count is released with noise here, so it is exact.
            .run_partial(
                &bounded.aggregate,
                patient_key,
                None,
                deadline,
                !request.preview,
            )
            .await?;
        let execution = executing.elapsed();
        let noising = tokio::time::Instant::now();

        // How much one patient can move each column, over all groups together.
        let m = bounded.max_rows as f64;
        let mut noisy = Vec::new();
        let mut key_columns = Vec::new();
        let mut patients = None;
        for (index, (column, role)) in columns.iter().zip(&roles).enumerate() {
            let sensitivity = match column.kind {
                ColumnKind::Key => {
                    key_columns.push(index);
                    continue;
                }
                ColumnKind::GroupingId => return Err(NodeError::Execution),
                // Measured only to choose groups by threshold; otherwise released as null.
                ColumnKind::Patients => {
                    patients = Some(index);
                    if public.is_some() || keys == 0 {
                        continue;
                    }
                    m
                }
                ColumnKind::DistinctCount => m,
                ColumnKind::State => {
                    let a = column.aggregate.ok_or(NodeError::Execution)?;
                    let clamp = bounded.clamp.get(a).copied().flatten();
                    let moments = bounded
                        .functions
                        .get(a)
                        .is_some_and(|f| MOMENT_AGGREGATES.contains(&f.as_str()));
                    match (moments, state_suffix(&column.name), role, clamp) {
                        // Moments about the centre: n, Σy and Σy², |y| ≤ half the range.
                        (true, "count", _, Some(_)) => m,
                        (true, "mean", _, Some(c)) => m * c.half_width(),
                        (true, "m2", _, Some(c)) => m * c.half_width().powi(2),
                        (true, ..) => return Err(NodeError::Execution),
                        (false, _, ColumnRole::Sum { .. }, Some(c)) => m * c.max_abs(),
                        (false, _, ColumnRole::Sum { .. }, None) => {
                            return Err(NodeError::Execution);
                        }
                        (false, ..) => m,
                    }
                }
            };
            noisy.push(Noisy {
                column: index,
                sensitivity,
            });
        }
        let patients = patients.ok_or(NodeError::Execution)?;
        let moments = moment_columns(&columns, &bounded)?;
        let batch = to_sums(&batch, &moments)?;
        let released = add_noise(
            &batch,
            &key_columns,
            patients,
            &noisy,
            bounded.max_rows,
            selection,
            epsilon,
            delta,
            policy.query.max_groups,
        )?;
        let report = released.report;
        let released_batch = from_sums(&released.batch, &moments)?;
        let (charged, remaining) = if request.preview {
            ((0.0, 0.0), left)
        } else {
            (
                (epsilon, delta),
                ((left.0 - epsilon).max(0.0), (left.1 - delta).max(0.0)),
            )
        };
        let dp_meta = DpMeta {
            epsilon_charged: charged.0,
            delta_charged: charged.1,
            epsilon_cost: epsilon,
            delta_cost: delta,
            epsilon_remaining: remaining.0,
            delta_remaining: remaining.1,
            repeat: false,
            preview: request.preview,
            max_rows_per_patient: bounded.max_rows,
            threshold: report.threshold,
            noise: noisy
                .iter()
                .zip(&report.scales)
                .map(|(n, scale)| ColumnNoise {
                    column: n.column,
                    scale: *scale,
                    centre: moments
                        .iter()
                        .find(|([_, mean, m2], _)| n.column == *mean || n.column == *m2)
                        .map(|(_, clamp)| clamp.centre()),
                })
                .collect(),
        };
        let batch = if request.preview {
            released_batch.slice(0, 0)
        } else {
            released_batch
        };
        // Nothing is said about groups not released: their number would tell how many rare
        // groups exist.
        let meta = AnswerMeta {
            trust: self.trust.clone(),
            request_id: request.request_id.clone(),
            policy_version: policy.policy.version.clone(),
            policy_hash: self.policy.hash.clone(),
            released: batch.num_rows(),
            withheld: Default::default(),
            columns,
            dp: Some(dp_meta),
        };
        let batch = with_meta(batch, &meta)?;
        let answer = SiteAnswer {
            batch,
            meta,
            plan_fingerprint,
            timings: Timings {
                vetting: Default::default(),
                execution,
                protection: bounding + noising.elapsed(),
            },
        };
        if request.preview {
            return Ok(answer);
        }
        let charge = Charge {
            at: now_rfc3339(),
            project: project.to_string(),
            researcher: request.researcher.clone(),
            request_id: request.request_id.clone(),
            query_key,
            epsilon,
            delta,
            answer: encode(&answer.batch)?,
        };
        tokio::task::spawn_blocking(move || ledger.charge(charge))
            .await
            .map_err(|_| NodeError::Budget("the ledger write did not finish".into()))??;
        Ok(answer)
    }
}

/// The (count, mean, m2) columns of each VAR/STDDEV aggregate, with its clamping range.
fn moment_columns(
    columns: &[AnswerColumn],
    bounded: &BoundedQuery,
) -> Result<Vec<([usize; 3], Clamp)>, NodeError> {
    let mut out = Vec::new();
    for (a, function) in bounded.functions.iter().enumerate() {
        if !MOMENT_AGGREGATES.contains(&function.as_str()) {
            continue;
        }
        let find = |suffix: &str| {
            columns
                .iter()
                .position(|c| {
                    c.kind == ColumnKind::State
                        && c.aggregate == Some(a)
                        && state_suffix(&c.name) == suffix
                })
                .ok_or(NodeError::Execution)
        };
        let clamp = bounded
            .clamp
            .get(a)
            .copied()
            .flatten()
            .ok_or(NodeError::Execution)?;
        out.push(([find("count")?, find("mean")?, find("m2")?], clamp));
    }
    Ok(out)
}

fn floats(array: &ArrayRef) -> Result<Vec<f64>, NodeError> {
    let array = cast(array, &DataType::Float64).map_err(|_| NodeError::Execution)?;
    Ok(array
        .as_primitive::<Float64Type>()
        .iter()
        .map(|v| v.unwrap_or(0.0))
        .collect())
}

fn replace(batch: &RecordBatch, values: Vec<(usize, Vec<f64>)>) -> Result<RecordBatch, NodeError> {
    let mut columns = batch.columns().to_vec();
    for (index, v) in values {
        columns[index] = Arc::new(Float64Array::from(v));
    }
    RecordBatch::try_new(batch.schema(), columns).map_err(|_| NodeError::Execution)
}

/// DataFusion's variance state (n, mean, m2) as moments about the range's centre c:
/// Σ(x−c) = n·(mean−c) in the mean column and Σ(x−c)² = m2 + n·(mean−c)² in the m2 column,
/// sums whose sensitivity the clamping bounds.
fn to_sums(batch: &RecordBatch, moments: &[([usize; 3], Clamp)]) -> Result<RecordBatch, NodeError> {
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
fn from_sums(
    batch: &RecordBatch,
    moments: &[([usize; 3], Clamp)],
) -> Result<RecordBatch, NodeError> {
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

/// What identifies a release for the cache: the normalised plan, the ε, the policy and the
/// data (new data is a new release, and costs again).
fn query_key(plan_fingerprint: &str, epsilon: f64, policy_hash: &str, data: &str) -> String {
    hex(&Sha256::digest(format!(
        "{plan_fingerprint}|{epsilon:?}|{policy_hash}|{data}"
    )))
}

/// The earlier release of the same query, re-addressed to this request, at no cost.
fn repeat(
    bytes: &[u8],
    request: &SiteRequest,
    left: (f64, f64),
    plan_fingerprint: String,
) -> Result<SiteAnswer, NodeError> {
    let batch = decode(bytes)?;
    let mut meta = batch
        .schema()
        .metadata()
        .get(ANSWER_META_KEY)
        .and_then(|m| AnswerMeta::from_json(m).ok())
        .ok_or_else(|| NodeError::Budget("a recorded answer has no metadata".into()))?;
    meta.request_id = request.request_id.clone();
    if let Some(dp) = meta.dp.as_mut() {
        dp.epsilon_charged = 0.0;
        dp.delta_charged = 0.0;
        dp.epsilon_remaining = left.0;
        dp.delta_remaining = left.1;
        dp.repeat = true;
    }
    let batch = with_meta(batch, &meta)?;
    Ok(SiteAnswer {
        batch,
        meta,
        plan_fingerprint,
        timings: Timings::default(),
    })
}

fn with_meta(batch: RecordBatch, meta: &AnswerMeta) -> Result<RecordBatch, NodeError> {
    let schema = batch
        .schema()
        .as_ref()
        .clone()
        .with_metadata([(ANSWER_META_KEY.to_string(), meta.to_json())].into());
    // Not `with_schema`: that refuses to replace metadata a cached answer already carries.
    RecordBatch::try_new(Arc::new(schema), batch.columns().to_vec())
        .map_err(|_| NodeError::Execution)
}

fn encode(batch: &RecordBatch) -> Result<Vec<u8>, NodeError> {
    let mut bytes = Vec::new();
    let mut writer =
        StreamWriter::try_new(&mut bytes, &batch.schema()).map_err(|_| NodeError::Execution)?;
    writer.write(batch).map_err(|_| NodeError::Execution)?;
    writer.finish().map_err(|_| NodeError::Execution)?;
    drop(writer);
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> Result<RecordBatch, NodeError> {
    let reader = StreamReader::try_new(bytes, None)
        .map_err(|_| NodeError::Budget("a recorded answer cannot be read".into()))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| NodeError::Budget("a recorded answer cannot be read".into()))?;
    arrow::compute::concat_batches(&schema, &batches)
        .map_err(|_| NodeError::Budget("a recorded answer cannot be read".into()))
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
