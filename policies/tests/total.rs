//! Vetted expressions are total (issue 15, class 4): every expression that DataFusion fails on
//! for some value is rewritten so it yields NULL there instead, and what no rewrite covers is
//! refused before anything runs. Each fallible form is run on hostile values twice: in a plain
//! DataFusion session (it fails: the test is not vacuous) and in the locked session (it answers).

mod common;

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, AsArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::catalog::MemTable;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, LogicalPlan, Operator};
use datafusion::optimizer::Analyzer;
use datafusion::prelude::{SessionConfig, SessionContext};
use trustql_policies::{Policy, Refusal, Rule, locked_session, make_total, plan_sql, vet_sql};

/// One row per hostile value: the integer and date extremes, zero and -1, text that parses as
/// no number or date.
fn hostile() -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("i", DataType::Int64, true),
        Field::new("f", DataType::Float64, true),
        Field::new("s", DataType::Utf8, true),
        Field::new("d", DataType::Date32, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![
                Some(i64::MIN),
                Some(i64::MAX),
                Some(0),
                Some(-1),
                Some(300),
                Some(57),
                None,
            ])),
            Arc::new(Float64Array::from(vec![
                Some(0.0),
                Some(1e308),
                Some(-1.0),
                Some(f64::NAN),
                Some(2.5),
                Some(-0.0),
                None,
            ])),
            Arc::new(StringArray::from(vec![
                Some("abc"),
                Some("12"),
                Some(""),
                Some("2020-13-45"),
                Some("99999999999999999999"),
                Some("1.5"),
                None,
            ])),
            Arc::new(Date32Array::from(vec![
                Some(i32::MAX),
                Some(i32::MIN),
                Some(0),
                Some(19_000),
                Some(2_932_896), // 9999-12-31, a common "unknown" date
                Some(-106_000),  // 1679-10-…, near the nanosecond floor
                None,
            ])),
        ],
    )
    .expect("batch")
}

fn with_table(ctx: SessionContext) -> SessionContext {
    let batch = hostile();
    let table = MemTable::try_new(batch.schema(), vec![vec![batch]]).expect("table");
    ctx.register_table("t", Arc::new(table)).expect("register");
    ctx
}

fn locked() -> SessionContext {
    with_table(locked_session(
        SessionConfig::new(),
        Arc::new(RuntimeEnv::default()),
        &trustql_schemas::TrustSchema::cancer().expect("schema"),
    ))
}

async fn run(ctx: &SessionContext, sql: &str) -> datafusion::common::Result<Vec<RecordBatch>> {
    ctx.sql(sql).await?.collect().await
}

/// Expressions DataFusion fails on for some row of [`hostile`].
const FALLIBLE: [&str; 26] = [
    "i / (i - 57)",
    "1 / (i - 57)",
    "i % (i - 57)",
    "i / -1",
    "i / CAST(-1 AS BIGINT)",
    "CAST(i AS TINYINT) / CAST(-1 AS TINYINT)",
    "abs(i)",
    "abs(CAST(i AS INT))",
    "CAST(i AS INT)",
    "CAST(i AS TINYINT)",
    "CAST(s AS INT)",
    "CAST(s AS DOUBLE)",
    "CAST(s AS DATE)",
    "CAST(s AS BOOLEAN)",
    "CAST(f AS BIGINT)",
    "CAST(d AS TIMESTAMP)",
    "s = 3",
    "d = s",
    "s IN ('1', 2)",
    "greatest(s, i)",
    "date_part('year', s)",
    "substr(s, 1, i)",
    "substr(s, i)",
    "date_trunc('month', d)",
    "date_trunc('year', TRY_CAST(i AS TIMESTAMP))",
    "date_trunc('day', TRY_CAST(i AS TIMESTAMP(0)))",
];

#[tokio::test]
async fn every_fallible_form_fails_in_plain_datafusion_and_answers_when_locked() {
    let plain = with_table(SessionContext::new());
    let locked = locked();
    for e in FALLIBLE {
        for sql in [
            format!("SELECT {e} AS v FROM t"),
            // Inside an aggregate and a filter, where an oracle would put it.
            format!("SELECT COUNT(*) AS n FROM t WHERE ({e}) IS NOT NULL"),
        ] {
            // date_trunc near the floor panics in DataFusion rather than failing cleanly.
            let fails = tokio::spawn({
                let (plain, sql) = (plain.clone(), sql.clone());
                async move { run(&plain, &sql).await.is_err() }
            })
            .await
            .unwrap_or(true);
            assert!(fails, "plain DataFusion should fail on {sql}");
            if let Err(e) = run(&locked, &sql).await {
                panic!("the locked session should answer {sql}: {e}");
            }
        }
    }
}

