//! `median`, `percentile_cont` and `approx_percentile_cont` as DataFusion aggregates over a
//! column's public grid: states are the rows counted and the bin counts, so Partial →
//! (network) → Final works like SUM's.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type, UInt64Type};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr::expressions::{Column, Literal};

use crate::grid::BinGrid;

/// The median aggregate.
pub const MEDIAN: &str = "median";
/// The percentile aggregate.
pub const PERCENTILE_CONT: &str = "percentile_cont";
/// The approximate percentile aggregate (answered from the same histogram).
pub const APPROX_PERCENTILE_CONT: &str = "approx_percentile_cont";
/// State: rows counted.
pub const STATE_N: &str = "n";
/// State: rows per bin.
pub const STATE_BINS: &str = "bins";

/// Each column's grid, by column name: the columns a percentile may read.
pub type Grids = BTreeMap<String, BinGrid>;

/// The histogram aggregates over `grids`, to register in a session (they replace DataFusion's
/// own, whose states are value lists).
pub fn functions(grids: Arc<Grids>) -> Vec<AggregateUDF> {
    [Kind::Median, Kind::Cont, Kind::Approx]
        .into_iter()
        .map(|kind| {
            AggregateUDF::from(Percentile {
                kind,
                grids: Arc::clone(&grids),
                signature: Signature::user_defined(Volatility::Immutable),
            })
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Median,
    Cont,
    Approx,
}

#[derive(Debug)]
struct Percentile {
    kind: Kind,
    grids: Arc<Grids>,
    signature: Signature,
}

// Grids hold floats; two instances are the same function when they have the same name and
// the same grids (compared bit for bit).
impl PartialEq for Percentile {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.grids == other.grids
    }
}

impl Eq for Percentile {}

impl std::hash::Hash for Percentile {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        for (name, grid) in self.grids.iter() {
            name.hash(state);
            grid.bins().hash(state);
            grid.width().to_bits().hash(state);
        }
    }
}

fn plan(message: String) -> DataFusionError {
    DataFusionError::Plan(message)
}

impl Percentile {
    fn usage(&self) -> &'static str {
        match self.kind {
            Kind::Median => "median(column)",
            Kind::Cont => {
                "percentile_cont(column, p) or percentile_cont(p) WITHIN GROUP (ORDER BY column)"
            }
            Kind::Approx => {
                "approx_percentile_cont(column, p) or approx_percentile_cont(p) WITHIN GROUP (ORDER BY column)"
            }
        }
    }

    /// The grid of the column the call reads: a plain column that has one.
    fn grid(&self, args: &AccumulatorArgs<'_>) -> Result<BinGrid> {
        let column = args
            .exprs
            .first()
            .and_then(|e| e.downcast_ref::<Column>())
            .map(|c| c.name().to_string());
        column
            .as_ref()
            .and_then(|name| self.grids.get(name).copied())
            .ok_or_else(|| {
                plan(format!(
                    "{} reads a column that has public bounds and a bin width in the schema \
                     (such as age or weight_at_start_of_regimen), named as it is there{}",
                    self.name(),
                    column
                        .map(|c| format!("; `{c}` has none"))
                        .unwrap_or_default()
                ))
            })
    }

    /// The constant percentile the call asks for, from 0 to 1.
    fn fraction(&self, args: &AccumulatorArgs<'_>) -> Result<f64> {
        if self.kind == Kind::Median {
            return Ok(0.5);
        }
        let p = args
            .exprs
            .get(1)
            .and_then(|e| e.downcast_ref::<Literal>())
            .and_then(|l| l.value().cast_to(&DataType::Float64).ok())
            .and_then(|v| match v {
                ScalarValue::Float64(v) => v,
                _ => None,
            })
            .filter(|p| (0.0..=1.0).contains(p))
            .ok_or_else(|| {
                plan(format!(
                    "{}: the percentile must be a constant from 0 to 1",
                    self.name()
                ))
            })?;
        // WITHIN GROUP (ORDER BY column DESC) counts from the top.
        let descending = args.order_bys.first().is_some_and(|o| o.options.descending);
        Ok(if descending { 1.0 - p } else { p })
    }
}

