//! Survival over a public grid of time intervals.
//!
//! Every row adds one to its interval's events or censorings (or only to the total, past the
//! horizon): counts that add up across trusts. So `km_curve` and `survival_at` are ordinary
//! two-phase aggregates whose states are the total and two vectors of interval counts; a node
//! sends them (protected), the coordinator sums them and finishes the Kaplan–Meier estimate.
//! No event time and no value list ever leaves a node.
//!
//! The grid convention: interval k (from 1) covers durations (w·(k−1), w·k] of
//! `end_date − start_date` in days; a duration of 0 or less counts in the first interval;
//! events and censorings in an interval count at its end, deaths before censorings (as
//! Kaplan–Meier treats ties).

mod estimate;
mod grid;
mod logrank;
mod udaf;

pub use estimate::{Counts, Step, curve, survival};
pub use grid::{DEFAULT_HORIZON_DAYS, DEFAULT_INTERVAL_DAYS, Grid, GridError, MAX_INTERVALS};
pub use logrank::{LogRank, chi_square_survival, logrank};
pub use udaf::{
    KM_CURVE, LOGRANK, STATE_ARM, STATE_CENSORED, STATE_EVENTS, STATE_N, SURVIVAL_AT,
    data_arguments, functions, grid_of,
};

/// Whether `name` (lower case) is one of the survival aggregates (`logrank` among them: its
/// states are one arm's interval counts).
pub fn is_survival(name: &str) -> bool {
    name == KM_CURVE || name == SURVIVAL_AT || name == LOGRANK
}
