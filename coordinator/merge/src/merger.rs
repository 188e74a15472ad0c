//! Planning at the coordinator and finishing the nodes' states.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, cast as cast_expr, lit, when,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::prelude::{SessionConfig, SessionContext};
use trustql_policies::{
    Refusal, Rule, TotalsRules, aggregate_of, locked_session, optimizer_rules_without, plan_sql,
};
use trustql_protocol::{AnswerMeta, ColumnKind, PATIENTS_COLUMN};
use trustql_schemas::TrustSchema;

use crate::error::MergeError;

/// One node's protected answer, as received.
#[derive(Debug, Clone)]
pub struct SiteStates {
    /// The answering trust.
    pub trust: String,
    /// The states (columns as `meta.columns` describes them).
    pub batch: RecordBatch,
    /// The answer's metadata.
    pub meta: AnswerMeta,
}

/// Plans against empty tables of the shared schema and finishes nodes' states.
pub struct Merger {
    ctx: SessionContext,
    rules: TotalsRules,
    grids: trustql_policies::Grids,
}

/// A query planned at the coordinator, ready to merge answers into.
#[derive(Debug, Clone)]
pub struct Prepared {
    outputs: Vec<AggregateOutput>,
    key_outputs: Option<Vec<String>>,
    plan: Arc<dyn ExecutionPlan>,
    partial: Arc<dyn ExecutionPlan>,
    partial_schema: SchemaRef,
    distinct: HashSet<String>,
    survival: bool,
    percentiles: Vec<(String, f64)>,
}

impl Merger {
    /// A merger for `schema`: the locked session, one empty table per schema table.
    pub fn new(schema: &TrustSchema, totals: TotalsRules) -> Result<Self, MergeError> {
        // One partition: Partial → Final with nothing between, and the same locked rules as
        // the nodes, except pushing filters down, which would move a HAVING on a key below
        // the aggregate, into the part the nodes' states replace.
        let locked = locked_session(
            SessionConfig::new().with_target_partitions(1),
            Arc::new(RuntimeEnv::default()),
            schema,
        );
        let rules = optimizer_rules_without(&["push_down_filter"]);
        let state = SessionStateBuilder::new_from_existing(locked.state())
            .with_optimizer_rules(rules)
            .build();
        let ctx = SessionContext::new_with_state(state);
        for table in schema.tables() {
            let arrow_schema = schema
                .arrow_schema(&table.name)
                .map_err(|e| MergeError::Setup(e.to_string()))?;
            let empty = MemTable::try_new(arrow_schema, vec![vec![]])
                .map_err(|e| MergeError::Setup(e.to_string()))?;
            ctx.register_table(table.name.as_str(), Arc::new(empty))
                .map_err(|e| MergeError::Setup(e.to_string()))?;
        }
        Ok(Merger {
            ctx,
            rules: totals,
            grids: trustql_policies::percentile_grids(schema),
        })
    }

