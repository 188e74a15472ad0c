//! Percentiles in the release contract (issue 18): which calls a policy takes, and how a trust
//! protects a histogram before it leaves.

mod common;

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Int64Array, ListArray, RecordBatch, UInt64Array};
use arrow::datatypes::UInt64Type;
use trustql_policies::{
    Curve, Disclosure, Needs, PartialAnswer, Refusal, Role, Rule, StateColumn, Terms, protect,
};

const POLICY: &str = r#"
[policy]
version = "percentile-1"
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

async fn needs_for(project: &str, sql: &str) -> Result<Needs, Refusal> {
    common::needs_for(POLICY, project, sql, Terms::default()).await
}

#[tokio::test]
async fn a_median_counts_the_patients_with_a_value() {
    let sql = "SELECT stage_best, median(age) FROM sim_av_tumour GROUP BY 1";
    let Needs::Sdc(sdc) = needs_for("sdc", sql).await.expect("taken") else {
        panic!("an SDC project");
    };
    // The group's minimum counts only the patients whose age is known.
    assert_eq!(sdc.counted, vec![0]);
    needs_for(
        "sdc",
        "SELECT percentile_cont(0.9) WITHIN GROUP (ORDER BY age DESC) FROM sim_av_tumour",
    )
    .await
    .expect("a WITHIN GROUP percentile");
}

#[tokio::test]
async fn calls_the_release_cannot_protect_are_refused() {
    for (project, sql, rule, words) in [
        (
            "dp",
            "SELECT median(age) FROM sim_av_tumour",
            Rule::Percentile,
            "noisy histograms",
        ),
        (
            "sdc",
            "SELECT percentile_cont(age, 1.5) FROM sim_av_tumour",
            Rule::Percentile,
            "from 0 to 1",
        ),
        (
            "sdc",
            "SELECT median(age) FILTER (WHERE stage_best = '1') FROM sim_av_tumour",
            Rule::TableBuilder,
            "FILTER",
        ),
        (
            "sdc",
            "SELECT percentile_cont(age, chrl_tot_27_03) FROM sim_av_tumour",
            Rule::TableBuilder,
            "constant",
        ),
    ] {
        let r = needs_for(project, sql)
            .await
            .expect_err(&format!("refused: {sql}"));
        assert_eq!(r.rule, rule, "{sql}: {r}");
        assert!(r.reason.contains(words), "{sql}: {r}");
    }
}

fn bins(batch: &RecordBatch, c: usize) -> Vec<u64> {
    let list = batch.column(c).as_list::<i32>().value(0);
    list.as_primitive::<UInt64Type>().values().to_vec()
}

