//! Differential privacy at the node: noisy answers charged to a durable ledger before release,
//! free repeats, refusals when the budget is spent, previews that spend nothing.

mod common;

use std::collections::HashMap;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use trustql_node::{NodeError, SiteAnswer, SiteEngine};
use trustql_policies::{Rule, approve, load_approved};
use trustql_protocol::{ColumnKind, SiteRequest};
use trustql_schemas::table_path;

const TODAY: i32 = 20_415;

/// p1 is in DP mode with ε 1 per query and 3 in all; p2 is not.
fn dp_policy(dir: &Path) -> trustql_policies::ApprovedPolicy {
    let path = dir.join("policy.toml");
    let tables = common::ALL_TABLES;
    let text = format!(
        r#"[policy]
version = "dp-test"
trust = "TQ01"

[dp]
default_rows_per_patient = 1
rows_per_patient = {{ sim_av_tumour = 3, sim_sact_regimen = 4 }}
bounds = {{ "sim_av_tumour.age" = [0, 100] }}

[[project]]
id = "p1"
researchers = ["alice"]
tables = {tables}
expires = "2099-12-31"
dp = {{ epsilon_budget = 3.0, epsilon_per_query = 1.0 }}

[[project]]
id = "p2"
researchers = ["alice"]
tables = {tables}
expires = "2099-12-31"
"#
    );
    std::fs::write(&path, text).expect("write policy");
    approve(&path, "Test Controller", &common::schema()).expect("approve");
    load_approved(&path, &common::schema()).expect("load")
}

async fn engine(dir: &Path) -> SiteEngine {
    let fed = dir.join("fed");
    if !fed.exists() {
        common::synth(dir, 3000);
    }
    common::open_engine(dir, &fed, dp_policy(dir), true).await
}

fn request(project: &str, sql: &str) -> SiteRequest {
    SiteRequest {
        request_id: "r".into(),
        researcher: "alice".into(),
        project: project.into(),
        sql: sql.into(),
        ..Default::default()
    }
}

async fn ask(engine: &SiteEngine, sql: &str) -> SiteAnswer {
    match engine.answer(&request("p1", sql), TODAY).await {
        Ok(a) => a,
        Err(e) => panic!("{sql} should be answered: {e}"),
    }
}

/// Exact per-group values from plain DataFusion over the same Parquet.
async fn exact(dir: &Path, sql: &str) -> HashMap<String, i64> {
    let ctx = common::plain_session(&dir.join("fed/TQ01")).await;
    let batches = ctx
        .sql(sql)
        .await
        .expect("sql")
        .collect()
        .await
        .expect("run");
    let mut out = HashMap::new();
    for b in batches {
        let keys = cast(b.column(0), &DataType::Utf8).expect("cast");
        let values = cast(b.column(1), &DataType::Int64).expect("cast");
        for r in 0..b.num_rows() {
            let key = keys.as_string::<i32>();
            let key = if key.is_null(r) {
                "<null>"
            } else {
                key.value(r)
            };
            out.insert(key.to_string(), values.as_primitive::<Int64Type>().value(r));
        }
    }
    out
}

/// (group key, value of the first state column) of a site answer.
fn released(batch: &RecordBatch, state: usize) -> HashMap<String, i64> {
    let keys = cast(batch.column(0), &DataType::Utf8).expect("cast");
    let keys = keys.as_string::<i32>();
    let values = cast(batch.column(state), &DataType::Int64).expect("cast");
    let values = values.as_primitive::<Int64Type>();
    (0..batch.num_rows())
        .map(|r| {
            let key = if keys.is_null(r) {
                "<null>"
            } else {
                keys.value(r)
            };
            (key.to_string(), values.value(r))
        })
        .collect()
}

fn state_column(answer: &SiteAnswer) -> usize {
    answer
        .meta
        .columns
        .iter()
        .position(|c| c.kind == ColumnKind::State)
        .expect("a state column")
}

const BY_STAGE: &str = "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY stage_best";

#[tokio::test]
async fn noisy_counts_cover_every_public_code_and_are_charged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    let answer = ask(&engine, BY_STAGE).await;
    let dp = answer.meta.dp.clone().expect("a DP answer");
    assert_eq!(dp.epsilon_charged, 1.0);
    assert_eq!(dp.delta_charged, 0.0, "public keys need no δ");
    assert_eq!(dp.epsilon_remaining, 2.0);
    assert_eq!(dp.max_rows_per_patient, 3);
    // One noisy column, the count, spends ε = 1 over sensitivity 3; the patient count is not
    // needed to choose public groups, so it is not measured and is released as null.
    assert_eq!(dp.noise.len(), 1);
    assert!(
        (dp.noise[0].scale - 3.0).abs() < 1e-6,
        "scale {}",
        dp.noise[0].scale
    );
    let patients = answer
        .meta
        .columns
        .iter()
        .position(|c| c.kind == ColumnKind::Patients)
        .expect("patients column");
    assert_eq!(
        answer.batch.column(patients).null_count(),
        answer.batch.num_rows(),
        "an unmeasured patient count says nothing"
    );
    let stages = common::schema()
        .code_set("stage")
        .expect("stage codes")
        .codes
        .len();
    assert_eq!(
        answer.batch.num_rows(),
        stages + 1,
        "every stage code and null is released, present or not"
    );
    let noisy = released(&answer.batch, state_column(&answer));
    let truth = exact(dir.path(), BY_STAGE).await;
    let mut differs = false;
    for (stage, value) in &noisy {
        let true_value = truth.get(stage).copied().unwrap_or(0);
        differs |= *value != true_value;
        // Laplace(6) beyond 20 scales happens with probability e^-20.
        assert!(
            (value - true_value).abs() < 120,
            "stage {stage}: {value} vs {true_value}"
        );
    }
    assert!(differs, "no noise was added");
    assert_eq!(engine.ledger().expect("ledger").spent("p1").epsilon, 1.0);
}