/// The first column of a one-column answer, as i64 (NULL as None).
async fn values(sql: &str) -> Vec<Option<i64>> {
    let batches = run(&locked(), sql).await.expect(sql);
    let mut out = Vec::new();
    for b in batches {
        let c = datafusion::arrow::compute::cast(b.column(0), &DataType::Int64).expect("cast");
        let c = c.as_primitive::<Int64Type>();
        out.extend((0..c.len()).map(|r| (!c.is_null(r)).then(|| c.value(r))));
    }
    out
}

#[tokio::test]
async fn total_forms_answer_what_the_fallible_ones_do_and_null_where_they_failed() {
    // i: MIN, MAX, 0, -1, 300, 57, NULL
    assert_eq!(
        values("SELECT 600 / (i - 57) FROM t").await,
        vec![Some(0), Some(0), Some(-10), Some(-10), Some(2), None, None]
    );
    assert_eq!(
        values("SELECT i / -1 FROM t").await,
        vec![
            None,
            Some(-i64::MAX),
            Some(0),
            Some(1),
            Some(-300),
            Some(-57),
            None
        ]
    );
    assert_eq!(
        values("SELECT i % -1 FROM t").await,
        vec![Some(0), Some(0), Some(0), Some(0), Some(0), Some(0), None],
        "MIN % -1 is 0, as in DataFusion"
    );
    assert_eq!(
        values("SELECT -7 % (i - 54) FROM t").await[5],
        Some(-1),
        "sign of the dividend"
    );
    assert_eq!(
        values("SELECT abs(i) FROM t").await,
        vec![
            None,
            Some(i64::MAX),
            Some(0),
            Some(1),
            Some(300),
            Some(57),
            None
        ]
    );
    assert_eq!(
        values("SELECT CAST(s AS INT) FROM t").await,
        vec![None, Some(12), None, None, None, None, None]
    );
    assert_eq!(
        values("SELECT CAST(i AS TINYINT) FROM t").await,
        vec![None, None, Some(0), Some(-1), None, Some(57), None]
    );
    assert_eq!(values("SELECT 1 / 0").await, vec![None]);
    assert_eq!(values("SELECT abs(-9223372036854775808)").await, vec![None]);
    assert_eq!(values("SELECT 7 / 2").await, vec![Some(3)]);
    // A division by a safe constant is left as written.
    assert_eq!(values("SELECT i / 100 FROM t").await[4], Some(3));
    // Whole aggregates over the hostile rows.
    assert_eq!(
        values("SELECT SUM(600 / (i - 57)) FROM t").await,
        vec![Some(-18)]
    );
    assert_eq!(
        values("SELECT SUM(CAST(s AS INT)) FROM t").await,
        vec![Some(12)]
    );
}

