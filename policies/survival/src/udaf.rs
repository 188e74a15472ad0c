//! `km_curve` and `survival_at` as DataFusion aggregates: states are the rows counted and the
//! per-interval events and censorings, so Partial → (network) → Final works like SUM's.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, ListArray, StructArray, UInt64Array};
use arrow::datatypes::{DataType, Date32Type, Field, FieldRef, Fields, UInt64Type};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr::expressions::Literal;

use crate::estimate::{Counts, curve, survival};
use crate::grid::{DEFAULT_HORIZON_DAYS, DEFAULT_INTERVAL_DAYS, Grid, GridError};
use crate::logrank::logrank;

/// The Kaplan–Meier curve aggregate.
pub const KM_CURVE: &str = "km_curve";
/// Survival at a horizon.
pub const SURVIVAL_AT: &str = "survival_at";
/// State: rows counted.
pub const STATE_N: &str = "n";
/// State: events per interval.
pub const STATE_EVENTS: &str = "events";
/// State: censorings per interval.
pub const STATE_CENSORED: &str = "censored";
/// The log-rank test between the values of an arm.
pub const LOGRANK: &str = "logrank";
/// State: the arm a log-rank state counts (one per group: the node groups by it).
pub const STATE_ARM: &str = "arm";

/// The survival aggregates, to register in a session.
pub fn functions() -> Vec<AggregateUDF> {
    vec![
        AggregateUDF::from(Survival::new(Kind::Curve)),
        AggregateUDF::from(Survival::new(Kind::At)),
        AggregateUDF::from(Logrank::new()),
    ]
}

/// How many leading arguments of survival aggregate `name` are data (the rest are the grid's
/// constants): start, end and event, and logrank's arm.
pub fn data_arguments(name: &str) -> usize {
    if name == LOGRANK { 4 } else { 3 }
}

