//! The messages that cross the wire between the coordinator and a node, in one place.
//!
//! A site request travels as the Flight `Ticket` of a `DoGet` (JSON); the answer is an Arrow
//! stream whose schema metadata carries [`AnswerMeta`] under [`ANSWER_META_KEY`]. The ticket
//! is signed by the coordinator ([`RequestSigner`]), and a node opens it only with the keys
//! it was configured with ([`RequestVerifier`]).

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

mod signed;

use serde::{Deserialize, Serialize};

pub use signed::{ProtocolError, RequestSigner, RequestVerifier, SignedRequest, VerifyingKey};

/// gRPC header of a researcher's call naming the project.
pub const PROJECT_HEADER: &str = "x-trustql-project";

/// gRPC header where a researcher asks for a smaller ε than the project's default.
pub const EPSILON_HEADER: &str = "x-trustql-epsilon";

/// gRPC header asking only what a query would cost (`true`), running and spending nothing.
pub const PREVIEW_HEADER: &str = "x-trustql-preview";

/// Schema-metadata key holding the JSON [`AnswerMeta`] of a site answer.
pub const ANSWER_META_KEY: &str = "trustql.answer";

/// Name of the per-group distinct-patient count column in a site answer.
pub const PATIENTS_COLUMN: &str = "__trustql_patients";

/// Name of the single column of a pooled answer: the member's masked words.
pub const MASKED_COLUMN: &str = "__trustql_masked";

/// One researcher query, as the coordinator sends it to every node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// For a project in differential-privacy mode: the ε to spend, if less than the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Only say what the query would cost and how noisy it would be; run and spend nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preview: bool,
}

impl SiteRequest {
    /// Encodes the request as JSON: unsigned, which a node refuses (see [`RequestSigner`]).
    pub fn to_ticket(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Decodes the JSON of an unsigned request.
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
    /// A pooled member's masked words ([`MASKED_COLUMN`]): meaningless until every member's
    /// are added.
    Masked,
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

/// Groups withheld by disclosure control, by reason. Exact and data-dependent, so it stays at the
/// trust (its audit log): it never travels in an answer's metadata.
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

/// Laplace noise on one column of a site answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ColumnNoise {
    /// Index of the column in the answer.
    pub column: usize,
    /// The Laplace scale b (standard deviation b·√2).
    pub scale: f64,
    /// For the mean and m2 of a VAR/STDDEV state: the centre c its noisy moments Σ(x−c) and
    /// Σ(x−c)² were taken about (the scale is theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub centre: Option<f64>,
}

/// What a differentially private answer cost and how noisy it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DpMeta {
    /// ε charged to the project by this answer (0 for a repeat or a preview).
    pub epsilon_charged: f64,
    /// δ charged by this answer.
    pub delta_charged: f64,
    /// ε the query costs (or cost, when first answered).
    pub epsilon_cost: f64,
    /// δ the query costs.
    pub delta_cost: f64,
    /// ε the project has left at this trust.
    pub epsilon_remaining: f64,
    /// δ the project has left at this trust.
    pub delta_remaining: f64,
    /// The answer repeats an earlier release of the same query, at no cost.
    pub repeat: bool,
    /// Nothing ran: a preview of cost and noise.
    pub preview: bool,
    /// Rows one patient can bring to the aggregate.
    pub max_rows_per_patient: u64,
    /// The noisy patient count a group needed to be released (keys without a public code set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<i64>,
    /// Noise per noisy column.
    pub noise: Vec<ColumnNoise>,
}