#[test]
fn a_trust_pools_sparse_bins_rounds_the_rest_and_withholds_small_groups() {
    let columns = vec![
        StateColumn::key("stage"),
        StateColumn::state("m[n]", 0, "median", "n"),
        StateColumn::state("m[bins]", 0, "median", "bins"),
        StateColumn::aggregate_patients("__read0", 0),
        StateColumn::patients("__patients"),
    ];
    assert_eq!(columns[2].role(), Role::Curve(Curve::Bins));
    let histogram = [1u64, 0, 3, 4, 6, 9, 5, 2, 0, 1];
    let batch = RecordBatch::try_from_iter(vec![
        ("stage", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
        ("m[n]", Arc::new(UInt64Array::from(vec![31, 12]))),
        (
            "m[bins]",
            Arc::new(ListArray::from_iter_primitive::<UInt64Type, _, _>([
                Some(histogram.map(Some)),
                Some([0, 12, 0, 0, 0, 0, 0, 0, 0, 0].map(Some)),
            ])),
        ),
        // Group 2 has 12 rows but 6 patients with an age.
        ("__read0", Arc::new(Int64Array::from(vec![31, 6]))),
        ("__patients", Arc::new(Int64Array::from(vec![31, 12]))),
    ])
    .expect("batch");
    let answer = PartialAnswer {
        batch,
        columns,
        contributions: None,
    };
    let out = protect(&answer, &Disclosure::default(), 100).expect("protect");
    assert_eq!(out.batch.num_rows(), 1, "the small group is withheld whole");
    // Runs of at least 10 rows, each counted in the bin of its middle row: bins 0–4 (14 rows,
    // the 7th in bin 3) and 5–9 (14, then the last 3 join: 17 rows, the 9th in bin 5);
    // cumulative 14, 31 → 13, 33.
    assert_eq!(bins(&out.batch, 2), vec![0, 0, 0, 13, 0, 20, 0, 0, 0, 0]);
    assert_eq!(
        out.batch.column(1).as_primitive::<UInt64Type>().value(0),
        33
    );
    // No bin shows fewer rows than a cell may, and nothing per patient leaves.
    assert_eq!(out.batch.num_columns(), 4);
    // Without protection the histogram leaves as counted.
    let unprotected = Disclosure {
        min_patients: 1,
        ..Disclosure::default()
    };
    let out = protect(&answer, &unprotected, 100).expect("protect");
    assert_eq!(out.batch.num_rows(), 2);
    assert_eq!(bins(&out.batch, 2), histogram.to_vec());
}

/// A trust's released histogram of `ages` (5-year bins over 0–110) under the default policy.
fn released(ages: &[u64]) -> Vec<u64> {
    let mut counts = [0u64; 23];
    for &a in ages {
        counts[(a.min(110) / 5) as usize] += 1;
    }
    let n = ages.len() as u64;
    let columns = vec![
        StateColumn::state("m[n]", 0, "median", "n"),
        StateColumn::state("m[bins]", 0, "median", "bins"),
        StateColumn::patients("__patients"),
    ];
    let batch = RecordBatch::try_from_iter(vec![
        ("m[n]", Arc::new(UInt64Array::from(vec![n])) as ArrayRef),
        (
            "m[bins]",
            Arc::new(ListArray::from_iter_primitive::<UInt64Type, _, _>([Some(
                counts.map(Some),
            )])),
        ),
        ("__patients", Arc::new(Int64Array::from(vec![n as i64]))),
    ])
    .expect("batch");
    let answer = PartialAnswer {
        batch,
        columns,
        contributions: None,
    };
    let out = protect(&answer, &Disclosure::default(), 100).expect("protect");
    bins(&out.batch, 1)
}

#[test]
fn differencing_two_histograms_does_not_tell_one_patients_age() {
    // Forty attacks, each on its own group of 60–260 ages around 68 (a fixed pseudo-random
    // sequence): the group with and without one target patient.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut attacks, mut found) = (0, 0);
    for _ in 0..40 {
        let size = 60 + next() % 200;
        let ages: Vec<u64> = (0..size)
            .map(|_| 38 + (0..6).map(|_| next() % 11).sum::<u64>())
            .collect();
        let target = 30 + next() % 70;
        let without = released(&ages);
        let mut with = ages.clone();
        with.push(target);
        let with = released(&with);
        let bin = (target / 5) as usize;
        // Exact histograms would differ by one row, in the target's bin only.
        let exact: Vec<i64> = (0..23).map(|b| i64::from(b == bin)).collect();
        let difference: Vec<i64> = with
            .iter()
            .zip(&without)
            .map(|(a, b)| *a as i64 - *b as i64)
            .collect();
        assert_ne!(
            difference, exact,
            "the histograms differ by exactly the target"
        );
        attacks += 1;
        let first = (0..23).find(|&b| with[b] != without[b]);
        if first == Some(bin) {
            found += 1;
        }
    }
    // Cumulative rounding moves a count only where it crosses a band's edge, and pooling
    // moves the sparse ends: the first differing bin is the target's about one time in five.
    assert!(
        found * 2 < attacks,
        "the first differing bin gave the target's age away {found} times of {attacks}"
    );
    eprintln!("the first differing bin was the target's {found} times of {attacks}");
}
