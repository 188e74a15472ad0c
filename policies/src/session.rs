//! A DataFusion session locked down for researcher SQL.
//!
//! Built without DataFusion's default features: only allow-listed scalar and aggregate
//! functions, no table functions, no URL tables, no file formats or table factories, and no
//! information_schema. Statements are refused through `SQLOptions`.

use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::common::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use datafusion::optimizer::{Analyzer, Optimizer};
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    Expr as SQLExpr, ObjectName, Statement as SQLStatement, TableFactor, Visit, Visitor,
};

use trustql_distribution::{BinGrid, Grids};
use trustql_schemas::{ColumnType, TrustSchema};

use crate::policy::SHIPPABLE_AGGREGATES;
use crate::refusal::{Refusal, Rule};

/// Scalar functions a query may call: none reads anything but its arguments, and none fails on
/// data once [`TotalExpressions`](crate::TotalExpressions) has rewritten the plan and vetting has checked its constant
/// arguments. `date_bin` is not offered: it fails on data in ways no rewrite covers (an
/// overflowing bin, a stride too large for the value).
pub const ALLOWED_SCALAR_FUNCTIONS: [&str; 30] = [
    "abs",
    "btrim",
    "ceil",
    "char_length",
    "character_length",
    "coalesce",
    "date_part",
    "date_trunc",
    "datepart",
    "datetrunc",
    "floor",
    // A field of a released struct (`get_field(survival_at(…), 'survival')`); no table has a
    // struct column, and a missing field fails at planning, never on a value.
    "get_field",
    "greatest",
    "least",
    "left",
    "length",
    "lower",
    "ltrim",
    "nullif",
    "nvl",
    "right",
    "round",
    "rtrim",
    "sign",
    "signum",
    "substr",
    "substring",
    "trim",
    "trunc",
    "upper",
];

/// SQL options that refuse DDL, DML and statements (SET, transactions…).
pub fn sql_options() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Optimiser rules every TrustQL plan goes without, at the nodes and at the coordinator alike.
/// Sharing one accumulator between identical aggregates would reshape the states a node ships
/// and the coordinator merges (keep one state per written aggregate); the distinct rewrite nests
/// an aggregation; and a grouped aggregate over an input the optimiser proves empty
/// (`WHERE x = 'a' AND x = 'b'`) stays an aggregate, answered with no groups as any empty input
/// is, rather than collapsing into a plan with no aggregation to merge.
pub const LOCKED_OUT_OPTIMIZER_RULES: &[&str] = &[
    "single_distinct_aggregation_to_group_by",
    "common_sub_expression_eliminate",
    "propagate_empty_relation",
];

/// DataFusion's optimiser rules less [`LOCKED_OUT_OPTIMIZER_RULES`] and `also`.
pub fn optimizer_rules_without(
    also: &[&str],
) -> Vec<Arc<dyn datafusion::optimizer::OptimizerRule + Send + Sync>> {
    Optimizer::new()
        .rules
        .into_iter()
        .filter(|r| !LOCKED_OUT_OPTIMIZER_RULES.contains(&r.name()) && !also.contains(&r.name()))
        .collect()
}

/// Each column's public grid of value bins, by name: the columns a percentile may read. A name
/// that two tables give different grids has none, so a percentile never reads the wrong one.
pub fn percentile_grids(schema: &TrustSchema) -> Grids {
    let mut grids = Grids::new();
    let mut ambiguous = Vec::new();
    for table in schema.tables() {
        for column in &table.columns {
            let (Some([lower, upper]), Some(width)) = (column.bounds, column.bin_width) else {
                continue;
            };
            let whole = column.ty == ColumnType::Int64;
            let Ok(grid) = BinGrid::new(lower, upper, width, whole) else {
                continue;
            };
            if grids
                .insert(column.name.clone(), grid)
                .is_some_and(|g| g != grid)
            {
                ambiguous.push(column.name.clone());
            }
        }
    }
    for name in ambiguous {
        grids.remove(&name);
    }
    grids
}

