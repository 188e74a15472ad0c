//! Vetting a planned query against the schema's disclosure classes and a trust's policy.
//!
//! The node plans the researcher's SQL with DataFusion and hands the plans here. Vetting walks
//! the unoptimised logical plan, tracking for every column which schema column it comes from
//! (its lineage), so a renamed or re-projected identifier is still an identifier; joins and
//! their count are checked on the optimised plan, where equalities have become join keys.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{Scalar, StringArray};
use datafusion::arrow::compute::kernels::comparison;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::error::ArrowError;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::logical_expr::expr::{AggregateFunction, Alias, Cast, Like, TryCast};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, JoinType, LogicalPlan, Operator};
use trustql_schemas::{DisclosureClass, TrustSchema};

use crate::policy::{ClassRules, Policy, Project};
use crate::refusal::{Refusal, Rule};
use crate::session::{ALLOWED_SCALAR_FUNCTIONS, explain_refusal, statement_refusal};
use crate::total::TOTAL_FUNCTIONS;

/// What vetting learned about an accepted query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vetted {
    /// Schema tables the query reads.
    pub tables: Vec<String>,
    /// Number of group-by expressions of the aggregate.
    pub group_exprs: usize,
    /// Whether the aggregate uses ROLLUP, CUBE or GROUPING SETS.
    pub grouping_sets: bool,
    /// A column of the aggregate's input holding the patient key, if any.
    pub patient_key: Option<Column>,
    /// Per GROUP BY expression: the code set of the schema column it is, if it is one untouched.
    pub key_code_sets: Vec<Option<String>>,
    /// Per aggregate expression: the `table.column` its first argument is, if it is one untouched.
    pub argument_sources: Vec<Option<String>>,
    /// Whether every join is an equi-join of identifier keys of one domain, so a row only ever
    /// meets rows of the same patient.
    pub joins_on_keys: bool,
}

/// Where a column's values come from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    /// The most sensitive class among its sources.
    class: DisclosureClass,
    /// For an untransformed direct identifier: the key it joins on (`table.column` of the
    /// primary key it is or refers to); `None` if it is no key.
    key: Option<String>,
    /// `table.column` of (one of) its sources, for messages.
    source: String,
    /// Whether it is an untransformed schema column.
    bare: bool,
}

type Lineage = Vec<Option<Origin>>;

/// Checks that `researcher` may run queries for `project` at this trust today.
pub fn authorise<'a>(
    policy: &'a Policy,
    project: &str,
    researcher: &str,
    today: i32,
) -> Result<&'a Project, Refusal> {
    let Some(p) = policy.project(project) else {
        return Err(Refusal::new(
            Rule::Project,
            format!(
                "project `{project}` is not approved at trust {}",
                policy.policy.trust
            ),
        ));
    };
    if !p.researchers.iter().any(|r| r == researcher) {
        return Err(Refusal::new(
            Rule::Project,
            format!(
                "researcher `{researcher}` is not on project `{project}` at trust {}",
                policy.policy.trust
            ),
        ));
    }
    if !p.in_force(today) {
        return Err(Refusal::new(
            Rule::Project,
            format!(
                "project `{project}`'s approval at trust {} ended on {}",
                policy.policy.trust, p.expires
            ),
        ));
    }
    Ok(p)
}

/// Checks the SQL text before it is parsed: length, nesting and operators
/// ([`crate::check_text`]), so no query can overflow the stack or burn the CPU in planning.
pub fn vet_text(sql: &str, policy: &Policy) -> Result<(), Refusal> {
    crate::text::check_text(sql, &policy.query.text_limits())
}

/// Vets a planned query. `plan` is the unoptimised plan, `optimized` the same after DataFusion's
/// logical optimiser.
pub fn vet_plan(
    schema: &TrustSchema,
    policy: &Policy,
    project: &Project,
    plan: &LogicalPlan,
    optimized: &LogicalPlan,
) -> Result<Vetted, Refusal> {
    let vetter = Vetter {
        schema,
        policy,
        project,
    };
    vetter.check_node_kinds(plan)?;
    vetter.check_expressions(plan)?;
    // The optimised plan carries the casts type coercion added (`text_column = 3`).
    vetter.check_expressions(optimized)?;
    let aggregate = find_aggregate(plan)?;
    let LogicalPlan::Aggregate(agg) = aggregate else {
        return Err(not_aggregate());
    };
    let mut tables = Vec::new();
    let lineage = vetter.lineage(&agg.input, &mut tables, false)?;
    vetter.check_aggregate(agg, &lineage)?;
    vetter.check_joins(optimized)?;
    // The optimised plan's joins and pushed-down filters, below its innermost aggregate.
    let mut innermost = None;
    optimized
        .apply(|node| {
            if let LogicalPlan::Aggregate(a) = node {
                innermost = Some(Arc::clone(&a.input));
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(|_| Refusal::new(Rule::Unsupported, "the plan could not be inspected"))?;
    if let Some(input) = innermost {
        vetter.lineage(&input, &mut Vec::new(), true)?;
    }
    // Rounding and thresholds survive only table-builder shapes; DP answers the rest. Checked
    // last, so a query any mode refuses hears the precise rule it broke.
    if project.dp.is_none() && !policy.disclosure.is_unprotected() {
        crate::shape::check(schema, policy, agg)?;
    }
    tables.sort();
    tables.dedup();
    let grouping_sets = agg
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)));
    let patient_key = vetter.patient_key(&agg.input, &lineage);
    let input_schema = agg.input.schema();
    let key_code_sets = agg
        .group_expr
        .iter()
        .map(|e| {
            let source = vetter.bare_source(e, input_schema, &lineage)?;
            let (table, column) = source.split_once('.')?;
            schema.table(table).ok()?.column(column)?.code_set.clone()
        })
        .collect();
    let argument_sources = agg
        .aggr_expr
        .iter()
        .map(|e| match e.clone().unalias_nested().data {
            Expr::AggregateFunction(AggregateFunction { params, .. }) => params
                .args
                .first()
                .and_then(|a| vetter.bare_source(a, input_schema, &lineage)),
            _ => None,
        })
        .collect();
    let joins_on_keys = vetter.joins_on_keys(optimized);
    Ok(Vetted {
        tables,
        group_exprs: agg.group_expr.len(),
        grouping_sets,
        patient_key,
        key_code_sets,
        argument_sources,
        joins_on_keys,
    })
}

