//! Availability (attack class 12): SQL too big or too deep for the parser and planner is
//! refused on its tokens before any planning; planning and vetting run within the request's
//! deadline and inside its query slot.

mod common;

use std::path::Path;

use trustql_node::{Limits, NodeError, SiteEngine};
use trustql_policies::{Rule, approve, load_approved};
use trustql_protocol::SiteRequest;

const TODAY: i32 = 20_415;

/// TQ01's engine under a plain SDC policy with `query` as its `[query]` rules.
async fn engine(dir: &Path, query: &str, limits: &Limits) -> SiteEngine {
    let fed = dir.join("fed");
    if !fed.exists() {
        common::synth(dir, 300);
    }
    let path = dir.join("policy.toml");
    let text = format!(
        "[policy]\nversion = \"availability\"\ntrust = \"TQ01\"\n\n[query]\n{query}\n\n\
         [[project]]\nid = \"p1\"\nresearchers = [\"alice\"]\ntables = {}\n\
         expires = \"2099-12-31\"\n",
        common::ALL_TABLES
    );
    std::fs::write(&path, text).expect("write policy");
    approve(&path, "Test Controller", &common::schema()).expect("approve");
    let policy = load_approved(&path, &common::schema()).expect("load");
    SiteEngine::open("TQ01", common::schema(), policy, &fed.join("TQ01"), limits)
        .await
        .expect("engine opens")
}

fn request(sql: &str) -> SiteRequest {
    SiteRequest {
        request_id: "r".into(),
        researcher: "alice".into(),
        project: "p1".into(),
        sql: sql.into(),
        ..Default::default()
    }
}

/// `SELECT 1+1+…` with `terms` terms.
fn sum_of_ones(terms: usize) -> String {
    format!("SELECT {}", vec!["1"; terms].join("+"))
}

fn refused_as(outcome: Result<trustql_node::SiteAnswer, NodeError>, rule: Rule, what: &str) {
    match outcome {
        Err(NodeError::Refused(r)) => assert_eq!(r.rule, rule, "{what}: {r}"),
        Err(e) => panic!("{what}: expected a {rule:?} refusal, got {e}"),
        Ok(_) => panic!("{what}: expected a {rule:?} refusal, got an answer"),
    }
}

#[tokio::test]
async fn sql_too_deep_or_with_too_many_operators_is_refused_before_planning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), "", &Limits::default()).await;
    // Planned, these would be refused as not aggregate: the complexity rule shows they were
    // refused on their tokens, before any tree was built.
    for terms in [700, 2_000] {
        let outcome = engine.answer(&request(&sum_of_ones(terms)), TODAY).await;
        refused_as(outcome, Rule::QueryComplexity, &format!("{terms} terms"));
    }
    let deep = format!(
        "SELECT COUNT(*) FROM sim_av_tumour WHERE {}age > 1{}",
        "(".repeat(200),
        ")".repeat(200)
    );
    refused_as(
        engine.answer(&request(&deep), TODAY).await,
        Rule::QueryComplexity,
        "200 parentheses deep",
    );
    let cases = format!(
        "SELECT COUNT(*) FROM sim_av_tumour WHERE {} 1 = 1{}",
        "CASE WHEN age > 1 THEN ".repeat(40),
        " END".repeat(40)
    );
    refused_as(
        engine.answer(&request(&cases), TODAY).await,
        Rule::QueryComplexity,
        "40 CASEs deep",
    );
    // The node still answers.
    let answer = engine
        .answer(&request("SELECT COUNT(*) FROM sim_av_tumour"), TODAY)
        .await
        .expect("an ordinary query");
    assert_eq!(answer.batch.num_rows(), 1);
}

#[tokio::test]
async fn planning_runs_within_the_deadline_and_holds_its_query_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Caps raised so a slow plan gets through to planning; one query at a time; a deadline no
    // plan of this size meets.
    let limits = Limits {
        query_timeout_ms: 1,
        max_concurrent_queries: 1,
        ..Limits::default()
    };
    let engine = engine(
        dir.path(),
        "max_operators = 100000\nmax_query_chars = 100000",
        &limits,
    )
    .await;
    let slow = format!(
        "SELECT COUNT(*) FROM sim_av_tumour WHERE age > {}",
        vec!["1"; 600].join("+")
    );
    // Planned on the request's own thread, the deadline could not fire until planning ended,
    // and the answer would be its refusal.
    match engine.answer(&request(&slow), TODAY).await {
        Err(NodeError::Timeout(1)) => {}
        other => panic!(
            "expected the deadline to cut planning short: {:?}",
            other.err()
        ),
    }
    // The plan still running holds the node's only slot.
    match engine.answer(&request(&slow), TODAY).await {
        Err(NodeError::Busy) => {}
        other => panic!("expected busy while the plan runs: {:?}", other.err()),
    }
    // And gives it back when it ends.
    let mut freed = false;
    for _ in 0..600 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        match engine
            .answer(&request("SELECT COUNT(*) FROM sim_av_tumour"), TODAY)
            .await
        {
            Err(NodeError::Busy) => continue,
            _ => {
                freed = true;
                break;
            }
        }
    }
    assert!(freed, "the slot came back");
}
