//! What a node's partial answer holds, column by column, and what each column is for the
//! release rules.

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use trustql_protocol::{AnswerColumn, ColumnKind};

use crate::contribution::MOMENT_AGGREGATES;

/// Where a column of the partial answer comes from, as the node planned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A GROUP BY key (null where a grouping set rolls it up).
    Key,
    /// DataFusion's grouping id: bit `n-1-i` set when key `i` is rolled up.
    GroupingId,
    /// The node's own count of distinct patients in the group.
    Patients,
    /// The node's count of the group's patients one aggregate reads (those with a value for
    /// its argument): decides that aggregate's threshold and never leaves the trust.
    AggregatePatients,
    /// The cell key (the sum of the record keys, mod 1) of the patients a patient count
    /// counted: the group's (no aggregate) or those one aggregate reads. Decides the cell-key
    /// method's adjustments and never leaves the trust.
    CellKey,
    /// A researcher's COUNT(DISTINCT …), finished into a count at the node.
    DistinctCount,
    /// One state column of an aggregate's accumulator.
    State,
}

/// One column of a partial answer: where it comes from and which aggregate state it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateColumn {
    /// The column's name in the answer.
    pub name: String,
    /// Where it comes from.
    pub source: Source,
    /// The query's aggregate it belongs to (its index among the aggregate expressions).
    pub aggregate: Option<usize>,
    /// That aggregate's function, lower case (`count`, `sum`, `avg`, `var` …).
    pub function: String,
    /// The accumulator state it holds (`count`, `sum`, `mean`, `m2` …; empty for keys).
    pub state: String,
}

/// What a column is to the release rules: decided here, from the function and the state,
/// never by the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A GROUP BY key.
    Key,
    /// The grouping id of ROLLUP, CUBE or GROUPING SETS.
    GroupingId,
    /// Distinct patients in the group.
    Patients,
    /// Distinct patients one aggregate reads; used by the thresholds, never released.
    AggregatePatients,
    /// The cell key of the group's patients, or of the patients one aggregate reads; used by
    /// the cell-key method, never released.
    CellKey,
    /// A released frequency: COUNT's count, a COUNT(DISTINCT), and AVG's count, which
    /// SUM / AVG would otherwise give exactly beside a rounded COUNT.
    Count,
    /// A sum of values (SUM's, AVG's): dominance applies.
    Sum,
    /// One of the (n, mean, m2) moments of VAR or STDDEV.
    Moment(Moment),
    /// One state of a binned aggregate: a survival aggregate's interval counts (`km_curve`,
    /// `survival_at`) or a percentile's bin counts (`median`, `percentile_cont`, …).
    Curve(Curve),
    /// Any other state (MIN, MAX).
    Other,
}

/// The states of a survival aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    /// Rows counted.
    N,
    /// Events per interval.
    Events,
    /// Censorings per interval.
    Censored,
    /// Rows per bin of a percentile's histogram (whose rows counted are [`Curve::N`]).
    Bins,
    /// The arm a log-rank state counts: the value of a key the node added, released with
    /// its row as any key is.
    Arm,
}

/// The states of DataFusion's variance accumulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// The number of values.
    Count,
    /// Their mean.
    Mean,
    /// The sum of squared deviations from the mean.
    M2,
}

impl StateColumn {
    /// A GROUP BY key.
    pub fn key(name: impl Into<String>) -> Self {
        Self::plain(name, Source::Key)
    }

    /// The grouping id.
    pub fn grouping_id(name: impl Into<String>) -> Self {
        Self::plain(name, Source::GroupingId)
    }

    /// The node's distinct-patient count.
    pub fn patients(name: impl Into<String>) -> Self {
        Self::plain(name, Source::Patients)
    }

    /// The patients aggregate `aggregate` reads.
    pub fn aggregate_patients(name: impl Into<String>, aggregate: usize) -> Self {
        StateColumn {
            aggregate: Some(aggregate),
            ..Self::plain(name, Source::AggregatePatients)
        }
    }

    /// The cell key of the patients the count `of` counted: the group's (`None`) or those
    /// aggregate `of` reads.
    pub fn cell_key(name: impl Into<String>, of: Option<usize>) -> Self {
        StateColumn {
            aggregate: of,
            ..Self::plain(name, Source::CellKey)
        }
    }

    /// A researcher's COUNT(DISTINCT …) of aggregate `aggregate`, as a count.
    pub fn distinct(name: impl Into<String>, aggregate: usize) -> Self {
        StateColumn {
            name: name.into(),
            source: Source::DistinctCount,
            aggregate: Some(aggregate),
            function: "count".into(),
            state: "count".into(),
        }
    }