/// The grid of a call of `name` whose arguments after the third are `params` (`None` where
/// one is not a constant integer).
pub fn grid_of(name: &str, params: &[Option<i64>]) -> Result<Grid, GridError> {
    let constant = |p: &Option<i64>| p.ok_or(GridError::NotConstant);
    match (name, params) {
        (KM_CURVE | LOGRANK, []) => Grid::curve(DEFAULT_INTERVAL_DAYS, DEFAULT_HORIZON_DAYS),
        (KM_CURVE | LOGRANK, [interval]) => Grid::curve(constant(interval)?, DEFAULT_HORIZON_DAYS),
        (KM_CURVE | LOGRANK, [interval, horizon]) => {
            Grid::curve(constant(interval)?, constant(horizon)?)
        }
        (SURVIVAL_AT, [days]) => Grid::at(constant(days)?, DEFAULT_INTERVAL_DAYS),
        (SURVIVAL_AT, [days, interval]) => Grid::at(constant(days)?, constant(interval)?),
        _ => Err(GridError::Arguments),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Curve,
    At,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Survival {
    kind: Kind,
    signature: Signature,
}

impl Survival {
    fn new(kind: Kind) -> Self {
        Survival {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

fn curve_fields() -> Fields {
    Fields::from(vec![
        Field::new("interval_start_days", DataType::Float64, false),
        Field::new("interval_end_days", DataType::Float64, false),
        Field::new("at_risk", DataType::UInt64, false),
        Field::new("events", DataType::UInt64, false),
        Field::new("censored", DataType::UInt64, false),
        Field::new("survival", DataType::Float64, false),
        Field::new("lower_95", DataType::Float64, false),
        Field::new("upper_95", DataType::Float64, false),
    ])
}

fn point_fields() -> Fields {
    Fields::from(vec![
        Field::new("days", DataType::Float64, false),
        Field::new("at_risk", DataType::UInt64, false),
        Field::new("survival", DataType::Float64, false),
        Field::new("lower_95", DataType::Float64, false),
        Field::new("upper_95", DataType::Float64, false),
    ])
}

/// The types a survival call's arguments are coerced to: two dates and a boolean, then
/// `data` (logrank's arm), then whole numbers of days.
fn coerce_survival(name: &str, arg_types: &[DataType], data: &[DataType]) -> Result<Vec<DataType>> {
    let dates = |t: &DataType| {
        matches!(
            t,
            DataType::Date32 | DataType::Date64 | DataType::Timestamp(..) | DataType::Null
        )
    };
    if !dates(&arg_types[0]) || !dates(&arg_types[1]) {
        return Err(DataFusionError::Plan(format!(
            "{name}: the start and end must be dates"
        )));
    }
    if !matches!(arg_types[2], DataType::Boolean | DataType::Null) {
        return Err(DataFusionError::Plan(format!(
            "{name}: the event must be true or false (for example vitalstatus = 'D')"
        )));
    }
    let constants = &arg_types[3 + data.len()..];
    if !constants
        .iter()
        .all(|t| t.is_integer() || *t == DataType::Null)
    {
        return Err(plan_error(GridError::NotConstant));
    }
    let mut types = vec![DataType::Date32, DataType::Date32, DataType::Boolean];
    types.extend(data.iter().cloned());
    types.extend(constants.iter().map(|_| DataType::Int64));
    Ok(types)
}

/// The constant grid arguments of a call (after its `skip` data arguments), `None` where one
/// is not an integer literal.
fn grid_params(args: &AccumulatorArgs<'_>, skip: usize) -> Vec<Option<i64>> {
    args.exprs
        .iter()
        .skip(skip)
        .map(|e| {
            e.downcast_ref::<Literal>()
                .and_then(|l| match l.value().clone() {
                    ScalarValue::Int64(v) => v,
                    other => other.cast_to(&DataType::Int64).ok().and_then(|v| match v {
                        ScalarValue::Int64(v) => v,
                        _ => None,
                    }),
                })
        })
        .collect()
}

fn counts_list() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::UInt64, true)))
}

fn plan_error(e: GridError) -> DataFusionError {
    DataFusionError::Plan(e.to_string())
}

impl AggregateUDFImpl for Survival {
    fn name(&self) -> &str {
        match self.kind {
            Kind::Curve => KM_CURVE,
            Kind::At => SURVIVAL_AT,
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let range = match self.kind {
            Kind::Curve => 3..=5,
            Kind::At => 4..=5,
        };
        if !range.contains(&arg_types.len()) {
            return Err(plan_error(GridError::Arguments));
        }
        coerce_survival(self.name(), arg_types, &[])
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            Kind::Curve => DataType::List(Arc::new(Field::new_list_field(
                DataType::Struct(curve_fields()),
                true,
            ))),
            Kind::At => DataType::Struct(point_fields()),
        })
    }

    fn state_fields(&self, args: StateFieldsArgs<'_>) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(
                format_state_name(args.name, STATE_N),
                DataType::UInt64,
                true,
            )),
            Arc::new(Field::new(
                format_state_name(args.name, STATE_EVENTS),
                counts_list(),
                true,
            )),
            Arc::new(Field::new(
                format_state_name(args.name, STATE_CENSORED),
                counts_list(),
                true,
            )),
        ])
    }

    fn accumulator(&self, args: AccumulatorArgs<'_>) -> Result<Box<dyn Accumulator>> {
        let grid = grid_of(self.name(), &grid_params(&args, 3)).map_err(plan_error)?;
        Ok(Box::new(SurvivalAccumulator {
            kind: self.kind,
            grid,
            counts: Counts {
                n: 0,
                events: vec![0; grid.intervals()],
                censored: vec![0; grid.intervals()],
            },
        }))
    }
}

#[derive(Debug)]
struct SurvivalAccumulator {
    kind: Kind,
    grid: Grid,
    counts: Counts,
}

fn list_scalar(values: &[u64]) -> ScalarValue {
    let list =
        ListArray::from_iter_primitive::<UInt64Type, _, _>([Some(values.iter().map(|v| Some(*v)))]);
    ScalarValue::List(Arc::new(list))
}

fn bad_state() -> DataFusionError {
    DataFusionError::Internal("a survival state does not match its grid".into())
}

