//! Vetted expressions are total: they cannot fail on data.
//!
//! A query that fails only where some row exists (`SUM(1 / (age - 57))`, `abs(i64::MIN)`, a
//! CAST of text that does not parse) answers a yes/no question about that row with no noise, in
//! DP mode too. So every expression that could fail on a value is rewritten, keeping its type,
//! to yield NULL there instead, as TRY_CAST does:
//!
//! - `CAST(e AS t)` becomes `TRY_CAST(e AS t)` (a CAST of a literal is left: DataFusion folds it
//!   while planning, so it fails, if at all, before any data is read, at every trust alike);
//! - integer `a / b` and `a % b` become [`TotalArithmetic`], NULL where `b` is 0 or
//!   the quotient overflows (`MIN / -1`);
//! - `abs(x)` of a signed integer becomes `abs(nullif(x, MIN))`;
//! - `substr(s, p, n)` gets `nullif(p, i64::MIN)` and `nullif(greatest(n, -1), -1)`;
//! - `date_trunc(u, ts)` sees `ts` only within 1678-01-01 .. 2262-01-01 (DataFusion truncates in
//!   nanoseconds and fails, or panics, near the ends of that range).
//!
//! What cannot be made total this way is refused by vetting (`vet.rs`, [`Rule::ErrorOracle`]):
//! a pattern (LIKE, ILIKE, SIMILAR TO, `~`, `~~`) that is not a literal, or a literal one that
//! arrow cannot build (checked at vetting with arrow's own kernel: arrow builds it only when a
//! batch reaches it), DECIMAL, date and timestamp arithmetic, integer `round` to a place.
//! `+ - *` of integers wrap in DataFusion 55 and floats give inf/NaN, so neither fails.
//!
//! The rewrite is an analyzer rule of [`crate::locked_session`], after type coercion (which adds
//! the casts a comparison of text with a number needs): every plan the node or the coordinator
//! runs passes through it, so both sides plan the same expressions and the same state types.
//! Each rewritten form names a function, never a literal of the data, and duplicates no
//! operand, so a nested expression grows linearly, not exponentially.
//!
//! [`Rule::ErrorOracle`]: crate::Rule::ErrorOracle

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, ArrowPrimitiveType, AsArray, PrimitiveArray};
use datafusion::arrow::datatypes::{
    ArrowNativeTypeOp, DataType, Int8Type, Int16Type, Int32Type, Int64Type, TimeUnit, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, Result, ScalarValue, exec_err};
use datafusion::logical_expr::expr::{ScalarFunction, TryCast};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::utils::merge_schema;
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Expr, ExprSchemable, LogicalPlan, Operator, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, Volatility, lit,
};
use datafusion::optimizer::AnalyzerRule;

/// Names of the functions the rewrite introduces. A researcher cannot call them (the session
/// does not register them); vetting accepts them in the plans it checks after the rewrite.
pub const TOTAL_FUNCTIONS: [&str; 2] = [TotalArithmetic::DIVIDE, TotalArithmetic::MODULO];

/// The analyzer rule that makes every expression of a plan total (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct TotalExpressions;

impl AnalyzerRule for TotalExpressions {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        make_total(plan)
    }

    fn name(&self) -> &str {
        "trustql_total_expressions"
    }
}

/// Rewrites every expression of `plan` (subqueries included) so it cannot fail on data. The plan
/// must be type-coerced already (the analyzer's `type_coercion` rule): the rewrite reads the
/// operands' types and builds expressions of exactly those types.
pub fn make_total(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| {
        let mut schema = merge_schema(&node.inputs());
        if let LogicalPlan::TableScan(scan) = &node {
            schema.merge(&scan.projected_schema);
        }
        // Output names stay as written: the states a node ships are named after them.
        let names = NamePreserver::new(&node);
        node.map_expressions(|expr| {
            let name = names.save(&expr);
            expr.transform_up(|e| total(e, &schema))
                .map(|t| t.update_data(|e| name.restore(e)))
        })?
        .map_data(|node| node.recompute_schema())
    })
    .map(|t| t.data)
}