    /// State `state` of aggregate `aggregate`, a call of `function`.
    pub fn state(
        name: impl Into<String>,
        aggregate: usize,
        function: impl Into<String>,
        state: impl Into<String>,
    ) -> Self {
        StateColumn {
            name: name.into(),
            source: Source::State,
            aggregate: Some(aggregate),
            function: function.into().to_lowercase(),
            state: state.into(),
        }
    }

    fn plain(name: impl Into<String>, source: Source) -> Self {
        StateColumn {
            name: name.into(),
            source,
            aggregate: None,
            function: String::new(),
            state: String::new(),
        }
    }

    /// How the column is described on the wire.
    pub fn wire(&self) -> AnswerColumn {
        AnswerColumn {
            name: self.name.clone(),
            kind: match self.source {
                Source::Key => ColumnKind::Key,
                Source::GroupingId => ColumnKind::GroupingId,
                // Per-aggregate counts and cell keys never leave (the release drops them).
                Source::Patients | Source::AggregatePatients | Source::CellKey => {
                    ColumnKind::Patients
                }
                Source::DistinctCount => ColumnKind::DistinctCount,
                Source::State => ColumnKind::State,
            },
            aggregate: self.aggregate,
        }
    }

    /// Whether it stays at the trust whatever the release: the thresholds' and the cell-key
    /// method's inputs.
    pub fn stays(&self) -> bool {
        matches!(self.source, Source::AggregatePatients | Source::CellKey)
    }

    /// Whether its aggregate is VAR or STDDEV, whose states are moments.
    pub fn is_moment_aggregate(&self) -> bool {
        MOMENT_AGGREGATES.contains(&self.function.as_str())
    }

    /// What it is to the release rules. Every count a state carries is a frequency, whichever
    /// aggregate carries it: AVG's count (the mean of an SDC answer divides by the rounded
    /// count, the price of not releasing the exact one) and VAR's n (a moment, rounded too).
    pub fn role(&self) -> Role {
        match self.source {
            Source::Key => Role::Key,
            Source::GroupingId => Role::GroupingId,
            Source::Patients => Role::Patients,
            Source::AggregatePatients => Role::AggregatePatients,
            Source::CellKey => Role::CellKey,
            Source::DistinctCount => Role::Count,
            Source::State if self.is_moment_aggregate() => match self.state.as_str() {
                "count" => Role::Moment(Moment::Count),
                "mean" => Role::Moment(Moment::Mean),
                "m2" => Role::Moment(Moment::M2),
                _ => Role::Other,
            },
            Source::State if trustql_survival::is_survival(&self.function) => {
                match self.state.as_str() {
                    trustql_survival::STATE_N => Role::Curve(Curve::N),
                    trustql_survival::STATE_EVENTS => Role::Curve(Curve::Events),
                    trustql_survival::STATE_CENSORED => Role::Curve(Curve::Censored),
                    trustql_survival::STATE_ARM => Role::Curve(Curve::Arm),
                    _ => Role::Other,
                }
            }
            Source::State if trustql_distribution::is_percentile(&self.function) => {
                match self.state.as_str() {
                    trustql_distribution::STATE_N => Role::Curve(Curve::N),
                    trustql_distribution::STATE_BINS => Role::Curve(Curve::Bins),
                    _ => Role::Other,
                }
            }
            Source::State => match (self.function.as_str(), self.state.as_str()) {
                ("count" | "avg", "count") => Role::Count,
                ("sum" | "avg", "sum") => Role::Sum,
                _ => Role::Other,
            },
        }
    }
}

/// One trust's partial answer before release: one row per group, each column described.
#[derive(Debug, Clone)]
pub struct PartialAnswer {
    /// The states, as DataFusion's reduced partial aggregation produced them.
    pub batch: RecordBatch,
    /// One description per column of `batch`.
    pub columns: Vec<StateColumn>,
    /// Per-patient contributions to sums, when the release needs them (see
    /// [`crate::SdcNeeds::contributions`]); used inside the release, never released.
    pub contributions: Option<Contributions>,
}

/// Each patient's contribution to each sum, per group: the group keys (in the answer's key
/// order), then the patient key, then one column per aggregate in `aggregates`.
#[derive(Debug, Clone)]
pub struct Contributions {
    /// The rows, one per (group, patient).
    pub batch: RecordBatch,
    /// The aggregates summed, in column order after the patient key.
    pub aggregates: Vec<usize>,
}
