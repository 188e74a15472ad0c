//! One federated query: plan, fan out, merge, report coverage.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use tonic::transport::Identity;
use trustql_merge::{Merger, SiteStates};
use trustql_protocol::{CellKeyMeta, Coverage, SiteRequest, TrustCoverage, TrustStatus, Withheld};
use trustql_schemas::TrustSchema;

use trustql_audit::{AuditEntry, AuditLog, Decision, TrustOutcome};
use trustql_policies::{AnswerProtection, Rounding, TotalsRules, check_text, now_rfc3339};

use crate::auth::{Caller, Researchers};
use crate::config::{CoordinatorConfig, Quorum};
use crate::error::{CoordinatorError, random_hex};
use crate::fanout::{NodeLink, Outcome, Taken, load_signer};
use crate::limits::Limits;
use crate::noise::{NoiseSum, value_intervals};

/// A merged, protected answer and its coverage.
#[derive(Debug, Clone)]
pub struct FederatedAnswer {
    /// The result's schema (its metadata carries the coverage report).
    pub schema: SchemaRef,
    /// The result.
    pub batches: Vec<RecordBatch>,
    /// Which trusts contributed.
    pub coverage: Coverage,
}

/// The coordinator's query engine (no data: the schema, the links, the merger).
pub struct Coordinator {
    merger: Merger,
    /// Without the federation's totals rules: for answers that are all differentially
    /// private, whose noise is the protection (and whose patient counts are not released).
    dp_merger: Merger,
    /// The federation's minimum without its rounding: for cell-key answers, already perturbed,
    /// whose sums rounding would bias.
    unrounded_merger: Merger,
    schema: TrustSchema,
    links: Vec<NodeLink>,
    deadline: Duration,
    quorum: Quorum,
    limits: Limits,
    researchers: Researchers,
    totals: TotalsRules,
    /// Every researcher request, hash-chained like a node's.
    audit: Arc<AuditLog>,
    /// Calls refused before they named a query (bad token, project or header).
    refused_calls: RefusedCalls,
}

const WITHHELD_NOTE: &str = "each trust withholds its own groups with too few patients, \
     dominated sums and 100% cells, with their margins, so a value covers only the trusts that \
     released that group; how many groups a trust withheld is not reported, as that number would \
     itself be an exact count";

/// Why a pooled query stops, once its coverage report is written.
enum PoolStop {
    /// Fewer members answered than the pool has.
    Missing { answered: usize, members: usize },
    /// The members disagreed, or their masks did not cancel.
    Fault(crate::pool::PoolFault),
}

/// What the researcher is told about answers perturbed by the cell-key method, with the
/// largest movement any of their trusts' tables allows.
fn cell_key_note(tables: &[CellKeyMeta]) -> Option<String> {
    let count = tables.iter().map(|t| t.count_max_adjustment).max()?;
    let sum = tables
        .iter()
        .map(|t| f64::from(t.sum_max_steps) * t.sum_step_scale)
        .fold(0.0, f64::max);
    // 3 × 0.1 is 0.30000000000000004 in binary: say it as a person would.
    let sum = (sum * 1e6).round() / 1e6;
    Some(format!(
        "{} of the answering trusts perturb their counts and sums by the cell-key method: each \
         trust's count of a group moved by at most {count} (never below zero), each sum by at \
         most {sum} times the group's largest value, with no bias; the same patients always \
         give the same numbers, so asking again or rewording changes nothing; a mean is a \
         perturbed sum over a perturbed count, and totals are not rounded on top",
        tables.len()
    ))
}

const DISTINCT_NOTE: &str = "COUNT(DISTINCT …) is summed over trusts: a patient treated at two \
     trusts has a local id at each and is counted at both (cross-trust linkage is not done yet).";

const SURVIVAL_NOTE: &str = "survival curves: each trust withholds a stratum with too few \
     patients whole and rounds its cumulative events and censorings to the middle of their band \
     (of 5 unless its policy says otherwise), never one interval; at-risk counts follow from the \
     rounded totals, so survival, its interval and at-risk carry every answering trust's rounding; \
     logrank protects each arm as a stratum the same way and compares the arms the trusts \
     released (an arm with too few patients at a trust is left out of that trust's part).";