#[tokio::test]
async fn a_repeat_costs_nothing_and_a_changed_query_costs_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    let first = ask(&engine, BY_STAGE).await;
    // Same plan, different spelling.
    let again = ask(
        &engine,
        "select   stage_best , count(*) from sim_av_tumour group by stage_best",
    )
    .await;
    let dp = again.meta.dp.clone().expect("dp");
    assert!(dp.repeat);
    assert_eq!(dp.epsilon_charged, 0.0);
    assert_eq!(dp.epsilon_remaining, 2.0);
    assert_eq!(
        first.batch.columns(),
        again.batch.columns(),
        "the same release"
    );
    let ledger = engine.ledger().expect("ledger");
    assert_eq!(ledger.spent("p1").epsilon, 1.0);

    let changed = ask(
        &engine,
        "SELECT stage_best, COUNT(*) FROM sim_av_tumour WHERE age > 50 GROUP BY stage_best",
    )
    .await;
    assert!(!changed.meta.dp.expect("dp").repeat);
    assert_eq!(ledger.spent("p1").epsilon, 2.0);

    // Asking for a different ε is a different release, and costs that ε.
    let mut smaller = request("p1", BY_STAGE);
    smaller.epsilon = Some(0.25);
    let answer = engine.answer(&smaller, TODAY).await.expect("answer");
    assert_eq!(answer.meta.dp.expect("dp").epsilon_charged, 0.25);
    assert_eq!(ledger.spent("p1").epsilon, 2.25);
}

#[tokio::test]
async fn a_spent_budget_refuses_and_says_what_is_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    for age in [40, 50, 60] {
        ask(
            &engine,
            &format!("SELECT COUNT(*) FROM sim_av_tumour WHERE age > {age}"),
        )
        .await;
    }
    let err = engine
        .answer(
            &request("p1", "SELECT COUNT(*) FROM sim_av_tumour WHERE age > 70"),
            TODAY,
        )
        .await
        .expect_err("the budget is spent");
    match err {
        NodeError::Refused(r) => {
            assert_eq!(r.rule, Rule::Budget);
            assert!(r.reason.contains("ε 0.0000"), "{}", r.reason);
        }
        other => panic!("expected a budget refusal, got {other}"),
    }
    // A repeat of a paid query is still answered.
    ask(&engine, "SELECT COUNT(*) FROM sim_av_tumour WHERE age > 40").await;

    let mut greedy = request("p1", "SELECT COUNT(*) FROM sim_av_patient");
    greedy.epsilon = Some(2.0);
    match engine.answer(&greedy, TODAY).await {
        Err(NodeError::Refused(r)) => assert_eq!(r.rule, Rule::Budget),
        other => panic!("more than ε per query must be refused: {:?}", other.err()),
    }
}

#[tokio::test]
async fn the_ledger_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = {
        let engine = engine(dir.path()).await;
        ask(&engine, BY_STAGE).await
    };
    let engine = engine(dir.path()).await;
    let ledger = engine.ledger().expect("ledger");
    assert_eq!(ledger.spent("p1").epsilon, 1.0);
    let after = ask(&engine, BY_STAGE).await;
    assert!(after.meta.dp.clone().expect("dp").repeat);
    assert_eq!(before.batch.columns(), after.batch.columns());
    assert_eq!(ledger.spent("p1").epsilon, 1.0);
}

#[tokio::test]
async fn a_preview_runs_and_spends_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    let mut preview = request("p1", BY_STAGE);
    preview.preview = true;
    let answer = engine.answer(&preview, TODAY).await.expect("preview");
    assert_eq!(answer.batch.num_rows(), 0);
    let dp = answer.meta.dp.expect("dp");
    assert!(dp.preview);
    assert_eq!(dp.epsilon_charged, 0.0);
    assert_eq!(dp.epsilon_cost, 1.0);
    assert_eq!(dp.noise.len(), 1);
    assert_eq!(engine.ledger().expect("ledger").spent("p1").epsilon, 0.0);
}