    /// The planning session (for listing tables and schemas).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Plans `sql`; refuses early what no node could ever answer.
    pub async fn prepare(&self, sql: &str) -> Result<Prepared, MergeError> {
        let plan = plan_sql(&self.ctx, sql).await?;
        if aggregate_of(&plan).is_none() {
            return Err(Refusal::new(
                Rule::NotAggregate,
                "only aggregate queries are answered (COUNT, SUM, AVG … with or without GROUP BY)",
            )
            .into());
        }
        let (key_outputs, outputs) = result_columns(&plan);
        let calls: Vec<(String, Option<String>)> = aggregate_of(&plan)
            .map(|agg| {
                agg.aggr_expr
                    .iter()
                    .filter_map(|e| match e.clone().unalias_nested().data {
                        Expr::AggregateFunction(f) => Some((
                            f.func.name().to_lowercase(),
                            match f.params.args.first() {
                                Some(Expr::Column(c)) => Some(c.name.clone()),
                                _ => None,
                            },
                        )),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let survival = calls
            .iter()
            .any(|(name, _)| trustql_policies::is_survival(name));
        // Each percentile's column and bin width, for the note on how close it is.
        let mut percentiles: Vec<(String, f64)> = calls
            .iter()
            .filter(|(name, _)| trustql_policies::is_percentile(name))
            .filter_map(|(_, column)| column.clone())
            .filter_map(|c| self.grids.get(&c).map(|g| (c, g.width())))
            .collect();
        percentiles.dedup();
        let mut distinct = HashSet::new();
        let rules = self.rules;
        let plan = plan
            .transform_up(|node| match node {
                LogicalPlan::Aggregate(agg) => federate_aggregate(agg, &mut distinct, &rules),
                other => Ok(Transformed::no(other)),
            })
            .map_err(fault("could not plan the merge"))?
            .data;
        let physical = self
            .ctx
            .state()
            .create_physical_plan(&plan)
            .await
            .map_err(fault("could not plan the merge"))?;
        let partial = single_partial(&physical)?;
        Ok(Prepared {
            outputs,
            key_outputs,
            partial_schema: partial.schema(),
            plan: physical,
            partial,
            distinct,
            survival,
            percentiles,
        })
    }

    /// Finishes the conformed states of every answering node into the query's result.
    pub async fn merge(
        &self,
        prepared: &Prepared,
        states: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>, MergeError> {
        let source: Arc<dyn ExecutionPlan> =
            MemorySourceConfig::try_new_exec(&[states], Arc::clone(&prepared.partial_schema), None)
                .map_err(fault("could not hold the answers"))?;
        let plan = Arc::clone(&prepared.plan)
            .transform_up(|node| {
                Ok(if Arc::ptr_eq(&node, &prepared.partial) {
                    Transformed::yes(Arc::clone(&source))
                } else {
                    Transformed::no(node)
                })
            })
            .map_err(fault("could not plan the merge"))?
            .data;
        datafusion::physical_plan::collect(plan, self.ctx.task_ctx())
            .await
            .map_err(fault("the final aggregation failed"))
    }
}

impl Prepared {
    /// The result's schema.
    pub fn schema(&self) -> SchemaRef {
        self.plan.schema()
    }

    /// The aggregates that reach the result as they are, with their result column.
    pub fn aggregate_outputs(&self) -> &[AggregateOutput] {
        &self.outputs
    }

    /// The schema of the states every node's answer is conformed to (keys first).
    pub fn partial_schema(&self) -> SchemaRef {
        Arc::clone(&self.partial_schema)
    }

    /// The result column of each GROUP BY key, in the order of the states' key columns (which
    /// come first); `None` unless every key reaches the result unchanged, under a name of its
    /// own, and the query has no grouping sets.
    pub fn key_outputs(&self) -> Option<&[String]> {
        self.key_outputs.as_deref()
    }

    /// Whether the query counts distinct values (summed over trusts, see the notes).
    pub fn counts_distinct(&self) -> bool {
        !self.distinct.is_empty()
    }

    /// The column and bin width of each percentile the query asks for (`median`, …).
    pub fn percentiles(&self) -> &[(String, f64)] {
        &self.percentiles
    }

    /// Whether the query asks for a survival curve (`km_curve`, `survival_at`).
    pub fn has_survival(&self) -> bool {
        self.survival
    }

    /// Puts one node's answer into the column order and types of this query's states.
    pub fn conform(&self, site: &SiteStates) -> Result<RecordBatch, MergeError> {
        let shape = |reason: String| MergeError::Shape {
            trust: site.trust.clone(),
            reason,
        };
        let columns = &site.meta.columns;
        if columns.len() != site.batch.num_columns() {
            return Err(shape("its metadata does not describe its columns".into()));
        }
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.partial_schema.fields().len());
        // Keys are named without their table (`t.gender` and `p.gender` are both `gender`):
        // the n-th state of a name is the node's n-th column of that name, never its first.
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for field in self.partial_schema.fields() {
            let name = field.name();
            let occurrence = seen.entry(name.as_str()).or_default();
            let nth = *occurrence;
            *occurrence += 1;
            let distinct_prefix = name
                .rsplit_once('[')
                .map(|(prefix, _)| prefix)
                .filter(|prefix| self.distinct.contains(*prefix));
            let patients = name.rsplit_once('[').map(|(prefix, _)| prefix) == Some(PATIENTS_COLUMN);
            let index = columns
                .iter()
                .enumerate()
                .filter(|(_, c)| match distinct_prefix {
                    _ if patients => c.kind == ColumnKind::Patients,
                    Some(prefix) => {
                        c.kind == ColumnKind::DistinctCount
                            && c.name.rsplit_once('[').map(|(p, _)| p) == Some(prefix)
                    }
                    None => c.name == *name && c.kind != ColumnKind::Patients,
                })
                .nth(nth)
                .map(|(i, _)| i);
            let Some(index) = index else {
                return Err(shape(format!("column {name} is missing")));
            };
            let array = site.batch.column(index);
            let array = if array.data_type() == field.data_type() {
                Arc::clone(array)
            } else {
                cast(array, field.data_type())
                    .map_err(|_| shape(format!("column {name} has the wrong type")))?
            };
            if array.null_count() > 0 && !field.is_nullable() {
                return Err(shape(format!("column {name} holds nulls")));
            }
            arrays.push(array);
        }
        RecordBatch::try_new(Arc::clone(&self.partial_schema), arrays)
            .map_err(|_| shape("its columns do not fit together".into()))
    }
}

/// An aggregate expression that is a column of the result unchanged (perhaps renamed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateOutput {
    /// Its index among the query's aggregate expressions.
    pub aggregate: usize,
    /// The result column holding it.
    pub column: String,
    /// The aggregate function, lower case (`count`, `sum`, `avg` …).
    pub function: String,
    /// The name its partial states carry (`<state>[count]`, `<state>[sum]` …).
    pub state: String,
}

/// Which result columns are the GROUP BY keys (all of them, or `None`) and which are
/// aggregates, passed through unchanged: through ORDER BY, LIMIT and HAVING to the projection
/// above the aggregate.
fn result_columns(plan: &LogicalPlan) -> (Option<Vec<String>>, Vec<AggregateOutput>) {
    let Some(aggregate) = aggregate_of(plan) else {
        return (None, Vec::new());
    };
    let mut node = plan;
    let projection = loop {
        match node {
            LogicalPlan::Projection(p) => break Some(p),
            LogicalPlan::Sort(_) | LogicalPlan::Limit(_) | LogicalPlan::Filter(_) => {
                match node.inputs().first() {
                    Some(input) => node = input,
                    None => break None,
                }
            }
            _ => break None,
        }
    };
    let names: Vec<(String, Option<Expr>)> = match projection {
        Some(p) => p
            .schema
            .fields()
            .iter()
            .zip(&p.expr)
            .map(|(f, e)| (f.name().clone(), Some(e.clone())))
            .collect(),
        None => aggregate
            .schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), None))
            .collect(),
    };
    // Matched with the table too: `t.gender` and `p.gender` are both named `gender`.
    let result_column = |produced: &Column| {
        names.iter().find_map(|(name, e)| match e {
            None => (*name == produced.name).then(|| name.clone()),
            Some(e) => match e.clone().unalias_nested().data {
                Expr::Column(c) if c == *produced => Some(name.clone()),
                _ => None,
            },
        })
    };
    let produced = |i: usize| Column::from(aggregate.schema.qualified_field(i));
    // A grouping set's schema has every distinct key, then its id, before the aggregates.
    let grouping_set = matches!(aggregate.group_expr.first(), Some(Expr::GroupingSet(_)));
    let keys = aggregate
        .group_expr_len()
        .unwrap_or(aggregate.group_expr.len());
    let key_outputs = (0..keys - usize::from(grouping_set))
        .map(|k| result_column(&produced(k)))
        .collect::<Option<Vec<_>>>()
        // A result column named twice cannot be told apart by name, nor a grouping set's
        // levels by their keys alone (a rolled-up NULL and a NULL value).
        .filter(|outputs| {
            !grouping_set && outputs.iter().collect::<HashSet<_>>().len() == outputs.len()
        });
    let mut outputs = Vec::new();
    for (a, expr) in aggregate.aggr_expr.iter().enumerate() {
        let produced = produced(keys + a);
        let function = match expr.clone().unalias_nested().data {
            Expr::AggregateFunction(f) => f.func.name().to_lowercase(),
            _ => continue,
        };
        if let Some(column) = result_column(&produced) {
            outputs.push(AggregateOutput {
                aggregate: a,
                column,
                function,
                state: produced.name,
            });
        }
    }
    (key_outputs, outputs)
}

