//! The demo's default protection, the cell-key method (issue 16), end to end: a researcher's
//! Flight SQL client, the real coordinator and one node per trust, each answer checked against
//! the trusts' own Parquet. Counts move by at most 3 at each trust, `SUM(1)` is refused, a SUM
//! over its AVG no longer gives the exact count, the same patients give the same numbers
//! however the query is worded, and totals are perturbed, not rounded.

use std::collections::{BTreeMap, HashMap};

use arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;
use trustql_demo::{DemoOptions, Federation, launch};
use trustql_testkit::federation::{at_trust, central, client, floats, one, texts};
use trustql_testkit::oracle;

/// The count table's largest adjustment at each trust (the policy default, D = 3).
const MAX_ADJUSTMENT: f64 = 3.0;
/// The magnitude table's largest movement of a sum, in units of its largest contribution
/// (D = 3 steps of 0.1).
const MAX_SUM_MOVE: f64 = 0.3;
/// The demo policy's minimum patients a group.
const MIN_PATIENTS: f64 = 10.0;

async fn federation() -> Federation {
    launch(&DemoOptions {
        trusts: 3,
        patients: 6_000,
        seed: 16,
        node_deadline_ms: 20_000,
        ..DemoOptions::default()
    })
    .await
    .expect("launch")
}

/// Rows by their first column's text, every other column as numbers.
fn by_key(batch: &RecordBatch) -> BTreeMap<String, Vec<Option<f64>>> {
    let columns: Vec<Vec<Option<f64>>> =
        (1..batch.num_columns()).map(|c| floats(batch, c)).collect();
    texts(batch, 0)
        .into_iter()
        .enumerate()
        .map(|(row, key)| (key, columns.iter().map(|c| c[row]).collect()))
        .collect()
}

async fn truth(ctx: &SessionContext, sql: &str) -> BTreeMap<String, Vec<Option<f64>>> {
    by_key(&oracle::run(ctx, sql).await)
}

/// Each trust's exact figures for `sql` (grouped by its first column), from its own Parquet.
async fn per_trust(fed: &Federation, sql: &str) -> Vec<BTreeMap<String, Vec<Option<f64>>>> {
    let mut all = Vec::new();
    for trust in &fed.info.trusts {
        let ctx = at_trust(fed, trust).await;
        all.push(truth(&ctx, sql).await);
    }
    all
}