#[tokio::test]
async fn keys_without_a_code_set_pass_a_threshold_and_spend_delta() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    let sql = "SELECT age / 5, COUNT(DISTINCT patientid) FROM sim_av_tumour GROUP BY age / 5";
    let answer = ask(&engine, sql).await;
    let dp = answer.meta.dp.clone().expect("dp");
    let threshold = dp.threshold.expect("a threshold");
    assert!(threshold > 20, "threshold {threshold}");
    assert!(dp.delta_charged > 0.0);
    // No group with only a handful of patients comes out.
    let truth = exact(dir.path(), sql).await;
    let keys = released(&answer.batch, 1);
    assert!(!keys.is_empty(), "common age bands should pass");
    assert!(
        keys.len() < truth.len(),
        "rare bands at the extremes should not"
    );
    for band in keys.keys() {
        let patients = truth.get(band).copied().unwrap_or(0);
        assert!(
            patients >= 3,
            "band {band} with {patients} patient(s) was released"
        );
    }
    assert_eq!(
        answer.withheld,
        Default::default(),
        "nothing said about rare groups"
    );
}

#[tokio::test]
async fn projects_outside_dp_mode_are_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    let answer = engine
        .answer(&request("p2", BY_STAGE), TODAY)
        .await
        .expect("answer");
    assert!(answer.meta.dp.is_none());
    assert_eq!(engine.ledger().expect("ledger").spent("p2").epsilon, 0.0);
}

#[tokio::test]
async fn new_data_is_a_new_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let engine = engine(dir.path()).await;
        ask(&engine, BY_STAGE).await;
    }
    // The trust reloads its tumours (same bytes, a new file): the old release is not reused.
    let tumours = table_path(&dir.path().join("fed/TQ01"), "sim_av_tumour");
    let file = std::fs::File::options()
        .write(true)
        .open(&tumours)
        .expect("open");
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60))
        .expect("touch");
    drop(file);
    let engine = engine(dir.path()).await;
    let answer = ask(&engine, BY_STAGE).await;
    assert!(!answer.meta.dp.expect("dp").repeat);
    assert_eq!(engine.ledger().expect("ledger").spent("p1").epsilon, 2.0);
}

#[tokio::test]
async fn a_vanishing_epsilon_is_refused_and_a_spent_budget_pays_for_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    let ledger = engine.ledger().expect("ledger");
    let with = |sql: &str, epsilon: f64| {
        let mut r = request("p1", sql);
        r.epsilon = Some(epsilon);
        r
    };
    // Below the policy's minimum (the default, 0.01): refused before anything is spent.
    match engine.answer(&with(BY_STAGE, 1e-300), TODAY).await {
        Err(NodeError::Refused(r)) => assert_eq!(r.rule, Rule::Budget),
        other => panic!("a vanishing ε must be refused: {:?}", other.err()),
    }
    assert_eq!(ledger.spent("p1").releases, 0);

    for age in [40, 50, 60] {
        ask(
            &engine,
            &format!("SELECT COUNT(*) FROM sim_av_tumour WHERE age > {age}"),
        )
        .await;
    }
    assert_eq!(ledger.spent("p1").epsilon, 3.0);
    for epsilon in [0.01, 1e-9, 1e-300] {
        let sql = "SELECT COUNT(*) FROM sim_av_tumour WHERE age > 70";
        match engine.answer(&with(sql, epsilon), TODAY).await {
            Err(NodeError::Refused(r)) => assert_eq!(r.rule, Rule::Budget, "{epsilon}"),
            other => panic!("ε {epsilon} after the budget is spent: {:?}", other.err()),
        }
    }
    assert_eq!(ledger.spent("p1").releases, 3);
}

#[tokio::test]
async fn a_query_that_fails_while_running_still_costs_its_epsilon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    // The tumour file goes bad after the node opened it: vetting passes (it reads no data),
    // the run fails.
    let tumours = table_path(&dir.path().join("fed/TQ01"), "sim_av_tumour");
    let bytes = std::fs::read(&tumours).expect("read");
    std::fs::write(&tumours, &bytes[..bytes.len() / 2]).expect("damage");

    let ledger = engine.ledger().expect("ledger");
    for attempt in 1..=2 {
        match engine.answer(&request("p1", BY_STAGE), TODAY).await {
            Err(NodeError::Refused(r)) => panic!("a failure, not a refusal: {r}"),
            Err(_) => {}
            Ok(_) => panic!("a damaged file cannot be answered"),
        }
        // Charged before it ran; a failed query is no repeat, so trying again costs again.
        let spent = ledger.spent("p1");
        assert_eq!(
            (spent.epsilon, spent.releases),
            (attempt as f64, attempt),
            "attempt {attempt}"
        );
    }
    drop(engine);
    let reopened =
        trustql_budget::Ledger::open(&dir.path().join("state/budget.ledger")).expect("ledger");
    assert_eq!(reopened.spent("p1").epsilon, 2.0, "the spend is durable");
}