/// How close a percentile of `column` is: read from a histogram over its public bins, and
/// under a trust's own protection from pooled and rounded bins.
fn percentile_note(column: &str, width: f64, protected: bool) -> String {
    let mut note = format!(
        "percentiles of {column} are read from a histogram over its public bins {width} wide, \
         each bin's rows spread evenly across it: within {width} of the exact value over the \
         same rows"
    );
    if protected {
        note.push_str(
            "; each trust pools bins with fewer rows than its minimum into their neighbours and \
             rounds the cumulative counts to the middle of their band (of 5 unless its policy \
             says otherwise), which moves the rank a percentile is read at by a few rows per \
             trust and the 0th and 100th percentiles inward",
        );
    }
    note
}

impl Coordinator {
    /// Builds the coordinator from its configuration (node channels connect lazily).
    pub fn new(config: &CoordinatorConfig, schema: TrustSchema) -> Result<Self, CoordinatorError> {
        let cert = read(&config.node_client.cert, "client certificate")?;
        let key = read(&config.node_client.key, "client key")?;
        let identity = Identity::from_pem(cert, key);
        let signer = load_signer(&config.request_signing_key)?;
        let links = config
            .nodes
            .iter()
            .map(|n| NodeLink::new(n, &identity, Arc::clone(&signer)))
            .collect::<Result<Vec<_>, _>>()?;
        let audit = AuditLog::open(&config.audit_dir, &now_rfc3339())
            .map_err(|e| CoordinatorError::Config(format!("the coordinator's audit log: {e}")))?;
        Ok(Coordinator {
            audit: Arc::new(audit),
            merger: Merger::new(&schema, config.disclosure)?,
            dp_merger: Merger::new(&schema, TotalsRules::default())?,
            unrounded_merger: Merger::new(
                &schema,
                TotalsRules {
                    rounding: Rounding::None,
                    ..config.disclosure
                },
            )?,
            totals: config.disclosure,
            schema,
            links,
            deadline: Duration::from_millis(config.node_deadline_ms),
            quorum: config.quorum,
            limits: config.limits,
            researchers: Researchers::new(config.researchers.clone()),
            refused_calls: RefusedCalls::new(std::time::Instant::now()),
        })
    }

    /// The shared schema.
    pub fn schema(&self) -> &TrustSchema {
        &self.schema
    }

    /// The result schema `sql` would have, or why it can never be answered.
    pub async fn result_schema(&self, sql: &str) -> Result<SchemaRef, CoordinatorError> {
        self.check_text(sql)?;
        Ok(self.merger.prepare(sql).await?.schema())
    }

    /// Runs one query for a caller across every trust, and records it in the coordinator's
    /// audit log before anything is returned.
    pub async fn query(
        &self,
        caller: &Caller,
        sql: &str,
    ) -> Result<FederatedAnswer, CoordinatorError> {
        // Random, and the same at every node, to join the audit logs.
        let request_id = random_hex(12)?;
        // What each trust really did: the audit keeps it, the researcher may not see it.
        let mut statuses = Vec::new();
        let outcome = self.federate(caller, sql, &request_id, &mut statuses).await;
        let entry = audit_entry(caller, sql, &request_id, &outcome, statuses);
        let audit = Arc::clone(&self.audit);
        let recorded = tokio::task::spawn_blocking(move || audit.append(entry)).await;
        if !matches!(recorded, Ok(Ok(_))) {
            tracing::error!(id = %request_id, outcome = ?recorded.map(|r| r.map(|_| ())), "the audit record was not written");
            return Err(CoordinatorError::Internal(
                "the audit record could not be written".into(),
            ));
        }
        outcome
    }