/// One expression node, rewritten if it could fail on some value.
fn total(expr: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    match expr {
        Expr::Cast(cast) if !matches!(*cast.expr, Expr::Literal(..)) => Ok(Transformed::yes(
            Expr::TryCast(TryCast::new(cast.expr, cast.field.data_type().clone())),
        )),
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(op, Operator::Divide | Operator::Modulo) =>
        {
            let ty = left.get_type(schema)?;
            let integers = ty.is_integer() && right.get_type(schema)? == ty;
            if !integers || safe_divisor(&right) {
                return Ok(Transformed::no(Expr::BinaryExpr(BinaryExpr {
                    left,
                    op,
                    right,
                })));
            }
            let udf = ScalarUDF::new_from_impl(TotalArithmetic::new(if op == Operator::Divide {
                Op::Divide
            } else {
                Op::Modulo
            }));
            Ok(Transformed::yes(Expr::ScalarFunction(
                ScalarFunction::new_udf(Arc::new(udf), vec![*left, *right]),
            )))
        }
        Expr::ScalarFunction(mut f) => {
            let changed = match f.func.name() {
                "abs" => guard_abs(&mut f.args, schema)?,
                "substr" => guard_substr(&mut f.args, schema)?,
                "date_trunc" => guard_date_trunc(&mut f.args, schema)?,
                _ => false,
            };
            let expr = Expr::ScalarFunction(f);
            Ok(if changed {
                Transformed::yes(expr)
            } else {
                Transformed::no(expr)
            })
        }
        Expr::SimilarTo(like) => standard_similar_to(like, schema),
        other => Ok(Transformed::no(other)),
    }
}

/// `e SIMILAR TO p` as the SQL standard (and PostgreSQL) reads it. DataFusion 55 plans it as
/// `e ~ p`, an unanchored regular expression, so `'C18' SIMILAR TO 'C1'` would be true and
/// `%` and `_` would be literal: a researcher would get another answer than a central database
/// gives. A literal pattern becomes the regular expression [`similar_to_regex`] over the same
/// type. Any other pattern, and one whose expression does not build, is left for vetting to
/// refuse with its reason (DataFusion's simplifier would fail on it first, as invalid SQL).
fn standard_similar_to(
    like: datafusion::logical_expr::Like,
    schema: &DFSchema,
) -> Result<Transformed<Expr>> {
    let text = match &*like.pattern {
        Expr::Literal(value, _) => match value.cast_to(&DataType::Utf8) {
            Ok(ScalarValue::Utf8(Some(text))) => Some(text),
            _ => None,
        },
        _ => None,
    };
    let Some(regex) = text
        .map(|t| similar_to_regex(&t))
        .filter(|r| crate::vet::regex_builds(r, like.case_insensitive).is_ok())
    else {
        return Ok(Transformed::no(Expr::SimilarTo(like)));
    };
    let ty = like.pattern.get_type(schema)?;
    let pattern = ScalarValue::Utf8(Some(regex)).cast_to(&ty)?;
    let op = match (like.negated, like.case_insensitive) {
        (false, false) => Operator::RegexMatch,
        (true, false) => Operator::RegexNotMatch,
        (false, true) => Operator::RegexIMatch,
        (true, true) => Operator::RegexNotIMatch,
    };
    Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(
        like.expr,
        op,
        Box::new(Expr::Literal(pattern, None)),
    ))))
}