/// A session with only the allow-listed functions; percentiles read `schema`'s grids.
pub fn locked_session(
    config: SessionConfig,
    runtime: Arc<RuntimeEnv>,
    schema: &TrustSchema,
) -> SessionContext {
    let scalar = datafusion::functions::all_default_functions()
        .into_iter()
        .filter(|f| {
            ALLOWED_SCALAR_FUNCTIONS.contains(&f.name())
                || f.aliases()
                    .iter()
                    .any(|a| ALLOWED_SCALAR_FUNCTIONS.contains(&a.as_str()))
        })
        .collect::<Vec<_>>();
    // Every shippable aggregate is registered; the policy narrows what a query may use.
    // DataFusion's percentiles keep every value; ours count bins (trustql-distribution).
    let aggregates = datafusion::functions_aggregate::all_default_aggregate_functions()
        .into_iter()
        .filter(|f| {
            let name = f.name().to_lowercase();
            !trustql_distribution::is_percentile(&name)
                && SHIPPABLE_AGGREGATES.contains(&name.as_str())
                || f.aliases()
                    .iter()
                    .any(|a| SHIPPABLE_AGGREGATES.contains(&a.as_str()))
        })
        .chain(trustql_survival::functions().into_iter().map(Arc::new))
        .chain(
            trustql_distribution::functions(Arc::new(percentile_grids(schema)))
                .into_iter()
                .map(Arc::new),
        )
        .collect::<Vec<_>>();
    let config = config.with_information_schema(false);
    // Rules that would break two-phase aggregation across the network: fusing Partial and
    // Final, answering COUNT(*) from statistics, rewriting COUNT(DISTINCT) into a nested
    // aggregation whose first phase has one row per distinct value, and merging aggregates.
    let optimizer_rules = optimizer_rules_without(&[]);
    let physical_rules = PhysicalOptimizer::new()
        .rules
        .into_iter()
        .filter(|r| {
            !matches!(
                r.name(),
                "CombinePartialFinalAggregate" | "aggregate_statistics"
            )
        })
        .collect();
    // Every plan is made total after type coercion, so the casts coercion adds are covered too.
    let mut analyzer_rules = Analyzer::new().rules;
    analyzer_rules.push(Arc::new(crate::total::TotalExpressions));
    let state = SessionStateBuilder::new()
        .with_analyzer_rules(analyzer_rules)
        .with_optimizer_rules(optimizer_rules)
        .with_physical_optimizer_rules(physical_rules)
        .with_config(config)
        .with_runtime_env(runtime)
        .with_scalar_functions(scalar)
        .with_aggregate_functions(aggregates)
        .with_expr_planners(vec![
            Arc::new(datafusion::functions::core::planner::CoreFunctionPlanner::default())
                as Arc<dyn datafusion::logical_expr::planner::ExprPlanner>,
            Arc::new(datafusion::functions::datetime::planner::DatetimeFunctionPlanner),
            Arc::new(datafusion::functions::unicode::planner::UnicodeFunctionPlanner),
            Arc::new(datafusion::functions_aggregate::planner::AggregateFunctionPlanner),
        ])
        .build();
    SessionContext::new_with_state(state)
}

/// Plans researcher SQL: refuses statements; planning errors (which never see data) are
/// reported as invalid SQL, unknown functions as the function rule. The plan is as written;
/// the session's analyzer makes its expressions total ([`TotalExpressions`](crate::TotalExpressions)) whenever it is
/// optimised or run, at the node and at the coordinator alike.
pub async fn plan_sql(ctx: &SessionContext, sql: &str) -> Result<LogicalPlan, Refusal> {
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state
        .sql_to_statement(sql, &dialect)
        .map_err(|e| planning_refusal(&e))?;
    // Refuse statements before planning: some (COPY) would otherwise fail later with a
    // less helpful message.
    match &statement {
        DFStatement::Statement(s) if matches!(**s, SQLStatement::Query(_)) => {}
        DFStatement::Explain(_) => return Err(explain_refusal()),
        DFStatement::Statement(s) if matches!(**s, SQLStatement::Explain { .. }) => {
            return Err(explain_refusal());
        }
        _ => return Err(statement_refusal()),
    }
    // Functions are checked on the parsed query, by name against what this session
    // registered, so an unknown one is refused by the function rule, not by reading the
    // planner's error message.
    if let DFStatement::Statement(query) = &statement {
        let mut functions = Functions {
            state: &state,
            ident_normalization: state
                .config()
                .options()
                .sql_parser
                .enable_ident_normalization,
        };
        if let ControlFlow::Break(refusal) = query.visit(&mut functions) {
            return Err(refusal);
        }
    }
    let plan = state
        .statement_to_plan(statement)
        .await
        .map_err(|e| planning_refusal(&e))?;
    sql_options()
        .verify_plan(&plan)
        .map_err(|_| statement_refusal())?;
    Ok(plan)
}