/// Rewrites the query's aggregate for merging: COUNT(DISTINCT x) arrives as one count per
/// node and merges as SUM under the same name; with totals rules, the nodes' patient counts
/// are summed too and the rules ([`TotalsRules::apply`]) apply directly above the aggregate.
fn federate_aggregate(
    agg: Aggregate,
    distinct: &mut HashSet<String>,
    rules: &TotalsRules,
) -> datafusion::common::Result<Transformed<LogicalPlan>> {
    let mut counts = HashSet::new();
    let mut aggr_expr = agg
        .aggr_expr
        .iter()
        .map(|expr| match expr {
            Expr::AggregateFunction(AggregateFunction { func, params })
                if func.name().eq_ignore_ascii_case("count") =>
            {
                let name = expr.schema_name().to_string();
                counts.insert(name.clone());
                if !params.distinct {
                    return expr.clone();
                }
                distinct.insert(name.clone());
                let arg = params.args.first().cloned().unwrap_or(lit(1i64));
                sum(cast_expr(arg, DataType::Int64)).alias(name)
            }
            other => other.clone(),
        })
        .collect::<Vec<_>>();
    let protect = rules.is_active();
    if distinct.is_empty() && !protect {
        return Ok(Transformed::no(LogicalPlan::Aggregate(agg)));
    }
    if protect {
        // Fed from each node's distinct-patient column.
        aggr_expr.push(sum(lit(1i64)).alias(PATIENTS_COLUMN));
    }
    let plan = LogicalPlan::Aggregate(Aggregate::try_new(agg.input, agg.group_expr, aggr_expr)?);
    let plan = zero_distinct_counts(plan, distinct)?;
    Ok(Transformed::yes(rules.apply(
        plan,
        &counts,
        PATIENTS_COLUMN,
    )?))
}

