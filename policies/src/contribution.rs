//! Differential privacy's query side: bounding what one patient can bring to an aggregate.
//!
//! Every table the query reads is cut to at most `rows_per_patient` rows per patient (a
//! `ROW_NUMBER()` over the table's patient key), joins must be on identifier keys so a patient's
//! rows only ever meet that patient's rows, and SUM/AVG/VAR/STDDEV arguments are clamped to the policy's
//! bounds. The product of the table bounds is then the most rows one patient brings to the
//! aggregate; with the clamping bounds it gives each state's sensitivity, which the noise is
//! calibrated to.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, Cast, EmptyRelation, Expr, ExprFunctionExt, ExprSchemable, LogicalPlan,
    LogicalPlanBuilder, SortExpr, TableScan, col, lit, when,
};
use trustql_schemas::TrustSchema;

use crate::policy::DpRules;
use crate::refusal::{Refusal, Rule};
use crate::vet::Vetted;

/// Aggregates a DP query may use: their states are noisy counts and sums (VAR and STDDEV
/// through noisy moments: the count, and sums of the centred value and of its square).
pub const DP_AGGREGATES: [&str; 7] = [
    "count",
    "sum",
    "avg",
    "var",
    "var_pop",
    "stddev",
    "stddev_pop",
];

/// Aggregates whose states are DataFusion's (count, mean, m2) of a variance.
pub const MOMENT_AGGREGATES: [&str; 4] = ["var", "var_pop", "stddev", "stddev_pop"];

/// The range an aggregate's argument is clamped to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clamp {
    /// Lower bound.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
}

impl Clamp {
    /// The largest absolute value one row adds to a sum.
    pub fn max_abs(&self) -> f64 {
        self.lower.abs().max(self.upper.abs())
    }

    /// The middle of the range, around which moments are taken.
    pub fn centre(&self) -> f64 {
        (self.lower + self.upper) / 2.0
    }

    /// Half the width of the range: the largest distance from the centre.
    pub fn half_width(&self) -> f64 {
        (self.upper - self.lower) / 2.0
    }
}

const ROW_COLUMN: &str = "__trustql_row";

/// A query rewritten so that each patient's contribution is bounded.
#[derive(Debug, Clone)]
pub struct BoundedQuery {
    /// The aggregate to run instead of the researcher's: bounded input, clamped arguments.
    pub aggregate: Aggregate,
    /// Most rows one patient can bring to the aggregate.
    pub max_rows: u64,
    /// Per aggregate expression: the range its argument is clamped to (`None` for COUNT,
    /// whose rows add one).
    pub clamp: Vec<Option<Clamp>>,
    /// Per aggregate expression: its function, lower case.
    pub functions: Vec<String>,
    /// Per GROUP BY key, its public codes, when every key is a column with a code set.
    pub public_domain: Option<Vec<Vec<String>>>,
}

