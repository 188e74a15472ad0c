//! Survival curves at the node: each stratum's cumulative events and censorings rounded to
//! the midpoint of their band (OpenSAFELY's `roundmid_any`), never an interval suppressed.
//!
//! Rounding the cumulative counts rather than each interval's keeps the released curve
//! monotone and its at-risk counts consistent, and a patient added or removed moves a
//! cumulative count by one, which changes its rounded value only where it crosses a band's
//! edge: differencing two curves tells that the patient left at or before the first interval
//! where they differ, not at which. A cumulative count below `least_cumulative` (3) is released as
//! 0, so an event that only one or two patients have shows nowhere.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray, RecordBatch, UInt64Array};
use arrow::datatypes::UInt64Type;

use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Aggregate, Expr};
use datafusion::scalar::ScalarValue;

use super::sdc::internal;
use super::{Curve, ReleaseError, Role, StateColumn};
use crate::policy::Policy;
use crate::refusal::{Refusal, Rule};

/// Refuses a survival aggregate the policy does not allow: a grid that is not constant or
/// too fine, DISTINCT or FILTER, or a mode that cannot release curves yet.
pub(super) fn check_calls(policy: &Policy, aggregate: &Aggregate, dp: bool) -> Result<(), Refusal> {
    let refuse = |why: String| Err(Refusal::new(Rule::Survival, why));
    for expr in &aggregate.aggr_expr {
        let Expr::AggregateFunction(AggregateFunction { func, params }) =
            expr.clone().unalias_nested().data
        else {
            continue;
        };
        let name = func.name().to_lowercase();
        if !trustql_survival::is_survival(&name) {
            continue;
        }
        if dp {
            return refuse(format!(
                "{name} is released under suppression and rounding so far; this project is in                  differential-privacy mode at this trust, where noisy interval counts are not                  built yet"
            ));
        }
        if params.distinct || params.filter.is_some() {
            return refuse(format!(
                "{name} takes no DISTINCT or FILTER; put conditions in WHERE or group by them"
            ));
        }
        let constants: Vec<Option<i64>> = params.args.iter().skip(3).map(constant_days).collect();
        let grid = match trustql_survival::grid_of(&name, &constants) {
            Ok(grid) => grid,
            Err(e) => return refuse(format!("{name}: {e}")),
        };
        let least = policy.disclosure.survival.min_interval_days;
        if grid.width_days() + 1e-9 < f64::from(least) {
            return refuse(format!(
                "{name}: its intervals are {:.1} days wide, and this trust allows none narrower                  than {least} days, so that single event times cannot be read off; pass a                  wider interval_days",
                grid.width_days()
            ));
        }
    }
    Ok(())
}

/// A constant whole number of days (a literal, perhaps cast by type coercion).
fn constant_days(expr: &Expr) -> Option<i64> {
    match expr {
        Expr::Literal(value, _) => match value.cast_to(&arrow::datatypes::DataType::Int64) {
            Ok(ScalarValue::Int64(v)) => v,
            _ => None,
        },
        Expr::Cast(c) => constant_days(&c.expr),
        Expr::TryCast(c) => constant_days(&c.expr),
        Expr::Alias(a) => constant_days(&a.expr),
        _ => None,
    }
}

/// `x` rounded up to its band of `base` and then to the band's midpoint; 0 stays 0.
pub(super) fn round_mid(x: u64, base: u64) -> u64 {
    if base <= 1 || x == 0 {
        return x;
    }
    x.div_ceil(base) * base - base / 2
}

/// One stratum's released counts: totals rounded cumulatively, then turned back into the
/// per-interval counts the state holds (non-negative, since rounding is monotone), and the
/// rows counted never fewer than the events and censorings released. A cumulative count below
/// `least` is released as 0: an event condition that one or two patients meet (a rare code)
/// would otherwise show when they died; the price is that a stratum's first events appear
/// late, by at most `least − 1` rows per trust.
pub(super) fn round_stratum(
    n: u64,
    events: &[u64],
    censored: &[u64],
    base: u64,
    least: u64,
) -> (u64, Vec<u64>, Vec<u64>) {
    let per_interval = |counts: &[u64]| {
        let mut cumulative = 0u64;
        let mut released = 0u64;
        counts
            .iter()
            .map(|&c| {
                cumulative += c;
                let rounded = if cumulative < least {
                    0
                } else {
                    round_mid(cumulative, base)
                };
                let step = rounded - released;
                released = rounded;
                step
            })
            .collect::<Vec<u64>>()
    };
    let (events, censored) = (per_interval(events), per_interval(censored));
    let left: u64 = events.iter().sum::<u64>() + censored.iter().sum::<u64>();
    (round_mid(n, base).max(left), events, censored)
}