/// True if some expression of `plan` could still fail on data: a CAST of a non-literal, or an
/// integer `/` or `%` by anything but a safe constant.
fn fallible(plan: &LogicalPlan) -> Option<String> {
    let mut found = None;
    plan.apply_with_subqueries(|node| {
        let schema = datafusion::logical_expr::utils::merge_schema(&node.inputs());
        node.apply_expressions(|e| {
            e.apply(|e| {
                match e {
                    Expr::Cast(c) if !matches!(*c.expr, Expr::Literal(..)) => {
                        found = Some(e.to_string());
                    }
                    Expr::BinaryExpr(BinaryExpr {
                        left,
                        op: Operator::Divide | Operator::Modulo,
                        right,
                    }) if left.get_type(&schema).is_ok_and(|t| t.is_integer())
                        && !matches!(**right, Expr::Literal(..)) =>
                    {
                        found = Some(e.to_string());
                    }
                    _ => {}
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })
    .expect("walk");
    found
}

#[tokio::test]
async fn the_rewrite_leaves_no_fallible_form_and_keeps_every_type_and_name() {
    let ctx = locked();
    let sql = "SELECT s, SUM(1 / (i - 57)) AS a, SUM(i % (i - 1)), AVG(CAST(s AS INT)), \
               COUNT(*) FILTER (WHERE CAST(s AS DATE) > '2020-01-01'), MAX(abs(i)) \
               FROM t WHERE s = 3 OR substr(s, 1, i) = 'a' GROUP BY s";
    let plan = plan_sql(&ctx, sql).await.expect("plan");
    // Type coercion alone (DataFusion's analyzer without the rewrite) leaves fallible forms…
    let coerced = Analyzer::new()
        .execute_and_check(plan, ctx.state().config_options(), |_, _| {})
        .expect("coerce");
    assert!(fallible(&coerced).is_some());
    // …the rewrite leaves none, and the schema is the same, name by name and type by type.
    let total = make_total(coerced.clone()).expect("total");
    assert_eq!(fallible(&total), None, "{}", total.display_indent());
    let (before, after) = (coerced.schema(), total.schema());
    assert_eq!(before.fields().len(), after.fields().len());
    for (b, a) in before.fields().iter().zip(after.fields()) {
        assert_eq!((b.name(), b.data_type()), (a.name(), a.data_type()));
    }
    // The optimised plan the node runs is rewritten too (the rule is in the session).
    let optimized = ctx
        .state()
        .optimize(&plan_sql(&ctx, sql).await.expect("plan"))
        .expect("optimize");
    assert_eq!(fallible(&optimized), None);
    assert!(
        optimized
            .display_indent()
            .to_string()
            .contains("trustql_divide")
    );
}

#[tokio::test]
async fn the_same_sql_plans_the_same_in_every_session() {
    let sql = "SELECT s, SUM(1 / (i - 57)), AVG(CAST(s AS INT)), SUM(abs(i)) FROM t GROUP BY s";
    let mut plans = Vec::new();
    for _ in 0..3 {
        let ctx = locked();
        let plan = plan_sql(&ctx, sql).await.expect("plan");
        let optimized = ctx.state().optimize(&plan).expect("optimize");
        plans.push((
            plan.display_indent_schema().to_string(),
            optimized.display_indent_schema().to_string(),
        ));
    }
    assert!(plans.windows(2).all(|w| w[0] == w[1]), "{plans:#?}");
}

// ---- refused: what no rewrite makes total -------------------------------------------------------

fn full_sql_policy() -> Policy {
    Policy::from_toml(
        r#"
[policy]
version = "test-1"
trust = "TQ01"

[disclosure]
min_patients = 1
rounding = "none"

[[project]]
id = "p1"
researchers = ["alice"]
tables = ["sim_av_patient", "sim_av_tumour"]
expires = "2099-12-31"
"#,
    )
    .expect("policy")
}

async fn vet(sql: &str) -> Result<(), Refusal> {
    vet_under(&full_sql_policy(), sql).await
}

async fn vet_under(policy: &Policy, sql: &str) -> Result<(), Refusal> {
    let project = policy.project("p1").expect("project");
    vet_sql(&common::session(), &common::schema(), policy, project, sql)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn forms_no_rewrite_makes_total_are_refused_before_running() {
    let refused = [
        (
            "SELECT COUNT(*) FROM sim_av_tumour WHERE stage_best ~ gender",
            Rule::ErrorOracle,
        ),
        (
            "SELECT COUNT(*) FROM sim_av_tumour WHERE stage_best ~ 'a{1000}{1000}'",
            Rule::ErrorOracle,
        ),
        (
            "SELECT COUNT(*) FROM sim_av_tumour WHERE stage_best SIMILAR TO gender",
            Rule::ErrorOracle,
        ),
        (
            "SELECT SUM(CAST(age AS DECIMAL(38, 0)) * age) FROM sim_av_tumour",
            Rule::ErrorOracle,
        ),
        (
            "SELECT COUNT(*) FROM sim_av_tumour WHERE diagnosisdatebest + INTERVAL '1 day' > '2020-01-01'",
            Rule::ErrorOracle,
        ),
        (
            "SELECT COUNT(*) FROM sim_av_tumour WHERE diagnosisdatebest - age > '2020-01-01'",
            Rule::ErrorOracle,
        ),
        (
            "SELECT COUNT(*) FROM sim_av_tumour WHERE CAST(diagnosisdatebest AS TIMESTAMP) - CAST(date_first_surgery AS TIMESTAMP) > INTERVAL '1 day'",
            Rule::ErrorOracle,
        ),
        (
            "SELECT date_part('fortnight', diagnosisdatebest) AS p, COUNT(*) FROM sim_av_tumour GROUP BY 1",
            Rule::ErrorOracle,
        ),
        (
            "SELECT date_trunc('fortnight', diagnosisdatebest) AS p, COUNT(*) FROM sim_av_tumour GROUP BY 1",
            Rule::ErrorOracle,
        ),
        (
            "SELECT date_trunc(gender, diagnosisdatebest) AS p, COUNT(*) FROM sim_av_tumour GROUP BY 1",
            Rule::ErrorOracle,
        ),
        (
            "SELECT round(age, -1) AS a, COUNT(*) FROM sim_av_tumour GROUP BY 1",
            Rule::ErrorOracle,
        ),
        (
            "SELECT round(age, chrl_tot_27_03) AS a, COUNT(*) FROM sim_av_tumour GROUP BY 1",
            Rule::ErrorOracle,
        ),
        (
            "SELECT date_bin(INTERVAL '0 day', CAST(diagnosisdatebest AS TIMESTAMP)) AS b, COUNT(*) FROM sim_av_tumour GROUP BY 1",
            Rule::Function,
        ),
        // The rewrite's own functions are not for researchers.
        (
            "SELECT SUM(trustql_divide(age, 2)) FROM sim_av_tumour",
            Rule::Function,
        ),
        // Patterns: a literal that builds, nothing else (see `patterns_must_be_literals…`).
        (
            "SELECT COUNT(*) FROM sim_av_tumour WHERE stage_best LIKE gender",
            Rule::ErrorOracle,
        ),
        (
            "SELECT COUNT(*) FROM sim_av_tumour WHERE stage_best SIMILAR TO '('",
            Rule::ErrorOracle,
        ),
        // The regular-expression functions are not registered at all.
        (
            "SELECT COUNT(*) FROM sim_av_tumour WHERE regexp_like(stage_best, '1')",
            Rule::Function,
        ),
    ];
    for (sql, rule) in refused {
        match vet(sql).await {
            Ok(()) => panic!("should be refused ({}): {sql}", rule.name()),
            Err(r) => assert_eq!(r.rule, rule, "{sql}\n{r}"),
        }
    }
    let accepted = [
        "SELECT SUM(1 / (age - 57)) FROM sim_av_tumour",
        "SELECT SUM(CAST(stage_best AS INT)) FROM sim_av_tumour",
        "SELECT SUM(abs(age - 57)), SUM(age % (age - 57)) FROM sim_av_tumour",
        "SELECT AVG(diagnosisdatebest - date_first_surgery) FROM sim_av_tumour",
        "SELECT date_part('year', diagnosisdatebest) AS y, COUNT(*) FROM sim_av_tumour GROUP BY 1",
        "SELECT date_trunc('month', diagnosisdatebest) AS m, COUNT(*) FROM sim_av_tumour GROUP BY 1",
        "SELECT round(CAST(age AS DOUBLE), -1) AS a, COUNT(*) FROM sim_av_tumour GROUP BY 1",
        "SELECT COUNT(*) FROM sim_av_tumour WHERE stage_best LIKE '1%'",
    ];
    for sql in accepted {
        if let Err(r) = vet(sql).await {
            panic!("should be accepted: {sql}\n{r}");
        }
    }
}

// ---- patterns: LIKE, ILIKE, SIMILAR TO, ~ ------------------------------------------------------

/// Underscores enough for the regular expression arrow builds from a LIKE pattern to pass the
/// `regex` crate's size limit (10 MiB; some 11,000 do it).
fn oversized_like() -> String {
    "_".repeat(12_000)
}

#[tokio::test]
async fn a_pattern_that_does_not_build_fails_in_plain_datafusion_only_where_a_row_reaches_it() {
    // Not vacuous: arrow builds the pattern when a batch reaches it, so the failure tells
    // whether a row with i = 57 exists (the hostile table has one, none has i = 12345).
    let plain = with_table(SessionContext::new());
    let like = oversized_like();
    for form in [
        format!("s LIKE '{like}'"),
        format!("s ILIKE '{like}'"),
        format!("s NOT LIKE '{like}'"),
        "s SIMILAR TO '.{12000}'".to_string(),
        "s SIMILAR TO '('".to_string(),
        // A pattern from the data fails on the rows whose value does not build.
        "s SIMILAR TO CASE WHEN i = {T} THEN '(' ELSE 'a' END".to_string(),
    ] {
        for (target, fails) in [("57", true), ("12345", false)] {
            let form = form.replace("{T}", target);
            let sql =
                format!("SELECT COUNT(*) AS n FROM t WHERE CASE WHEN i = {target} THEN {form} END");
            assert_eq!(run(&plain, &sql).await.is_err(), fails, "{sql}");
        }
    }
    // A trailing backslash is no error in arrow 59: a literal backslash.
    for form in ["s LIKE 'abc\\'", "s ILIKE 'é\\'", "s LIKE '\\\\\\'"] {
        let sql = format!("SELECT COUNT(*) AS n FROM t WHERE {form}");
        assert!(run(&plain, &sql).await.is_ok(), "{sql}");
    }
}

#[tokio::test]
async fn patterns_must_be_literals_that_build_when_vetted() {
    // A trust may allow long queries: the size limit is reached by the pattern, not the text.
    let mut policy = full_sql_policy();
    policy.query.max_query_chars = 100_000;
    let like = oversized_like();
    let q = |condition: &str| format!("SELECT COUNT(*) FROM sim_av_tumour WHERE {condition}");
    let refused = [
        // Not a literal: a column, a concatenation, a CASE, on either operator's right.
        (q("stage_best LIKE gender"), Rule::ErrorOracle),
        (q("stage_best NOT LIKE gender || '%'"), Rule::ErrorOracle),
        (
            q("stage_best ILIKE CASE WHEN age > 50 THEN '1%' ELSE '2%' END"),
            Rule::ErrorOracle,
        ),
        (q("'1' LIKE stage_best"), Rule::ErrorOracle),
        (q("stage_best ~~ gender"), Rule::ErrorOracle),
        (q("stage_best !~~* gender"), Rule::ErrorOracle),
        (q("stage_best SIMILAR TO gender"), Rule::ErrorOracle),
        (
            q("stage_best NOT SIMILAR TO lower(gender)"),
            Rule::ErrorOracle,
        ),
        (q("stage_best ~ gender"), Rule::ErrorOracle),
        (q("stage_best ~* ('^' || gender)"), Rule::ErrorOracle),
        // Literals that do not build: refused before running, not failed where rows are.
        (q(&format!("stage_best LIKE '{like}'")), Rule::ErrorOracle),
        (q(&format!("stage_best ILIKE '{like}'")), Rule::ErrorOracle),
        (
            q(&format!("stage_best NOT LIKE '%{like}%'")),
            Rule::ErrorOracle,
        ),
        (
            q(&format!(
                "CASE WHEN age = 57 THEN stage_best LIKE '{like}' END"
            )),
            Rule::ErrorOracle,
        ),
        (q("stage_best SIMILAR TO '('"), Rule::ErrorOracle),
        // `_` is any character: 12,000 of them pass the size limit (12,000 `.` are dots).
        (q("stage_best SIMILAR TO '_{12000}'"), Rule::ErrorOracle),
        (q("stage_best NOT SIMILAR TO '[z-a]'"), Rule::ErrorOracle),
        (q("stage_best ~ 'a{1000}{1000}'"), Rule::ErrorOracle),
        (q("stage_best ~* '.{12000}'"), Rule::ErrorOracle),
        // Escapes DataFusion does not implement.
        (q("stage_best LIKE '1#%' ESCAPE '#'"), Rule::Unsupported),
        (q("stage_best SIMILAR TO '1' ESCAPE '#'"), Rule::Unsupported),
    ];
    for (sql, rule) in &refused {
        let short: String = sql.chars().take(120).collect();
        match vet_under(&policy, sql).await {
            Ok(()) => panic!("should be refused ({}): {short}", rule.name()),
            Err(r) => {
                assert_eq!(r.rule, *rule, "{short}\n{r}");
                if r.rule == Rule::ErrorOracle {
                    assert!(r.reason.contains("pattern"), "{short}\n{r}");
                }
            }
        }
    }
    let not_literal = vet_under(&policy, &q("stage_best LIKE gender"))
        .await
        .expect_err("refused");
    assert!(
        not_literal.reason.contains("must be a literal"),
        "{not_literal}"
    );
    let accepted = [
        q("stage_best LIKE '1%'"),
        q("site_icd10_o2_3char ILIKE 'c5_'"),
        q("site_icd10_o2_3char NOT LIKE 'C%'"),
        q("site_icd10_o2_3char NOT ILIKE '%x%'"),
        q("site_icd10_o2_3char LIKE 'C\\%' ESCAPE '\\'"),
        q("site_icd10_o2_3char LIKE 'C\\'"),
        q("site_icd10_o2_3char LIKE NULL"),
        q(&format!("site_icd10_o2_3char LIKE '{}'", "_".repeat(1_000))),
        q("site_icd10_o2_3char ~~ 'C5%'"),
        q("site_icd10_o2_3char SIMILAR TO 'C5[0-9]'"),
        q("site_icd10_o2_3char NOT SIMILAR TO '^D'"),
        q("site_icd10_o2_3char ~ '^C5[0-9]$'"),
        q("site_icd10_o2_3char !~* 'c'"),
        // A literal is still one through the casts coercion adds.
        q("site_icd10_o2_3char LIKE CAST('C%' AS VARCHAR)"),
    ];
    for sql in &accepted {
        if let Err(r) = vet_under(&policy, sql).await {
            panic!("should be accepted: {sql}\n{r}");
        }
    }
}

#[tokio::test]
async fn accepted_patterns_answer_in_the_locked_session_as_in_plain_datafusion() {
    let plain = with_table(SessionContext::new());
    let locked = locked();
    for form in [
        "s LIKE 'a%'",
        "s ILIKE 'ABC'",
        "s NOT LIKE '%1%'",
        "s LIKE '1\\.5'",
        "s ~* '^A'",
    ] {
        let sql = format!("SELECT COUNT(*) AS n FROM t WHERE {form}");
        let a = run(&plain, &sql).await.expect(&sql);
        let b = run(&locked, &sql).await.expect(&sql);
        assert_eq!(a, b, "{sql}");
    }
}

/// SIMILAR TO as the SQL standard and PostgreSQL read it, not as DataFusion's unanchored `~`:
/// the whole value must match, `%` is any text and `_` one character, `.`, `^` and `$` are
/// themselves. Each count is what PostgreSQL answers over [`hostile`]'s text column ("abc",
/// "12", "", "2020-13-45", "99999999999999999999", "1.5", NULL).
#[tokio::test]
async fn similar_to_matches_the_whole_value_as_the_standard_says() {
    let plain = with_table(SessionContext::new());
    let locked = locked();
    let cases = [
        ("s SIMILAR TO '[0-9]+'", 2),
        ("s SIMILAR TO '1'", 0),
        ("s SIMILAR TO '1%'", 2),
        ("s SIMILAR TO '__'", 1),
        ("s SIMILAR TO '_'", 0),
        ("s SIMILAR TO '%.%'", 1),
        ("s SIMILAR TO '1\\.5'", 1),
        ("s SIMILAR TO '^12$'", 0),
        ("s SIMILAR TO 'abc|12'", 2),
        ("s SIMILAR TO '(ab|xy)c'", 1),
        ("s SIMILAR TO '[^a-z]%'", 4),
        ("s SIMILAR TO '[]a]bc'", 1),
        ("s SIMILAR TO '9{20}'", 1),
        ("s SIMILAR TO '%'", 6),
        ("s NOT SIMILAR TO '%'", 0),
        ("s NOT SIMILAR TO '[0-9]+'", 4),
    ];
    let mut differs = 0;
    for (form, expected) in cases {
        let sql = format!("SELECT COUNT(*) AS n FROM t WHERE {form}");
        assert_eq!(
            count(&run(&locked, &sql).await.expect(&sql)),
            expected,
            "{sql}"
        );
        if count(&run(&plain, &sql).await.expect(&sql)) != expected {
            differs += 1;
        }
    }
    // Not vacuous: DataFusion alone answers most of these otherwise.
    assert!(differs >= 8, "plain DataFusion differs on {differs}");
}

fn count(batches: &[RecordBatch]) -> i64 {
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}