#[tokio::test]
async fn sum_of_one_is_refused_and_sum_over_avg_no_longer_gives_the_exact_count() {
    let fed = federation().await;
    let mut client = client(&fed).await;
    let trusts = fed.info.trusts.len() as f64;

    // The one-query undoing of rounding: SUM of a constant is a count in disguise.
    let err = client
        .query(
            "SELECT stage_best, COUNT(*), SUM(1) FROM sim_av_tumour \
             WHERE site_icd10_o2_3char = 'C18' GROUP BY 1",
        )
        .await
        .expect_err("SUM(1) is refused");
    assert!(err.to_string().contains("table-builder"), "{err}");

    let result = client
        .query(
            "SELECT site_icd10_o2_3char, COUNT(*), SUM(age), AVG(age) FROM sim_av_tumour \
             GROUP BY 1",
        )
        .await
        .expect("answered");
    let released = by_key(&one(&result));
    // Per trust: tumours, tumours with an age, patients, patients with an age, the sum of
    // ages, and the largest one patient's ages add up to (the magnitude table's unit).
    let exact = per_trust(
        &fed,
        "SELECT site_icd10_o2_3char, COUNT(*), COUNT(age), COUNT(DISTINCT patientid), \
         COUNT(DISTINCT CASE WHEN age IS NOT NULL THEN patientid END), SUM(age), MAX(ages) \
         FROM sim_av_tumour t JOIN (SELECT patientid AS p, site_icd10_o2_3char AS s, \
         SUM(age) AS ages FROM sim_av_tumour GROUP BY 1, 2) c \
         ON c.p = t.patientid AND c.s = t.site_icd10_o2_3char GROUP BY 1",
    )
    .await;
    let value = |t: &BTreeMap<String, Vec<Option<f64>>>, site: &str, i: usize| {
        t.get(site).and_then(|v| v[i]).unwrap_or(0.0)
    };
    let (mut covered, mut exact_counts, mut moved) = (0, 0, 0);
    for (site, row) in &released {
        let (count, sum, mean) = (row[0].expect("a count"), row[1], row[2]);
        let total = |i: usize| exact.iter().map(|t| value(t, site, i)).sum::<f64>();
        let (tumours, aged, true_sum) = (total(0), total(1), total(4));
        // A trust with too few of the group's patients withholds it, so a released count
        // covers the trusts that released it: never more than all of them, moved.
        assert!(
            count <= tumours + trusts * MAX_ADJUSTMENT,
            "{site}: {count} for {tumours}"
        );
        let everywhere = exact
            .iter()
            .all(|t| value(t, site, 2) >= MIN_PATIENTS && value(t, site, 3) >= MIN_PATIENTS);
        if !everywhere {
            continue;
        }
        covered += 1;
        assert!(
            (count - tumours).abs() <= trusts * MAX_ADJUSTMENT,
            "{site}: {count} for {tumours}"
        );
        if count != tumours {
            moved += 1;
        }
        let (sum, mean) = (sum.expect("a sum"), mean.expect("a mean"));
        let largest: f64 = exact.iter().map(|t| value(t, site, 5)).sum();
        assert!(
            (sum - true_sum).abs() <= MAX_SUM_MOVE * largest + 0.5 * trusts,
            "{site}: SUM {sum} for {true_sum}"
        );
        // SUM / AVG is the sum of the trusts' perturbed counts of tumours with an age.
        let n = sum / mean;
        assert!(
            (n - aged).abs() <= trusts * MAX_ADJUSTMENT + 0.01,
            "{site}: SUM/AVG {n} for {aged}"
        );
        if (n.round() - aged).abs() < 0.5 {
            exact_counts += 1;
        }
    }
    // Every group every trust releases is there (the totals' minimum passes at 30 patients).
    let expected = exact[0]
        .keys()
        .filter(|site| {
            exact
                .iter()
                .all(|t| value(t, site, 2) >= MIN_PATIENTS && value(t, site, 3) >= MIN_PATIENTS)
        })
        .count();
    assert_eq!(
        covered, expected,
        "a group every trust holds was not released"
    );
    assert!(covered >= 10, "only {covered} groups to compare");
    assert!(moved > 0, "no count moved: the perturbation is not applied");
    // Three trusts' adjustments add up to zero about one time in five.
    assert!(
        exact_counts * 2 < covered,
        "{exact_counts} of {covered} groups give their exact count as SUM / AVG"
    );
}

#[tokio::test]
async fn the_same_patients_give_the_same_answer_however_the_query_is_worded() {
    let fed = federation().await;
    let mut client = client(&fed).await;
    let central = central(&fed).await;
    // The reordered wordings add `age >= 0`, which must keep every stage-4 tumour for them
    // to count the same patients.
    let dropped = truth(
        &central,
        "SELECT 'all', COUNT(*) FROM sim_av_tumour WHERE stage_best = '4' \
         AND (age IS NULL OR age < 0)",
    )
    .await;
    assert_eq!(dropped["all"], vec![Some(0.0)], "age >= 0 drops tumours");

    let wordings = [
        "SELECT site_icd10_o2_3char, COUNT(*), COUNT(DISTINCT patientid) FROM sim_av_tumour \
         WHERE stage_best = '4' GROUP BY 1",
        "SELECT site_icd10_o2_3char, COUNT(*), COUNT(DISTINCT patientid) FROM sim_av_tumour \
         WHERE stage_best IN ('4') GROUP BY site_icd10_o2_3char",
        "SELECT site_icd10_o2_3char, COUNT(*), COUNT(DISTINCT patientid) FROM sim_av_tumour \
         WHERE '4' = stage_best AND age >= 0 GROUP BY 1",
        "SELECT site_icd10_o2_3char, COUNT(*), COUNT(DISTINCT patientid) FROM sim_av_tumour \
         WHERE age >= 0 AND stage_best = '4' GROUP BY 1",
    ];
    let first = client.query(wordings[0]).await.expect("answered");
    let want = by_key(&one(&first));
    assert!(want.len() > 3, "enough groups to compare: {want:?}");
    for sql in &wordings[1..] {
        let got = by_key(&one(&client.query(sql).await.expect("answered")));
        assert_eq!(got, want, "{sql}");
    }
    // Asking again gives the same numbers: nothing to average away.
    let again = client.query(wordings[0]).await.expect("answered");
    assert_eq!(by_key(&one(&again)), want);
}