/// Counts one row: in the total, and in its interval's events or censorings (none past the
/// horizon).
fn tally(counts: &mut Counts, grid: &Grid, duration: i64, event: bool) {
    counts.n += 1;
    if let Some(k) = grid.bin(duration) {
        if event {
            counts.events[k] += 1;
        } else {
            counts.censored[k] += 1;
        }
    }
}

/// Adds lists of per-interval counts into `target`, which is one grid long.
fn add_counts(target: &mut [u64], lists: &ListArray, row: usize) -> Result<()> {
    if lists.is_null(row) {
        return Ok(());
    }
    let values = lists.value(row);
    let values = values
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(bad_state)?;
    if values.len() != target.len() {
        return Err(bad_state());
    }
    for (t, v) in target.iter_mut().zip(values.iter()) {
        *t = t.saturating_add(v.unwrap_or(0));
    }
    Ok(())
}

impl SurvivalAccumulator {
    fn add_lists(&mut self, into_events: bool, lists: &ListArray) -> Result<()> {
        let target = if into_events {
            &mut self.counts.events
        } else {
            &mut self.counts.censored
        };
        for row in 0..lists.len() {
            add_counts(target, lists, row)?;
        }
        Ok(())
    }
}

impl Accumulator for SurvivalAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [start, end, event, ..] = values else {
            return Err(DataFusionError::Internal(
                "a survival aggregate without its three arguments".into(),
            ));
        };
        let (Some(start), Some(end), Some(event)) = (
            start.as_primitive_opt::<Date32Type>(),
            end.as_primitive_opt::<Date32Type>(),
            event.as_boolean_opt(),
        ) else {
            return Err(DataFusionError::Internal(
                "survival arguments were not coerced to dates and a boolean".into(),
            ));
        };
        for row in 0..start.len() {
            // A row without a start, an end or an outcome is not counted at all.
            if start.is_null(row) || end.is_null(row) || event.is_null(row) {
                continue;
            }
            let duration = i64::from(end.value(row)) - i64::from(start.value(row));
            tally(&mut self.counts, &self.grid, duration, event.value(row));
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [n, events, censored] = states else {
            return Err(bad_state());
        };
        let n = n.as_primitive_opt::<UInt64Type>().ok_or_else(bad_state)?;
        self.counts.n = n
            .iter()
            .flatten()
            .fold(self.counts.n, |a, b| a.saturating_add(b));
        self.add_lists(true, events.as_list_opt::<i32>().ok_or_else(bad_state)?)?;
        self.add_lists(false, censored.as_list_opt::<i32>().ok_or_else(bad_state)?)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![
            ScalarValue::UInt64(Some(self.counts.n)),
            list_scalar(&self.counts.events),
            list_scalar(&self.counts.censored),
        ])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        match self.kind {
            Kind::Curve => {
                let steps = curve(&self.counts);
                let width = self.grid.width_days();
                let f64s = |f: &dyn Fn(usize) -> f64| -> ArrayRef {
                    Arc::new((0..steps.len()).map(f).collect::<Float64Array>())
                };
                let u64s = |f: &dyn Fn(usize) -> u64| -> ArrayRef {
                    Arc::new((0..steps.len()).map(f).collect::<UInt64Array>())
                };
                let columns: Vec<ArrayRef> = vec![
                    f64s(&|k| k as f64 * width),
                    f64s(&|k| self.grid.end(k)),
                    u64s(&|k| steps[k].at_risk),
                    u64s(&|k| steps[k].events),
                    u64s(&|k| steps[k].censored),
                    f64s(&|k| steps[k].survival),
                    f64s(&|k| steps[k].lower_95),
                    f64s(&|k| steps[k].upper_95),
                ];
                let rows = StructArray::try_new(curve_fields(), columns, None)?;
                let offsets = arrow::buffer::OffsetBuffer::from_lengths([rows.len()]);
                let list = ListArray::try_new(
                    Arc::new(Field::new_list_field(rows.data_type().clone(), true)),
                    offsets,
                    Arc::new(rows),
                    None,
                )?;
                Ok(ScalarValue::List(Arc::new(list)))
            }
            Kind::At => {
                let s = survival(&self.counts);
                let days = self.grid.end(self.grid.intervals().saturating_sub(1));
                let columns: Vec<ArrayRef> = vec![
                    Arc::new(Float64Array::from(vec![days])),
                    Arc::new(UInt64Array::from(vec![s.at_risk])),
                    Arc::new(Float64Array::from(vec![s.survival])),
                    Arc::new(Float64Array::from(vec![s.lower_95])),
                    Arc::new(Float64Array::from(vec![s.upper_95])),
                ];
                Ok(ScalarValue::Struct(Arc::new(StructArray::try_new(
                    point_fields(),
                    columns,
                    None,
                )?)))
            }
        }
    }

    fn size(&self) -> usize {
        size_of_val(self) + 16 * self.counts.events.len()
    }
}

