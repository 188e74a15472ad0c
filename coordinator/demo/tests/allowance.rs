//! End to end: an SDC project's query allowance at each trust, through the real coordinator.
//! The coverage report says what is left at each trust; a repeat is not counted; once the
//! allowance is spent the query is refused clearly, saying when it resets.

use trustql_demo::{DemoOptions, launch};
use trustql_policies::QueryAllowance;
use trustql_protocol::{AllowanceLeft, Coverage, TrustStatus};
use trustql_testkit::federation::client;

fn lefts(coverage: &Coverage) -> Vec<Option<AllowanceLeft>> {
    coverage.trusts.iter().map(|t| t.allowance).collect()
}

#[tokio::test]
async fn the_coverage_report_shows_the_allowance_left_and_a_spent_one_is_refused() {
    let fed = launch(&DemoOptions {
        trusts: 2,
        patients: 1_500,
        seed: 5,
        node_deadline_ms: 20_000,
        query_allowance: Some(QueryAllowance {
            per_day: 2,
            total: Some(100),
        }),
        ..DemoOptions::default()
    })
    .await
    .expect("launch");
    let mut client = client(&fed).await;
    let sql = |age: u32| {
        format!("SELECT gender, COUNT(*) FROM sim_av_tumour WHERE age >= {age} GROUP BY gender")
    };

    let first = client.query(&sql(40)).await.expect("first query");
    let coverage = first.coverage.expect("coverage");
    let left = AllowanceLeft {
        today_left: 1,
        total_left: Some(99),
        repeat: false,
    };
    assert_eq!(lefts(&coverage), vec![Some(left); 2], "{coverage}");
    let text = coverage.to_string();
    assert!(
        text.contains("answered    1 queries left today, 99 in total"),
        "{text}"
    );

    // The same query again is the same answer: not counted.
    let repeat = client.query(&sql(40)).await.expect("a repeat");
    let coverage = repeat.coverage.expect("coverage");
    assert!(
        lefts(&coverage)
            .iter()
            .all(|l| l.is_some_and(|l| l.repeat && l.today_left == 1)),
        "{coverage}"
    );
    assert!(coverage.to_string().contains("(a repeat, not counted)"));

    let second = client.query(&sql(50)).await.expect("second query");
    let coverage = second.coverage.expect("coverage");
    assert!(
        lefts(&coverage)
            .iter()
            .all(|l| l.is_some_and(|l| l.today_left == 0 && l.total_left == Some(98))),
        "{coverage}"
    );

    let err = client
        .query(&sql(60))
        .await
        .expect_err("the daily allowance is spent");
    let message = err.to_string();
    assert!(message.contains("query-allowance"), "{message}");
    assert!(message.contains("2 queries today"), "{message}");
    assert!(message.contains("resets at 00:00 UTC"), "{message}");
    assert!(!message.to_lowercase().contains("internal"), "{message}");

    // A repeat of one answered today is still answered.
    let again = client.query(&sql(50)).await.expect("a repeat after");
    let coverage = again.coverage.expect("coverage");
    assert!(
        coverage
            .trusts
            .iter()
            .all(|t| t.status == TrustStatus::Answered),
        "{coverage}"
    );
}
