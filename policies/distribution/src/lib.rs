//! Percentiles over a public grid of value bins.
//!
//! A column with public bounds and a bin width (both in the schema) has a grid every trust
//! shares. Each row adds one to its value's bin: counts that add up across trusts. So
//! `median`, `percentile_cont` and `approx_percentile_cont` are ordinary two-phase aggregates
//! whose states are the rows counted and a vector of bin counts; a node sends them
//! (protected), the coordinator sums them and reads the percentile off the histogram. No value
//! list ever leaves a node.
//!
//! The estimate: the rows of a bin are spread evenly across it (for a whole-number column,
//! across the whole numbers it holds), and the percentile interpolates between order
//! statistics as `percentile_cont` does, so it is within one bin width of the exact value,
//! and exact for a whole-number column whose bins are one wide.

mod grid;
mod udaf;

pub use grid::{BinGrid, GridError, MAX_BINS};
pub use udaf::{
    APPROX_PERCENTILE_CONT, Grids, MEDIAN, PERCENTILE_CONT, STATE_BINS, STATE_N, functions,
};

/// Whether `name` (lower case) is one of the histogram aggregates.
pub fn is_percentile(name: &str) -> bool {
    name == MEDIAN || name == PERCENTILE_CONT || name == APPROX_PERCENTILE_CONT
}