/// The refusal for DDL, DML, COPY, SET and other statements.
pub(crate) fn statement_refusal() -> Refusal {
    Refusal::new(
        Rule::Statement,
        "only SELECT queries are accepted: DDL, DML, COPY, SET, DESCRIBE and other statements \
         are refused",
    )
}

/// The refusal for EXPLAIN.
pub(crate) fn explain_refusal() -> Refusal {
    Refusal::new(
        Rule::Statement,
        "EXPLAIN is not available: plans can reveal table statistics",
    )
}

/// Finds the first function call or table function the session does not offer.
struct Functions<'a> {
    state: &'a SessionState,
    ident_normalization: bool,
}

impl Functions<'_> {
    fn known(&self, name: &ObjectName) -> bool {
        let [part] = name.0.as_slice() else {
            return false;
        };
        let Some(ident) = part.as_ident() else {
            return false;
        };
        let name = if self.ident_normalization && ident.quote_style.is_none() {
            ident.value.to_lowercase()
        } else {
            ident.value.clone()
        };
        // UNNEST is the planner's own; the vetting allows it only above the aggregation.
        name == "unnest"
            || self.state.scalar_functions().contains_key(&name)
            || self.state.aggregate_functions().contains_key(&name)
            || self.state.window_functions().contains_key(&name)
    }
}

impl Visitor for Functions<'_> {
    type Break = Refusal;

    fn pre_visit_expr(&mut self, expr: &SQLExpr) -> ControlFlow<Refusal> {
        match expr {
            SQLExpr::Function(f) if !self.known(&f.name) => {
                let name = f.name.to_string().to_lowercase();
                let name: String = name.chars().take(64).collect();
                ControlFlow::Break(Refusal::new(
                    Rule::Function,
                    format!("function `{name}` is not on the allow-list"),
                ))
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<Refusal> {
        let table_function = match factor {
            TableFactor::Table { args, .. } => args.is_some(),
            TableFactor::Function { .. }
            | TableFactor::TableFunction { .. }
            | TableFactor::UNNEST { .. } => true,
            _ => false,
        };
        if table_function {
            return ControlFlow::Break(Refusal::new(
                Rule::Function,
                "table functions are not available",
            ));
        }
        ControlFlow::Continue(())
    }
}

/// A planning error as a refusal, classified by the error's variant: what DataFusion does not
/// implement is unsupported, anything else is invalid SQL (planning never sees data).
fn planning_refusal(error: &DataFusionError) -> Refusal {
    if matches!(error.find_root(), DataFusionError::NotImplemented(_)) {
        return Refusal::new(
            Rule::Unsupported,
            "the query uses SQL that TrustQL does not support",
        );
    }
    let message = error.to_string();
    let first_line = message.lines().next().unwrap_or_default();
    // Planning errors come from the SQL text and the schema, never from data; still keep them
    // short and free of the planner's internals.
    let cleaned = first_line
        .trim_start_matches("Error during planning: ")
        .trim_start_matches("Schema error: ")
        .trim_start_matches("SQL error: ");
    let cleaned: String = cleaned.chars().take(300).collect();
    Refusal::new(
        Rule::Invalid,
        format!("the SQL could not be planned: {cleaned}"),
    )
}
