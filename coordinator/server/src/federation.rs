//! One federated query: plan, fan out, merge, report coverage.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use tonic::transport::Identity;
use trustql_merge::{Merger, SiteStates};
use trustql_protocol::{Coverage, SiteRequest, TrustCoverage, TrustStatus, Withheld};
use trustql_schemas::TrustSchema;

use trustql_audit::{AuditEntry, AuditLog, Decision, TrustOutcome};
use trustql_policies::{AnswerProtection, TotalsRules, check_text, now_rfc3339};

use crate::auth::{Caller, Researchers};
use crate::config::{CoordinatorConfig, Quorum};
use crate::error::{CoordinatorError, random_hex};
use crate::fanout::{NodeLink, Outcome, load_signer};
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
    schema: TrustSchema,
    links: Vec<NodeLink>,
    deadline: Duration,
    quorum: Quorum,
    limits: Limits,
    researchers: Researchers,
    totals: TotalsRules,
    /// Every researcher request, hash-chained like a node's.
    audit: Arc<AuditLog>,
}

const DISTINCT_NOTE: &str = "COUNT(DISTINCT …) is summed over trusts: a patient treated at two \
     trusts has a local id at each and is counted at both (cross-trust linkage is not done yet).";

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
            .map(|n| NodeLink::new(n, &identity, signer.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let audit = AuditLog::open(&config.audit_dir, &now_rfc3339())
            .map_err(|e| CoordinatorError::Config(format!("the coordinator's audit log: {e}")))?;
        Ok(Coordinator {
            audit: Arc::new(audit),
            merger: Merger::new(&schema, config.disclosure)?,
            dp_merger: Merger::new(&schema, TotalsRules::default())?,
            totals: config.disclosure,
            schema,
            links,
            deadline: Duration::from_millis(config.node_deadline_ms),
            quorum: config.quorum,
            limits: config.limits,
            researchers: Researchers::new(config.researchers.clone()),
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
        let outcome = self.federate(caller, sql, &request_id).await;
        let entry = audit_entry(caller, sql, &request_id, &outcome);
        let audit = self.audit.clone();
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
                Outcome::Answered(site) if site.meta.dp.is_some() => Some(AnswerProtection::Dp),
                Outcome::Answered(_) => Some(AnswerProtection::Sdc),
                Outcome::Not(..) => None,
            }));
        // Without totals rules the two mergers plan alike: no need to plan again.
        let (merger, prepared) = if totals != self.totals && self.totals.is_active() {
            (&self.dp_merger, self.dp_merger.prepare(sql).await?)
        } else {
            (&self.merger, prepared)
        };
        let mut trusts = Vec::with_capacity(outcomes.len());
        let mut states = Vec::new();
        let mut noise = NoiseSum::default();
        let mut noisy_states = Vec::new();
        for (link, outcome) in self.links.iter().zip(outcomes) {
            let line = match outcome {
                Outcome::Answered(site) => match prepared.conform(&site) {
                    Ok(batch) => {
                        if site.meta.dp.is_some() {
                            noisy_states.push((batch.clone(), site.meta.clone()));
                        }
                        states.push(batch);
                        noise.add(&site.meta);
                        answered(&site)
                    }
                    Err(e) => not(link.trust(), TrustStatus::Failed, e.to_string()),
                },
                Outcome::Not(status, reason) => {
                    tracing::warn!(
                        id = %request.request_id,
                        trust = link.trust(),
                        ?status,
                        reason = %reason,
                        "a trust did not answer"
                    );
                    not(link.trust(), status, reason)
                }
            };
            trusts.push(line);
        }
        let answered_count = states.len();
        let total = trusts.len();
        let mut notes = Vec::new();
        if prepared.counts_distinct() {
            notes.push(DISTINCT_NOTE.to_string());
        }
        notes.extend(totals.notes());
        let noise = noise.outputs(prepared.aggregate_outputs());
        if trusts.iter().any(|t| t.dp.is_some()) {
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
                .filter(|t| t.status != TrustStatus::Answered)
                .map(|t| t.trust.as_str())
                .collect();
            notes.push(format!(
                "the result leaves out {}: it covers only the trusts that answered",
                missing.join(", ")
            ));
        }
        let mut coverage = Coverage {
            request_id: request.request_id.clone(),
            complete: answered_count == total,
            trusts,
            notes,
            noise,
        };
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
            .map(|b| b.with_schema(schema.clone()))
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

    /// Authenticates a call's metadata.
    pub(crate) fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Caller, CoordinatorError> {
        self.researchers.authenticate(metadata)
    }
}

/// The coordinator's record of one request: who asked what, which trusts answered, what was
/// released (the SQL and the decision, never a value).
fn audit_entry(
    caller: &Caller,
    sql: &str,
    request_id: &str,
    outcome: &Result<FederatedAnswer, CoordinatorError>,
) -> AuditEntry {
    let coverage = match outcome {
        Ok(answer) => Some(&answer.coverage),
        Err(CoordinatorError::Refused { coverage, .. }) => coverage.as_deref(),
        Err(CoordinatorError::NoQuorum { coverage, .. }) => Some(coverage.as_ref()),
        Err(_) => None,
    };
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
    let mut withheld = Withheld::default();
    let mut trusts = Vec::new();
    for t in coverage.map(|c| c.trusts.as_slice()).unwrap_or_default() {
        withheld.small += t.withheld.small;
        withheld.dominated += t.withheld.dominated;
        withheld.whole_margin += t.withheld.whole_margin;
        withheld.margin_of_withheld += t.withheld.margin_of_withheld;
        trusts.push(TrustOutcome {
            trust: t.trust.clone(),
            status: t.status,
        });
    }
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
        withheld,
        // The coordinator serves no policy of its own; the trusts' records carry theirs.
        policy_hash: String::new(),
        epsilon: None,
        trusts,
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
        released: site.meta.released,
        withheld: site.meta.withheld.clone(),
        dp: site.meta.dp.clone(),
    }
}

fn not(trust: &str, status: TrustStatus, reason: String) -> TrustCoverage {
    TrustCoverage {
        trust: trust.to_string(),
        status,
        reason: Some(reason),
        released: 0,
        withheld: Withheld::default(),
        dp: None,
    }
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, CoordinatorError> {
    std::fs::read(path).map_err(|e| {
        CoordinatorError::Tls(format!("cannot read the {what} {}: {e}", path.display()))
    })
}
