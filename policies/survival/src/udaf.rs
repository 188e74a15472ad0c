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

/// The survival aggregates, to register in a session.
pub fn functions() -> Vec<AggregateUDF> {
    vec![
        AggregateUDF::from(Survival::new(Kind::Curve)),
        AggregateUDF::from(Survival::new(Kind::At)),
    ]
}

/// The grid of a call of `name` whose arguments after the third are `params` (`None` where
/// one is not a constant integer).
pub fn grid_of(name: &str, params: &[Option<i64>]) -> Result<Grid, GridError> {
    let constant = |p: &Option<i64>| p.ok_or(GridError::NotConstant);
    match (name, params) {
        (KM_CURVE, []) => Grid::curve(DEFAULT_INTERVAL_DAYS, DEFAULT_HORIZON_DAYS),
        (KM_CURVE, [interval]) => Grid::curve(constant(interval)?, DEFAULT_HORIZON_DAYS),
        (KM_CURVE, [interval, horizon]) => Grid::curve(constant(interval)?, constant(horizon)?),
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
        let dates = |t: &DataType| {
            matches!(
                t,
                DataType::Date32 | DataType::Date64 | DataType::Timestamp(..) | DataType::Null
            )
        };
        if !dates(&arg_types[0]) || !dates(&arg_types[1]) {
            return Err(DataFusionError::Plan(format!(
                "{}: the start and end must be dates",
                self.name()
            )));
        }
        if !matches!(arg_types[2], DataType::Boolean | DataType::Null) {
            return Err(DataFusionError::Plan(format!(
                "{}: the event must be true or false (for example vitalstatus = 'D')",
                self.name()
            )));
        }
        if !arg_types[3..]
            .iter()
            .all(|t| t.is_integer() || *t == DataType::Null)
        {
            return Err(plan_error(GridError::NotConstant));
        }
        let mut types = vec![DataType::Date32, DataType::Date32, DataType::Boolean];
        types.extend(arg_types[3..].iter().map(|_| DataType::Int64));
        Ok(types)
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
        let params = args
            .exprs
            .iter()
            .skip(3)
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
            .collect::<Vec<_>>();
        let grid = grid_of(self.name(), &params).map_err(plan_error)?;
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

impl SurvivalAccumulator {
    fn add_lists(&mut self, into_events: bool, lists: &ListArray) -> Result<()> {
        let width = self.grid.intervals();
        for row in 0..lists.len() {
            if lists.is_null(row) {
                continue;
            }
            let values = lists.value(row);
            let values = values
                .as_primitive_opt::<UInt64Type>()
                .ok_or_else(bad_state)?;
            if values.len() != width {
                return Err(bad_state());
            }
            let target = if into_events {
                &mut self.counts.events
            } else {
                &mut self.counts.censored
            };
            for (t, v) in target.iter_mut().zip(values.iter()) {
                *t = t.saturating_add(v.unwrap_or(0));
            }
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
            self.counts.n += 1;
            if let Some(k) = self.grid.bin(duration) {
                if event.value(row) {
                    self.counts.events[k] += 1;
                } else {
                    self.counts.censored[k] += 1;
                }
            }
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
