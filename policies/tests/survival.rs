//! Survival aggregates in the release contract (issue 18): which calls a policy takes, which
//! rows they read, and how a trust protects a curve before it leaves.

mod common;

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Int64Array, ListArray, RecordBatch, UInt64Array};
use arrow::datatypes::UInt64Type;
use common::{schema, session};
use trustql_policies::{
    Curve, Disclosure, Needs, PartialAnswer, Policy, Refusal, Role, Rule, StateColumn, Terms,
    aggregate_of, protect, read_filter, vet_sql,
};

const POLICY: &str = r#"
[policy]
version = "survival-1"
trust = "TQ01"

[[project]]
id = "sdc"
researchers = ["alice"]
tables = ["sim_av_tumour", "sim_av_patient"]
expires = "2099-12-31"

[[project]]
id = "dp"
researchers = ["alice"]
tables = ["sim_av_tumour", "sim_av_patient"]
expires = "2099-12-31"
dp = { epsilon_budget = 1.5, epsilon_per_query = 1.0 }
"#;

const FROM: &str =
    "FROM sim_av_tumour t JOIN sim_av_patient p ON t.patientid = p.patientid GROUP BY t.stage_best";

fn call(args: &str) -> String {
    format!(
        "SELECT t.stage_best, km_curve(t.diagnosisdatebest, p.vitalstatusdate, \
         p.vitalstatus = 'D'{args}) {FROM}"
    )
}

async fn needs_for(project: &str, sql: &str) -> Result<Needs, Refusal> {
    let needs = common::needs_for(POLICY, project, sql, Terms::default()).await?;
    // The rows a curve reads are those with a start, an end and an event.
    let policy = Policy::from_toml(POLICY).expect("policy");
    let project = policy.project(project).expect("project");
    let (plan, _, _) = vet_sql(&session(), &schema(), &policy, project, sql)
        .await
        .expect("vetted");
    let aggregate = aggregate_of(&plan).expect("aggregate");
    let read = read_filter(&aggregate.aggr_expr[0]).expect("a read filter");
    assert_eq!(read.to_string().matches("IS NOT NULL").count(), 3, "{read}");
    Ok(needs)
}

#[tokio::test]
async fn a_curve_on_the_default_grid_is_taken_and_counts_its_own_patients() {
    let Needs::Sdc(sdc) = needs_for("sdc", &call("")).await.expect("taken") else {
        panic!("an SDC project");
    };
    // The stratum's minimum counts only the patients the curve reads.
    assert_eq!(sdc.counted, vec![0]);
    needs_for("sdc", &call(", 30, 3650"))
        .await
        .expect("ten years");
    needs_for(
        "sdc",
        "SELECT t.stage_best, survival_at(t.diagnosisdatebest, p.vitalstatusdate, \
         p.vitalstatus = 'D', 365) FROM sim_av_tumour t JOIN sim_av_patient p \
         ON t.patientid = p.patientid GROUP BY t.stage_best",
    )
    .await
    .expect("one-year survival");
}

#[tokio::test]
async fn grids_the_policy_does_not_allow_are_refused() {
    for (args, why) in [
        (", 7", "30 days"),
        (", 29, 1825", "30 days"),
        (", 0", "positive"),
        (", 1, 100000", "at most"),
        (", t.age", "constant"),
    ] {
        let refusal = needs_for("sdc", &call(args)).await.expect_err("refused");
        assert!(
            matches!(refusal.rule, Rule::Survival | Rule::TableBuilder),
            "{args}: {refusal}"
        );
        assert!(refusal.to_string().contains(why), "{args}: {refusal}");
    }
    // A start that is not a plain column could shift durations by a known amount.
    let shifted = "SELECT km_curve(date_trunc('month', t.diagnosisdatebest), p.vitalstatusdate, \
                   p.vitalstatus = 'D') FROM sim_av_tumour t JOIN sim_av_patient p \
                   ON t.patientid = p.patientid";
    let refusal = needs_for("sdc", shifted).await.expect_err("refused");
    assert_eq!(refusal.rule, Rule::TableBuilder, "{refusal}");
}

#[tokio::test]
async fn an_event_that_could_single_out_a_patient_is_refused() {
    for event in [
        "p.vitalstatusdate = DATE '2019-03-04'",
        "p.vitalstatus = 'D' OR t.age > 50",
        "t.age = 47",
    ] {
        let sql = format!(
            "SELECT t.stage_best, km_curve(t.diagnosisdatebest, p.vitalstatusdate, {event}) {FROM}"
        );
        let refusal = needs_for("sdc", &sql).await.expect_err("refused");
        assert_eq!(refusal.rule, Rule::TableBuilder, "{event}: {refusal}");
        assert!(refusal.to_string().contains("coded column"), "{refusal}");
    }
    needs_for(
        "sdc",
        &format!(
            "SELECT t.stage_best, km_curve(t.diagnosisdatebest, p.vitalstatusdate, \
             p.vitalstatus IN ('D', 'D4') OR p.vitalstatus = 'D5') {FROM}"
        ),
    )
    .await
    .expect("codes of one coded column");
}

