//! An SDC project's query allowance at a real node over Parquet: queries that pass vetting
//! are counted per day and in total, in the ledger (a restart does not reset them); a repeat
//! of a query counted that day and a refusal by vetting are not counted; a spent allowance is
//! refused before the query runs, and the next day resets the daily one.

mod common;

use trustql_node::{NodeError, SiteAnswer, SiteEngine};
use trustql_policies::Rule;
use trustql_protocol::{AllowanceLeft, SiteRequest};

const TODAY: i32 = 20_415; // 2025-11-23

const SDC: &str = "min_patients = 10\nrounding = \"base\"\nrounding_base = 5";

fn request(sql: &str) -> SiteRequest {
    SiteRequest {
        request_id: "r".into(),
        researcher: "alice".into(),
        project: "p1".into(),
        sql: sql.into(),
        ..Default::default()
    }
}

/// A distinct table-builder query for each `age`.
fn query(age: u32) -> String {
    format!("SELECT gender, COUNT(*) FROM sim_av_tumour WHERE age >= {age} GROUP BY gender")
}

async fn ask(engine: &SiteEngine, sql: &str, today: i32) -> Result<SiteAnswer, NodeError> {
    engine.answer(&request(sql), today).await
}

fn left(answer: Result<SiteAnswer, NodeError>, what: &str) -> AllowanceLeft {
    match answer {
        Ok(a) => a
            .meta
            .allowance
            .unwrap_or_else(|| panic!("{what}: no allowance in the answer")),
        Err(e) => panic!("{what}: expected an answer, got {e}"),
    }
}

fn refused(answer: Result<SiteAnswer, NodeError>, what: &str) -> String {
    match answer {
        Err(NodeError::Refused(r)) if r.rule == Rule::QueryAllowance => r.reason,
        Err(e) => panic!("{what}: expected a query-allowance refusal, got {e}"),
        Ok(_) => panic!("{what}: expected a query-allowance refusal, got an answer"),
    }
}

fn allowance(today_left: u64, total_left: Option<u64>, repeat: bool) -> AllowanceLeft {
    AllowanceLeft {
        today_left,
        total_left,
        repeat,
    }
}

#[tokio::test]
async fn three_a_day_then_refused_repeats_free_and_the_count_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = common::synth(dir.path(), 300);
    let disclosure = format!("{SDC}\nquery_allowance = {{ per_day = 3, total = 10 }}");
    let (_, policy) = common::policy(dir.path(), &disclosure);
    let engine = common::open_engine(dir.path(), &fed, policy.clone(), true).await;

    // A refusal (not table-builder SQL, no aggregate) costs nothing.
    let bad = ask(&engine, "SELECT patientid FROM sim_av_tumour", TODAY).await;
    assert!(
        matches!(bad, Err(NodeError::Refused(_))),
        "not an aggregate"
    );

    for (i, age) in [40, 50, 60].into_iter().enumerate() {
        let got = left(
            ask(&engine, &query(age), TODAY).await,
            "within the allowance",
        );
        assert_eq!(got, allowance(2 - i as u64, Some(9 - i as u64), false));
    }
    let reason = refused(ask(&engine, &query(70), TODAY).await, "a fourth query");
    assert!(reason.contains("3 queries today"), "{reason}");
    assert!(
        reason.contains("resets at 00:00 UTC on 2025-11-24"),
        "{reason}"
    );
    // A repeat of an answered query is answered, and not counted.
    let got = left(ask(&engine, &query(50), TODAY).await, "a repeat");
    assert_eq!(got, allowance(0, Some(7), true));

    // The count is in the ledger: reopening on the same state directory keeps it.
    drop(engine);
    let engine = common::open_engine(dir.path(), &fed, policy.clone(), true).await;
    refused(ask(&engine, &query(70), TODAY).await, "after a restart");
    let got = left(
        ask(&engine, &query(40), TODAY).await,
        "a repeat after a restart",
    );
    assert_eq!(got, allowance(0, Some(7), true));

    // The next day the daily allowance is back; the total keeps counting, and yesterday's
    // query counts again today.
    let got = left(ask(&engine, &query(70), TODAY + 1).await, "the next day");
    assert_eq!(got, allowance(2, Some(6), false));
    let got = left(
        ask(&engine, &query(40), TODAY + 1).await,
        "yesterday's query",
    );
    assert_eq!(got, allowance(1, Some(5), false));
}

#[tokio::test]
async fn a_spent_total_is_refused_on_every_later_day() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = common::synth(dir.path(), 300);
    let disclosure = format!("{SDC}\nquery_allowance = {{ per_day = 10, total = 2 }}");
    let (_, policy) = common::policy(dir.path(), &disclosure);
    let engine = common::open_engine(dir.path(), &fed, policy, true).await;
    left(ask(&engine, &query(40), TODAY).await, "first");
    let got = left(ask(&engine, &query(50), TODAY + 3).await, "second");
    assert_eq!(got, allowance(9, Some(0), false));
    for day in [TODAY + 3, TODAY + 40] {
        let reason = refused(ask(&engine, &query(60), day).await, "a third");
        assert!(reason.contains("total allowance of 2"), "{reason}");
    }
}

#[tokio::test]
async fn the_default_allowance_applies_and_the_unprotected_mode_has_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = common::synth(dir.path(), 300);
    let (_, policy) = common::policy(dir.path(), SDC);
    // Without a ledger (an embedded engine) the count lasts as long as the engine.
    let engine = common::open_engine(dir.path(), &fed, policy, false).await;
    let got = left(ask(&engine, &query(40), TODAY).await, "default");
    assert_eq!(got, allowance(499, None, false));
    let got = left(ask(&engine, &query(50), TODAY).await, "default");
    assert_eq!(got, allowance(498, None, false));

    let dir = tempfile::tempdir().expect("tempdir");
    let fed = common::synth(dir.path(), 300);
    let (_, policy) = common::policy(dir.path(), common::UNPROTECTED);
    let engine = common::open_engine(dir.path(), &fed, policy, true).await;
    let answer = ask(&engine, &query(40), TODAY).await.expect("answer");
    assert_eq!(
        answer.meta.allowance, None,
        "the correctness mode is not limited"
    );
}