/// The metadata of a site answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerMeta {
    /// The answering trust.
    pub trust: String,
    /// The request answered.
    pub request_id: String,
    /// Version label of the policy applied.
    pub policy_version: String,
    /// SHA-256 of the policy applied.
    pub policy_hash: String,
    /// Groups released (the rows of the stream; nothing about groups not released travels);
    /// for a pooled answer, its masked words.
    pub released: usize,
    /// The columns of the stream.
    pub columns: Vec<AnswerColumn>,
    /// For a differentially private answer: its cost and noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<DpMeta>,
    /// For a project with a query allowance (suppression and rounding): what is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowance: Option<AllowanceLeft>,
    /// For an answer perturbed by the cell-key method: the public tables it used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_key: Option<CellKeyMeta>,
    /// For a pooled project: what every member must agree on before the words are added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PooledMeta>,
}

/// What a pooled answer says about its pool. The texts are compared, byte for byte, across
/// members: their hashes are bound into the masks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PooledMeta {
    /// The pool's members, sorted, as this trust's policy lists them.
    pub members: Vec<String>,
    /// The pooled protection parameters (JSON, as `policies` writes them).
    pub parameters: String,
    /// The cell layout (JSON).
    pub layout: String,
}

/// The cell-key method's public parameters, as `[disclosure.cell_key]` of the trust's policy
/// sets them: what a researcher needs to know how far a number may have moved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CellKeyMeta {
    /// No count moved by more than this (D of the count table).
    pub count_max_adjustment: u32,
    /// The count adjustments' variance (V).
    pub count_variance: f64,
    /// No sum moved by more than this many steps (D of the magnitude table).
    pub sum_max_steps: u32,
    /// The steps' variance.
    pub sum_step_variance: f64,
    /// One step, as a fraction of the cell's largest contribution.
    pub sum_step_scale: f64,
}

/// A project's query allowance left at a trust once this query was counted. It counts
/// queries, not data, so it may be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowanceLeft {
    /// Queries left today (resets at 00:00 UTC).
    pub today_left: u64,
    /// Queries left in total; none without a total limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_left: Option<u64>,
    /// This answer repeated one already counted today, so it was not counted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repeat: bool,
}

impl AnswerMeta {
    /// JSON for the schema metadata.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// Parses the schema metadata value.
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("malformed answer metadata: {e}"))
    }
}

/// gRPC metadata key a node sets on its `resource_exhausted` status when it refused a request
/// at admission (too many queries running), before looking at any data; a node that runs out
/// of memory while running a query uses the same code without it.
pub const BUSY_HEADER: &str = "x-trustql-busy";

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
    /// The trust was asked; whether it completed is not said. Used for every such trust when
    /// at least one of them failed or timed out ([`Coverage::incomplete`]): a failure after a
    /// trust took a query could depend on its data, so naming the trust would tell where a
    /// patient is.
    Asked,
}

/// One trust's line in the coverage report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrustCoverage {
    /// The trust code.
    pub trust: String,
    /// What happened.
    pub status: TrustStatus,
    /// Why, when not answered (the node's own words where it gave them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Groups the trust released, for a differentially private answer only (its count comes
    /// from noisy counts; under suppression and rounding the number of a trust's groups that
    /// pass the minimum is an exact data-dependent count, and is not reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<usize>,
    /// For a differentially private answer: its cost and noise at this trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<DpMeta>,
    /// The project's query allowance left at this trust (suppression and rounding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowance: Option<AllowanceLeft>,
}

/// The noise in one column of a federated answer, from every trust's noise together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputNoise {
    /// The result column.
    pub column: String,
    /// Standard deviation of the noise in each value (a COUNT or SUM: the same for every row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sd: Option<f64>,
    /// Half-width of a 95% interval around each value (±), when the same for every row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci95: Option<f64>,
    /// Half-width of a 95% interval per row, in result order, when it differs by row (a mean:
    /// noisy sum over noisy count, by the delta method); null where it cannot be told.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ci95_by_row: Vec<Option<f64>>,
}

impl OutputNoise {
    /// The ± of row `row` (0-based, in result order), if known.
    pub fn ci95_at(&self, row: usize) -> Option<f64> {
        if self.ci95_by_row.is_empty() {
            self.ci95
        } else {
            self.ci95_by_row.get(row).copied().flatten()
        }
    }
}

