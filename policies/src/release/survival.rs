//! Survival curves and percentiles' histograms at the node: each stratum's cumulative events and censorings rounded to
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
        if trustql_distribution::is_percentile(&name) {
            check_percentile(&name, &params, dp)?;
            continue;
        }
        if !trustql_survival::is_survival(&name) {
            continue;
        }
        if dp {
            return refuse(format!(
                "{name} is released under suppression and rounding so far; this project is in differential-privacy mode at this trust, where noisy interval counts are not built yet"
            ));
        }
        if params.distinct || params.filter.is_some() {
            return refuse(format!(
                "{name} takes no DISTINCT or FILTER; put conditions in WHERE or group by them"
            ));
        }
        if name == trustql_survival::LOGRANK {
            check_logrank(aggregate, &params.args)?;
        }
        let constants: Vec<Option<i64>> = params
            .args
            .iter()
            .skip(trustql_survival::data_arguments(&name))
            .map(constant_days)
            .collect();
        let grid = match trustql_survival::grid_of(&name, &constants) {
            Ok(grid) => grid,
            Err(e) => return refuse(format!("{name}: {e}")),
        };
        let least = policy.disclosure.survival.min_interval_days;
        if grid.width_days() + 1e-9 < f64::from(least) {
            return refuse(format!(
                "{name}: its intervals are {:.1} days wide, and this trust allows none narrower than {least} days, so that single event times cannot be read off; pass a wider interval_days",
                grid.width_days()
            ));
        }
    }
    Ok(())
}

/// The name of the key a node groups each `logrank` call's arm by (the n-th call's gets
/// `n` appended).
pub const ARM_KEY: &str = "__trustql_logrank_arm";

/// The keys a node adds to `aggregate`'s own for its `logrank` calls: each call's arm, so
/// each arm is protected as a stratum (and each partial state holds one arm).
pub(super) fn arm_keys(aggregate: &Aggregate) -> Vec<Expr> {
    aggregate
        .aggr_expr
        .iter()
        .filter_map(|e| match e.clone().unalias_nested().data {
            Expr::AggregateFunction(f)
                if f.func
                    .name()
                    .eq_ignore_ascii_case(trustql_survival::LOGRANK) =>
            {
                f.params.args.get(3).cloned()
            }
            _ => None,
        })
        .enumerate()
        .map(|(i, arm)| arm.alias(format!("{ARM_KEY}{i}")))
        .collect()
}

/// Refuses a log-rank test the node cannot split into arms: beside other aggregates (which
/// the added arm key would split too), with ROLLUP, CUBE or GROUPING SETS, or with an arm
/// that is already a key (one arm per group compares nothing).
fn check_logrank(aggregate: &Aggregate, args: &[Expr]) -> Result<(), Refusal> {
    let refuse = |why: &str| Err(Refusal::new(Rule::Survival, why));
    if aggregate.aggr_expr.len() > 1 {
        return refuse(
            "logrank is asked on its own: each trust splits the query's groups by the arm to              protect every arm as a stratum, which would split any other aggregate too; ask              for counts or curves in a query of their own",
        );
    }
    if aggregate
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return refuse("logrank does not take ROLLUP, CUBE or GROUPING SETS; group plainly");
    }
    let Some(arm) = args.get(3) else {
        return refuse("logrank takes (start_date, end_date, event, arm)");
    };
    if aggregate.group_expr.iter().any(|k| k == arm) {
        return refuse(
            "logrank's arm is also a GROUP BY key, so each group has one arm and there is              nothing to compare; drop it from GROUP BY",
        );
    }
    Ok(())
}

/// Refuses a percentile the release cannot protect: DISTINCT or FILTER, a fraction that is
/// not a constant from 0 to 1, or a mode without noisy histograms yet.
fn check_percentile(
    name: &str,
    params: &datafusion::logical_expr::expr::AggregateFunctionParams,
    dp: bool,
) -> Result<(), Refusal> {
    let refuse = |why: String| Err(Refusal::new(Rule::Percentile, why));
    if dp {
        return refuse(format!(
            "{name} is released from a histogram under suppression and rounding so far; this \
             project is in differential-privacy mode at this trust, where noisy histograms are \
             not built yet"
        ));
    }
    if params.distinct || params.filter.is_some() {
        return refuse(format!(
            "{name} takes no DISTINCT or FILTER; put conditions in WHERE or group by them"
        ));
    }
    let fraction = params.args.get(1).map(constant_fraction);
    if matches!(fraction, Some(None)) {
        return refuse(format!(
            "{name}: the percentile must be a constant from 0 to 1 (0.5 is the median)"
        ));
    }
    Ok(())
}