/// Plans, optimises and vets researcher SQL in a locked session; returns both plans.
pub async fn vet_sql(
    ctx: &datafusion::prelude::SessionContext,
    schema: &TrustSchema,
    policy: &Policy,
    project: &Project,
    sql: &str,
) -> Result<(LogicalPlan, LogicalPlan, Vetted), Refusal> {
    vet_text(sql, policy)?;
    let plan = crate::session::plan_sql(ctx, sql).await?;
    // Planning statements and EXPLAIN is harmless; optimising them is not needed to refuse them.
    let vetter = Vetter {
        schema,
        policy,
        project,
    };
    vetter.check_node_kinds(&plan)?;
    let optimized = ctx.state().optimize(&plan).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        Refusal::new(
            Rule::Invalid,
            format!(
                "the SQL could not be planned: {}",
                first.chars().take(300).collect::<String>()
            ),
        )
    })?;
    let vetted = vet_plan(schema, policy, project, &plan, &optimized)?;
    Ok((plan, optimized, vetted))
}

fn not_aggregate() -> Refusal {
    Refusal::new(
        Rule::NotAggregate,
        "only aggregate queries are answered (for example COUNT(*) … GROUP BY …); row-level \
         results never leave a trust",
    )
}

/// The aggregation of a vetted plan (the node runs only its partial half).
pub fn aggregate_of(plan: &LogicalPlan) -> Option<&datafusion::logical_expr::Aggregate> {
    match find_aggregate(plan) {
        Ok(LogicalPlan::Aggregate(agg)) => Some(agg),
        _ => None,
    }
}

/// The unnests on the way from the root down to the aggregation.
fn released_unnests(plan: &LogicalPlan) -> Vec<*const LogicalPlan> {
    let mut found = Vec::new();
    let mut node = plan;
    while !matches!(node, LogicalPlan::Aggregate(_)) {
        if matches!(node, LogicalPlan::Unnest(_)) {
            found.push(std::ptr::from_ref(node));
        }
        match node.inputs().as_slice() {
            [one] => node = one,
            _ => break,
        }
    }
    found
}

/// Descends from the root through the nodes that run after aggregation (at the coordinator)
/// to the one aggregate.
fn find_aggregate(plan: &LogicalPlan) -> Result<&LogicalPlan, Refusal> {
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Aggregate(_) => return Ok(node),
            LogicalPlan::Projection(p) => node = &p.input,
            LogicalPlan::Filter(f) => node = &f.input,
            LogicalPlan::Sort(s) => node = &s.input,
            LogicalPlan::Limit(l) => node = &l.input,
            LogicalPlan::SubqueryAlias(a) => node = &a.input,
            // Unnesting a released curve into rows (`unnest(km_curve(…))`).
            LogicalPlan::Unnest(u) => node = &u.input,
            LogicalPlan::Distinct(_) | LogicalPlan::Window(_) => {
                return Err(Refusal::new(
                    Rule::Nested,
                    "DISTINCT and window functions over aggregated results are not supported",
                ));
            }
            _ => return Err(not_aggregate()),
        }
    }
}

struct Vetter<'a> {
    schema: &'a TrustSchema,
    policy: &'a Policy,
    project: &'a Project,
}