/// A SUM of no counts is NULL, where COUNT(DISTINCT) of no rows is 0 (as COUNT's own final
/// gives): the summed distinct counts read 0 when no trust sent any.
fn zero_distinct_counts(
    plan: LogicalPlan,
    distinct: &HashSet<String>,
) -> datafusion::common::Result<LogicalPlan> {
    if distinct.is_empty() {
        return Ok(plan);
    }
    let exprs = plan
        .schema()
        .iter()
        .map(|(qualifier, field)| {
            let column = Expr::Column(Column::new(qualifier.cloned(), field.name()));
            if qualifier.is_none() && distinct.contains(field.name()) {
                when(column.clone().is_null(), lit(0i64))
                    .otherwise(column)
                    .map(|e| e.alias(field.name()))
            } else {
                Ok(column)
            }
        })
        .collect::<datafusion::common::Result<Vec<_>>>()?;
    LogicalPlanBuilder::from(plan).project(exprs)?.build()
}

fn single_partial(plan: &Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>, MergeError> {
    let mut partials = Vec::new();
    let mut stack = vec![Arc::clone(plan)];
    while let Some(node) = stack.pop() {
        if let Some(agg) = node.downcast_ref::<AggregateExec>()
            && *agg.mode() == AggregateMode::Partial
        {
            partials.push(Arc::clone(&node));
        }
        stack.extend(node.children().into_iter().cloned());
    }
    match partials.as_slice() {
        [one] => Ok(Arc::clone(one)),
        _ => Err(Refusal::new(
            Rule::Unsupported,
            "the query did not plan as a single two-phase aggregation (one GROUP BY level)",
        )
        .into()),
    }
}

fn engine(what: &str) -> MergeError {
    MergeError::Engine(what.to_string())
}

/// An engine error with its cause: logged here (the log stays local), bounded for the wire.
fn fault<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> MergeError {
    move |cause| {
        tracing::error!(%cause, "{what}");
        engine(what)
    }
}
