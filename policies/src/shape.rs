//! Table-builder shapes: the SQL that suppression and rounding can answer.
//!
//! Rounding and thresholds only survive queries whose every released number counts or sums
//! real rows of real columns: an expression the researcher writes can add rows of known count
//! (a CASE branch, a constant), shift them through every residue of the rounding and average
//! it away. So a project protected by SDC gets what a statistics office's table builder
//! offers, and differential privacy, whose budget bounds what any sequence of queries can
//! learn, answers the rest:
//! - joins on the patient key (and along the schema's key paths), derived tables and CTEs of
//!   the same shapes;
//! - WHERE, ON and CASE conditions that compare one column with constants (`=`, `<`, `IN`,
//!   `BETWEEN`, `IS NULL`, `LIKE`, combined with AND, OR and NOT);
//! - group keys that are a column or a coarsening of one: year, quarter or month of a date, a
//!   code prefix, a CASE over one column whose branches are constant ranges or lists with
//!   constant results (bands at least the schema's `band_width` wide);
//! - COUNT(*), COUNT(column), COUNT(DISTINCT patient key), SUM / AVG / VAR / STDDEV of a column
//!   with public bounds, MIN / MAX where the policy's classes allow them.
//!
//! Everything above the aggregation (HAVING, ORDER BY, LIMIT, arithmetic on results) reads
//! only released values, so it is free.

use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::expr::{AggregateFunction, Alias, Between, Case, InList, Like};
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, GroupingSet, JoinType, LogicalPlan, Operator,
};
use trustql_schemas::{DisclosureClass, TrustSchema};

use crate::contribution::MOMENT_AGGREGATES;
use crate::policy::Policy;
use crate::refusal::{Refusal, Rule};

/// What one column of a plan is, for the table builder.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    /// A schema column, untouched: `table.column`.
    Plain(String),
    /// A coarsening of one schema column (`table.column`).
    Coarse(String),
}

impl Shape {
    fn source(&self) -> &str {
        match self {
            Shape::Plain(s) | Shape::Coarse(s) => s,
        }
    }
}

type Shapes = Vec<Option<Shape>>;

/// Refuses `aggregate` (from the unoptimised plan) unless it is a table-builder query.
pub(crate) fn check(
    schema: &TrustSchema,
    policy: &Policy,
    aggregate: &Aggregate,
) -> Result<(), Refusal> {
    let builder = Builder { schema, policy };
    let input = builder.shapes(&aggregate.input)?;
    let input_schema = aggregate.input.schema();
    for key in group_keys(aggregate) {
        builder.value(key, input_schema, &input, "a GROUP BY key")?;
    }
    for expr in &aggregate.aggr_expr {
        builder.aggregate(expr, input_schema, &input)?;
    }
    Ok(())
}

/// Every GROUP BY expression, grouping sets flattened.
pub(crate) fn group_keys(aggregate: &Aggregate) -> Vec<&Expr> {
    let mut keys = Vec::new();
    for expr in &aggregate.group_expr {
        match expr {
            Expr::GroupingSet(GroupingSet::Rollup(exprs) | GroupingSet::Cube(exprs)) => {
                keys.extend(exprs.iter());
            }
            Expr::GroupingSet(GroupingSet::GroupingSets(sets)) => {
                keys.extend(sets.iter().flatten());
            }
            other => keys.push(other),
        }
    }
    keys
}

/// A refusal naming what is not table-builder SQL, what is, and where the rest is answered.
fn refuse(what: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        Rule::TableBuilder,
        format!(
            "{what}. Suppression and rounding answer table-builder queries only; a project in \
             differential-privacy mode answers the rest. Table-builder SQL: joins on the \
             patient key; WHERE comparing a column with constants (=, <, IN, BETWEEN, IS NULL, \
             LIKE; AND, OR, NOT); GROUP BY columns or a coarsening of one column (year or month \
             of a date, a code prefix such as substr(col, 1, 1), a CASE of constant bands); \
             COUNT(*), COUNT(col), COUNT(DISTINCT patient key), and SUM, AVG, VAR or STDDEV of \
             a column with public bounds"
        ),
    )
}

/// A short rendering of the researcher's own expression, for a refusal.
fn shown(expr: &Expr) -> String {
    let text = expr.to_string();
    if text.chars().count() > 80 {
        format!("{}…", text.chars().take(80).collect::<String>())
    } else {
        text
    }
}

