//! Runtime errors are no oracle (issue 15, class 4): a query built to fail only where a target
//! row exists gets the same kind of outcome at a trust that holds the row and at one that does
//! not — both answer, or both are refused before anything runs — in the unprotected correctness
//! mode and in DP mode. A failure after vetting says nothing of what failed, and in DP mode it
//! costs what an answer would.

mod common;

use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use trustql_node::{NodeError, SiteAnswer, SiteEngine};
use trustql_policies::{Rule, approve, load_approved};
use trustql_protocol::{ColumnKind, SiteRequest};
use trustql_schemas::table_path;

const TODAY: i32 = 20_415;

/// No one is this old: the "trust without the row".
const ABSENT_AGE: i64 = 200;

/// Oracle queries, with `{T}` for the target age. Each fails in plain DataFusion exactly where
/// a tumour of age `{T}` exists.
const ORACLES: [&str; 8] = [
    "SELECT SUM(1 / (age - {T})) FROM sim_av_tumour",
    "SELECT SUM(age % (age - {T})) FROM sim_av_tumour",
    "SELECT SUM((age - {T} + (-9223372036854775807 - 1)) / -1) FROM sim_av_tumour",
    "SELECT SUM(abs(age - {T} + (-9223372036854775807 - 1))) FROM sim_av_tumour",
    "SELECT SUM(CAST(CASE WHEN age = {T} THEN 'x' ELSE '1' END AS INT)) FROM sim_av_tumour",
    "SELECT SUM(CAST(CASE WHEN age = {T} THEN 300 ELSE 1 END AS TINYINT)) FROM sim_av_tumour",
    "SELECT COUNT(*) FROM sim_av_tumour WHERE 1 / (age - {T}) IS NOT NULL",
    "SELECT COUNT(*) FROM sim_av_tumour \
     WHERE CAST(CASE WHEN age = {T} THEN stage_best || 'x' ELSE '1' END AS INT) = 1",
];

fn oracle(template: &str, age: i64) -> String {
    template.replace("{T}", &age.to_string())
}

fn request(project: &str, sql: &str) -> SiteRequest {
    SiteRequest {
        request_id: format!("r-{}", sql.len()),
        researcher: "alice".into(),
        project: project.into(),
        sql: sql.into(),
        ..Default::default()
    }
}

/// p1 answers unprotected; p2 in DP mode with room for every oracle query.
fn policy(dir: &Path) -> trustql_policies::ApprovedPolicy {
    let path = dir.join("policy.toml");
    let tables = common::ALL_TABLES;
    let text = format!(
        r#"[policy]
version = "total-test"
trust = "TQ01"

[disclosure]
{unprotected}

[dp]
default_rows_per_patient = 1
rows_per_patient = {{ sim_av_tumour = 3 }}
bounds = {{ "sim_av_tumour.age" = [0, 110] }}

[[project]]
id = "p1"
researchers = ["alice"]
tables = {tables}
expires = "2099-12-31"

[[project]]
id = "p2"
researchers = ["alice"]
tables = {tables}
expires = "2099-12-31"
dp = {{ epsilon_budget = 1000.0, epsilon_per_query = 1.0 }}
"#,
        unprotected = common::UNPROTECTED
    );
    std::fs::write(&path, text).expect("write policy");
    approve(&path, "Test Controller", &common::schema()).expect("approve");
    load_approved(&path, &common::schema()).expect("load")
}

async fn engine(dir: &Path) -> SiteEngine {
    let fed = common::synth(dir, 400);
    common::open_engine(dir, &fed, policy(dir), true).await
}

/// An age some tumour at this trust has: the target row.
async fn present_age(dir: &Path) -> i64 {
    let ctx = common::plain_session(&dir.join("fed/TQ01")).await;
    let batches = ctx
        .sql("SELECT MIN(age) FROM sim_av_tumour WHERE age > 0")
        .await
        .expect("sql")
        .collect()
        .await
        .expect("run");
    let ages = cast(batches[0].column(0), &DataType::Int64).expect("cast");
    ages.as_primitive::<Int64Type>().value(0)
}