/// `logrank(start, end, event, arm [, interval_days [, horizon_days]])`: per arm, the same
/// interval counts as `km_curve`. A node groups by the arm as well as the query's keys, so
/// each arm is protected as a stratum of its own and every partial state holds one arm;
/// the coordinator's final aggregate gathers the arms of a group and runs the test.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Logrank {
    signature: Signature,
}

impl Logrank {
    fn new() -> Self {
        Logrank {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

fn logrank_fields() -> Fields {
    Fields::from(vec![
        Field::new("chi_square", DataType::Float64, true),
        Field::new("degrees_of_freedom", DataType::UInt64, true),
        Field::new("p_value", DataType::Float64, true),
        Field::new("arms", DataType::UInt64, false),
    ])
}

impl AggregateUDFImpl for Logrank {
    fn name(&self) -> &str {
        LOGRANK
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if !(4..=6).contains(&arg_types.len()) {
            return Err(plan_error(GridError::Arguments));
        }
        coerce_survival(LOGRANK, arg_types, &[DataType::Utf8])
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Struct(logrank_fields()))
    }

    fn state_fields(&self, args: StateFieldsArgs<'_>) -> Result<Vec<FieldRef>> {
        let field = |state: &str, t: DataType| {
            Arc::new(Field::new(format_state_name(args.name, state), t, true))
        };
        Ok(vec![
            field(STATE_ARM, DataType::Utf8),
            field(STATE_N, DataType::UInt64),
            field(STATE_EVENTS, counts_list()),
            field(STATE_CENSORED, counts_list()),
        ])
    }

    fn accumulator(&self, args: AccumulatorArgs<'_>) -> Result<Box<dyn Accumulator>> {
        let grid = grid_of(LOGRANK, &grid_params(&args, 4)).map_err(plan_error)?;
        Ok(Box::new(LogrankAccumulator {
            grid,
            arms: std::collections::BTreeMap::new(),
        }))
    }
}

#[derive(Debug)]
struct LogrankAccumulator {
    grid: Grid,
    arms: std::collections::BTreeMap<String, Counts>,
}

impl LogrankAccumulator {
    fn arm(&mut self, label: &str) -> &mut Counts {
        let intervals = self.grid.intervals();
        self.arms
            .entry(label.to_string())
            .or_insert_with(|| Counts {
                n: 0,
                events: vec![0; intervals],
                censored: vec![0; intervals],
            })
    }
}

impl Accumulator for LogrankAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [start, end, event, arm, ..] = values else {
            return Err(DataFusionError::Internal(
                "logrank without its four arguments".into(),
            ));
        };
        let (Some(start), Some(end), Some(event), Some(arm)) = (
            start.as_primitive_opt::<Date32Type>(),
            end.as_primitive_opt::<Date32Type>(),
            event.as_boolean_opt(),
            arm.as_string_opt::<i32>(),
        ) else {
            return Err(DataFusionError::Internal(
                "logrank's arguments were not coerced to dates, a boolean and text".into(),
            ));
        };
        let grid = self.grid;
        for row in 0..start.len() {
            // A row without a start, an end, an outcome or an arm is not counted at all.
            if start.is_null(row) || end.is_null(row) || event.is_null(row) || arm.is_null(row) {
                continue;
            }
            let duration = i64::from(end.value(row)) - i64::from(start.value(row));
            tally(self.arm(arm.value(row)), &grid, duration, event.value(row));
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [arm, n, events, censored] = states else {
            return Err(bad_state());
        };
        let (Some(arm), Some(n), Some(events), Some(censored)) = (
            arm.as_string_opt::<i32>(),
            n.as_primitive_opt::<UInt64Type>(),
            events.as_list_opt::<i32>(),
            censored.as_list_opt::<i32>(),
        ) else {
            return Err(bad_state());
        };
        for row in 0..arm.len() {
            if arm.is_null(row) {
                continue;
            }
            let counts = self.arm(arm.value(row));
            counts.n = counts.n.saturating_add(n.value(row));
            add_counts(&mut counts.events, events, row)?;
            add_counts(&mut counts.censored, censored, row)?;
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let mut arms = self.arms.iter();
        match (arms.next(), arms.next()) {
            (None, _) => Ok(vec![
                ScalarValue::Utf8(None),
                ScalarValue::UInt64(Some(0)),
                list_scalar(&vec![0; self.grid.intervals()]),
                list_scalar(&vec![0; self.grid.intervals()]),
            ]),
            (Some((label, counts)), None) => Ok(vec![
                ScalarValue::Utf8(Some(label.clone())),
                ScalarValue::UInt64(Some(counts.n)),
                list_scalar(&counts.events),
                list_scalar(&counts.censored),
            ]),
            // One state holds one arm: the node groups by it, so each arm is released (or
            // withheld) as a stratum of its own.
            (Some(_), Some(_)) => Err(DataFusionError::Execution(
                "logrank's partial states hold one arm each; group by the arm to split them".into(),
            )),
        }
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let arms: Vec<Counts> = self.arms.values().cloned().collect();
        let test = logrank(&arms);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Float64Array::from(vec![test.map(|t| t.chi_square)])),
            Arc::new(UInt64Array::from(vec![test.map(|t| t.degrees_of_freedom)])),
            Arc::new(Float64Array::from(vec![test.map(|t| t.p_value)])),
            Arc::new(UInt64Array::from(vec![
                arms.iter().filter(|a| a.n > 0).count() as u64,
            ])),
        ];
        Ok(ScalarValue::Struct(Arc::new(StructArray::try_new(
            logrank_fields(),
            columns,
            None,
        )?)))
    }

