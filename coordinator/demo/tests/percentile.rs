//! Percentiles end to end (issue 18): `median`, `percentile_cont` and
//! `approx_percentile_cont` through a researcher's Flight SQL client, the coordinator and three
//! nodes, against the union's rows.

use std::collections::BTreeMap;

use trustql_demo::{DemoOptions, Federation, launch};
use trustql_testkit::federation::{at_trust, central, client, floats, one, texts};
use trustql_testkit::oracle;

/// Cycles reach their patients through their regimens.
const CYCLES: &str = "FROM sim_sact_cycle c JOIN sim_sact_regimen r \
     ON c.merged_regimen_id = r.merged_regimen_id";

async fn federation(unprotected: bool) -> Federation {
    launch(&DemoOptions {
        trusts: 3,
        patients: 6_000,
        seed: 18,
        node_deadline_ms: 30_000,
        unprotected,
        ..DemoOptions::default()
    })
    .await
    .expect("launch")
}

/// `(key, value)` per row of a two-column answer.
fn by_key(batch: &arrow::array::RecordBatch) -> BTreeMap<String, Option<f64>> {
    texts(batch, 0).into_iter().zip(floats(batch, 1)).collect()
}

/// Ages (whole years) per stage over `ctx`'s rows.
async fn ages(ctx: &datafusion::prelude::SessionContext) -> BTreeMap<String, Vec<f64>> {
    let batch = oracle::run(
        ctx,
        "SELECT stage_best, CAST(age AS DOUBLE) FROM sim_av_tumour WHERE age IS NOT NULL",
    )
    .await;
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (stage, age) in texts(&batch, 0).into_iter().zip(floats(&batch, 1)) {
        out.entry(stage).or_default().push(age.expect("an age"));
    }
    for v in out.values_mut() {
        v.sort_by(f64::total_cmp);
    }
    out
}

/// `percentile_cont` of sorted values.
fn exact(sorted: &[f64], p: f64) -> f64 {
    let h = p * (sorted.len() - 1) as f64;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    sorted[lo] + (h - h.floor()) * (sorted[hi] - sorted[lo])
}

/// The histogram estimate, written out independently of the crate: ages in 5-year bins from
/// 0, each bin's rows spread evenly over the whole years it holds, interpolated as
/// `percentile_cont` is.
fn binned(sorted: &[f64], p: f64) -> f64 {
    let bin = |a: f64| (a.clamp(0.0, 110.0) / 5.0).floor() as usize;
    let mut counts = [0usize; 23];
    for &a in sorted {
        counts[bin(a)] += 1;
    }
    let order = |i: usize| {
        let mut before = 0;
        for (b, &c) in counts.iter().enumerate() {
            if i < before + c {
                let first = 5.0 * b as f64;
                let last = (first + 4.0).min(110.0);
                return first + (last - first) * ((i - before) as f64 + 0.5) / c as f64;
            }
            before += c;
        }
        unreachable!("i is below the row count")
    };
    let h = p * (sorted.len() - 1) as f64;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    order(lo) + (h - h.floor()) * (order(hi) - order(lo))
}