/// What kind of outcome a researcher (and an attacker) sees.
#[derive(Debug, PartialEq)]
enum Outcome {
    Answered,
    Refused(Rule),
    Failed,
}

fn outcome(result: &Result<SiteAnswer, NodeError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Answered,
        Err(NodeError::Refused(r)) => Outcome::Refused(r.rule),
        Err(_) => Outcome::Failed,
    }
}

#[tokio::test]
async fn the_oracles_fail_in_plain_datafusion_where_the_row_is() {
    // Not vacuous: each query does fail on the target row without TrustQL, and only there.
    let dir = tempfile::tempdir().expect("tempdir");
    common::synth(dir.path(), 400);
    let target = present_age(dir.path()).await;
    let ctx = common::plain_session(&dir.path().join("fed/TQ01")).await;
    for template in ORACLES {
        for (age, fails) in [(target, true), (ABSENT_AGE, false)] {
            let sql = oracle(template, age);
            let result = async { ctx.sql(&sql).await?.collect().await }.await;
            assert_eq!(result.is_err(), fails, "{sql}");
        }
    }
}

#[tokio::test]
async fn a_trust_with_the_row_and_one_without_answer_alike_unprotected_and_in_dp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    let target = present_age(dir.path()).await;
    let ledger = engine.ledger().expect("ledger");
    for project in ["p1", "p2"] {
        for template in ORACLES {
            let with_row = oracle(template, target);
            let without = oracle(template, ABSENT_AGE);
            let before = ledger.spent("p2").epsilon;
            let a = engine.answer(&request(project, &with_row), TODAY).await;
            let spent_with_row = ledger.spent("p2").epsilon - before;
            let before = ledger.spent("p2").epsilon;
            let b = engine.answer(&request(project, &without), TODAY).await;
            let spent_without = ledger.spent("p2").epsilon - before;
            let (a, b) = (outcome(&a), outcome(&b));
            assert_eq!(a, b, "{project}: {with_row}");
            assert_ne!(a, Outcome::Failed, "{project}: {with_row}");
            // The unprotected mode answers the full aggregate SQL.
            // The unprotected mode answers the full aggregate SQL; DP answers the counts (its
            // sums need a bounded plain column, so both trusts refuse those alike).
            if project == "p1" || template.starts_with("SELECT COUNT") {
                assert_eq!(a, Outcome::Answered, "{project}: {with_row}");
            }
            assert_eq!(spent_with_row, spent_without, "{project}: {with_row}");
        }
    }
}

/// The first state column of an unprotected answer, as i64.
fn first_state(answer: &SiteAnswer) -> Option<i64> {
    let column = answer
        .meta
        .columns
        .iter()
        .position(|c| c.kind == ColumnKind::State)
        .expect("a state column");
    let values = cast(answer.batch.column(column), &DataType::Int64).expect("cast");
    let values = values.as_primitive::<Int64Type>();
    (!values.is_null(0)).then(|| values.value(0))
}

#[tokio::test]
async fn the_total_answer_is_the_answer_over_the_rows_that_do_not_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    let target = present_age(dir.path()).await;
    let ctx = common::plain_session(&dir.path().join("fed/TQ01")).await;
    let truth = |sql: String| {
        let ctx = ctx.clone();
        async move {
            let batches = ctx
                .sql(&sql)
                .await
                .expect("sql")
                .collect()
                .await
                .expect("run");
            let v = cast(batches[0].column(0), &DataType::Int64).expect("cast");
            let v = v.as_primitive::<Int64Type>();
            (!v.is_null(0)).then(|| v.value(0))
        }
    };
    // NULL where the row would have failed: the sum over every other row.
    let sql = format!("SELECT SUM(600 / (age - {target})) FROM sim_av_tumour");
    let answer = engine
        .answer(&request("p1", &sql), TODAY)
        .await
        .expect(&sql);
    let exact = truth(format!(
        "SELECT SUM(600 / (age - {target})) FROM sim_av_tumour WHERE age <> {target}"
    ))
    .await;
    assert_eq!(first_state(&answer), exact);
    // Where nothing fails, the answer is DataFusion's.
    let sql = format!("SELECT SUM(600 / (age - {ABSENT_AGE})) FROM sim_av_tumour");
    let answer = engine
        .answer(&request("p1", &sql), TODAY)
        .await
        .expect(&sql);
    assert_eq!(first_state(&answer), truth(sql).await);
}

