//! Pool-then-protect end to end (issue 17): a researcher's Flight SQL client, the real
//! coordinator and three nodes whose policies pool the demo project. The trusts add their exact
//! counts under pairwise masks and the coordinator protects the total once, so a cancer with a
//! few patients at every trust, withheld everywhere when each trust protects its own piece, is
//! released when the pool has enough.

use std::collections::BTreeMap;

use trustql_demo::{DemoOptions, Federation, launch};
use trustql_testkit::federation::{at_trust, central, client, floats, one, texts};
use trustql_testkit::oracle;

/// The demo policy's minimum patients a group (here: a pooled cell).
const MIN_PATIENTS: f64 = 10.0;

async fn federation(rounding: bool) -> Federation {
    launch(&DemoOptions {
        trusts: 3,
        patients: 6_000,
        seed: 17,
        node_deadline_ms: 20_000,
        rounding,
        pool: true,
        ..DemoOptions::default()
    })
    .await
    .expect("launch")
}

/// Rows by their first column's text, every other column as numbers.
async fn truth(ctx: &datafusion::prelude::SessionContext, sql: &str) -> BTreeMap<String, Vec<f64>> {
    let batch = oracle::run(ctx, sql).await;
    let columns: Vec<Vec<Option<f64>>> = (1..batch.num_columns())
        .map(|c| floats(&batch, c))
        .collect();
    texts(&batch, 0)
        .into_iter()
        .enumerate()
        .map(|(row, key)| (key, columns.iter().map(|c| c[row].unwrap_or(0.0)).collect()))
        .collect()
}

/// Each site's tumours across the trusts, its patients summed over trusts (a pool counts a
/// patient at each trust that treats them), and the most patients it has at any one trust.
async fn sites(fed: &Federation) -> BTreeMap<String, (f64, f64, f64)> {
    let per_site = "SELECT site_icd10_o2_3char, COUNT(*), COUNT(DISTINCT patientid) \
                    FROM sim_av_tumour GROUP BY 1";
    let mut out: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    for trust in &fed.info.trusts {
        let ctx = at_trust(fed, trust).await;
        for (site, v) in truth(&ctx, per_site).await {
            let entry = out.entry(site).or_default();
            entry.0 += v[0];
            entry.1 += v[1];
            entry.2 = entry.2.max(v[1]);
        }
    }
    out
}

#[tokio::test]
async fn rounding_applies_once_to_the_pooled_total_and_rare_sites_come_back() {
    let fed = federation(true).await;
    let mut client = client(&fed).await;
    let result = client
        .query("SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour GROUP BY 1")
        .await
        .expect("a pooled answer");
    let coverage = result.coverage.clone().expect("coverage");
    assert!(coverage.complete, "{coverage}");
    assert!(
        coverage
            .notes
            .iter()
            .any(|n| n.contains("pooled over TQ01, TQ02, TQ03")),
        "{coverage}"
    );
    let batch = one(&result);
    let released: BTreeMap<String, f64> = texts(&batch, 0)
        .into_iter()
        .zip(floats(&batch, 1))
        .map(|(k, v)| (k, v.expect("a count")))
        .collect();
    let truth = sites(&fed).await;
    let mut rare_everywhere = 0;
    for (site, &(tumours, patients, most_at_one)) in &truth {
        match released.get(site) {
            Some(&count) => {
                assert!(
                    patients >= MIN_PATIENTS,
                    "{site}: {patients} patients released"
                );
                // Rounded once, to 5, over the exact pooled count.
                assert_eq!(count % 5.0, 0.0, "{site}: {count}");
                assert!(
                    (count - tumours).abs() <= 2.5,
                    "{site}: {count} for {tumours}"
                );
                if most_at_one < MIN_PATIENTS {
                    rare_everywhere += 1;
                }
            }
            None => assert!(
                patients < MIN_PATIENTS,
                "{site}: {patients} patients withheld"
            ),
        }
    }
    // The case: sites every trust would withhold on its own, released by the pool.
    assert!(
        rare_everywhere > 0,
        "no site below the minimum at every trust but above it pooled"
    );
    assert!(
        released.keys().all(|k| truth.contains_key(k)),
        "a site no trust has"
    );
}

#[tokio::test]
async fn cell_key_perturbs_the_pooled_total_once() {
    let fed = federation(false).await;
    let mut client = client(&fed).await;
    let sql = "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY 1";
    let first = one(&client.query(sql).await.expect("a pooled answer"));
    let again = one(&client.query(sql).await.expect("again"));
    assert_eq!(
        first.columns(),
        again.columns(),
        "the same patients give the same numbers"
    );
    let truth = truth(&central(&fed).await, sql).await;
    let mut moved = 0;
    for (stage, count) in texts(&first, 0).into_iter().zip(floats(&first, 1)) {
        let count = count.expect("a count");
        let exact = truth[&stage][0];
        // One perturbation of the pooled count (D = 3), not one per trust.
        assert!((count - exact).abs() <= 3.0, "{stage}: {count} for {exact}");
        if count != exact {
            moved += 1;
        }
    }
    assert!(moved > 0, "no pooled count was perturbed");
}

#[tokio::test]
async fn every_panel_query_pooled_mode_takes_equals_one_process_over_the_union() {
    let fed = launch(&DemoOptions {
        trusts: 3,
        patients: 6_000,
        seed: 17,
        node_deadline_ms: 20_000,
        unprotected: true,
        pool: true,
        ..DemoOptions::default()
    })
    .await
    .expect("launch");
    let mut client = client(&fed).await;
    let central = central(&fed).await;
    let mut pooled = 0;
    for sql in oracle::PANEL {
        match client.query(sql).await {
            Ok(result) => {
                let got = one(&result);
                let want = oracle::run(&central, sql).await;
                oracle::assert_same(sql, &got, &want, sql.contains("ORDER BY"));
                let coverage = result.coverage.expect("coverage");
                assert!(
                    coverage.notes.iter().any(|n| n.starts_with("pooled over")),
                    "{sql}: {coverage}"
                );
                pooled += 1;
            }
            // What does not pool is refused, saying so.
            Err(e) => assert!(e.to_string().contains("(pool)"), "{sql}: {e}"),
        }
    }
    assert!(pooled >= 5, "only {pooled} panel queries pooled");
}

#[tokio::test]
async fn pooled_projects_refuse_what_does_not_pool() {
    let fed = federation(true).await;
    let mut client = client(&fed).await;
    for sql in [
        "SELECT stage_best, AVG(age) FROM sim_av_tumour GROUP BY 1",
        "SELECT site_icd10_o2, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    ] {
        let err = client.query(sql).await.expect_err("refused");
        assert!(err.to_string().contains("(pool)"), "{sql}: {err}");
    }
}