impl AggregateUDFImpl for Percentile {
    fn name(&self) -> &str {
        match self.kind {
            Kind::Median => MEDIAN,
            Kind::Cont => PERCENTILE_CONT,
            Kind::Approx => APPROX_PERCENTILE_CONT,
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn supports_within_group_clause(&self) -> bool {
        self.kind != Kind::Median
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let arity = match self.kind {
            Kind::Median => 1..=1,
            Kind::Cont => 2..=2,
            Kind::Approx => 2..=3,
        };
        if !arity.contains(&arg_types.len()) {
            return Err(plan(format!("use {}", self.usage())));
        }
        let numeric = |t: &DataType| t.is_numeric() || *t == DataType::Null;
        if !arg_types.iter().all(numeric) {
            return Err(plan(format!(
                "{} takes a number column and a number: {}",
                self.name(),
                self.usage()
            )));
        }
        // The column keeps its type, so the call still names it plainly (a cast around it
        // would hide which grid it reads); the percentile is a float; the third argument of
        // approx_percentile_cont (DataFusion's number of centroids) is accepted and unused.
        let mut types = vec![match &arg_types[0] {
            DataType::Int64 | DataType::Float64 => arg_types[0].clone(),
            _ => DataType::Float64,
        }];
        types.extend(arg_types.iter().skip(1).take(1).map(|_| DataType::Float64));
        types.extend(arg_types.iter().skip(2).map(|_| DataType::Int64));
        Ok(types)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn state_fields(&self, args: StateFieldsArgs<'_>) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(
                format_state_name(args.name, STATE_N),
                DataType::UInt64,
                true,
            )),
            Arc::new(Field::new(
                format_state_name(args.name, STATE_BINS),
                DataType::List(Arc::new(Field::new_list_field(DataType::UInt64, true))),
                true,
            )),
        ])
    }

    fn accumulator(&self, args: AccumulatorArgs<'_>) -> Result<Box<dyn Accumulator>> {
        if args.is_distinct {
            return Err(plan(format!("{} takes no DISTINCT", self.name())));
        }
        let grid = self.grid(&args)?;
        let p = self.fraction(&args)?;
        Ok(Box::new(HistogramAccumulator {
            grid,
            p,
            n: 0,
            counts: vec![0; grid.bins()],
        }))
    }
}

#[derive(Debug)]
struct HistogramAccumulator {
    grid: BinGrid,
    p: f64,
    n: u64,
    counts: Vec<u64>,
}

fn bad_state() -> DataFusionError {
    DataFusionError::Internal("a histogram state does not match its grid".into())
}