    async fn federate(
        &self,
        caller: &Caller,
        sql: &str,
        request_id: &str,
        statuses: &mut Vec<TrustOutcome>,
    ) -> Result<FederatedAnswer, CoordinatorError> {
        self.check_text(sql)?;
        let prepared = self.merger.prepare(sql).await?;
        let request = SiteRequest {
            request_id: request_id.to_string(),
            researcher: caller.researcher.clone(),
            project: caller.project.clone(),
            sql: sql.to_string(),
            epsilon: caller.epsilon,
            preview: caller.preview,
        };
        let outcomes = futures::future::join_all(
            self.links
                .iter()
                .map(|link| link.ask(&request, self.deadline)),
        )
        .await;

        // Which totals rules apply depends on how the answers were protected (policies decides).
        let totals = self
            .totals
            .for_answers(outcomes.iter().filter_map(|o| match o {
                Outcome::Answered(site) if site.meta.pool.is_some() => {
                    site.meta.pool.as_ref().map(crate::pool::protection)
                }
                Outcome::Answered(site) if site.meta.dp.is_some() => Some(AnswerProtection::Dp),
                Outcome::Answered(site) if site.meta.cell_key.is_some() => {
                    Some(AnswerProtection::CellKey)
                }
                Outcome::Answered(_) => Some(AnswerProtection::Sdc),
                Outcome::Not(..) => None,
            }));
        // Without totals rules the mergers plan alike: no need to plan again.
        let (merger, prepared) = if totals != self.totals && self.totals.is_active() {
            let merger = if totals.is_active() {
                &self.unrounded_merger
            } else {
                &self.dp_merger
            };
            (merger, merger.prepare(sql).await?)
        } else {
            (&self.merger, prepared)
        };
        // Each line, and whether the trust failed after it took the query.
        let mut lines = Vec::with_capacity(outcomes.len());
        let mut states = Vec::new();
        let mut noise = NoiseSum::default();
        let mut noisy_states = Vec::new();
        let mut cell_keys = Vec::new();
        // Pooled members' masked words: added, and protected once, below.
        let mut pooled_sites = Vec::new();
        for (link, outcome) in self.links.iter().zip(outcomes) {
            let line = match outcome {
                Outcome::Answered(site) if site.meta.pool.is_some() => {
                    let line = (answered(&site), Taken::Before);
                    pooled_sites.push(site);
                    line
                }
                Outcome::Answered(site) => match prepared.conform(&site) {
                    Ok(batch) => {
                        cell_keys.extend(site.meta.cell_key);
                        if site.meta.dp.is_some() {
                            noisy_states.push((batch.clone(), site.meta.clone()));
                        }
                        states.push(batch);
                        noise.add(&site.meta);
                        (answered(&site), Taken::Before)
                    }
                    Err(e) => (
                        not(link.trust(), TrustStatus::Failed, e.to_string()),
                        Taken::Before,
                    ),
                },
                Outcome::Not(status, reason, taken) => {
                    tracing::warn!(
                        id = %request.request_id,
                        trust = link.trust(),
                        ?status,
                        reason = %reason,
                        "a trust did not answer"
                    );
                    (not(link.trust(), status, reason), taken)
                }
            };
            lines.push(line);
        }
        statuses.extend(lines.iter().map(|(t, _)| TrustOutcome {
            trust: t.trust.clone(),
            status: t.status,
        }));
        // A pooled query needs every member (the words of fewer add up to noise); its total
        // stands in `states` for all of them.
        let mut pool_notes = Vec::new();
        let mut pool_stop = None;
        let mut pooled_entry = 0;
        if let Some(meta) = pooled_sites.first().and_then(|s| s.meta.pool.as_ref()) {
            if pooled_sites.len() < meta.members.len() {
                pool_stop = Some(PoolStop::Missing {
                    answered: pooled_sites.len(),
                    members: meta.members.len(),
                });
            } else {
                let sites: Vec<&SiteStates> = pooled_sites.iter().map(AsRef::as_ref).collect();
                match crate::pool::combine(&sites) {
                    Err(fault) => {
                        tracing::warn!(id = %request.request_id, error = %fault, "a pooled answer was not released");
                        pool_stop = Some(PoolStop::Fault(fault));
                    }
                    Ok(pooled) => {
                        let batch = prepared.conform(&pooled.site).map_err(|e| {
                            tracing::error!(id = %request.request_id, error = %e, "the pooled answer does not fit the query");
                            CoordinatorError::Internal(
                                "the pooled answer does not fit the query".into(),
                            )
                        })?;
                        states.push(batch);
                        pool_notes = pooled.notes;
                        pooled_entry = 1;
                    }
                }
            }
        }
        let pooled_members = pooled_sites.len();
        let noisy = !noisy_states.is_empty();
        let counted = lines.iter().any(|(t, _)| t.allowance.is_some());
        let incomplete = conceal_incomplete(&mut lines);
        let trusts: Vec<TrustCoverage> = lines.into_iter().map(|(t, _)| t).collect();
        let answered_count = states.len() - pooled_entry + pooled_members;
        let total = trusts.len();
        let mut notes = Vec::new();
        if prepared.counts_distinct() {
            notes.push(DISTINCT_NOTE.to_string());
        }
        notes.extend(totals.notes());
        // Trusts that protected their own answer (the pooled total is one answer, its members
        // none).
        let own_protection = states.len() - pooled_entry;
        for (column, width) in prepared.percentiles() {
            notes.push(percentile_note(
                column,
                *width,
                own_protection > noisy_states.len(),
            ));
        }
        let noise = noise.outputs(prepared.aggregate_outputs());
        if own_protection > noisy_states.len() {
            notes.push(WITHHELD_NOTE.into());
            if prepared.has_survival() {
                notes.push(SURVIVAL_NOTE.into());
            }
        }
        notes.append(&mut pool_notes);
        if noisy && incomplete > 0 {
            notes.push(
                "every trust marked \"asked\" charged the query's ε to the project before it \
                 ran, whether or not it completed; the next answer at each trust shows what is left"
                    .into(),
            );
        }
        if counted && incomplete > 0 {
            notes.push(
                "every trust marked \"asked\" counted the query against the project's query \
                 allowance before it ran, whether or not it completed"
                    .into(),
            );
        }
        if let Some(note) = cell_key_note(&cell_keys) {
            notes.push(note);
        }
        if noisy {
            notes.push(
                "values carry differential-privacy noise from each trust; counts can come out \
                 negative, and a mean is a noisy sum over a noisy count"
                    .into(),
            );
        }
        if caller.preview {
            notes.push("a preview: nothing ran and no budget was spent".into());
        }
        if answered_count < total {
            let missing: Vec<&str> = trusts
                .iter()
                .filter(|t| !matches!(t.status, TrustStatus::Answered | TrustStatus::Asked))
                .map(|t| t.trust.as_str())
                .collect();
            let mut left_out = missing.join(", ");
            if incomplete > 0 {
                if !left_out.is_empty() {
                    left_out.push_str(" and ");
                }
                left_out.push_str(&format!(
                    "{incomplete} of the trusts marked \"asked\" (which is not said)"
                ));
            }
            notes.push(format!(
                "the result leaves out {left_out}: it covers only the trusts that answered"
            ));
        }
        let mut coverage = Coverage {
            request_id: request.request_id.clone(),
            complete: answered_count == total,
            incomplete,
            trusts,
            notes,
            noise,
        };
        match pool_stop {
            Some(PoolStop::Missing { answered, members }) => {
                return Err(CoordinatorError::NoQuorum {
                    answered,
                    total: members,
                    needed: members,
                    coverage: Box::new(coverage),
                });
            }
            Some(PoolStop::Fault(fault)) => {
                return Err(CoordinatorError::Pool {
                    message: fault.to_string(),
                    coverage: Box::new(coverage),
                });
            }
            None => {}
        }
        let needed = match self.quorum {
            Quorum::All => total,
            Quorum::AtLeast(n) => n,
        };
        if answered_count < needed {
            let refused = coverage
                .trusts
                .iter()
                .filter(|t| t.status == TrustStatus::Refused)
                .count();
            if refused > 0 && answered_count + refused == total {
                return Err(CoordinatorError::Refused {
                    message: format!("{refused} of {total} trusts refused this query"),
                    coverage: Some(Box::new(coverage)),
                });
            }
            return Err(CoordinatorError::NoQuorum {
                answered: answered_count,
                total,
                needed,
                coverage: Box::new(coverage),
            });
        }
        let batches = if caller.preview {
            Vec::new()
        } else {
            merger.merge(&prepared, states).await.inspect_err(|e| {
                tracing::error!(id = %request.request_id, error = ?e, "the merge failed");
            })?
        };
        coverage
            .noise
            .extend(value_intervals(&prepared, &noisy_states, &batches));
        let schema = Arc::new(
            prepared.schema().as_ref().clone().with_metadata(
                [(
                    trustql_protocol::COVERAGE_META_KEY.to_string(),
                    coverage.to_json().map_err(|e| {
                        tracing::error!(error = %e, "could not encode the coverage report");
                        CoordinatorError::Internal(e.to_string())
                    })?,
                )]
                .into(),
            ),
        );
        let batches = batches
            .into_iter()
            .map(|b| b.with_schema(Arc::clone(&schema)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                CoordinatorError::Merge(trustql_merge::MergeError::Engine(
                    "could not label the result".into(),
                ))
            })?;
        tracing::info!(
            id = %request.request_id,
            researcher = %caller.researcher,
            project = %caller.project,
            answered = answered_count,
            total,
            "answered"
        );
        Ok(FederatedAnswer {
            schema,
            batches,
            coverage,
        })
    }