    fn size(&self) -> usize {
        size_of_val(self)
            + self
                .arms
                .iter()
                .map(|(k, c)| k.len() + 16 * c.events.len() + 64)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BooleanArray, Date32Array, Int64Array, RecordBatch};
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn two_phase_curve_over_sql() {
        let ctx = SessionContext::new();
        for f in functions() {
            ctx.register_udaf(f);
        }
        let batch = RecordBatch::try_from_iter(vec![
            (
                "s",
                Arc::new(Date32Array::from(vec![0, 0, 0, 0, 0])) as ArrayRef,
            ),
            (
                "e",
                Arc::new(Date32Array::from(vec![10, 10, 45, 100, 5000])),
            ),
            (
                "d",
                Arc::new(BooleanArray::from(vec![true, false, true, true, false])),
            ),
            ("g", Arc::new(Int64Array::from(vec![1, 1, 1, 2, 2]))),
        ])
        .expect("test");
        ctx.register_batch("t", batch).expect("test");
        let rows = ctx
            .sql("SELECT g, unnest(km_curve(s, e, d, 30, 90)) AS step FROM t GROUP BY g ORDER BY g")
            .await
            .expect("test")
            .collect()
            .await
            .expect("test");
        let total: usize = rows.iter().map(|b| b.num_rows()).sum();
        assert_eq!(total, 6, "three intervals per group");
        let at = ctx
            .sql("SELECT unnest(survival_at(s, e, d, 60, 30)) FROM t")
            .await
            .expect("test")
            .collect()
            .await
            .expect("test");
        assert_eq!(at[0].num_columns(), 5, "{:?}", at[0].schema());
        let s = at[0]
            .column(2)
            .as_primitive::<arrow::datatypes::Float64Type>()
            .value(0);
        // 5 at risk, 1 death (and 1 censoring) in (0, 30], 1 death of 3 in (30, 60].
        assert!((s - 0.8 * 2.0 / 3.0).abs() < 1e-12, "{s}");
    }
}