/// A constant from 0 to 1.
fn constant_fraction(expr: &Expr) -> Option<f64> {
    match expr {
        Expr::Literal(value, _) => match value.cast_to(&arrow::datatypes::DataType::Float64) {
            Ok(ScalarValue::Float64(Some(p))) if (0.0..=1.0).contains(&p) => Some(p),
            _ => None,
        },
        Expr::Cast(c) => constant_fraction(&c.expr),
        Expr::TryCast(c) => constant_fraction(&c.expr),
        Expr::Alias(a) => constant_fraction(&a.expr),
        _ => None,
    }
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

/// A percentile's histogram as released: sparse bins are pooled with their neighbours, so
/// every bin that shows rows shows at least `least` (a cell's minimum) and no lowest or highest
/// patient stands alone; then the cumulative counts are rounded as a stratum's are. With bins
/// at least as wide as a CASE band may be, this shows no more than a table of band counts.
pub(super) fn round_histogram(n: u64, bins: &[u64], base: u64, least: u64) -> (u64, Vec<u64>) {
    let bins = if least > 1 {
        pool_sparse(bins, least)
    } else {
        bins.to_vec()
    };
    let (n, bins, _) = round_stratum(n, &bins, &[], base, 0);
    (n, bins)
}

/// Runs of adjacent bins, from the bottom, each closed once it holds `least` rows (a short
/// last run joins the one before); each run's rows are counted in the bin of its middle row,
/// which keeps the percentiles between runs where they were.
fn pool_sparse(bins: &[u64], least: u64) -> Vec<u64> {
    let mut runs: Vec<(usize, usize, u64)> = Vec::new();
    let (mut start, mut rows) = (0usize, 0u64);
    for (b, &c) in bins.iter().enumerate() {
        rows += c;
        if rows >= least {
            runs.push((start, b, rows));
            (start, rows) = (b + 1, 0);
        }
    }
    if rows > 0 {
        match runs.last_mut() {
            Some(last) => {
                last.1 = bins.len() - 1;
                last.2 += rows;
            }
            None => runs.push((start, bins.len() - 1, rows)),
        }
    }
    let mut pooled = vec![0u64; bins.len()];
    for (start, end, rows) in runs {
        let middle = rows.div_ceil(2);
        let mut seen = 0u64;
        for b in start..=end {
            seen += bins[b];
            if seen >= middle {
                pooled[b] += rows;
                break;
            }
        }
    }
    pooled
}

/// One binned aggregate's state columns in the answer.
enum Binned {
    Curve {
        n: usize,
        events: usize,
        censored: usize,
    },
    Histogram {
        n: usize,
        bins: usize,
    },
}

/// The released batch with every survival aggregate's states rounded cumulatively and every
/// percentile's histogram coded at its ends and rounded (`columns` describes `batch`).
pub(super) fn round_curves(
    batch: &RecordBatch,
    columns: &[StateColumn],
    base: u64,
    least: u64,
    ends: u64,
) -> Result<RecordBatch, ReleaseError> {
    let find = |aggregate: usize, curve: Curve| {
        columns
            .iter()
            .position(|c| c.aggregate == Some(aggregate) && c.role() == Role::Curve(curve))
    };
    let mut binned = Vec::new();
    for a in columns
        .iter()
        .filter(|c| c.role() == Role::Curve(Curve::N))
        .filter_map(|c| c.aggregate)
    {
        let Some(n) = find(a, Curve::N) else {
            continue;
        };
        binned.push(
            match (
                find(a, Curve::Events),
                find(a, Curve::Censored),
                find(a, Curve::Bins),
            ) {
                (Some(events), Some(censored), None) => Binned::Curve {
                    n,
                    events,
                    censored,
                },
                (None, None, Some(bins)) => Binned::Histogram { n, bins },
                _ => return Err(internal("a binned aggregate without its states")),
            },
        );
    }
    if binned.is_empty() || (base <= 1 && least <= 1 && ends <= 1) {
        return Ok(batch.clone());
    }
    let counts = |at: usize| {
        batch
            .column(at)
            .as_primitive_opt::<UInt64Type>()
            .ok_or(internal("a binned count is not UInt64"))
    };
    let lists = |at: usize| {
        batch
            .column(at)
            .as_list_opt::<i32>()
            .ok_or(internal("binned counts are not a list"))
    };
    let values = |list: &ListArray, row: usize| -> Result<Vec<u64>, ReleaseError> {
        if list.is_null(row) {
            return Ok(Vec::new());
        }
        let v = list.value(row);
        let v = v
            .as_primitive_opt::<UInt64Type>()
            .ok_or(internal("binned counts are not UInt64"))?;
        Ok(v.iter().map(|x| x.unwrap_or(0)).collect())
    };
    let list_array = |rows: Vec<Vec<u64>>| -> ArrayRef {
        Arc::new(ListArray::from_iter_primitive::<UInt64Type, _, _>(
            rows.into_iter().map(|r| Some(r.into_iter().map(Some))),
        ))
    };
    let mut arrays: Vec<ArrayRef> = batch.columns().to_vec();
    for aggregate in binned {
        match aggregate {
            Binned::Curve {
                n: n_at,
                events: events_at,
                censored: censored_at,
            } => {
                let (n, events, censored) = (counts(n_at)?, lists(events_at)?, lists(censored_at)?);
                let (mut ns, mut es, mut cs) = (Vec::new(), Vec::new(), Vec::new());
                for row in 0..batch.num_rows() {
                    let (e, c) = (values(events, row)?, values(censored, row)?);
                    let (rn, re, rc) = round_stratum(n.value(row), &e, &c, base, least);
                    ns.push(rn);
                    es.push(re);
                    cs.push(rc);
                }
                arrays[n_at] = Arc::new(UInt64Array::from(ns));
                arrays[events_at] = list_array(es);
                arrays[censored_at] = list_array(cs);
            }
            Binned::Histogram {
                n: n_at,
                bins: bins_at,
            } => {
                let (n, bins) = (counts(n_at)?, lists(bins_at)?);
                let (mut ns, mut bs) = (Vec::new(), Vec::new());
                for row in 0..batch.num_rows() {
                    let (rn, rb) = round_histogram(n.value(row), &values(bins, row)?, base, ends);
                    ns.push(rn);
                    bs.push(rb);
                }
                arrays[n_at] = Arc::new(UInt64Array::from(ns));
                arrays[bins_at] = list_array(bs);
            }
        }
    }
    RecordBatch::try_new(batch.schema(), arrays)
        .map_err(|_| internal("could not rebuild the answer with its binned counts"))
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

    #[test]
    fn sparse_bins_are_pooled_then_rounded() {
        // Runs of at least 4 rows: [1, 2, 0, 6] (its middle row, the 5th of 9, in bin 3) and
        // [3, 0, 3], which the last 1 joins (the 4th of 7, in bin 6).
        let (n, bins) = round_histogram(16, &[1, 2, 0, 6, 3, 0, 3, 1], 1, 4);
        assert_eq!(bins, vec![0, 0, 0, 9, 0, 0, 7, 0]);
        assert_eq!(n, 16);
        // Then cumulative 9, 16 → 8, 18.
        let (n, bins) = round_histogram(16, &[1, 2, 0, 6, 3, 0, 3, 1], 5, 4);
        assert_eq!(bins, vec![0, 0, 0, 8, 0, 0, 10, 0]);
        assert_eq!(n, 18);
        // Dense bins are left as they are; unprotected, nothing changes.
        assert_eq!(
            round_histogram(27, &[0, 12, 15, 0], 1, 10),
            (27, vec![0, 12, 15, 0])
        );
        assert_eq!(round_histogram(3, &[1, 0, 2], 1, 0), (3, vec![1, 0, 2]));
        // Fewer rows than the least (a group the minimum withholds): all in one bin.
        let (_, bins) = round_histogram(2, &[1, 1, 0], 1, 10);
        assert_eq!(bins, vec![2, 0, 0]);
    }
}