/// The regular expression (of the `regex` crate) that matches what the SQL pattern `pattern`
/// of SIMILAR TO matches, as PostgreSQL translates it: the whole value, `%` any text, `_` one
/// character, `.`, `^` and `$` themselves, a backslash escaping the next character, bracket
/// expressions and `| * + ? {m,n} ( )` as in a regular expression.
pub(crate) fn similar_to_regex(pattern: &str) -> String {
    // `(?s)`: `%` and `_` match a newline too.
    let mut out = String::from("(?s)^(?:");
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next) => out.push_str(&regex_escape(next)),
                // A trailing backslash is itself (as arrow reads one at the end of a LIKE).
                None => out.push_str("\\\\"),
            },
            '%' => out.push_str(".*"),
            '_' => out.push('.'),
            '.' | '^' | '$' => {
                out.push('\\');
                out.push(c);
            }
            '[' => {
                // A bracket expression passes through; a `]` first (after an optional `^`)
                // is a member, not the end.
                out.push('[');
                if let Some(caret) = chars.next_if_eq(&'^') {
                    out.push(caret);
                }
                if let Some(bracket) = chars.next_if_eq(&']') {
                    out.push('\\');
                    out.push(bracket);
                }
                while let Some(c) = chars.next() {
                    out.push(c);
                    match c {
                        '\\' => out.extend(chars.next()),
                        ']' => break,
                        _ => {}
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out.push_str(")$");
    out
}

/// One character, matching itself in a regular expression.
fn regex_escape(c: char) -> String {
    // The `regex` crate's meta characters (what `regex::escape` escapes); escaping others may
    // mean something (`\<` is a word boundary).
    if "\\.+*?()|[]{}^$#&-~".contains(c) {
        format!("\\{c}")
    } else {
        c.to_string()
    }
}

/// A literal divisor that is neither NULL, 0 nor -1: dividing by it cannot fail.
fn safe_divisor(expr: &Expr) -> bool {
    let Expr::Literal(value, _) = expr else {
        return false;
    };
    if value.is_null() {
        return false;
    }
    let ty = value.data_type();
    let zero = ScalarValue::new_zero(&ty).ok();
    let minus_one = ScalarValue::new_negative_one(&ty).ok();
    Some(value) != zero.as_ref() && Some(value) != minus_one.as_ref()
}

/// `abs(x)` → `abs(nullif(x, MIN))` for a signed integer `x` (|MIN| does not exist).
fn guard_abs(args: &mut [Expr], schema: &DFSchema) -> Result<bool> {
    let [x] = args else { return Ok(false) };
    let ty = x.get_type(schema)?;
    let Some(min) = signed_min(&ty) else {
        return Ok(false);
    };
    if matches!(x, Expr::Literal(v, _) if *v != min) {
        return Ok(false);
    }
    *x = nullif(x.clone(), lit(min));
    Ok(true)
}

/// `substr(s, p[, n])`: NULL for the start `i64::MIN` (its 0-based start overflows) and for a
/// negative length (an error in DataFusion), instead of failing.
fn guard_substr(args: &mut [Expr], schema: &DFSchema) -> Result<bool> {
    let mut changed = false;
    if let Some(start) = args.get_mut(1)
        && start.get_type(schema)? == DataType::Int64
        && !matches!(start, Expr::Literal(ScalarValue::Int64(Some(p)), _) if *p != i64::MIN)
    {
        *start = nullif(start.clone(), lit(i64::MIN));
        changed = true;
    }
    if let Some(count) = args.get_mut(2)
        && count.get_type(schema)? == DataType::Int64
        && !matches!(count, Expr::Literal(ScalarValue::Int64(Some(n)), _) if *n >= 0)
    {
        let floored = greatest(count.clone(), lit(-1_i64));
        *count = nullif(floored, lit(-1_i64));
        changed = true;
    }
    Ok(changed)
}

/// Seconds since 1970 of 1678-01-01 and of 2262-01-01: within them, a timestamp of any unit
/// truncates in nanoseconds without overflow (the nanosecond range ends in 1677 and 2262).
const SAFE_SECONDS: (i64, i64) = (-9_214_560_000, 9_214_646_400);

/// `date_trunc(u, ts)`: `ts` outside [1678-01-01, 2262-01-01) becomes NULL.
fn guard_date_trunc(args: &mut [Expr], schema: &DFSchema) -> Result<bool> {
    let Some(ts) = args.get_mut(1) else {
        return Ok(false);
    };
    let DataType::Timestamp(unit, tz) = ts.get_type(schema)? else {
        return Ok(false);
    };
    let per_second: i64 = match unit {
        TimeUnit::Second => 1,
        TimeUnit::Millisecond => 1_000,
        TimeUnit::Microsecond => 1_000_000,
        TimeUnit::Nanosecond => 1_000_000_000,
    };
    let at = |v: i64| {
        lit(match unit {
            TimeUnit::Second => ScalarValue::TimestampSecond(Some(v), tz.clone()),
            TimeUnit::Millisecond => ScalarValue::TimestampMillisecond(Some(v), tz.clone()),
            TimeUnit::Microsecond => ScalarValue::TimestampMicrosecond(Some(v), tz.clone()),
            TimeUnit::Nanosecond => ScalarValue::TimestampNanosecond(Some(v), tz.clone()),
        })
    };
    // Below the window: greatest(ts, lo - 1) is lo - 1, which nullif turns to NULL; above it,
    // likewise with least and hi. Inside, ts passes unchanged.
    let lo = SAFE_SECONDS.0 * per_second - 1;
    let hi = SAFE_SECONDS.1 * per_second;
    let floored = nullif(greatest(ts.clone(), at(lo)), at(lo));
    *ts = nullif(least(floored, at(hi)), at(hi));
    Ok(true)
}

fn signed_min(ty: &DataType) -> Option<ScalarValue> {
    Some(match ty {
        DataType::Int8 => ScalarValue::Int8(Some(i8::MIN)),
        DataType::Int16 => ScalarValue::Int16(Some(i16::MIN)),
        DataType::Int32 => ScalarValue::Int32(Some(i32::MIN)),
        DataType::Int64 => ScalarValue::Int64(Some(i64::MIN)),
        _ => return None,
    })
}

fn nullif(a: Expr, b: Expr) -> Expr {
    datafusion::functions::core::expr_fn::nullif(a, b)
}

fn greatest(a: Expr, b: Expr) -> Expr {
    datafusion::functions::core::expr_fn::greatest(vec![a, b])
}

fn least(a: Expr, b: Expr) -> Expr {
    datafusion::functions::core::expr_fn::least(vec![a, b])
}

/// Integer `/` that is NULL where the divisor is 0 or the quotient overflows, or `%` that is
/// NULL where the divisor is 0 (`MIN % -1` is 0, as in DataFusion).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TotalArithmetic {
    op: Op,
    signature: Signature,
}

impl TotalArithmetic {
    const DIVIDE: &'static str = "trustql_divide";
    const MODULO: &'static str = "trustql_modulo";

    fn new(op: Op) -> Self {
        TotalArithmetic {
            op,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for TotalArithmetic {
    fn name(&self) -> &str {
        match self.op {
            Op::Divide => Self::DIVIDE,
            Op::Modulo => Self::MODULO,
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        same_integers(self.name(), arg_types)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        elementwise(self.name(), args, self.op)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Divide,
    Modulo,
}

/// The type both arguments share (the rewrite only builds calls on coerced integer operands).
fn same_integers(name: &str, types: &[DataType]) -> Result<DataType> {
    match types {
        [a, b] if a == b && a.is_integer() => Ok(a.clone()),
        _ => exec_err!("{name} takes two integers of one type"),
    }
}

fn elementwise(name: &str, args: ScalarFunctionArgs, op: Op) -> Result<ColumnarValue> {
    let scalar = args
        .args
        .iter()
        .all(|a| matches!(a, ColumnarValue::Scalar(_)));
    let arrays = ColumnarValue::values_to_arrays(&args.args)?;
    let [a, b] = arrays.as_slice() else {
        return exec_err!("{name} takes two arguments");
    };
    let out = match a.data_type() {
        DataType::Int8 => apply::<Int8Type>(a, b, op),
        DataType::Int16 => apply::<Int16Type>(a, b, op),
        DataType::Int32 => apply::<Int32Type>(a, b, op),
        DataType::Int64 => apply::<Int64Type>(a, b, op),
        DataType::UInt8 => apply::<UInt8Type>(a, b, op),
        DataType::UInt16 => apply::<UInt16Type>(a, b, op),
        DataType::UInt32 => apply::<UInt32Type>(a, b, op),
        DataType::UInt64 => apply::<UInt64Type>(a, b, op),
        _ => return exec_err!("{name} takes integers"),
    }?;
    if scalar {
        Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
    } else {
        Ok(ColumnarValue::Array(out))
    }
}

fn apply<T: ArrowPrimitiveType>(a: &ArrayRef, b: &ArrayRef, op: Op) -> Result<ArrayRef> {
    let (Some(a), Some(b)) = (a.as_primitive_opt::<T>(), b.as_primitive_opt::<T>()) else {
        return exec_err!("the operands of an integer division differ in type");
    };
    let out: PrimitiveArray<T> = a
        .iter()
        .zip(b.iter())
        .map(|pair| match pair {
            (Some(x), Some(y)) if !y.is_zero() => match op {
                // Checked: MIN / -1 overflows.
                Op::Divide => x.div_checked(y).ok(),
                // Wrapping: MIN % -1 is 0, which is what DataFusion answers.
                Op::Modulo => Some(x.mod_wrapping(y)),
            },
            _ => None,
        })
        .collect();
    Ok(Arc::new(out))
}