    /// What one request may cost.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Refuses SQL too long, too deep or with too many operators, on its tokens: before the
    /// parser and planner, which recurse over it (thousands of terms overflow the stack).
    fn check_text(&self, sql: &str) -> Result<(), CoordinatorError> {
        check_text(sql, &self.limits.text()).map_err(|r| CoordinatorError::Refused {
            message: r.to_string(),
            coverage: None,
        })
    }

    /// Authenticates a call's metadata. A call refused here is recorded in the audit log
    /// (who, when the token was good, which call, from where), at most
    /// [`REFUSED_CALLS_PER_MINUTE`] a minute so that a flood of bad tokens cannot fill the disk;
    /// the rest are counted in one record when the minute is over.
    pub(crate) async fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        call: &'static str,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Caller, CoordinatorError> {
        let failure = match self.researchers.authenticate(metadata) {
            Ok(caller) => return Ok(caller),
            Err(failure) => failure,
        };
        let (record, skipped) = self.refused_calls.admit(std::time::Instant::now());
        let mut entries = Vec::new();
        if skipped > 0 {
            entries.push(AuditEntry::node_note(
                &now_rfc3339(),
                format!(
                    "{skipped} more refused calls in the minute before were not recorded one by one"
                ),
                "",
            ));
        }
        if record {
            let from =
                peer.map_or_else(|| "an unknown address".to_string(), |p| p.ip().to_string());
            entries.push(AuditEntry {
                researcher: failure.researcher.clone().unwrap_or_default(),
                project: metadata
                    .get(trustql_protocol::PROJECT_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(|p| p.chars().take(64).collect())
                    .unwrap_or_default(),
                decision: Decision::Refused,
                reason: Some(format!(
                    "{call} from {from}: {}",
                    first_line(&failure.error)
                )),
                ..AuditEntry::node_note(&now_rfc3339(), String::new(), "")
            });
        }
        for entry in entries {
            let audit = Arc::clone(&self.audit);
            let recorded = tokio::task::spawn_blocking(move || audit.append(entry)).await;
            if !matches!(recorded, Ok(Ok(_))) {
                tracing::error!(call, "the record of a refused call was not written");
                return Err(CoordinatorError::Internal(
                    "the audit record could not be written".into(),
                ));
            }
        }
        Err(failure.error)
    }
}