#[tokio::test]
async fn the_coverage_says_cell_key_and_totals_are_not_rounded() {
    let fed = federation().await;
    let mut client = client(&fed).await;
    let result = client
        .query(
            "SELECT site_icd10_o2_3char, stage_best, COUNT(*) FROM sim_av_tumour \
             WHERE site_icd10_o2_3char IN ('C18', 'C34', 'C50', 'C61') GROUP BY 1, 2",
        )
        .await
        .expect("answered");
    let coverage = result.coverage.clone().expect("coverage");
    assert!(coverage.complete, "{coverage}");
    let note = format!(
        "{} of the answering trusts perturb their counts and sums by the cell-key method",
        fed.info.trusts.len()
    );
    assert!(
        coverage.notes.iter().any(|n| n.starts_with(&note)),
        "{coverage}"
    );
    // No rounding note ("… totals are not rounded on top" is the cell-key note's own).
    assert!(
        !coverage
            .notes
            .iter()
            .any(|n| n.contains("rounded to the nearest") || n.contains("rounded by")),
        "{coverage}"
    );
    // The federation's minimum still holds on the totals.
    assert!(
        coverage
            .notes
            .iter()
            .any(|n| n.contains("fewer than 10 patients across the trusts")),
        "{coverage}"
    );

    let batch = one(&result);
    let counts: Vec<i64> = floats(&batch, 2)
        .into_iter()
        .map(|c| c.expect("a count") as i64)
        .collect();
    assert!(counts.len() > 5, "{counts:?}");
    assert!(
        counts.iter().any(|c| c % 5 != 0),
        "every total is a multiple of 5: {counts:?}"
    );

    // Within each trust's bound of the exact totals, where every trust released the cell.
    let central = central(&fed).await;
    let sql = "SELECT concat(site_icd10_o2_3char, '/', stage_best), COUNT(*), \
               COUNT(DISTINCT patientid) FROM sim_av_tumour \
               WHERE site_icd10_o2_3char IN ('C18', 'C34', 'C50', 'C61') GROUP BY 1";
    let exact = truth(&central, sql).await;
    let trusts = per_trust(&fed, sql).await;
    let released: HashMap<String, i64> = texts(&batch, 0)
        .iter()
        .zip(texts(&batch, 1))
        .map(|(site, stage)| format!("{site}/{stage}"))
        .zip(counts)
        .collect();
    let mut compared = 0;
    for (cell, count) in &released {
        let everywhere = trusts
            .iter()
            .all(|t| t.get(cell).and_then(|v| v[1]).unwrap_or(0.0) >= MIN_PATIENTS);
        if !everywhere {
            continue;
        }
        compared += 1;
        let tumours = exact[cell][0].expect("a count");
        assert!(
            (*count as f64 - tumours).abs() <= fed.info.trusts.len() as f64 * MAX_ADJUSTMENT,
            "{cell}: {count} for {tumours}"
        );
    }
    assert!(compared > 0, "no cell every trust released");
}