#[tokio::test]
async fn a_failure_after_vetting_names_nothing_and_costs_its_epsilon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    // The data goes bad after the node opened it: vetting passes, the run fails.
    let tumours = table_path(&dir.path().join("fed/TQ01"), "sim_av_tumour");
    let bytes = std::fs::read(&tumours).expect("read");
    std::fs::write(&tumours, &bytes[..bytes.len() / 2]).expect("damage");
    let ledger = engine.ledger().expect("ledger");
    for (project, sql) in [
        (
            "p2",
            "SELECT COUNT(*) FROM sim_av_tumour WHERE 1 / (age - 57) IS NOT NULL",
        ),
        ("p1", "SELECT SUM(1 / (age - 57)) FROM sim_av_tumour"),
    ] {
        let before = ledger.spent("p2").epsilon;
        let error = engine
            .answer(&request(project, sql), TODAY)
            .await
            .expect_err("a damaged file cannot be answered");
        assert!(matches!(error, NodeError::Execution), "{error:?}");
        let status = error.to_status();
        assert_eq!(status.code(), tonic::Code::Internal);
        // DataFusion's words (and any value they quote) stay in the node's log.
        assert_eq!(
            status.message(),
            "the query could not be completed at this trust"
        );
        let charged = ledger.spent("p2").epsilon - before;
        assert_eq!(charged, if project == "p2" { 1.0 } else { 0.0 }, "{sql}");
    }
}

/// Oracles through a pattern, with `{T}` for the target age: arrow builds a pattern when a batch
/// reaches it, so one that does not build fails exactly where a tumour of age `{T}` exists.
const PATTERN_ORACLES: [&str; 2] = [
    "SELECT COUNT(*) FROM sim_av_tumour \
     WHERE CASE WHEN age = {T} THEN site_icd10_o2_3char SIMILAR TO '_{12000}|.{12000}' END",
    "SELECT COUNT(*) FROM sim_av_tumour \
     WHERE site_icd10_o2_3char SIMILAR TO CASE WHEN age = {T} THEN '(' ELSE 'C' END",
];

#[tokio::test]
async fn a_pattern_oracle_is_refused_alike_before_anything_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    let target = present_age(dir.path()).await;
    let ctx = common::plain_session(&dir.path().join("fed/TQ01")).await;
    let ledger = engine.ledger().expect("ledger");
    for template in PATTERN_ORACLES {
        // Not vacuous: without TrustQL the query fails on the target row, and only there.
        for (age, fails) in [(target, true), (ABSENT_AGE, false)] {
            let sql = oracle(template, age);
            let result = async { ctx.sql(&sql).await?.collect().await }.await;
            assert_eq!(result.is_err(), fails, "{sql}");
        }
        for project in ["p1", "p2"] {
            let before = ledger.spent("p2").epsilon;
            for age in [target, ABSENT_AGE] {
                let sql = oracle(template, age);
                let result = engine.answer(&request(project, &sql), TODAY).await;
                assert_eq!(
                    outcome(&result),
                    Outcome::Refused(Rule::ErrorOracle),
                    "{project}: {sql}"
                );
            }
            assert_eq!(ledger.spent("p2").epsilon, before, "{project}: {template}");
        }
    }
}