#[tokio::test]
async fn unprotected_percentiles_are_a_central_databases_where_bins_are_one_wide() {
    let fed = federation(true).await;
    let mut client = client(&fed).await;
    let ctx = central(&fed).await;
    // Cycle numbers are whole numbers in bins one wide: the histogram's percentiles are the
    // exact ones, as DataFusion computes them over the union.
    for p in [0.1, 0.5, 0.9] {
        let sql = format!("SELECT percentile_cont(c.cycle_number, {p}) {CYCLES}");
        let got = floats(&one(&client.query(&sql).await.expect("answered")), 0)[0];
        let want = floats(&oracle::run(&ctx, &sql).await, 0)[0];
        assert_eq!(got, want, "{sql}");
    }
    let got = floats(
        &one(&client
            .query(&format!("SELECT median(c.cycle_number) {CYCLES}"))
            .await
            .expect("answered")),
        0,
    )[0];
    let want = floats(
        &oracle::run(
            &ctx,
            "SELECT median(CAST(cycle_number AS DOUBLE)) FROM sim_sact_cycle",
        )
        .await,
        0,
    )[0];
    assert_eq!(got, want, "the median");
    // Ages come in 5-year bins: the answer is the histogram's estimate over the union's rows,
    // exactly, and within one bin of DataFusion's exact percentile.
    let truth = ages(&ctx).await;
    for (sql, p) in [
        (
            "SELECT stage_best, median(age) FROM sim_av_tumour GROUP BY 1",
            0.5,
        ),
        (
            "SELECT stage_best, percentile_cont(0.75) WITHIN GROUP (ORDER BY age) \
             FROM sim_av_tumour GROUP BY 1",
            0.75,
        ),
        (
            "SELECT stage_best, approx_percentile_cont(age, 0.25) FROM sim_av_tumour GROUP BY 1",
            0.25,
        ),
    ] {
        let got = by_key(&one(&client.query(sql).await.expect("answered")));
        assert_eq!(got.len(), truth.len(), "{sql}: every stage");
        for (stage, values) in &truth {
            let got = got[stage].expect("a value");
            let want = binned(values, p);
            assert!((got - want).abs() < 1e-9, "{sql} {stage}: {got} vs {want}");
            let exact = exact(values, p);
            assert!(
                (got - exact).abs() <= 5.0,
                "{sql} {stage}: {got} vs exact {exact}"
            );
        }
    }
}

#[tokio::test]
async fn protected_medians_stay_close_and_extremes_show_no_patient() {
    let fed = federation(false).await;
    let mut client = client(&fed).await;
    let truth = ages(&central(&fed).await).await;
    let result = client
        .query("SELECT stage_best, median(age) FROM sim_av_tumour GROUP BY 1")
        .await
        .expect("answered");
    // The answer says how close it is.
    let notes = result.coverage.as_ref().expect("coverage").notes.join("\n");
    assert!(
        notes.contains("percentiles of age") && notes.contains("bins 5 wide"),
        "{notes}"
    );
    let got = by_key(&one(&result));
    let mut worst: f64 = 0.0;
    for (stage, values) in truth.iter().filter(|(_, v)| v.len() >= 300) {
        let got = got[stage].expect("a released median");
        let error = (got - exact(values, 0.5)).abs();
        worst = worst.max(error);
        // One bin, and the rank a trust's rounding moves by a few rows of hundreds.
        assert!(error <= 5.0, "stage {stage}: {got} is {error} years off");
    }
    println!("protected medians of strata of 300+: worst error {worst:.2} years");

    // The oldest and youngest patient of a stage, asked for as the 0th and 100th percentiles:
    // each trust pools its sparse bins into runs of at least 10 rows counted at their middle
    // row, so the answer lies within the bins of the trusts' 5th youngest and 5th oldest,
    // never beyond them.
    let mut fifth: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for trust in &fed.info.trusts {
        for (stage, values) in ages(&at_trust(&fed, trust).await).await {
            if values.len() < 10 {
                continue;
            }
            let low = (values[4] / 5.0).floor() * 5.0;
            let high = (values[values.len() - 5] / 5.0).floor() * 5.0 + 5.0;
            let e = fifth.entry(stage).or_insert((low, high));
            *e = (e.0.min(low), e.1.max(high));
        }
    }
    let extremes = one(&client
        .query(
            "SELECT stage_best, percentile_cont(age, 0.0), percentile_cont(age, 1.0) \
             FROM sim_av_tumour GROUP BY 1",
        )
        .await
        .expect("answered"));
    let (stages, lows, highs) = (
        texts(&extremes, 0),
        floats(&extremes, 1),
        floats(&extremes, 2),
    );
    let mut hidden = 0;
    for ((stage, low), high) in stages.iter().zip(lows).zip(highs) {
        let (Some(low), Some(high)) = (low, high) else {
            continue;
        };
        let values = &truth[stage];
        let (least, most) = fifth[stage];
        assert!(
            low >= least && high <= most,
            "stage {stage}: {low}..{high} beyond {least}..{most}"
        );
        if low != values[0] && high != values[values.len() - 1] {
            hidden += 1;
        }
    }
    assert!(hidden > 0, "no stage's extremes were hidden");
}