#[tokio::test]
async fn a_differentially_private_project_is_refused_until_noisy_curves_exist() {
    let refusal = needs_for("dp", &call("")).await.expect_err("refused");
    assert_eq!(refusal.rule, Rule::Survival, "{refusal}");
    assert!(
        refusal.to_string().contains("differential-privacy"),
        "{refusal}"
    );
}

fn logrank_call(arm: &str, rest: &str) -> String {
    format!(
        "SELECT t.stage_best{rest}, logrank(t.diagnosisdatebest, p.vitalstatusdate, \
         p.vitalstatus = 'D', {arm}) AS test {FROM}"
    )
}

#[tokio::test]
async fn logrank_splits_its_groups_by_the_arm_and_counts_each_arms_patients() {
    let sql = logrank_call("p.gender", "");
    let Needs::Sdc(sdc) = common::needs_for(POLICY, "sdc", &sql, Terms::default())
        .await
        .expect("taken")
    else {
        panic!("an SDC project");
    };
    // The node groups by the arm too, so each arm is a stratum of its own, with its own
    // patients (those with a start, an end, an event and an arm).
    assert_eq!(sdc.arms.len(), 1, "{:?}", sdc.arms);
    assert!(sdc.arms[0].to_string().contains("gender"), "{:?}", sdc.arms);
    assert_eq!(sdc.counted, vec![0]);
    let policy = Policy::from_toml(POLICY).expect("policy");
    let project = policy.project("sdc").expect("project");
    let (plan, _, _) = vet_sql(&session(), &schema(), &policy, project, &sql)
        .await
        .expect("vetted");
    let aggregate = aggregate_of(&plan).expect("aggregate");
    let read = read_filter(&aggregate.aggr_expr[0]).expect("a read filter");
    assert_eq!(read.to_string().matches("IS NOT NULL").count(), 4, "{read}");
    // A curve asks for no split.
    let Needs::Sdc(curve) = needs_for("sdc", &call("")).await.expect("taken") else {
        panic!("an SDC project");
    };
    assert!(curve.arms.is_empty());
}

#[tokio::test]
async fn logrank_is_refused_where_its_arms_could_not_be_protected_as_strata() {
    for (sql, rule, why) in [
        // Splitting by the arm would split the count too.
        (
            logrank_call("p.gender", ", COUNT(*) AS n"),
            Rule::Survival,
            "on its own",
        ),
        // One arm per group compares nothing.
        (
            "SELECT p.gender, logrank(t.diagnosisdatebest, p.vitalstatusdate, \
             p.vitalstatus = 'D', p.gender) FROM sim_av_tumour t JOIN sim_av_patient p \
             ON t.patientid = p.patientid GROUP BY p.gender"
                .to_string(),
            Rule::Survival,
            "GROUP BY key",
        ),
        // An arm that singles out a patient is no key a table-builder query may have.
        (
            logrank_call("t.patientid = 12", ""),
            Rule::Identifier,
            "identifier",
        ),
        (
            logrank_call("t.diagnosisdatebest = DATE '2019-03-04'", ""),
            Rule::TableBuilder,
            "logrank's arm",
        ),
        (logrank_call("t.age", ""), Rule::Survival, ""),
        (
            "SELECT logrank(t.diagnosisdatebest, p.vitalstatusdate, p.vitalstatus = 'D', \
             p.gender, 7) FROM sim_av_tumour t JOIN sim_av_patient p \
             ON t.patientid = p.patientid"
                .to_string(),
            Rule::Survival,
            "30 days",
        ),
    ] {
        let result = common::needs_for(POLICY, "sdc", &sql, Terms::default()).await;
        if why.is_empty() {
            // A plain column of any kind is an arm, as it is a key.
            result.expect("an arm by age is a split by a plain column");
            continue;
        }
        let refusal = result.expect_err("refused");
        assert_eq!(refusal.rule, rule, "{sql}: {refusal}");
        assert!(refusal.to_string().contains(why), "{sql}: {refusal}");
    }
    let refusal = common::needs_for(
        POLICY,
        "dp",
        &logrank_call("p.gender", ""),
        Terms::default(),
    )
    .await
    .expect_err("refused");
    assert_eq!(refusal.rule, Rule::Survival, "{refusal}");
}

