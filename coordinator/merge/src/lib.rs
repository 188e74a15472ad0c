//! The coordinator's half of two-phase aggregation.
//!
//! The coordinator has the schema, never the data. It plans a researcher's SQL against empty
//! tables of the shared schema with the same locked session the nodes use, so its `Partial`
//! aggregate has the same state columns a node ships. [`Merger::merge`] replaces that
//! `Partial` with the nodes' protected states and runs the rest of the plan — DataFusion's own
//! `Final` aggregation, then HAVING, ORDER BY and LIMIT — so AVG, VAR and STDDEV are exact.
//! A COUNT(DISTINCT …) arrives from each node as a count and is merged as a sum.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

mod error;
mod merger;

pub use error::MergeError;
pub use merger::{AggregateOutput, Merger, Prepared, SiteStates};
pub use trustql_policies::TotalsRules;
