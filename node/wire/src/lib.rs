//! The messages that cross the wire between the coordinator and a node, in one place.
//!
//! A site request travels as the Flight `Ticket` of a `DoGet` (JSON); the answer is an Arrow
//! stream whose schema metadata carries [`AnswerMeta`] under [`ANSWER_META_KEY`].

use serde::{Deserialize, Serialize};

/// Schema-metadata key holding the JSON [`AnswerMeta`] of a site answer.
pub const ANSWER_META_KEY: &str = "trustql.answer";

/// Name of the per-group distinct-patient count column in a site answer.
pub const PATIENTS_COLUMN: &str = "__trustql_patients";

/// One researcher query, as the coordinator sends it to every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteRequest {
    /// Identifier of the request (the same at every node).
    pub request_id: String,
    /// The authenticated researcher.
    pub researcher: String,
    /// The project the query is made for.
    pub project: String,
    /// The SQL text.
    pub sql: String,
}

impl SiteRequest {
    /// Encodes the request as a Flight ticket.
    pub fn to_ticket(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a Flight ticket.
    pub fn from_ticket(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a TrustQL site request: {e}"))
    }
}

/// What a column of a site answer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnKind {
    /// A GROUP BY key.
    Key,
    /// DataFusion's grouping id (ROLLUP / CUBE / GROUPING SETS).
    GroupingId,
    /// Distinct patients in the group at this trust.
    Patients,
    /// A partial aggregate state as DataFusion's accumulator defines it.
    State,
    /// A COUNT(DISTINCT …) finished at the node: a count, to be summed across trusts.
    DistinctCount,
}

/// One column of a site answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerColumn {
    /// Column name in the stream.
    pub name: String,
    /// What it holds.
    pub kind: ColumnKind,
    /// For states: the index of the aggregate expression it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<usize>,
}

/// Groups withheld by disclosure control, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withheld {
    /// Fewer distinct patients than the minimum.
    pub small: usize,
    /// A sum dominated by its largest contributions.
    pub dominated: usize,
    /// A group holding every patient of its margin.
    pub whole_margin: usize,
    /// Subtotals and totals of withheld groups.
    pub margin_of_withheld: usize,
}

/// The metadata of a site answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerMeta {
    /// The answering trust.
    pub trust: String,
    /// The request answered.
    pub request_id: String,
    /// Version label of the policy applied.
    pub policy_version: String,
    /// SHA-256 of the policy applied.
    pub policy_hash: String,
    /// Groups released.
    pub released: usize,
    /// Groups withheld, by reason.
    pub withheld: Withheld,
    /// The columns of the stream.
    pub columns: Vec<AnswerColumn>,
}

impl AnswerMeta {
    /// JSON for the schema metadata.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses the schema metadata value.
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("malformed answer metadata: {e}"))
    }
}

/// Schema-metadata key (and FlightInfo app_metadata) holding the JSON [`Coverage`] of a
/// federated answer.
pub const COVERAGE_META_KEY: &str = "trustql.coverage";

/// What became of a query at one trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustStatus {
    /// The trust answered; its groups are in the result.
    Answered,
    /// The trust's policy refused the query.
    Refused,
    /// The trust did not answer within the deadline.
    TimedOut,
    /// The trust could not be reached (down, or TLS failed).
    Unreachable,
    /// The trust accepted the query but could not complete it, or answered garbage.
    Failed,
}

/// One trust's line in the coverage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustCoverage {
    /// The trust code.
    pub trust: String,
    /// What happened.
    pub status: TrustStatus,
    /// Why, when not answered (the node's own words where it gave them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Groups the trust released.
    pub released: usize,
    /// Groups the trust withheld, by reason.
    pub withheld: Withheld,
}

/// Which trusts contributed to a federated answer, and what the numbers mean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// The request id every node logged.
    pub request_id: String,
    /// One line per trust.
    pub trusts: Vec<TrustCoverage>,
    /// Whether every trust answered.
    pub complete: bool,
    /// Notes on reading the result.
    pub notes: Vec<String>,
}

impl Coverage {
    /// JSON for metadata.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses coverage JSON.
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("malformed coverage report: {e}"))
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let answered = self
            .trusts
            .iter()
            .filter(|t| t.status == TrustStatus::Answered)
            .count();
        writeln!(
            f,
            "Coverage: {answered} of {} trusts answered (request {})",
            self.trusts.len(),
            self.request_id
        )?;
        for t in &self.trusts {
            let status = match t.status {
                TrustStatus::Answered => "answered",
                TrustStatus::Refused => "refused",
                TrustStatus::TimedOut => "timed out",
                TrustStatus::Unreachable => "unreachable",
                TrustStatus::Failed => "failed",
            };
            let w = &t.withheld;
            let withheld = w.small + w.dominated + w.whole_margin + w.margin_of_withheld;
            write!(f, "  {:<6} {status:<11}", t.trust)?;
            if t.status == TrustStatus::Answered {
                write!(f, " {} group(s) released, {withheld} withheld", t.released)?;
                if withheld > 0 {
                    write!(
                        f,
                        " ({} small, {} dominated, {} whole-margin, {} margins of withheld cells)",
                        w.small, w.dominated, w.whole_margin, w.margin_of_withheld
                    )?;
                }
            }
            if let Some(reason) = &t.reason {
                write!(f, " — {reason}")?;
            }
            writeln!(f)?;
        }
        for note in &self.notes {
            writeln!(f, "Note: {note}")?;
        }
        Ok(())
    }
}