/// Bounds each patient's contribution to `aggregate` (from the unoptimised plan), or says why
/// the query cannot be answered with differential privacy.
pub fn bound_contributions(
    schema: &TrustSchema,
    rules: &DpRules,
    aggregate: &Aggregate,
    optimized: &LogicalPlan,
    vetted: &Vetted,
) -> Result<BoundedQuery, Refusal> {
    let refuse = |why: String| Err(Refusal::new(Rule::Unsupported, why));
    if vetted.grouping_sets {
        return refuse(
            "ROLLUP, CUBE and GROUPING SETS are not available with differential privacy: a \
             patient would count once per grouping set; run one query per grouping"
                .into(),
        );
    }
    if let Some(problem) = shape_problem(optimized) {
        return refuse(format!(
            "with differential privacy a query may only join, filter and aggregate once: {problem}"
        ));
    }
    if !vetted.joins_on_keys {
        return refuse(
            "with differential privacy every join must be an equality of identifier keys (for \
             example tumour.patientid = patient.patientid), so one patient's rows never meet \
             another's"
                .into(),
        );
    }

    let mut clamp = Vec::with_capacity(aggregate.aggr_expr.len());
    let mut functions = Vec::with_capacity(aggregate.aggr_expr.len());
    let mut aggr_expr = Vec::with_capacity(aggregate.aggr_expr.len());
    for (i, expr) in aggregate.aggr_expr.iter().enumerate() {
        let (expr, bound, function) = clamp_argument(
            expr,
            vetted.argument_sources.get(i),
            rules,
            aggregate.input.schema(),
        )?;
        aggr_expr.push(expr);
        clamp.push(bound);
        functions.push(function);
    }

    let mut max_rows: u64 = 1;
    let mut problem = None;
    let input = Arc::unwrap_or_clone(Arc::clone(&aggregate.input))
        .transform_up(|node| match node {
            LogicalPlan::TableScan(scan) => match bound_scan(schema, rules, scan) {
                Ok((plan, rows)) => {
                    max_rows = max_rows.saturating_mul(rows);
                    Ok(Transformed::yes(plan))
                }
                Err(refusal) => {
                    problem = Some(refusal);
                    Ok(Transformed::new(
                        LogicalPlan::EmptyRelation(EmptyRelation {
                            produce_one_row: false,
                            schema: Arc::new(DFSchema::empty()),
                        }),
                        true,
                        TreeNodeRecursion::Stop,
                    ))
                }
            },
            other => Ok(Transformed::no(other)),
        })
        .map_err(|_| Refusal::new(Rule::Unsupported, "the plan could not be bounded"))?
        .data;
    if let Some(refusal) = problem {
        return Err(refusal);
    }
    let aggregate = Aggregate::try_new(Arc::new(input), aggregate.group_expr.clone(), aggr_expr)
        .map_err(|_| Refusal::new(Rule::Unsupported, "the plan could not be bounded"))?;

    let public_domain = vetted
        .key_code_sets
        .iter()
        .map(|set| {
            let set = schema.code_set(set.as_deref()?)?;
            Some(set.codes.iter().map(|c| c.code.clone()).collect())
        })
        .collect::<Option<Vec<Vec<String>>>>();
    Ok(BoundedQuery {
        aggregate,
        max_rows,
        clamp,
        functions,
        public_domain,
    })
}