/// Row 0 of list column `c`.
fn values(batch: &RecordBatch, c: usize) -> Vec<u64> {
    let list = batch.column(c).as_list::<i32>().value(0);
    list.as_primitive::<UInt64Type>().values().to_vec()
}

fn lists(rows: &[&[u64]]) -> ArrayRef {
    Arc::new(ListArray::from_iter_primitive::<UInt64Type, _, _>(
        rows.iter().map(|r| Some(r.iter().map(|v| Some(*v)))),
    ))
}

#[test]
fn a_trust_rounds_cumulative_counts_and_withholds_small_strata_whole() {
    let columns = vec![
        StateColumn::key("stage"),
        StateColumn::state("km[n]", 0, "km_curve", "n"),
        StateColumn::state("km[events]", 0, "km_curve", "events"),
        StateColumn::state("km[censored]", 0, "km_curve", "censored"),
        StateColumn::aggregate_patients("__read0", 0),
        StateColumn::patients("__patients"),
    ];
    assert_eq!(columns[2].role(), Role::Curve(Curve::Events));
    let batch = RecordBatch::try_from_iter(vec![
        ("stage", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
        ("km[n]", Arc::new(UInt64Array::from(vec![40, 40]))),
        ("km[events]", lists(&[&[1, 0, 4, 7], &[9, 9, 9, 9]])),
        ("km[censored]", lists(&[&[0, 6, 0, 5], &[0, 0, 0, 0]])),
        // Stratum 2 has 40 rows but only 9 patients with a start, an end and an event.
        ("__read0", Arc::new(Int64Array::from(vec![30, 9]))),
        ("__patients", Arc::new(Int64Array::from(vec![30, 40]))),
    ])
    .expect("batch");
    let answer = PartialAnswer {
        batch,
        columns,
        contributions: None,
    };
    let out = protect(&answer, &Disclosure::default(), 100).expect("protect");
    assert_eq!(
        out.batch.num_rows(),
        1,
        "the small stratum is withheld whole"
    );
    assert_eq!(out.report.small, 1);
    // Cumulative events 1, 1, 5, 12 → 0, 0, 3, 13 and censorings 0, 6, 6, 11 → 0, 8, 8, 13:
    // below 3 a cumulative count is 0, above it the middle of its band of 5; the per-patient
    // counts stay at the trust.
    assert_eq!(values(&out.batch, 2), vec![0, 0, 3, 10]);
    assert_eq!(values(&out.batch, 3), vec![0, 8, 0, 5]);
    assert_eq!(
        out.batch.column(1).as_primitive::<UInt64Type>().value(0),
        38
    );
    assert_eq!(out.batch.num_columns(), 5);
    // Without protection nothing is rounded.
    let unprotected = Disclosure {
        min_patients: 1,
        ..Disclosure::default()
    };
    let out = protect(&answer, &unprotected, 100).expect("protect");
    assert_eq!(out.batch.num_rows(), 2);
    assert_eq!(values(&out.batch, 2), vec![1, 0, 4, 7]);
}

#[test]
fn a_few_events_or_censorings_show_nowhere() {
    let columns = vec![
        StateColumn::state("km[n]", 0, "km_curve", "n"),
        StateColumn::state("km[events]", 0, "km_curve", "events"),
        StateColumn::state("km[censored]", 0, "km_curve", "censored"),
        StateColumn::patients("__patients"),
    ];
    // 500 patients, and an event condition that only one or two of them meet: without the rule its
    // cumulative count would jump from 0 to 3 at that patient's interval; it stays 0.
    for (events, censored) in [
        (&[0u64, 1, 0][..], &[0u64, 0, 0][..]),
        (&[0, 0, 0], &[0, 1, 1]),
    ] {
        let batch = RecordBatch::try_from_iter(vec![
            ("km[n]", Arc::new(UInt64Array::from(vec![500])) as ArrayRef),
            ("km[events]", lists(&[events])),
            ("km[censored]", lists(&[censored])),
            ("__patients", Arc::new(Int64Array::from(vec![500]))),
        ])
        .expect("batch");
        let answer = PartialAnswer {
            batch,
            columns: columns.clone(),
            contributions: None,
        };
        let out = protect(&answer, &Disclosure::default(), 100).expect("protect");
        assert_eq!(out.batch.num_rows(), 1);
        assert_eq!(values(&out.batch, 1), vec![0, 0, 0], "{events:?}");
        assert_eq!(values(&out.batch, 2), vec![0, 0, 0], "{censored:?}");
    }
}
