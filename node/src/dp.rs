//! The node's side of a differentially private release: the budget ledger. The release itself
//! (bounding, sensitivities, noise, the budget arithmetic) is decided in `policies`; here the
//! node takes its turn, reads what was spent, answers a repeat from the ledger at no cost,
//! fsyncs the charge *before the query runs* (a query that fails or times out after vetting
//! still costs its ε: its failure, or how long it took, could tell something), and fsyncs the
//! released answer before it leaves, so asking again cannot average the noise away and a crash
//! cannot roll the spending back.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use sha2::{Digest, Sha256};
use tokio::sync::MutexGuard;
use trustql_budget::{Charge, Kind, Ledger};
use trustql_policies::{Budget, DpNeeds, DpReport, now_rfc3339};
use trustql_protocol::{ANSWER_META_KEY, AnswerMeta, ColumnNoise, DpMeta, SiteRequest, Withheld};

use crate::engine::{SiteAnswer, SiteEngine, Timings, hex};
use crate::error::{NodeError, fault};

/// How a DP answer starts: its turn at the ledger, or the recorded answer of the same query.
pub(crate) enum DpStart<'a> {
    /// Run the query and charge it within this turn.
    Turn(DpTurn<'a>),
    /// The same query was released before: its answer again, at no cost.
    Repeat(Box<SiteAnswer>),
}

/// One DP release's hold on the ledger: check, release and record as one step, so two queries
/// cannot both pass the budget check.
pub(crate) struct DpTurn<'a> {
    _turn: MutexGuard<'a, ()>,
    ledger: Arc<Ledger>,
    project: String,
    query_key: String,
    needs: Box<DpNeeds>,
    left: Budget,
}

impl DpTurn<'_> {
    /// The answer's DP metadata for `report`.
    pub(crate) fn meta(&self, report: &DpReport) -> DpMeta {
        let (charged_epsilon, charged_delta) = Budget::charge(&self.needs);
        let remaining = self.left.after(&self.needs);
        DpMeta {
            epsilon_charged: charged_epsilon,
            delta_charged: charged_delta,
            epsilon_cost: self.needs.epsilon,
            delta_cost: self.needs.delta,
            epsilon_remaining: remaining.epsilon,
            delta_remaining: remaining.delta,
            repeat: false,
            preview: self.needs.preview,
            max_rows_per_patient: self.needs.bounded.max_rows,
            threshold: report.threshold,
            noise: report
                .noise
                .iter()
                .map(|n| ColumnNoise {
                    column: n.column,
                    scale: n.scale,
                    centre: n.centre,
                })
                .collect(),
        }
    }
}

impl SiteEngine {
    /// Takes the DP turn, checks the budget and charges it (fsync'd) before anything runs, or
    /// finds the recorded answer of a repeat.
    pub(crate) async fn begin_dp(
        &self,
        request: &SiteRequest,
        project: &str,
        needs: &DpNeeds,
        plan_fingerprint: &str,
        deadline: tokio::time::Instant,
    ) -> Result<DpStart<'_>, NodeError> {
        let query_key = query_key(
            plan_fingerprint,
            needs.epsilon,
            &self.policy.hash,
            &self.data_version,
        );
        let Some(ledger) = self.ledger.clone() else {
            return Err(NodeError::Budget(
                "this node keeps no budget ledger, so it cannot answer in DP mode".into(),
            ));
        };
        let turn = tokio::time::timeout_at(deadline, self.dp_turn.lock())
            .await
            .map_err(|_| NodeError::Timeout(self.timeout_ms()))?;
        let spent = ledger.spent(project);
        let left = Budget::left(&needs.project, spent.epsilon, spent.delta);
        if !needs.preview
            && let Some(bytes) = ledger.cached(project, &query_key)
        {
            let answer = repeat(&bytes, request, left, plan_fingerprint.to_string())?;
            return Ok(DpStart::Repeat(Box::new(answer)));
        }
        left.afford(needs, project, &self.trust)?;
        if !needs.preview {
            let spend = Charge {
                kind: Kind::Spend,
                at: now_rfc3339(),
                project: project.to_string(),
                researcher: request.researcher.clone(),
                request_id: request.request_id.clone(),
                query_key: query_key.clone(),
                epsilon: needs.epsilon,
                delta: needs.delta,
                answer: Vec::new(),
                day: None,
                members: Vec::new(),
            };
            write(&ledger, spend).await?;
        }
        Ok(DpStart::Turn(DpTurn {
            _turn: turn,
            ledger,
            project: project.to_string(),
            query_key,
            needs: Box::new(needs.clone()),
            left,
        }))
    }

    /// Records the released answer in the ledger (fsync'd) before it is returned, for repeats
    /// (its ε was charged in [`SiteEngine::begin_dp`]); a preview is not recorded.
    pub(crate) async fn charge(
        &self,
        turn: DpTurn<'_>,
        request: &SiteRequest,
        answer: SiteAnswer,
    ) -> Result<SiteAnswer, NodeError> {
        if turn.needs.preview {
            return Ok(answer);
        }
        let released = Charge {
            kind: Kind::Answer,
            at: now_rfc3339(),
            project: turn.project.clone(),
            researcher: request.researcher.clone(),
            request_id: request.request_id.clone(),
            query_key: turn.query_key.clone(),
            epsilon: 0.0,
            delta: 0.0,
            answer: encode(&answer.batch)?,
            day: None,
            members: Vec::new(),
        };
        write(&turn.ledger, released).await?;
        Ok(answer)
    }
}

/// Appends a line to the ledger off the async threads (it fsyncs).
/// Writes `charge` to the ledger off the async threads (it fsyncs).
pub(crate) async fn write(ledger: &Arc<Ledger>, charge: Charge) -> Result<(), NodeError> {
    let ledger = Arc::clone(ledger);
    tokio::task::spawn_blocking(move || ledger.charge(charge))
        .await
        .map_err(|_| NodeError::Budget("the ledger write did not finish".into()))??;
    Ok(())
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
    left: Budget,
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
        dp.epsilon_remaining = left.epsilon;
        dp.delta_remaining = left.delta;
        dp.repeat = true;
    }
    let batch = with_meta(batch, &meta)?;
    Ok(SiteAnswer {
        batch,
        meta,
        withheld: Withheld::default(),
        plan_fingerprint,
        timings: Timings::default(),
    })
}

/// The batch with `meta` in its schema's metadata, as the coordinator reads it.
pub(crate) fn with_meta(batch: RecordBatch, meta: &AnswerMeta) -> Result<RecordBatch, NodeError> {
    let schema = batch.schema().as_ref().clone().with_metadata(
        [(
            ANSWER_META_KEY.to_string(),
            meta.to_json()
                .map_err(fault("could not serialise the answer's metadata"))?,
        )]
        .into(),
    );
    // Not `with_schema`: that refuses to replace metadata a cached answer already carries.
    RecordBatch::try_new(Arc::new(schema), batch.columns().to_vec())
        .map_err(fault("could not attach the answer's metadata"))
}

const ENCODE: &str = "could not encode a release for the ledger";

fn encode(batch: &RecordBatch) -> Result<Vec<u8>, NodeError> {
    let mut bytes = Vec::new();
    let mut writer = StreamWriter::try_new(&mut bytes, &batch.schema()).map_err(fault(ENCODE))?;
    writer.write(batch).map_err(fault(ENCODE))?;
    writer.finish().map_err(fault(ENCODE))?;
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
