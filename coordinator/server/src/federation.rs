//! One federated query: plan, fan out, merge, report coverage.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use rand::TryRngCore;
use tonic::transport::Identity;
use trustql_merge::{Merger, SiteStates};
use trustql_schemas::TrustSchema;
use trustql_wire::{Coverage, SiteRequest, TrustCoverage, TrustStatus, Withheld};

use trustql_policies::{AnswerProtection, TotalsRules};

use crate::auth::{Caller, Researchers};
use crate::config::{CoordinatorConfig, Quorum};
use crate::error::CoordinatorError;
use crate::fanout::{NodeLink, Outcome};
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
    researchers: Researchers,
    totals: TotalsRules,
}

const DISTINCT_NOTE: &str = "COUNT(DISTINCT …) is summed over trusts: a patient treated at two \
     trusts has a local id at each and is counted at both (cross-trust linkage is not done yet).";

impl Coordinator {
    /// Builds the coordinator from its configuration (node channels connect lazily).
    pub fn new(config: &CoordinatorConfig, schema: TrustSchema) -> Result<Self, CoordinatorError> {
        let cert = read(&config.node_client.cert, "client certificate")?;
        let key = read(&config.node_client.key, "client key")?;
        let identity = Identity::from_pem(cert, key);
        let links = config
            .nodes
            .iter()
            .map(|n| NodeLink::new(n, &identity))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Coordinator {
            merger: Merger::new(&schema, config.disclosure)?,
            dp_merger: Merger::new(&schema, TotalsRules::default())?,
            totals: config.disclosure,
            schema,
            links,
            deadline: Duration::from_millis(config.node_deadline_ms),
            quorum: config.quorum,
            researchers: Researchers::new(config.researchers.clone()),
        })
    }

    /// The shared schema.
    pub fn schema(&self) -> &TrustSchema {
        &self.schema
    }

    /// The result schema `sql` would have, or why it can never be answered.
    pub async fn result_schema(&self, sql: &str) -> Result<SchemaRef, CoordinatorError> {
        Ok(self.merger.prepare(sql).await?.schema())
    }

    /// Runs one query for a caller across every trust.
    pub async fn query(
        &self,
        caller: &Caller,
        sql: &str,
    ) -> Result<FederatedAnswer, CoordinatorError> {
        let prepared = self.merger.prepare(sql).await?;
        let request = SiteRequest {
            request_id: request_id(),
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
                    trustql_wire::COVERAGE_META_KEY.to_string(),
                    coverage.to_json(),
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

    /// Authenticates a call's metadata.
    pub(crate) fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Caller, CoordinatorError> {
        self.researchers.authenticate(metadata)
    }
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

/// A random request id (the same at every node, to join the audit logs).
fn request_id() -> String {
    let mut bytes = [0u8; 12];
    let _ = rand::rngs::OsRng.try_fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, CoordinatorError> {
    std::fs::read(path).map_err(|e| {
        CoordinatorError::Tls(format!("cannot read the {what} {}: {e}", path.display()))
    })
}
