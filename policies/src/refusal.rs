//! Why a query was refused: a stable rule name and words a researcher can act on.
//!
//! Refusal messages name tables, columns, functions and rules, never a data value.

use std::fmt;

/// The rule a refused query broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// The project is unknown here, expired, or the researcher is not on it.
    Project,
    /// A table the project may not read, or one the schema does not have.
    Table,
    /// DDL, DML, COPY, SET, EXPLAIN, CREATE EXTERNAL TABLE and other statements.
    Statement,
    /// The query does not end in one aggregation.
    NotAggregate,
    /// Aggregation inside aggregation, DISTINCT or a window below the aggregate.
    Nested,
    /// A function outside the allow-list.
    Function,
    /// An aggregate the policy does not allow, or one used in a way that ships row values.
    Aggregate,
    /// A direct identifier used other than to join on a key or be counted.
    Identifier,
    /// A quasi-identifier or clinical column used as its class forbids.
    ColumnClass,
    /// A join that is not on the patient key (or another declared key).
    Join,
    /// A join without any key equality (a cross join).
    CrossJoin,
    /// More joins than the policy allows.
    TooManyJoins,
    /// Subqueries in expressions.
    Subquery,
    /// Recursive queries.
    Recursion,
    /// An IN list longer than the policy allows.
    InList,
    /// SQL text longer than the policy allows.
    QueryLength,
    /// SQL nested deeper, or with more operators, than the policy allows (checked before
    /// parsing).
    QueryComplexity,
    /// More groups than the policy allows.
    TooManyGroups,
    /// An expression that fails on some rows, so its success would reveal them.
    ErrorOracle,
    /// SQL that does not parse or plan.
    Invalid,
    /// A construct TrustQL does not support.
    Unsupported,
    /// The project's privacy budget at this trust cannot pay for the query.
    Budget,
    /// An SDC project's query that is not table-builder SQL (DP mode answers it).
    TableBuilder,
    /// COUNT(DISTINCT …) of anything but the patient key: per-trust distinct counts do not
    /// add up to the distinct count over all trusts.
    DistinctCount,
    /// An SDC project has used its query allowance at this trust (per day or in total).
    QueryAllowance,
    /// A pooled project's query that pooled mode cannot answer (a key without a public code
    /// set, an aggregate that does not add up under masks).
    Pool,
    /// A survival aggregate whose grid the policy does not allow (intervals narrower than its
    /// minimum, arguments that are not constants), or a mode that cannot release one yet.
    Survival,
    /// A percentile the release cannot protect (DISTINCT, FILTER, a fraction that is not a
    /// constant from 0 to 1), or a mode without noisy histograms yet.
    Percentile,
}

impl Rule {
    /// Stable kebab-case name (used in answers and the audit log).
    pub fn name(self) -> &'static str {
        match self {
            Rule::Project => "project",
            Rule::Table => "table",
            Rule::Statement => "statement",
            Rule::NotAggregate => "aggregate-only",
            Rule::Nested => "nested-aggregation",
            Rule::Function => "function",
            Rule::Aggregate => "aggregate-function",
            Rule::Identifier => "identifier",
            Rule::ColumnClass => "column-class",
            Rule::Join => "join-key",
            Rule::CrossJoin => "cross-join",
            Rule::TooManyJoins => "join-count",
            Rule::Subquery => "subquery",
            Rule::Recursion => "recursion",
            Rule::InList => "in-list",
            Rule::QueryLength => "query-length",
            Rule::QueryComplexity => "query-complexity",
            Rule::TooManyGroups => "group-count",
            Rule::ErrorOracle => "error-oracle",
            Rule::Invalid => "invalid-sql",
            Rule::Unsupported => "unsupported",
            Rule::Budget => "privacy-budget",
            Rule::TableBuilder => "table-builder",
            Rule::QueryAllowance => "query-allowance",
            Rule::DistinctCount => "count-distinct",
            Rule::Pool => "pool",
            Rule::Survival => "survival",
            Rule::Percentile => "percentile",
        }
    }
}

/// A refused query: the rule and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The rule broken.
    pub rule: Rule,
    /// What was wrong and what to do instead.
    pub reason: String,
}

impl Refusal {
    /// A refusal under `rule`.
    pub fn new(rule: Rule, reason: impl Into<String>) -> Self {
        Refusal {
            rule,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused ({}): {}", self.rule.name(), self.reason)
    }
}

impl std::error::Error for Refusal {}