/// Most refused calls recorded one by one in a minute.
pub const REFUSED_CALLS_PER_MINUTE: u32 = 60;

/// How many refused calls were recorded in the current minute, and how many were not.
#[derive(Debug)]
struct RefusedCalls(std::sync::Mutex<RefusedWindow>);

#[derive(Debug)]
struct RefusedWindow {
    started: std::time::Instant,
    recorded: u32,
    skipped: u64,
}

impl RefusedCalls {
    fn new(now: std::time::Instant) -> Self {
        RefusedCalls(std::sync::Mutex::new(RefusedWindow {
            started: now,
            recorded: 0,
            skipped: 0,
        }))
    }

    /// Whether to record this refused call, and how many the minute before left unrecorded
    /// (reported once, by the first call of a new minute).
    fn admit(&self, now: std::time::Instant) -> (bool, u64) {
        let mut window = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut skipped = 0;
        if now.duration_since(window.started) >= Duration::from_secs(60) {
            skipped = window.skipped;
            *window = RefusedWindow {
                started: now,
                recorded: 0,
                skipped: 0,
            };
        }
        if window.recorded < REFUSED_CALLS_PER_MINUTE {
            window.recorded += 1;
            (true, skipped)
        } else {
            window.skipped += 1;
            (false, skipped)
        }
    }
}

/// The coordinator's record of one request: who asked what, which trusts answered, what was
/// released (the SQL and the decision, never a value).
fn audit_entry(
    caller: &Caller,
    sql: &str,
    request_id: &str,
    outcome: &Result<FederatedAnswer, CoordinatorError>,
    trusts: Vec<TrustOutcome>,
) -> AuditEntry {
    let (decision, reason, released) = match outcome {
        Ok(answer) => (
            Decision::Answered,
            None,
            answer.batches.iter().map(RecordBatch::num_rows).sum(),
        ),
        Err(
            e @ (CoordinatorError::Refused { .. }
            | CoordinatorError::Forbidden(_)
            | CoordinatorError::BadHeader(_)
            | CoordinatorError::Unauthenticated),
        ) => (Decision::Refused, Some(first_line(e)), 0),
        Err(e) => (Decision::Failed, Some(first_line(e)), 0),
    };
    AuditEntry {
        time: now_rfc3339(),
        request_id: request_id.to_string(),
        researcher: caller.researcher.clone(),
        project: caller.project.clone(),
        sql: sql.to_string(),
        plan_fingerprint: None,
        decision,
        reason,
        released,
        // Each trust's own log holds what it withheld; no count of it reaches the coordinator.
        withheld: Withheld::default(),
        // The coordinator serves no policy of its own; the trusts' records carry theirs.
        policy_hash: String::new(),
        epsilon: None,
        trusts,
        // Each member's own record names its pool.
        pool: Vec::new(),
    }
}