/// The released batch with every survival aggregate's states rounded (`columns` describes
/// `batch`).
pub(super) fn round_curves(
    batch: &RecordBatch,
    columns: &[StateColumn],
    base: u64,
    least: u64,
) -> Result<RecordBatch, ReleaseError> {
    let find = |aggregate: usize, curve: Curve| {
        columns
            .iter()
            .position(|c| c.aggregate == Some(aggregate) && c.role() == Role::Curve(curve))
    };
    let aggregates: Vec<usize> = columns
        .iter()
        .filter(|c| c.role() == Role::Curve(Curve::N))
        .filter_map(|c| c.aggregate)
        .collect();
    if aggregates.is_empty() || (base <= 1 && least <= 1) {
        return Ok(batch.clone());
    }
    let mut arrays: Vec<ArrayRef> = batch.columns().to_vec();
    for a in aggregates {
        let (Some(n_at), Some(events_at), Some(censored_at)) = (
            find(a, Curve::N),
            find(a, Curve::Events),
            find(a, Curve::Censored),
        ) else {
            return Err(internal("a survival aggregate without its three states"));
        };
        let n = batch
            .column(n_at)
            .as_primitive_opt::<UInt64Type>()
            .ok_or(internal("a survival count is not UInt64"))?;
        let lists = |at: usize| {
            batch
                .column(at)
                .as_list_opt::<i32>()
                .ok_or(internal("survival counts are not a list"))
        };
        let (events, censored) = (lists(events_at)?, lists(censored_at)?);
        let mut rounded_n = Vec::with_capacity(batch.num_rows());
        let mut rounded_events = Vec::with_capacity(batch.num_rows());
        let mut rounded_censored = Vec::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            let values = |list: &ListArray| -> Result<Vec<u64>, ReleaseError> {
                if list.is_null(row) {
                    return Ok(Vec::new());
                }
                let v = list.value(row);
                let v = v
                    .as_primitive_opt::<UInt64Type>()
                    .ok_or(internal("survival counts are not UInt64"))?;
                Ok(v.iter().map(|x| x.unwrap_or(0)).collect())
            };
            let (e, c) = (values(events)?, values(censored)?);
            let (rn, re, rc) = round_stratum(n.value(row), &e, &c, base, least);
            rounded_n.push(rn);
            rounded_events.push(Some(re.into_iter().map(Some)));
            rounded_censored.push(Some(rc.into_iter().map(Some)));
        }
        arrays[n_at] = Arc::new(UInt64Array::from(rounded_n));
        arrays[events_at] = Arc::new(ListArray::from_iter_primitive::<UInt64Type, _, _>(
            rounded_events,
        ));
        arrays[censored_at] = Arc::new(ListArray::from_iter_primitive::<UInt64Type, _, _>(
            rounded_censored,
        ));
    }
    RecordBatch::try_new(batch.schema(), arrays)
        .map_err(|_| internal("could not rebuild the answer with its curves"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn midpoint_rounding() {
        assert_eq!(round_mid(0, 5), 0);
        assert_eq!([1, 5, 6, 10, 11].map(|x| round_mid(x, 5)), [3, 3, 8, 8, 13]);
        assert_eq!(round_mid(7, 1), 7);
    }

    #[test]
    fn cumulative_counts_are_rounded_and_stay_consistent() {
        let (n, e, c) = round_stratum(23, &[1, 0, 4, 2], &[0, 6, 0, 1], 5, 0);
        // Cumulative events 1, 1, 5, 7 → 3, 3, 3, 8; censored 0, 6, 6, 7 → 0, 8, 8, 8.
        assert_eq!(e, vec![3, 0, 0, 5]);
        assert_eq!(c, vec![0, 8, 0, 0]);
        assert_eq!(n, 23);
        // Rounding never releases fewer rows than events and censorings: 6 → 8 and 4 → 3
        // leave 11, where 10 alone rounds to 8.
        let (n, _, _) = round_stratum(10, &[6], &[4], 5, 0);
        assert_eq!(n, 11);
        // Below the least a cumulative count is 0: one rare event shows nowhere.
        let (_, e, c) = round_stratum(500, &[0, 1, 1, 12], &[0, 0, 4, 0], 5, 3);
        assert_eq!(e, vec![0, 0, 0, 13]);
        assert_eq!(c, vec![0, 0, 3, 0]);
    }
}