fn unalias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(Alias { expr, .. }) => unalias(expr),
        other => other,
    }
}

fn literal(expr: &Expr) -> Option<&ScalarValue> {
    match unalias(expr) {
        Expr::Literal(value, _) => Some(value),
        Expr::Cast(c) => literal(&c.expr),
        Expr::TryCast(c) => literal(&c.expr),
        _ => None,
    }
}

/// A constant, possibly negated or cast (`DATE '2019-01-01'` is a cast of text).
fn is_constant(expr: &Expr) -> bool {
    match unalias(expr) {
        Expr::Negative(e) => is_constant(e),
        e => literal(e).is_some(),
    }
}

/// A numeric constant's value.
fn number(expr: &Expr) -> Option<f64> {
    match unalias(expr) {
        Expr::Negative(e) => number(e).map(|v| -v),
        e => {
            let value = literal(e)?;
            if value.is_null() {
                return None;
            }
            value
                .cast_to(&datafusion::arrow::datatypes::DataType::Float64)
                .ok()
                .and_then(|v| match v {
                    ScalarValue::Float64(v) => v,
                    _ => None,
                })
        }
    }
}

struct Builder<'a> {
    schema: &'a TrustSchema,
    policy: &'a Policy,
}

impl Builder<'_> {
    /// The shape of every output column of `plan`, refusing what a table builder does not do.
    fn shapes(&self, plan: &LogicalPlan) -> Result<Shapes, Refusal> {
        match plan {
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table();
                let table = self
                    .schema
                    .table(name)
                    .map_err(|_| refuse(format!("`{name}` is not a table of the schema")))?;
                // Every field of a registered table is a plain column of it.
                let plain = |fields: &datafusion::arrow::datatypes::Fields| -> Shapes {
                    fields
                        .iter()
                        .map(|f| {
                            table
                                .column(f.name())
                                .map(|c| Shape::Plain(format!("{name}.{}", c.name)))
                        })
                        .collect()
                };
                let shapes = plain(scan.projected_schema.inner().fields());
                if !scan.filters.is_empty() {
                    let full = DFSchema::try_from_qualified_schema(
                        scan.table_name.clone(),
                        &scan.source.schema(),
                    )
                    .map_err(|_| refuse("the scan could not be inspected"))?;
                    let all = plain(full.inner().fields());
                    for filter in &scan.filters {
                        self.condition(filter, &full, &all)?;
                    }
                }
                Ok(shapes)
            }
            LogicalPlan::Projection(p) => {
                let input = self.shapes(&p.input)?;
                let schema = p.input.schema();
                p.expr
                    .iter()
                    .map(|e| self.value(e, schema, &input, "a derived column").map(Some))
                    .collect()
            }
            LogicalPlan::Filter(f) => {
                let input = self.shapes(&f.input)?;
                self.condition(&f.predicate, f.input.schema(), &input)?;
                Ok(input)
            }
            LogicalPlan::SubqueryAlias(a) => self.shapes(&a.input),
            LogicalPlan::Join(join) => {
                if !matches!(
                    join.join_type,
                    JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
                ) {
                    return Err(refuse(
                        "semi-, anti- and mark joins are not table-builder SQL",
                    ));
                }
                let mut shapes = self.shapes(&join.left)?;
                shapes.extend(self.shapes(&join.right)?);
                for (l, r) in &join.on {
                    let pair = Expr::BinaryExpr(BinaryExpr::new(
                        Box::new(l.clone()),
                        Operator::Eq,
                        Box::new(r.clone()),
                    ));
                    self.condition(&pair, &join.schema, &shapes)?;
                }
                if let Some(filter) = &join.filter {
                    self.condition(filter, &join.schema, &shapes)?;
                }
                Ok(shapes)
            }
            LogicalPlan::Union(_) => Err(refuse(
                "UNION brings rows that a count cannot tell from patients' rows",
            )),
            LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => Err(refuse(
                "VALUES and rows not read from a table are not patients and may not be counted",
            )),
            LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => Err(refuse(
                "ORDER BY or LIMIT below the aggregation picks rows one by one",
            )),
            _ => Err(refuse(
                "the query uses a construct below its aggregation that is not table-builder SQL",
            )),
        }
    }

    /// The shape of a projected expression or group key: a column, or a coarsening of one.
    fn value(
        &self,
        expr: &Expr,
        schema: &DFSchema,
        input: &Shapes,
        what: &str,
    ) -> Result<Shape, Refusal> {
        if let Expr::Column(c) = unalias(expr) {
            let index = schema
                .index_of_column(c)
                .map_err(|_| refuse("a column could not be resolved"))?;
            return input
                .get(index)
                .cloned()
                .flatten()
                .ok_or_else(|| refuse(format!("`{}` is not read from a schema table", c.name)));
        }
        self.coarsening(expr, schema, input)?
            .map(Shape::Coarse)
            .ok_or_else(|| {
                refuse(format!(
                    "{what} `{}` is neither a column nor a coarsening of one column",
                    shown(expr)
                ))
            })
    }

    /// The `table.column` of an untouched schema column.
    fn plain(&self, expr: &Expr, schema: &DFSchema, input: &Shapes) -> Option<String> {
        let Expr::Column(c) = unalias(expr) else {
            return None;
        };
        match input.get(schema.index_of_column(c).ok()?)? {
            Some(Shape::Plain(source)) => Some(source.clone()),
            _ => None,
        }
    }

    /// The column a coarsening coarsens, or `None` if `expr` is not one.
    fn coarsening(
        &self,
        expr: &Expr,
        schema: &DFSchema,
        input: &Shapes,
    ) -> Result<Option<String>, Refusal> {
        match unalias(expr) {
            Expr::ScalarFunction(f) => {
                let name = f.func.name();
                let args = &f.args;
                let unit = |e: &Expr| match literal(e) {
                    Some(ScalarValue::Utf8(Some(u)) | ScalarValue::Utf8View(Some(u))) => {
                        matches!(u.to_lowercase().as_str(), "year" | "quarter" | "month")
                    }
                    _ => false,
                };
                let whole = |e: &Expr| number(e).filter(|v| v.fract() == 0.0);
                let source = match (name, args.as_slice()) {
                    ("date_part" | "datepart" | "date_trunc" | "datetrunc", [u, column])
                        if unit(u) =>
                    {
                        self.plain(column, schema, input)
                    }
                    ("substr" | "substring", [column, start, length])
                        if whole(start) == Some(1.0) && whole(length).is_some_and(|n| n >= 1.0) =>
                    {
                        self.plain(column, schema, input)
                    }
                    ("left", [column, length]) if whole(length).is_some_and(|n| n >= 1.0) => {
                        self.plain(column, schema, input)
                    }
                    _ => None,
                };
                Ok(source)
            }
            Expr::Case(case) => self.bands(case, schema, input).map(Some),
            _ => Ok(None),
        }
    }

    /// A CASE of bands: every branch tests one and the same column against constants and
    /// gives a constant; bands of a column with a `band_width` are at least that wide.
    fn bands(&self, case: &Case, schema: &DFSchema, input: &Shapes) -> Result<String, Refusal> {
        let not_bands = || {
            refuse(
                "a CASE in a group key or derived column must test one column against constants \
                 in every branch and give constants",
            )
        };
        let results = case
            .when_then_expr
            .iter()
            .map(|(_, then)| then.as_ref())
            .chain(case.else_expr.as_deref());
        for result in results {
            if !is_constant(result) {
                return Err(not_bands());
            }
        }
        let mut atoms = Vec::new();
        let column = if let Some(operand) = &case.expr {
            // CASE col WHEN 'a' THEN … : equality with each constant.
            let column = self.plain(operand, schema, input).ok_or_else(not_bands)?;
            for (when, _) in &case.when_then_expr {
                if !is_constant(when) {
                    return Err(not_bands());
                }
                atoms.push(Atom::new(column.clone(), AtomOp::Equal, None));
            }
            column
        } else {
            for (when, _) in &case.when_then_expr {
                self.predicate(when, schema, input, &mut atoms)?;
            }
            let mut sources = atoms.iter().map(|a| a.source.as_str());
            let first = sources.next().ok_or_else(not_bands)?.to_string();
            if sources.any(|s| s != first) {
                return Err(not_bands());
            }
            first
        };
        if let Some(width) = self.band_width(&column) {
            let single = || {
                refuse(format!(
                    "bands of `{column}` must be ranges at least {width} wide, not single values"
                ))
            };
            let mut cuts = Vec::new();
            for atom in &atoms {
                match atom.op {
                    AtomOp::Cut(offset) => cuts.push(atom.value.ok_or_else(single)? + offset),
                    AtomOp::Between => {
                        let (low, high) = atom.range.ok_or_else(single)?;
                        cuts.extend([low, high + 1.0]);
                    }
                    AtomOp::Null => {}
                    AtomOp::Equal => return Err(single()),
                }
            }
            cuts.sort_by(f64::total_cmp);
            cuts.dedup();
            if cuts.windows(2).any(|w| w[1] - w[0] < width) {
                return Err(refuse(format!(
                    "bands of `{column}` must be at least {width} wide"
                )));
            }
        }
        Ok(column)
    }

    /// The schema column a `table.column` source names.
    fn column(&self, source: &str) -> Option<&trustql_schemas::Column> {
        let (table, column) = source.split_once('.')?;
        self.schema.table(table).ok()?.column(column)
    }

    fn band_width(&self, source: &str) -> Option<f64> {
        self.column(source)?.band_width
    }

    fn class(&self, source: &str) -> Option<DisclosureClass> {
        Some(self.column(source)?.class)
    }

    /// A WHERE or ON condition: a table-builder predicate (key equalities included).
    fn condition(&self, expr: &Expr, schema: &DFSchema, input: &Shapes) -> Result<(), Refusal> {
        self.predicate(expr, schema, input, &mut Vec::new())
    }

    /// Checks a predicate, collecting its comparisons.
    fn predicate(
        &self,
        expr: &Expr,
        schema: &DFSchema,
        input: &Shapes,
        atoms: &mut Vec<Atom>,
    ) -> Result<(), Refusal> {
        let not_predicate = || {
            refuse(format!(
                "the condition `{}` does not compare one column with constants",
                shown(expr)
            ))
        };
        match unalias(expr) {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And | Operator::Or,
                right,
            }) => {
                self.predicate(left, schema, input, atoms)?;
                self.predicate(right, schema, input, atoms)
            }
            Expr::Not(inner) => self.predicate(inner, schema, input, atoms),
            Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
                let source = self
                    .operand(inner, schema, input)
                    .ok_or_else(not_predicate)?;
                atoms.push(Atom::new(source, AtomOp::Null, None));
                Ok(())
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right })
                if matches!(
                    op,
                    Operator::Eq
                        | Operator::NotEq
                        | Operator::Lt
                        | Operator::LtEq
                        | Operator::Gt
                        | Operator::GtEq
                ) =>
            {
                // A key equality joins two tables (the vetting checks it is on one key).
                if *op == Operator::Eq
                    && let (Some(l), Some(r)) = (
                        self.plain(left, schema, input),
                        self.plain(right, schema, input),
                    )
                    && self.class(&l) == Some(DisclosureClass::DirectIdentifier)
                    && self.class(&r) == Some(DisclosureClass::DirectIdentifier)
                {
                    return Ok(());
                }
                let (column, constant, op) = if is_constant(right) {
                    (left, right, *op)
                } else if is_constant(left) {
                    (right, left, op.swap().ok_or_else(not_predicate)?)
                } else {
                    return Err(not_predicate());
                };
                let source = self
                    .operand(column, schema, input)
                    .ok_or_else(not_predicate)?;
                let op = match op {
                    Operator::Eq | Operator::NotEq => AtomOp::Equal,
                    // `col < c` and `col >= c` cut at c; `col <= c` and `col > c` at c + 1.
                    Operator::Lt | Operator::GtEq => AtomOp::Cut(0.0),
                    _ => AtomOp::Cut(1.0),
                };
                atoms.push(Atom::new(source, op, number(constant)));
                Ok(())
            }
            Expr::Between(Between {
                expr: inner,
                low,
                high,
                ..
            }) => {
                if !is_constant(low) || !is_constant(high) {
                    return Err(not_predicate());
                }
                let source = self
                    .operand(inner, schema, input)
                    .ok_or_else(not_predicate)?;
                let mut atom = Atom::new(source, AtomOp::Between, None);
                atom.range = number(low).zip(number(high));
                atoms.push(atom);
                Ok(())
            }
            Expr::InList(InList {
                expr: inner, list, ..
            }) => {
                if !list.iter().all(is_constant) {
                    return Err(not_predicate());
                }
                let source = self
                    .operand(inner, schema, input)
                    .ok_or_else(not_predicate)?;
                atoms.push(Atom::new(source, AtomOp::Equal, None));
                Ok(())
            }
            Expr::Like(Like {
                expr: inner,
                pattern,
                ..
            }) => {
                if !is_constant(pattern) {
                    return Err(not_predicate());
                }
                let source = self
                    .operand(inner, schema, input)
                    .ok_or_else(not_predicate)?;
                atoms.push(Atom::new(source, AtomOp::Equal, None));
                Ok(())
            }
            Expr::Literal(ScalarValue::Boolean(_), _) => Ok(()),
            _ => Err(not_predicate()),
        }
    }

    /// What a condition may test: a column (plain or coarsened in a derived table) or a
    /// coarsening of one.
    fn operand(&self, expr: &Expr, schema: &DFSchema, input: &Shapes) -> Option<String> {
        if let Expr::Column(c) = unalias(expr) {
            let index = schema.index_of_column(c).ok()?;
            return input.get(index)?.as_ref().map(|s| s.source().to_string());
        }
        match unalias(expr) {
            // Bands inside a condition would nest CASEs: only functions coarsen here.
            Expr::ScalarFunction(_) => self.coarsening(expr, schema, input).ok().flatten(),
            _ => None,
        }
    }

    /// One aggregate of the aggregation.
    fn aggregate(&self, expr: &Expr, schema: &DFSchema, input: &Shapes) -> Result<(), Refusal> {
        let Expr::AggregateFunction(AggregateFunction { func, params }) = unalias(expr) else {
            return Err(refuse(
                "only plain aggregate functions are table-builder SQL",
            ));
        };
        let name = func.name().to_lowercase();
        let upper = name.to_uppercase();
        if params.filter.is_some() {
            return Err(refuse(format!(
                "{upper}(…) FILTER (WHERE …) counts a different set of patients than its \
                 group; put the condition in WHERE, or group by it"
            )));
        }
        if trustql_survival::is_survival(&name) {
            return self.survival(&upper, &params.args, schema, input);
        }
        if trustql_distribution::is_percentile(&name) {
            return self.percentile(&upper, &params.args, schema, input);
        }
        let argument = match params.args.as_slice() {
            [] => None,
            [arg] => Some(arg),
            _ => return Err(refuse(format!("{upper} takes one column here"))),
        };
        if name == "count" {
            return match argument {
                // COUNT(*) is COUNT of a constant.
                None => Ok(()),
                Some(arg) if !params.distinct && literal(arg).is_some_and(|v| !v.is_null()) => {
                    Ok(())
                }
                Some(arg) => {
                    let source = self.plain(arg, schema, input).ok_or_else(|| {
                        refuse(format!(
                            "COUNT of `{}`: only COUNT(*) and COUNT of a column are \
                             table-builder SQL",
                            shown(arg)
                        ))
                    })?;
                    if params.distinct && !self.is_patient_key(&source) {
                        return Err(refuse(format!(
                            "COUNT(DISTINCT {source}): only the patient key may be counted \
                             distinctly"
                        )));
                    }
                    Ok(())
                }
            };
        }
        let Some(arg) = argument else {
            return Err(refuse(format!("{upper} needs a column")));
        };
        let Some(source) = self.plain(arg, schema, input) else {
            return Err(refuse(format!(
                "{upper} of `{}`: aggregates take a column, not an expression",
                shown(arg)
            )));
        };
        let summed = name == "sum" || name == "avg" || MOMENT_AGGREGATES.contains(&name.as_str());
        if summed && !self.has_bounds(&source) {
            return Err(refuse(format!(
                "{upper}({source}): only columns with public bounds (in the schema or the \
                 policy's [dp] bounds) may be summed or averaged"
            )));
        }
        Ok(())
    }

    /// A survival aggregate: two date columns, an event that is a column or a condition on
    /// one, and constant grid parameters (which `needs` checks against the policy).
    fn survival(
        &self,
        upper: &str,
        args: &[Expr],
        schema: &DFSchema,
        input: &Shapes,
    ) -> Result<(), Refusal> {
        let [start, end, event, rest @ ..] = args else {
            return Err(refuse(format!(
                "{upper} takes a start date, an end date and an event"
            )));
        };
        // logrank's arm becomes a key at the node: it is held to what a GROUP BY key is.
        let params = if upper.eq_ignore_ascii_case(trustql_survival::LOGRANK) {
            let Some((arm, params)) = rest.split_first() else {
                return Err(refuse(format!("{upper} takes an arm after the event")));
            };
            self.value(arm, schema, input, "logrank's arm")?;
            params
        } else {
            rest
        };
        for date in [start, end] {
            if self.plain(date, schema, input).is_none() {
                return Err(refuse(format!(
                    "{upper}: `{}` is not a date column; the start and end are columns (diagnosisdatebest, vitalstatusdate)",
                    shown(date)
                )));
            }
        }
        // The event is a column, or codes of one coded column (vitalstatus IN ('D', 'D4')):
        // a condition on a date or a number could make one patient the only event.
        if self.plain(event, schema, input).is_none() {
            let mut atoms = Vec::new();
            self.predicate(event, schema, input, &mut atoms)?;
            let first = atoms.first().map(|a| a.source.clone());
            let coded = first.as_deref().is_some_and(|source| {
                atoms.iter().all(|a| a.source == source)
                    && self.column(source).is_some_and(|c| c.code_set.is_some())
            });
            if !coded {
                return Err(refuse(format!(
                    "{upper}: the event `{}` must be a boolean column or compare one coded \
                     column with constants (for example p.vitalstatus = 'D')",
                    shown(event)
                )));
            }
        }
        if let Some(p) = params.iter().find(|p| !is_constant(p)) {
            return Err(refuse(format!(
                "{upper}: `{}` must be a constant number of days",
                shown(p)
            )));
        }
        Ok(())
    }

    /// A percentile: a column with a public grid, named as the schema names it (the
    /// aggregate finds its grid by that name), and a constant fraction.
    fn percentile(
        &self,
        upper: &str,
        args: &[Expr],
        schema: &DFSchema,
        input: &Shapes,
    ) -> Result<(), Refusal> {
        let Some((column, params)) = args.split_first() else {
            return Err(refuse(format!("{upper} needs a column")));
        };
        let source = self.plain(column, schema, input);
        let named = match (unalias(column), source.as_deref()) {
            (Expr::Column(c), Some(source)) => source
                .rsplit_once('.')
                .is_some_and(|(_, name)| name == c.name),
            _ => false,
        };
        let gridded = source
            .as_deref()
            .and_then(|s| self.column(s))
            .is_some_and(|c| c.bin_width.is_some() && c.bounds.is_some());
        if !named || !gridded {
            return Err(refuse(format!(
                "{upper} of `{}`: percentiles are read from a histogram over a column's public \
                 bins, so they take a column that has bounds and a bin width in the schema \
                 (such as age or weight_at_start_of_regimen), under its own name",
                shown(column)
            )));
        }
        if let Some(p) = params.iter().find(|p| !is_constant(p)) {
            return Err(refuse(format!(
                "{upper}: `{}` must be a constant",
                shown(p)
            )));
        }
        Ok(())
    }

    fn has_bounds(&self, source: &str) -> bool {
        if self.policy.dp.bounds.contains_key(source) {
            return true;
        }
        self.column(source).is_some_and(|c| c.bounds.is_some())
    }

    /// Whether `source` is the patient key or refers to it.
    fn is_patient_key(&self, source: &str) -> bool {
        let info = self.schema.info();
        let Ok(patient) = self.schema.table(&info.patient_table) else {
            return false;
        };
        let Some(pk) = patient.primary_key.as_deref() else {
            return false;
        };
        let domain = format!("{}.{pk}", patient.name);
        if source == domain {
            return true;
        }
        self.column(source)
            .is_some_and(|c| c.references.as_deref() == Some(domain.as_str()))
    }
}

/// One comparison of a column with constants.
#[derive(Debug, Clone)]
struct Atom {
    source: String,
    op: AtomOp,
    value: Option<f64>,
    range: Option<(f64, f64)>,
}

impl Atom {
    fn new(source: String, op: AtomOp, value: Option<f64>) -> Self {
        Atom {
            source,
            op,
            value,
            range: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AtomOp {
    /// Equality with one value or a list (a band of single values).
    Equal,
    /// A range boundary at the value plus this offset.
    Cut(f64),
    /// BETWEEN two constants.
    Between,
    /// IS [NOT] NULL.
    Null,
}