impl Vetter<'_> {
    /// Refuses statements, EXPLAIN, recursion and other node kinds anywhere in the plan.
    fn check_node_kinds(&self, plan: &LogicalPlan) -> Result<(), Refusal> {
        let mut refusal = None;
        let mut aggregates = 0;
        // Above the aggregation an unnest reads only released values (a curve's intervals).
        let released = released_unnests(plan);
        plan.apply_with_subqueries(|node| {
            let found = match node {
                LogicalPlan::Unnest(_) if released.contains(&std::ptr::from_ref(node)) => None,
                LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => Some(explain_refusal()),
                LogicalPlan::Statement(_)
                | LogicalPlan::Ddl(_)
                | LogicalPlan::Dml(_)
                | LogicalPlan::Copy(_)
                | LogicalPlan::DescribeTable(_) => Some(statement_refusal()),
                LogicalPlan::RecursiveQuery(_) => Some(Refusal::new(
                    Rule::Recursion,
                    "recursive queries are not accepted",
                )),
                LogicalPlan::Window(_) => Some(Refusal::new(
                    Rule::Function,
                    "window functions are not accepted: they compute values per row",
                )),
                LogicalPlan::Extension(_) | LogicalPlan::Unnest(_) => Some(Refusal::new(
                    Rule::Unsupported,
                    "the query uses a construct TrustQL does not support",
                )),
                LogicalPlan::Subquery(_) => Some(Refusal::new(
                    Rule::Subquery,
                    "subqueries in conditions or select lists are not supported; use a join on \
                     the patient key instead",
                )),
                LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(_) => {
                    aggregates += 1;
                    (aggregates > 1).then(|| {
                        Refusal::new(
                            Rule::Nested,
                            "only one level of aggregation is supported (no aggregates or \
                             DISTINCT inside derived tables)",
                        )
                    })
                }
                _ => None,
            };
            if let Some(r) = found {
                refusal = Some(r);
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(|_| Refusal::new(Rule::Unsupported, "the plan could not be inspected"))?;
        refusal.map_or(Ok(()), Err)
    }

    /// Function allow-lists, subqueries, IN-list sizes and error oracles, in every expression.
    fn check_expressions(&self, plan: &LogicalPlan) -> Result<(), Refusal> {
        let mut refusal: Option<Refusal> = None;
        plan.apply(|node| {
            // Join conditions read both sides; everything else reads its input.
            let schema = match node {
                LogicalPlan::Join(join) => Arc::clone(&join.schema),
                _ => node
                    .inputs()
                    .first()
                    .map(|i| Arc::clone(i.schema()))
                    .unwrap_or_else(|| Arc::clone(node.schema())),
            };
            node.apply_expressions(|expr| {
                expr.apply(|e| {
                    if let Some(r) = self.check_expr(e, &schema) {
                        refusal = Some(r);
                        return Ok(TreeNodeRecursion::Stop);
                    }
                    Ok(TreeNodeRecursion::Continue)
                })
            })
            .map(|r| {
                if refusal.is_some() {
                    TreeNodeRecursion::Stop
                } else {
                    r
                }
            })
        })
        .map_err(|_| Refusal::new(Rule::Unsupported, "the plan could not be inspected"))?;
        refusal.map_or(Ok(()), Err)
    }

    fn check_expr(&self, e: &Expr, schema: &DFSchema) -> Option<Refusal> {
        match e {
            Expr::ScalarFunction(f) => {
                let name = f.func.name();
                // The rewrite's own total functions appear only in rewritten plans.
                if !ALLOWED_SCALAR_FUNCTIONS.contains(&name) && !TOTAL_FUNCTIONS.contains(&name) {
                    return Some(Refusal::new(
                        Rule::Function,
                        format!("function `{name}` is not on the allow-list"),
                    ));
                }
                // Arguments that make a function fail on some values must be constants, and
                // constants it fails on are refused here, before any row is read: evaluated
                // only where rows exist, their failure would tell that rows exist.
                let literal_positions: &[usize] = match name {
                    "round" | "trunc" => &[1],
                    "date_part" | "date_trunc" | "datepart" | "datetrunc" => &[0],
                    _ => &[],
                };
                for &i in literal_positions {
                    if f.args.get(i).is_some_and(|a| !is_literal(a)) {
                        return Some(Refusal::new(
                            Rule::ErrorOracle,
                            format!(
                                "argument {} of `{name}` must be a constant: a value taken from \
                                 the data could make the query fail on some rows",
                                i + 1
                            ),
                        ));
                    }
                }
                total_arguments(name, &f.args, schema)
            }
            Expr::AggregateFunction(AggregateFunction { func, params }) => {
                let name = func.name().to_lowercase();
                let allowed = self.policy.query.aggregates.contains(&name)
                    || func
                        .aliases()
                        .iter()
                        .any(|alias| self.policy.query.aggregates.contains(alias));
                if !allowed {
                    return Some(Refusal::new(
                        Rule::Aggregate,
                        format!(
                            "aggregate `{name}` is not allowed here; allowed: {}",
                            self.policy.query.aggregates.join(", ")
                        ),
                    ));
                }
                if params.distinct && name != "count" {
                    return Some(Refusal::new(
                        Rule::Aggregate,
                        format!(
                            "`{name}(DISTINCT …)` would need the distinct values to leave the \
                             trust; only COUNT(DISTINCT …) is supported"
                        ),
                    ));
                }
                // WITHIN GROUP (ORDER BY column) names a percentile's column, nothing more.
                let within_group = trustql_distribution::is_percentile(&name)
                    && matches!(params.order_by.as_slice(),
                        [sort] if params.args.first() == Some(&sort.expr));
                if !params.order_by.is_empty() && !within_group {
                    return Some(Refusal::new(
                        Rule::Aggregate,
                        "ORDER BY inside an aggregate is not supported",
                    ));
                }
                None
            }
            Expr::WindowFunction(_) => Some(Refusal::new(
                Rule::Function,
                "window functions are not accepted: they compute values per row",
            )),
            Expr::ScalarSubquery(_)
            | Expr::InSubquery(_)
            | Expr::Exists(_)
            | Expr::SetComparison(_)
            | Expr::OuterReferenceColumn(..) => Some(Refusal::new(
                Rule::Subquery,
                "subqueries in conditions or select lists are not supported; use a join on the \
                 patient key instead",
            )),
            Expr::InList(list) if list.list.len() > self.policy.query.max_in_list => {
                Some(Refusal::new(
                    Rule::InList,
                    format!(
                        "an IN list has {} values; this trust accepts at most {}",
                        list.list.len(),
                        self.policy.query.max_in_list
                    ),
                ))
            }
            // Division, modulo and casts are made total by the rewrite (`total.rs`); what
            // follows is what no rewrite makes total.
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                binary_total(left, *op, right, schema)
            }
            Expr::Like(like) => pattern_total(like, Pattern::Like),
            Expr::SimilarTo(like) => pattern_total(like, Pattern::Similar),
            Expr::Cast(Cast { field, .. }) | Expr::TryCast(TryCast { field, .. })
                if matches!(
                    field.data_type(),
                    DataType::Decimal32(..)
                        | DataType::Decimal64(..)
                        | DataType::Decimal128(..)
                        | DataType::Decimal256(..)
                ) =>
            {
                Some(Refusal::new(
                    Rule::ErrorOracle,
                    "DECIMAL values overflow their precision, and the query would fail on the \
                     rows that do; use DOUBLE",
                ))
            }
            Expr::Placeholder(_) | Expr::ScalarVariable(..) => Some(Refusal::new(
                Rule::Unsupported,
                "parameters and variables are not supported",
            )),
            Expr::Unnest(_)
            | Expr::HigherOrderFunction(_)
            | Expr::Lambda(_)
            | Expr::LambdaVariable(_) => Some(Refusal::new(
                Rule::Unsupported,
                "the query uses a construct TrustQL does not support",
            )),
            _ => None,
        }
    }

    /// Lineage of every output column of `plan` (the input of the aggregate), checking each
    /// node on the way.
    fn lineage(
        &self,
        plan: &LogicalPlan,
        tables: &mut Vec<String>,
        optimized: bool,
    ) -> Result<Lineage, Refusal> {
        match plan {
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table().to_string();
                let Ok(table) = self.schema.table(&name) else {
                    return Err(Refusal::new(
                        Rule::Table,
                        format!("`{name}` is not a table of the shared schema"),
                    ));
                };
                if !self.project.tables.contains(&name) {
                    return Err(Refusal::new(
                        Rule::Table,
                        format!(
                            "project `{}` is not approved to read `{name}` at this trust",
                            self.project.id
                        ),
                    ));
                }
                tables.push(name.clone());
                let lineage: Lineage = scan
                    .projected_schema
                    .fields()
                    .iter()
                    .map(|field| {
                        let Some(column) = table.column(field.name()) else {
                            return Ok(None);
                        };
                        let key = (column.class == DisclosureClass::DirectIdentifier)
                            .then(|| self.key_domain(&name, &column.name))
                            .flatten();
                        Ok(Some(Origin {
                            class: column.class,
                            key,
                            source: format!("{name}.{}", column.name),
                            bare: true,
                        }))
                    })
                    .collect::<Result<_, Refusal>>()?;
                if !scan.filters.is_empty() {
                    // Filters pushed into the scan read the full table schema.
                    let full = DFSchema::try_from_qualified_schema(
                        scan.table_name.clone(),
                        &scan.source.schema(),
                    )
                    .map_err(|_| {
                        Refusal::new(Rule::Unsupported, "the scan could not be inspected")
                    })?;
                    let full_lineage: Lineage = full
                        .fields()
                        .iter()
                        .map(|f| {
                            table.column(f.name()).map(|c| Origin {
                                class: c.class,
                                key: (c.class == DisclosureClass::DirectIdentifier)
                                    .then(|| self.key_domain(&name, &c.name))
                                    .flatten(),
                                source: format!("{name}.{}", c.name),
                                bare: true,
                            })
                        })
                        .collect();
                    for filter in &scan.filters {
                        for conjunct in split_conjunction(filter) {
                            self.check_condition(conjunct, &full, &full_lineage)?;
                        }
                    }
                }
                Ok(lineage)
            }
            LogicalPlan::SubqueryAlias(alias) => self.lineage(&alias.input, tables, optimized),
            LogicalPlan::Filter(filter) => {
                let lineage = self.lineage(&filter.input, tables, optimized)?;
                for conjunct in split_conjunction(&filter.predicate) {
                    self.check_condition(conjunct, filter.input.schema(), &lineage)?;
                }
                Ok(lineage)
            }
            LogicalPlan::Sort(sort) => {
                let lineage = self.lineage(&sort.input, tables, optimized)?;
                for s in &sort.expr {
                    self.refuse_identifiers(&s.expr, sort.input.schema(), &lineage, "sorted on")?;
                }
                Ok(lineage)
            }
            LogicalPlan::Limit(limit) => self.lineage(&limit.input, tables, optimized),
            LogicalPlan::Repartition(r) => self.lineage(&r.input, tables, optimized),
            LogicalPlan::Projection(projection) => {
                let input = self.lineage(&projection.input, tables, optimized)?;
                let schema = projection.input.schema();
                projection
                    .expr
                    .iter()
                    .map(|expr| self.derive(expr, schema, &input))
                    .collect()
            }
            LogicalPlan::Join(join) => {
                if join.join_type == JoinType::LeftMark || join.join_type == JoinType::RightMark {
                    return Err(Refusal::new(
                        Rule::Subquery,
                        "subqueries in conditions are not supported",
                    ));
                }
                let left = self.lineage(&join.left, tables, optimized)?;
                let right = self.lineage(&join.right, tables, optimized)?;
                let mut both = left.clone();
                both.extend(right.iter().cloned());
                let combined = join.left.schema().join(join.right.schema()).map_err(|_| {
                    Refusal::new(Rule::Unsupported, "the join could not be inspected")
                })?;
                let mut keyed = false;
                for (l, r) in &join.on {
                    let equality = Expr::BinaryExpr(BinaryExpr::new(
                        Box::new(l.clone()),
                        Operator::Eq,
                        Box::new(r.clone()),
                    ));
                    keyed |= self.check_condition(&equality, &combined, &both)?;
                }
                if let Some(filter) = &join.filter {
                    for conjunct in split_conjunction(filter) {
                        keyed |= self.check_condition(conjunct, &combined, &both)?;
                    }
                }
                // As written, `FROM a, b WHERE a.k = b.k` is a bare join under a filter; once
                // optimised, every join must carry a key equality.
                let bare_cross = join.on.is_empty() && join.filter.is_none();
                if optimized && bare_cross {
                    return Err(Refusal::new(
                        Rule::CrossJoin,
                        "every join needs a key equality (a join without one pairs every row \
                         with every row); join on the patient key",
                    ));
                }
                if !keyed && (optimized || !bare_cross) {
                    return Err(Refusal::new(
                        Rule::Join,
                        "tables may only be joined on the patient key (or a declared key on the \
                         way to it, such as merged_regimen_id)",
                    ));
                }
                Ok(match join.join_type {
                    JoinType::LeftSemi | JoinType::LeftAnti => left,
                    JoinType::RightSemi | JoinType::RightAnti => right,
                    _ => both,
                })
            }
            LogicalPlan::Union(union) => {
                let mut merged: Option<Lineage> = None;
                for input in &union.inputs {
                    let lineage = self.lineage(input, tables, optimized)?;
                    merged = Some(match merged {
                        None => lineage,
                        Some(prev) => prev
                            .into_iter()
                            .zip(lineage)
                            .map(|(a, b)| match (a, b) {
                                (Some(a), Some(b)) => merge_origins([a, b].into_iter()),
                                // A constant in one branch: the column's rows are not all
                                // patients' rows, so it is no key and cannot count patients.
                                (Some(o), None) | (None, Some(o)) => Some(Origin {
                                    key: None,
                                    bare: false,
                                    ..o
                                }),
                                (None, None) => None,
                            })
                            .collect(),
                    });
                }
                Ok(merged.unwrap_or_default())
            }
            LogicalPlan::Values(v) => Ok(vec![None; v.schema.fields().len()]),
            LogicalPlan::EmptyRelation(e) => Ok(vec![None; e.schema.fields().len()]),
            _ => Err(Refusal::new(
                Rule::Unsupported,
                "the query uses a construct TrustQL does not support below its aggregation",
            )),
        }
    }

    /// The lineage of one projected expression.
    fn derive(
        &self,
        expr: &Expr,
        schema: &DFSchema,
        input: &Lineage,
    ) -> Result<Option<Origin>, Refusal> {
        if let Some(column) = bare_column(expr) {
            return Ok(resolve(column, schema, input));
        }
        let origins = self.origins(expr, schema, input);
        if let Some(id) = origins
            .iter()
            .find(|o| o.class == DisclosureClass::DirectIdentifier)
        {
            return Err(identifier_refusal(&id.source, "transformed"));
        }
        Ok(merge_origins(origins.into_iter()).map(|mut o| {
            o.bare = false;
            o
        }))
    }

    /// The origins of every column an expression reads.
    fn origins(&self, expr: &Expr, schema: &DFSchema, input: &Lineage) -> Vec<Origin> {
        expr.column_refs()
            .into_iter()
            .filter_map(|c| resolve(c, schema, input))
            .collect()
    }

    /// Refuses an expression that reads any direct identifier.
    fn refuse_identifiers(
        &self,
        expr: &Expr,
        schema: &DFSchema,
        input: &Lineage,
        verb: &str,
    ) -> Result<(), Refusal> {
        match self
            .origins(expr, schema, input)
            .into_iter()
            .find(|o| o.class == DisclosureClass::DirectIdentifier)
        {
            Some(id) => Err(identifier_refusal(&id.source, verb)),
            None => Ok(()),
        }
    }

    /// One conjunct of a WHERE or join condition; true when it is a key equality (a join).
    fn check_condition(
        &self,
        conjunct: &Expr,
        schema: &DFSchema,
        input: &Lineage,
    ) -> Result<bool, Refusal> {
        // A key equality is a join, the one thing identifiers may do.
        if let Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) = conjunct
        {
            let side = |e: &Expr| bare_column(e).and_then(|c| resolve(c, schema, input));
            if let (Some(l), Some(r)) = (side(left), side(right))
                && (l.class == DisclosureClass::DirectIdentifier
                    || r.class == DisclosureClass::DirectIdentifier)
            {
                return match (&l.key, &r.key) {
                    (Some(a), Some(b)) if a == b && l.bare && r.bare => Ok(true),
                    _ => Err(Refusal::new(
                        Rule::Join,
                        format!(
                            "`{}` and `{}` may not be matched: tables may only be joined on the \
                             patient key (or a declared key on the way to it, such as \
                             merged_regimen_id)",
                            l.source, r.source
                        ),
                    )),
                };
            }
        }
        self.refuse_identifiers(conjunct, schema, input, "compared or filtered on")?;
        for origin in self.origins(conjunct, schema, input) {
            self.class_rule(&origin, |r| r.filter, "filtered on")?;
        }
        Ok(false)
    }

    fn class_rule(
        &self,
        origin: &Origin,
        pick: fn(&ClassRules) -> bool,
        verb: &str,
    ) -> Result<(), Refusal> {
        match self.policy.classes.rules(origin.class) {
            Some(rules) if pick(rules) => Ok(()),
            Some(_) => Err(Refusal::new(
                Rule::ColumnClass,
                format!(
                    "`{}` is a {} and this trust's policy says it may not be {verb}",
                    origin.source,
                    class_words(origin.class)
                ),
            )),
            None => Err(identifier_refusal(&origin.source, verb)),
        }
    }

    /// The aggregate node itself: group keys and aggregate arguments.
    fn check_aggregate(
        &self,
        agg: &datafusion::logical_expr::Aggregate,
        input: &Lineage,
    ) -> Result<(), Refusal> {
        let schema = agg.input.schema();
        for key in crate::shape::group_keys(agg) {
            self.refuse_identifiers(key, schema, input, "grouped on")?;
            for origin in self.origins(key, schema, input) {
                self.class_rule(&origin, |r| r.group_by, "grouped on")?;
            }
        }
        for expr in &agg.aggr_expr {
            let inner = match expr {
                Expr::Alias(Alias { expr, .. }) => expr.as_ref(),
                other => other,
            };
            let Expr::AggregateFunction(AggregateFunction { func, params }) = inner else {
                return Err(Refusal::new(
                    Rule::Aggregate,
                    "only plain aggregate functions are supported in the aggregation",
                ));
            };
            let name = func.name().to_lowercase();
            if let Some(filter) = &params.filter {
                for conjunct in split_conjunction(filter) {
                    if self.check_condition(conjunct, schema, input)? {
                        return Err(identifier_refusal("a key", "compared in a FILTER clause"));
                    }
                }
            }
            for arg in &params.args {
                let origins = self.origins(arg, schema, input);
                if name == "count" {
                    // Counting identifiers is how patients are counted; transforming them is not.
                    if bare_column(arg).is_none()
                        && let Some(id) = origins
                            .iter()
                            .find(|o| o.class == DisclosureClass::DirectIdentifier)
                    {
                        return Err(identifier_refusal(&id.source, "transformed"));
                    }
                    // Each trust counts its own distinct values and the coordinator sums
                    // them: right only for patients, whom no two trusts share (up to the
                    // linkage the answer's note states). Every mode relies on this.
                    if params.distinct && !self.is_patient_key(arg, schema, input) {
                        return Err(distinct_refusal(self.bare_source(arg, schema, input)));
                    }
                    continue;
                }
                for origin in &origins {
                    if origin.class == DisclosureClass::DirectIdentifier {
                        return Err(identifier_refusal(
                            &origin.source,
                            &format!("given to {}", name.to_uppercase()),
                        ));
                    }
                    if name == "min" || name == "max" {
                        self.class_rule(origin, |r| r.min_max, "given to MIN or MAX")?;
                    } else {
                        self.class_rule(origin, |r| r.aggregate, "summed or averaged")?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The number of joins, on the optimised plan.
    fn check_joins(&self, optimized: &LogicalPlan) -> Result<(), Refusal> {
        let mut joins = 0usize;
        optimized
            .apply(|node| {
                if matches!(node, LogicalPlan::Join(_)) {
                    joins += 1;
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .map_err(|_| Refusal::new(Rule::Unsupported, "the plan could not be inspected"))?;
        if joins > self.policy.query.max_joins {
            return Err(Refusal::new(
                Rule::TooManyJoins,
                format!(
                    "the query joins {joins} times; this trust accepts at most {}",
                    self.policy.query.max_joins
                ),
            ));
        }
        Ok(())
    }

    /// The `table.column` an expression is, if it is an untransformed schema column.
    fn bare_source(&self, expr: &Expr, schema: &DFSchema, input: &Lineage) -> Option<String> {
        let origin = resolve(bare_column(expr)?, schema, input)?;
        origin.bare.then_some(origin.source)
    }

    /// Whether every join of the plan is an equi-join on identifier keys of one domain.
    fn joins_on_keys(&self, optimized: &LogicalPlan) -> bool {
        let mut on_keys = true;
        let _ = optimized.apply(|node| {
            if let LogicalPlan::Join(join) = node {
                let key = |side: &LogicalPlan, expr: &Expr| {
                    let lineage = self.lineage(side, &mut Vec::new(), true).ok()?;
                    let origin = resolve(bare_column(expr)?, side.schema(), &lineage)?;
                    origin.key.filter(|_| origin.bare)
                };
                on_keys &= !join.on.is_empty()
                    && join.on.iter().all(|(l, r)| {
                        let left = key(&join.left, l);
                        left.is_some() && left == key(&join.right, r)
                    });
            }
            Ok(if on_keys {
                TreeNodeRecursion::Continue
            } else {
                TreeNodeRecursion::Stop
            })
        });
        on_keys
    }

    /// Whether `expr` is an untransformed patient-key column of the aggregate's input.
    fn is_patient_key(&self, expr: &Expr, schema: &DFSchema, input: &Lineage) -> bool {
        let Some(domain) = self.patient_domain() else {
            return false;
        };
        bare_column(expr)
            .and_then(|c| resolve(c, schema, input))
            .is_some_and(|o| o.bare && o.key.as_deref() == Some(domain.as_str()))
    }

    /// `table.column` of the patient table's primary key.
    fn patient_domain(&self) -> Option<String> {
        let patient = self.schema.table(&self.schema.info().patient_table).ok()?;
        Some(format!(
            "{}.{}",
            patient.name,
            patient.primary_key.as_deref()?
        ))
    }

    /// An untransformed patient-key column among the aggregate's input columns.
    fn patient_key(&self, input: &LogicalPlan, lineage: &Lineage) -> Option<Column> {
        let domain = self.patient_domain()?;
        let index = lineage.iter().position(|o| {
            o.as_ref()
                .is_some_and(|o| o.bare && o.key.as_deref() == Some(domain.as_str()))
        })?;
        let (qualifier, field) = input.schema().qualified_field(index);
        Some(Column::from((qualifier, field)))
    }

    /// The key an identifier column joins on: its own table's primary key, or what it refers to.
    fn key_domain(&self, table: &str, column: &str) -> Option<String> {
        let t = self.schema.table(table).ok()?;
        let c = t.column(column)?;
        if let Some(reference) = &c.references {
            return Some(reference.clone());
        }
        (t.primary_key.as_deref() == Some(column)).then(|| format!("{table}.{column}"))
    }
}

fn distinct_refusal(source: Option<String>) -> Refusal {
    let counted = source.map_or_else(|| "an expression".to_string(), |s| format!("`{s}`"));
    Refusal::new(
        Rule::DistinctCount,
        format!(
            "COUNT(DISTINCT …) of {counted}: COUNT(DISTINCT …) is answered only for the patient \
             key: distinct values cannot be combined across trusts without sending them"
        ),
    )
}

fn identifier_refusal(source: &str, verb: &str) -> Refusal {
    Refusal::new(
        Rule::Identifier,
        format!(
            "`{source}` is a direct identifier and may not be {verb}; identifiers may only join \
             tables on the patient key or be counted (COUNT(DISTINCT …))"
        ),
    )
}

fn class_words(class: DisclosureClass) -> &'static str {
    match class {
        DisclosureClass::DirectIdentifier => "direct identifier",
        DisclosureClass::QuasiIdentifier => "quasi-identifier",
        DisclosureClass::Clinical => "clinical column",
    }
}

/// The column an expression is, possibly under an alias.
fn bare_column(expr: &Expr) -> Option<&Column> {
    match expr {
        Expr::Column(c) => Some(c),
        Expr::Alias(Alias { expr, .. }) => bare_column(expr),
        _ => None,
    }
}

fn resolve(column: &Column, schema: &DFSchema, input: &Lineage) -> Option<Origin> {
    let index = schema.index_of_column(column).ok()?;
    input.get(index).cloned().flatten()
}

/// The most sensitive of several origins (an identifier keeps its key only if all agree).
fn merge_origins(origins: impl Iterator<Item = Origin>) -> Option<Origin> {
    let all: Vec<Origin> = origins.collect();
    let first = all.first()?.clone();
    let class = all.iter().map(|o| o.class).min()?;
    let source = all
        .iter()
        .find(|o| o.class == class)
        .map_or(first.source.clone(), |o| o.source.clone());
    let keys: HashSet<&Option<String>> = all.iter().map(|o| &o.key).collect();
    let key = if keys.len() == 1 {
        first.key.clone()
    } else {
        None
    };
    Some(Origin {
        class,
        key,
        source,
        bare: all.iter().all(|o| o.bare),
    })
}

/// Units `date_part` answers for every date and timestamp (tested at the extremes of both).
const DATE_PART_UNITS: [&str; 17] = [
    "year",
    "isoyear",
    "quarter",
    "month",
    "week",
    "day",
    "dow",
    "isodow",
    "doy",
    "hour",
    "minute",
    "second",
    "millisecond",
    "microsecond",
    "nanosecond",
    "epoch",
    "qtr",
];

/// Units `date_trunc` accepts.
const DATE_TRUNC_UNITS: [&str; 10] = [
    "year",
    "quarter",
    "month",
    "week",
    "day",
    "hour",
    "minute",
    "second",
    "millisecond",
    "microsecond",
];

/// A constant argument a function would fail on at every row, or an argument type it fails on.
fn total_arguments(name: &str, args: &[Expr], schema: &DFSchema) -> Option<Refusal> {
    let unit = || match args.first() {
        Some(Expr::Literal(
            ScalarValue::Utf8(Some(u))
            | ScalarValue::Utf8View(Some(u))
            | ScalarValue::LargeUtf8(Some(u)),
            _,
        )) => Some(u.trim_matches(|c| c == '\'' || c == '"').to_lowercase()),
        _ => None,
    };
    let bad_unit = |units: &[&str]| {
        let known = unit().is_some_and(|u| units.contains(&u.as_str()));
        (!known).then(|| {
            Refusal::new(
                Rule::ErrorOracle,
                format!(
                    "the first argument of `{name}` must be one of {}",
                    units.join(", ")
                ),
            )
        })
    };
    let temporal_arg = || args.get(1).and_then(|a| a.get_type(schema).ok());
    match name {
        "date_part" | "datepart" => bad_unit(&DATE_PART_UNITS),
        "date_trunc" | "datetrunc" => {
            bad_unit(&DATE_TRUNC_UNITS).or_else(|| {
                matches!(temporal_arg(), Some(DataType::Time32(_) | DataType::Time64(_))).then(|| {
                Refusal::new(
                    Rule::ErrorOracle,
                    "`date_trunc` of a time of day is not supported; truncate a date or timestamp",
                )
            })
            })
        }
        // Rounding an integer to tens or more overflows near its type's limits.
        "round" => {
            let integer = args
                .first()
                .and_then(|a| a.get_type(schema).ok())
                .is_some_and(|t| t.is_integer());
            let places_ok = match args.get(1) {
                None => true,
                Some(Expr::Literal(v, _)) => {
                    !v.is_null() && ScalarValue::new_zero(&v.data_type()).is_ok_and(|z| *v >= z)
                }
                Some(_) => false,
            };
            (integer && !places_ok).then(|| {
                Refusal::new(
                    Rule::ErrorOracle,
                    "rounding an integer to tens or more can overflow on large values and fail \
                     there; round a DOUBLE instead (CAST(x AS DOUBLE))",
                )
            })
        }
        _ => None,
    }
}

/// Binary operators no rewrite makes total: pattern matches (`~`, `~~`) whose pattern is not a
/// literal that builds ([`pattern_refused`]), and date or timestamp arithmetic, which overflows
/// (only a date minus a date, a number of days, cannot).
fn binary_total(left: &Expr, op: Operator, right: &Expr, schema: &DFSchema) -> Option<Refusal> {
    let pattern = match op {
        Operator::RegexMatch | Operator::RegexNotMatch => Some((Pattern::Regex, false)),
        Operator::RegexIMatch | Operator::RegexNotIMatch => Some((Pattern::Regex, true)),
        Operator::LikeMatch | Operator::NotLikeMatch => Some((Pattern::Like, false)),
        Operator::ILikeMatch | Operator::NotILikeMatch => Some((Pattern::Like, true)),
        _ => None,
    };
    if let Some((kind, case_insensitive)) = pattern {
        return pattern_refused(right, kind, case_insensitive, &op.to_string());
    }
    if !matches!(op, Operator::Plus | Operator::Minus) {
        return None;
    }
    let (l, r) = (left.get_type(schema).ok()?, right.get_type(schema).ok()?);
    let temporal = |t: &DataType| {
        matches!(
            t,
            DataType::Date32
                | DataType::Date64
                | DataType::Timestamp(..)
                | DataType::Time32(_)
                | DataType::Time64(_)
                | DataType::Interval(_)
                | DataType::Duration(_)
        )
    };
    let days_between = op == Operator::Minus && l == DataType::Date32 && r == DataType::Date32;
    ((temporal(&l) || temporal(&r)) && !days_between).then(|| {
        Refusal::new(
            Rule::ErrorOracle,
            "date and timestamp arithmetic overflows on some values and the query would fail \
             there; compare dates with constant dates, or subtract one date from another",
        )
    })
}

/// How a pattern is read: as a LIKE pattern (`%`, `_`, a backslash escapes), as a regular
/// expression of the `regex` crate, or as SIMILAR TO's standard pattern (which the session
/// turns into a regular expression, [`crate::total::similar_to_regex`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Like,
    Regex,
    Similar,
}

/// LIKE, ILIKE, SIMILAR TO and their negations: the escape character and the pattern.
fn pattern_total(like: &Like, kind: Pattern) -> Option<Refusal> {
    let what = match (kind, like.case_insensitive) {
        (Pattern::Similar, _) => "SIMILAR TO",
        (Pattern::Regex, _) => "~",
        (Pattern::Like, true) => "ILIKE",
        (Pattern::Like, false) => "LIKE",
    };
    // DataFusion refuses any other escape while planning: say so plainly, before that.
    let escape_ok = match kind {
        Pattern::Like => like.escape_char.is_none_or(|c| c == '\\'),
        Pattern::Regex | Pattern::Similar => like.escape_char.is_none(),
    };
    if !escape_ok {
        return Some(Refusal::new(
            Rule::Unsupported,
            match kind {
                Pattern::Like => format!("{what} ... ESCAPE supports only the backslash (\\)"),
                Pattern::Regex | Pattern::Similar => format!("{what} ... ESCAPE is not supported"),
            },
        ));
    }
    pattern_refused(&like.pattern, kind, like.case_insensitive, what)
}

/// A pattern DataFusion could fail to build while it runs. Arrow builds a LIKE pattern into a
/// regular expression (and compiles a regular expression) when a batch reaches it, so a pattern
/// that does not build (invalid, or over the `regex` crate's size limit: some 11,000 `_`, or
/// `.{12000}`) fails only where rows exist, and a pattern taken from the data fails on the rows
/// whose value does not build. So the pattern must be a literal, and is built here, by the same
/// arrow kernel, before anything runs. (A trailing backslash is a literal backslash in arrow
/// 59, not an error.)
fn pattern_refused(
    pattern: &Expr,
    kind: Pattern,
    case_insensitive: bool,
    what: &str,
) -> Option<Refusal> {
    let Some(value) = literal_value(pattern) else {
        return Some(Refusal::new(
            Rule::ErrorOracle,
            format!(
                "the pattern of {what} must be a literal: a pattern taken from the data (a \
                 column, a concatenation, a CASE) could make the query fail on some rows"
            ),
        ));
    };
    if value.is_null() {
        return None;
    }
    // A pattern of another type is compared as its text (type coercion casts it).
    let text = match value.cast_to(&DataType::Utf8) {
        Ok(ScalarValue::Utf8(Some(text))) => text,
        Ok(ScalarValue::Utf8(None)) => return None,
        _ => {
            return Some(Refusal::new(
                Rule::ErrorOracle,
                format!("the pattern of {what} must be text"),
            ));
        }
    };
    let built = match kind {
        Pattern::Like => like_builds(&text, case_insensitive),
        Pattern::Regex => regex_builds(&text, case_insensitive),
        Pattern::Similar => regex_builds(&crate::total::similar_to_regex(&text), case_insensitive),
    };
    built.err().map(|e| {
        let reason = if e.to_string().contains("size limit") {
            "is too large to compile"
        } else {
            "is not a valid regular expression"
        };
        Refusal::new(
            Rule::ErrorOracle,
            format!(
                "the pattern of {what} {reason}; it would fail wherever a row reaches it, so it \
                 is refused before running"
            ),
        )
    })
}

/// Arrow's own LIKE (ILIKE) of `pattern` against a non-ASCII value: ILIKE of ASCII values may
/// take a path without a regular expression, which this value does not, so every path builds.
fn like_builds(pattern: &str, case_insensitive: bool) -> Result<(), ArrowError> {
    let value = StringArray::from(vec!["\u{e9}"]);
    let pattern = Scalar::new(StringArray::from(vec![pattern]));
    if case_insensitive {
        comparison::ilike(&value, &pattern).map(|_| ())
    } else {
        comparison::like(&value, &pattern).map(|_| ())
    }
}

/// Arrow's regular-expression match of `pattern`, as DataFusion's `~` (`~*`) calls it.
pub(crate) fn regex_builds(pattern: &str, case_insensitive: bool) -> Result<(), ArrowError> {
    let value = StringArray::from(vec!["\u{e9}"]);
    comparison::regexp_is_match_scalar(&value, pattern, case_insensitive.then_some("i")).map(|_| ())
}

/// The value of a literal, through aliases and casts (as they will be folded while planning);
/// `None` if `expr` is no literal.
fn literal_value(expr: &Expr) -> Option<ScalarValue> {
    match expr {
        Expr::Literal(value, _) => Some(value.clone()),
        Expr::Alias(Alias { expr, .. }) => literal_value(expr),
        Expr::Cast(Cast { expr, field }) => literal_value(expr)?.cast_to(field.data_type()).ok(),
        Expr::TryCast(TryCast { expr, field }) => {
            let value = literal_value(expr)?;
            Some(
                value
                    .cast_to(field.data_type())
                    .or_else(|_| ScalarValue::try_from(field.data_type()))
                    .ok()?,
            )
        }
        _ => None,
    }
}

fn is_literal(expr: &Expr) -> bool {
    match expr {
        Expr::Literal(..) => true,
        Expr::Alias(Alias { expr, .. }) | Expr::Negative(expr) => is_literal(expr),
        Expr::Cast(c) => is_literal(&c.expr),
        Expr::TryCast(c) => is_literal(&c.expr),
        _ => false,
    }
}