/// An error's first line (a refusal's coverage report follows it, and is in `trusts`).
fn first_line(e: &CoordinatorError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

fn answered(site: &SiteStates) -> TrustCoverage {
    TrustCoverage {
        trust: site.trust.clone(),
        status: TrustStatus::Answered,
        reason: None,
        // Under DP the groups released follow from noisy counts; otherwise the number is exact.
        released: site.meta.dp.as_ref().map(|_| site.meta.released),
        dp: site.meta.dp.clone(),
        allowance: site.meta.allowance,
    }
}

/// If any trust failed after it took the query, marks every trust that took it "asked", with
/// no reason and no figures, and returns how many failed: the failure could depend on the
/// trust's data (an error only the trust holding some row hits, a join only its rows make
/// slow), so naming it, or the trusts that answered, would say which trust holds that row.
fn conceal_incomplete(lines: &mut [(TrustCoverage, Taken)]) -> usize {
    let incomplete = lines.iter().filter(|(_, t)| *t == Taken::While).count();
    if incomplete > 0 {
        for (line, _) in lines
            .iter_mut()
            .filter(|(l, t)| l.status == TrustStatus::Answered || *t == Taken::While)
        {
            line.status = TrustStatus::Asked;
            line.reason = None;
            line.released = None;
            line.dp = None;
            // Present only where the trust answered: it would tell the failed ones apart.
            line.allowance = None;
        }
    }
    incomplete
}

fn not(trust: &str, status: TrustStatus, reason: String) -> TrustCoverage {
    TrustCoverage {
        trust: trust.to_string(),
        status,
        reason: Some(reason),
        released: None,
        dp: None,
        allowance: None,
    }
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, CoordinatorError> {
    std::fs::read(path).map_err(|e| {
        CoordinatorError::Tls(format!("cannot read the {what} {}: {e}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use trustql_protocol::AllowanceLeft;

    use super::*;

    fn answered_line(trust: &str) -> TrustCoverage {
        TrustCoverage {
            allowance: Some(AllowanceLeft {
                today_left: 7,
                total_left: Some(70),
                repeat: false,
            }),
            ..not(trust, TrustStatus::Answered, String::new())
        }
    }

    #[test]
    fn a_failure_mid_query_hides_every_trusts_allowance_left() {
        let failed = not("TQ02", TrustStatus::Failed, "could not be completed".into());
        let mut lines = vec![
            (answered_line("TQ01"), Taken::Before),
            (failed, Taken::While),
            (answered_line("TQ03"), Taken::Before),
        ];
        assert_eq!(conceal_incomplete(&mut lines), 1);
        for (line, _) in &lines {
            assert_eq!(line.status, TrustStatus::Asked);
            assert_eq!(line.allowance, None, "{}", line.trust);
        }
        // Without a failure mid-query the allowance left stays.
        let mut lines = vec![(answered_line("TQ01"), Taken::Before)];
        assert_eq!(conceal_incomplete(&mut lines), 0);
        assert!(lines[0].0.allowance.is_some());
    }

    #[test]
    fn refused_calls_are_recorded_up_to_a_rate_and_the_rest_counted() {
        let start = std::time::Instant::now();
        let calls = RefusedCalls::new(start);
        let admitted = (0..REFUSED_CALLS_PER_MINUTE + 15)
            .filter(|_| calls.admit(start).0)
            .count();
        assert_eq!(admitted, REFUSED_CALLS_PER_MINUTE as usize);
        // Within the minute, nothing is reported as skipped yet.
        assert_eq!(calls.admit(start + Duration::from_secs(59)), (false, 0));
        // The first refused call of the next minute is recorded and reports the 16 skipped.
        assert_eq!(calls.admit(start + Duration::from_secs(61)), (true, 16));
        assert_eq!(calls.admit(start + Duration::from_secs(62)), (true, 0));
    }
}