/// Why the optimised plan is not one aggregation over joined, filtered tables, if it is not.
fn shape_problem(optimized: &LogicalPlan) -> Option<&'static str> {
    let mut aggregates = 0;
    let mut below = false;
    let mut problem = None;
    let _ = optimized.apply(|node| {
        match node {
            LogicalPlan::Aggregate(_) => {
                aggregates += 1;
                below = true;
            }
            LogicalPlan::TableScan(_)
            | LogicalPlan::Projection(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Join(_) => {}
            LogicalPlan::Filter(filter)
                if below
                    && filter
                        .predicate
                        .exists(|e| {
                            Ok(matches!(
                                e,
                                Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
                            ))
                        })
                        .unwrap_or(true) =>
            {
                problem = Some("a subquery's result would depend on other patients");
            }
            LogicalPlan::Filter(_) => {}
            // Above the aggregate the coordinator finishes HAVING, ORDER BY and LIMIT on noisy
            // values; below it a sort, limit, window or union could change with one patient.
            _ if below => problem = Some("only tables, joins and filters may feed the aggregate"),
            _ => {}
        }
        Ok(if problem.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    if aggregates > 1 {
        return Some("an aggregate inside another (or in a subquery) is not supported");
    }
    problem
}

/// The aggregate with its argument clamped to the policy's bounds, the range, and its function.
fn clamp_argument(
    expr: &Expr,
    source: Option<&Option<String>>,
    rules: &DpRules,
    input: &DFSchema,
) -> Result<(Expr, Option<Clamp>, String), Refusal> {
    let (inner, alias) = match expr {
        Expr::Alias(a) => (a.expr.as_ref(), Some(a.name.clone())),
        other => (other, None),
    };
    let Expr::AggregateFunction(AggregateFunction { func, params }) = inner else {
        return Err(Refusal::new(
            Rule::Aggregate,
            "only plain aggregate functions are supported",
        ));
    };
    let name = func.name().to_lowercase();
    if !DP_AGGREGATES.contains(&name.as_str()) {
        return Err(Refusal::new(
            Rule::Aggregate,
            format!(
                "{} is not available with differential privacy; use COUNT, SUM, AVG, VAR or STDDEV",
                name.to_uppercase()
            ),
        ));
    }
    if name == "count" {
        return Ok((expr.clone(), None, name));
    }
    if params.distinct {
        return Err(Refusal::new(
            Rule::Aggregate,
            format!(
                "{}(DISTINCT …) is not available with differential privacy",
                name.to_uppercase()
            ),
        ));
    }
    let Some(Some(source)) = source else {
        return Err(Refusal::new(
            Rule::Aggregate,
            format!(
                "with differential privacy {} takes a plain column, clamped to bounds the trust \
                 sets; count with COUNT(*) FILTER (WHERE …) instead of summing indicators",
                name.to_uppercase()
            ),
        ));
    };
    let Some([lower, upper]) = rules.bounds.get(source).copied() else {
        return Err(Refusal::new(
            Rule::Aggregate,
            format!(
                "this trust sets no bounds for `{source}`, so it cannot be summed or averaged \
                 with differential privacy; ask its data controller to add [dp] bounds"
            ),
        ));
    };
    let Some(argument) = params.args.first() else {
        return Err(Refusal::new(
            Rule::Aggregate,
            "the aggregate has no argument",
        ));
    };
    // The bounds take the column's type, so the states keep the type the coordinator plans;
    // for an integer column they are rounded inwards, so every clamped value lies within them.
    let ty = argument
        .get_type(input)
        .map_err(|_| Refusal::new(Rule::Unsupported, "the argument's type is unknown"))?;
    let (lower, upper) = if ty.is_integer() {
        (lower.ceil(), upper.floor())
    } else {
        (lower, upper)
    };
    if lower > upper {
        return Err(Refusal::new(
            Rule::Aggregate,
            format!("the bounds this trust sets for `{source}` hold no whole number"),
        ));
    }
    let typed = |x: f64| {
        Expr::Cast(Cast::new(
            Box::new(lit(ScalarValue::Float64(Some(x)))),
            ty.clone(),
        ))
    };
    let clamped = when(argument.clone().lt(typed(lower)), typed(lower))
        .when(argument.clone().gt(typed(upper)), typed(upper))
        .otherwise(argument.clone())
        .map_err(|_| Refusal::new(Rule::Unsupported, "the argument could not be clamped"))?;
    let mut params = params.clone();
    params.args = vec![clamped];
    let clamped = Expr::AggregateFunction(AggregateFunction {
        func: Arc::clone(func),
        params,
    });
    // Keep the researcher's name: the state columns are named after it, and the coordinator
    // matches them by name.
    let clamped = clamped.alias(alias.unwrap_or_else(|| expr.schema_name().to_string()));
    Ok((clamped, Some(Clamp { lower, upper }), name))
}

/// A table scan cut to at most its bound of rows per patient; the bound (1 for the patient table).
fn bound_scan(
    schema: &TrustSchema,
    rules: &DpRules,
    scan: TableScan,
) -> Result<(LogicalPlan, u64), Refusal> {
    let name = scan.table_name.table().to_string();
    let patient_table = &schema.info().patient_table;
    if &name == patient_table {
        return Ok((LogicalPlan::TableScan(scan), 1));
    }
    let table = schema
        .table(&name)
        .map_err(|_| Refusal::new(Rule::Table, format!("unknown table `{name}`")))?;
    let Some(key) = schema
        .patient_column(&name)
        .ok()
        .flatten()
        .and_then(|column| table.column(&column))
    else {
        return Err(Refusal::new(
            Rule::Unsupported,
            format!(
                "with differential privacy every table must hold the patient key, so each \
                 patient's rows can be bounded; `{name}` does not"
            ),
        ));
    };
    let rows = rules.rows_per_patient(&name);
    let qualifier = scan.table_name.clone();
    let columns: Vec<Expr> = scan
        .projected_schema
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    let order = table.primary_key.as_deref().unwrap_or(&key.name);
    let numbered = row_number()
        .partition_by(vec![Expr::Column(Column::new(
            Some(qualifier.clone()),
            &key.name,
        ))])
        .order_by(vec![SortExpr::new(
            Expr::Column(Column::new(Some(qualifier), order)),
            true,
            false,
        )])
        .build()
        .map_err(|_| Refusal::new(Rule::Unsupported, "the table could not be bounded"))?
        .alias(ROW_COLUMN);
    let plan = LogicalPlanBuilder::from(LogicalPlan::TableScan(scan))
        .window(vec![numbered])
        .and_then(|b| b.filter(col(ROW_COLUMN).lt_eq(lit(u64::from(rows)))))
        .and_then(|b| b.project(columns))
        .and_then(|b| b.build())
        .map_err(|_| Refusal::new(Rule::Unsupported, "the table could not be bounded"))?;
    Ok((plan, u64::from(rows)))
}