impl Accumulator for HistogramAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(values) = values.first() else {
            return Err(DataFusionError::Internal(
                "a percentile without its column".into(),
            ));
        };
        let values = arrow::compute::cast(values, &DataType::Float64)?;
        let values = values.as_primitive_opt::<Float64Type>().ok_or_else(|| {
            DataFusionError::Internal("a percentile column is not numeric".into())
        })?;
        for x in values.iter().flatten() {
            if let Some(b) = self.grid.bin(x) {
                self.n += 1;
                self.counts[b] += 1;
            }
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [n, bins] = states else {
            return Err(bad_state());
        };
        let n = n.as_primitive_opt::<UInt64Type>().ok_or_else(bad_state)?;
        self.n = n.iter().flatten().fold(self.n, |a, b| a.saturating_add(b));
        let bins = bins.as_list_opt::<i32>().ok_or_else(bad_state)?;
        for row in 0..bins.len() {
            if bins.is_null(row) {
                continue;
            }
            let values = bins.value(row);
            let values = values
                .as_primitive_opt::<UInt64Type>()
                .ok_or_else(bad_state)?;
            if values.len() != self.counts.len() {
                return Err(bad_state());
            }
            for (t, v) in self.counts.iter_mut().zip(values.iter()) {
                *t = t.saturating_add(v.unwrap_or(0));
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let list = ListArray::from_iter_primitive::<UInt64Type, _, _>([Some(
            self.counts.iter().map(|v| Some(*v)),
        )]);
        Ok(vec![
            ScalarValue::UInt64(Some(self.n)),
            ScalarValue::List(Arc::new(list)),
        ])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Float64(
            self.grid.percentile(&self.counts, self.p),
        ))
    }

    fn size(&self) -> usize {
        size_of_val(self) + 8 * self.counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, RecordBatch};
    use datafusion::prelude::SessionContext;

    async fn one(ctx: &SessionContext, sql: &str) -> Result<Option<f64>> {
        let rows = ctx.sql(sql).await?.collect().await?;
        Ok(rows
            .first()
            .map(|b| b.column(0).as_primitive::<Float64Type>())
            .and_then(|c| (!c.is_null(0)).then(|| c.value(0))))
    }

    #[tokio::test]
    async fn percentiles_over_sql_match_the_exact_ones_on_unit_bins() {
        let ctx = SessionContext::new();
        let grids = Grids::from([
            (
                "score".to_string(),
                BinGrid::new(0.0, 10.0, 1.0, true).expect("grid"),
            ),
            (
                "weight".to_string(),
                BinGrid::new(30.0, 200.0, 5.0, false).expect("grid"),
            ),
        ]);
        for f in functions(Arc::new(grids)) {
            ctx.register_udaf(f);
        }
        let batch = RecordBatch::try_from_iter(vec![
            (
                "score",
                Arc::new(Int64Array::from(vec![
                    Some(3),
                    Some(7),
                    None,
                    Some(8),
                    Some(4),
                    Some(4),
                ])) as ArrayRef,
            ),
            (
                "weight",
                Arc::new(Float64Array::from(vec![
                    61.0, 72.5, 80.0, 55.0, 90.0, 250.0,
                ])),
            ),
        ])
        .expect("test");
        ctx.register_batch("t", batch).expect("test");
        // 3, 4, 4, 7, 8: the median is 4, the 75th percentile 7.
        assert_eq!(
            one(&ctx, "SELECT median(score) FROM t").await.expect("sql"),
            Some(4.0)
        );
        assert_eq!(
            one(&ctx, "SELECT percentile_cont(score, 0.75) FROM t")
                .await
                .expect("sql"),
            Some(7.0)
        );
        assert_eq!(
            one(
                &ctx,
                "SELECT percentile_cont(0.75) WITHIN GROUP (ORDER BY score) FROM t"
            )
            .await
            .expect("sql"),
            Some(7.0)
        );
        assert_eq!(
            one(
                &ctx,
                "SELECT approx_percentile_cont(0.25) WITHIN GROUP (ORDER BY score DESC) FROM t"
            )
            .await
            .expect("sql"),
            Some(7.0)
        );
        let w = one(&ctx, "SELECT median(weight) FROM t")
            .await
            .expect("sql")
            .expect("a value");
        // Exact: (72.5 + 80) / 2 = 76.25, from 5-unit bins.
        assert!((w - 76.25).abs() <= 5.0, "{w}");
        assert_eq!(
            one(&ctx, "SELECT median(score) FROM t WHERE score > 100")
                .await
                .expect("sql"),
            None
        );
        // No grid for a computed value or an unknown column; no percentile outside [0, 1].
        for bad in [
            "SELECT median(score + 1) FROM t",
            "SELECT percentile_cont(score, 1.5) FROM t",
            "SELECT median(DISTINCT score) FROM t",
        ] {
            let err = one(&ctx, bad).await.expect_err(bad);
            assert!(matches!(err, DataFusionError::Plan(_)), "{bad}: {err}");
        }
    }
}