/// Which trusts contributed to a federated answer, and what the numbers mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// The request id every node logged.
    pub request_id: String,
    /// One line per trust.
    pub trusts: Vec<TrustCoverage>,
    /// Whether every trust answered.
    pub complete: bool,
    /// Trusts that were asked and failed or timed out; their lines (and those of the trusts
    /// that answered) say [`TrustStatus::Asked`], so which ones is not told.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incomplete: usize,
    /// Notes on reading the result.
    pub notes: Vec<String>,
    /// Noise in each noisy result column (differential privacy), by column.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub noise: Vec<OutputNoise>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Coverage {
    /// JSON for metadata.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// Parses coverage JSON.
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("malformed coverage report: {e}"))
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        let answered = self
            .trusts
            .iter()
            .filter(|t| t.status == TrustStatus::Answered)
            .count();
        let asked = self
            .trusts
            .iter()
            .filter(|t| t.status == TrustStatus::Asked)
            .count();
        writeln!(
            f,
            "Coverage: {} of {} trusts answered (request {})",
            answered + asked.saturating_sub(self.incomplete),
            self.trusts.len(),
            self.request_id
        )?;
        if self.incomplete > 0 {
            writeln!(
                f,
                "  {} of the {asked} trusts marked \"asked\" did not complete the query; which \
                 ones is not said, as a failure after a trust took a query could depend on its data",
                self.incomplete
            )?;
        }
        for t in &self.trusts {
            let status = match t.status {
                TrustStatus::Answered => "answered",
                TrustStatus::Refused => "refused",
                TrustStatus::TimedOut => "timed out",
                TrustStatus::Unreachable => "unreachable",
                TrustStatus::Failed => "failed",
                TrustStatus::Asked => "asked",
            };
            // One line, without the padding when nothing follows the status.
            let mut line = String::new();
            write!(line, "  {:<6} {status:<11}", t.trust)?;
            if let Some(released) = t.released {
                write!(line, " {released} group(s) released")?;
            }
            if let Some(dp) = &t.dp {
                if dp.preview {
                    write!(line, "; would spend ε {}", dp.epsilon_cost)?;
                } else if dp.repeat {
                    write!(line, "; a repeat, no ε spent")?;
                } else {
                    write!(line, "; spent ε {}", dp.epsilon_charged)?;
                }
                if dp.delta_cost > 0.0 && !dp.repeat {
                    write!(line, " and δ {:e}", dp.delta_cost)?;
                }
                write!(line, ", ε {:.4} left", dp.epsilon_remaining)?;
            }
            if let Some(a) = &t.allowance {
                let sep = if t.dp.is_some() || t.released.is_some() {
                    "; "
                } else {
                    " "
                };
                write!(line, "{sep}{} queries left today", a.today_left)?;
                if let Some(total) = a.total_left {
                    write!(line, ", {total} in total")?;
                }
                if a.repeat {
                    write!(line, " (a repeat, not counted)")?;
                }
            }
            if let Some(reason) = &t.reason {
                write!(line, " — {reason}")?;
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        for n in &self.noise {
            match (n.ci95, n.sd) {
                (Some(ci), Some(sd)) => writeln!(
                    f,
                    "Noise: {} ± {} (95% interval; standard deviation {})",
                    n.column,
                    significant(ci),
                    significant(sd)
                )?,
                _ => writeln!(
                    f,
                    "Noise: {} has a 95% interval per value (noisy sum over noisy count)",
                    n.column
                )?,
            }
        }
        for note in &self.notes {
            writeln!(f, "Note: {note}")?;
        }
        Ok(())
    }
}

/// A noise figure to three significant digits.
fn significant(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let digits = (2 - x.abs().log10().floor() as i32).max(0) as usize;
    format!("{x:.digits$}")
}
