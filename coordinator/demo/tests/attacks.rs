//! Issue 15's attacks, run as a researcher would: through the real coordinator and nodes of a
//! protected demo federation (minimum 10 patients, counts rounded to 5), each answer checked
//! against the trusts' own Parquet, so a test fails if an attack recovers an exact count.

// Only the union oracle of the shared panel is used here.
#[allow(dead_code)]
#[path = "../../merge/tests/panel/mod.rs"]
mod panel;

use std::collections::HashMap;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::prelude::SessionContext;
use trustql_client::{Client, QueryResult};
use trustql_demo::{DemoOptions, Federation, PROJECT, launch};

async fn protected() -> Federation {
    launch(&DemoOptions {
        trusts: 3,
        patients: 3_000,
        seed: 15,
        node_deadline_ms: 10_000,
        ..DemoOptions::default()
    })
    .await
    .expect("launch")
}

async fn client(fed: &Federation) -> Client {
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    Client::connect(&fed.info.url, Some(&ca), &fed.info.token, Some(PROJECT))
        .await
        .expect("connect")
}

fn one(result: &QueryResult) -> RecordBatch {
    concat_batches(&result.schema, &result.batches).expect("concat")
}

fn texts(batch: &RecordBatch, column: usize) -> Vec<String> {
    let text = cast(batch.column(column), &DataType::Utf8).expect("cast");
    text.as_string::<i32>()
        .iter()
        .map(|v| v.unwrap_or("null").to_string())
        .collect()
}

fn floats(batch: &RecordBatch, column: usize) -> Vec<Option<f64>> {
    let values = cast(batch.column(column), &DataType::Float64).expect("cast");
    values.as_primitive::<Float64Type>().iter().collect()
}

/// Exact tumour counts per site over the union of the trusts' Parquet: the ground truth.
async fn exact_counts(central: &SessionContext) -> HashMap<String, i64> {
    let batches = central
        .sql("SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour GROUP BY 1")
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
    let batch = concat_batches(&batches[0].schema(), &batches).expect("concat");
    let counts = cast(batch.column(1), &DataType::Int64).expect("cast");
    texts(&batch, 0)
        .into_iter()
        .zip(counts.as_primitive::<Int64Type>().iter())
        .map(|(site, n)| (site, n.unwrap_or(0)))
        .collect()
}

#[tokio::test]
async fn no_attack_recovers_an_exact_count_through_the_federation() {
    let fed = protected().await;
    let mut client = client(&fed).await;
    let central = panel::union(&fed.info.data_dir, &fed.info.trusts).await;
    let exact = exact_counts(&central).await;

    // Class 1: SUM / AVG of the same column gives AVG's count, which must be rounded too.
    let result = client
        .query(
            "SELECT site_icd10_o2_3char, COUNT(*), SUM(age), AVG(age) FROM sim_av_tumour \
             GROUP BY 1",
        )
        .await
        .expect("answered");
    let batch = one(&result);
    assert!(batch.num_rows() > 5);
    let (sums, means) = (floats(&batch, 2), floats(&batch, 3));
    let mut inexact = 0;
    for (row, site) in texts(&batch, 0).iter().enumerate() {
        let (Some(sum), Some(mean)) = (sums[row], means[row]) else {
            continue;
        };
        let n = sum / mean;
        assert!(
            (n - n.round()).abs() < 1e-6 && n.round() as i64 % 5 == 0,
            "SUM/AVG gives {n} for {site}, not a rounded count"
        );
        if exact[site] % 5 != 0 {
            inexact += 1;
        }
    }
    assert!(
        inexact > 0,
        "no group's exact count differs from its rounding"
    );

    // Class 6: HAVING sees released values only. A site whose exact count is not a multiple
    // of 5 cannot be found by asking for its exact count, and is found by its released one.
    let released: HashMap<String, i64> = texts(&batch, 0)
        .into_iter()
        .zip(floats(&batch, 1))
        .filter_map(|(site, n)| Some((site, n? as i64)))
        .collect();
    let (site, count) = exact
        .iter()
        .filter(|(s, n)| **n % 5 != 0 && released.contains_key(*s))
        .map(|(s, n)| (s.clone(), *n))
        .next()
        .expect("a released site with an unrounded count");
    let having = |n: i64| {
        format!(
            "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour GROUP BY 1 \
             HAVING COUNT(*) = {n}"
        )
    };
    let found = one(&client.query(&having(count)).await.expect("answered"));
    assert!(
        !texts(&found, 0).contains(&site),
        "HAVING matched {site}'s exact count {count}"
    );
    let found = one(&client
        .query(&having(released[&site]))
        .await
        .expect("answered"));
    assert!(
        texts(&found, 0).contains(&site),
        "HAVING on the released value finds {site}"
    );

    // Classes 1, 2, 5, 8, 11: the crafted shapes are refused before anything runs, and the
    // refusal points to DP mode; the coordinator keeps answering.
    for sql in [
        "SELECT COUNT(*), SUM(CASE WHEN vitalstatus = 'D' THEN 1 ELSE 0 END) FROM sim_av_patient",
        "SELECT COUNT(*) FILTER (WHERE age > 85), COUNT(*) FROM sim_av_tumour",
        "SELECT g, COUNT(DISTINCT pid) FROM (SELECT gender AS g, patientid AS pid FROM \
         sim_av_patient UNION ALL SELECT '1' AS g, 1 AS pid) GROUP BY g",
        "SELECT COUNT(DISTINCT CASE WHEN age = 57 THEN age WHEN age % 15 < 3 THEN -1 - (age % 15) \
         END) FROM sim_av_tumour",
        "SELECT SUM(CASE WHEN age > 90 THEN 1001 ELSE 1000 END) - SUM(1000) FROM sim_av_tumour",
        "SELECT CASE WHEN age BETWEEN 57 AND 58 THEN 'x' ELSE 'y' END, COUNT(*) FROM \
         sim_av_tumour GROUP BY 1",
    ] {
        let err = client.query(sql).await.expect_err(sql);
        let text = err.to_string();
        assert!(
            text.contains("table-builder") && text.contains("differential-privacy"),
            "{sql}: {text}"
        );
    }
    let after = client
        .query("SELECT COUNT(*) FROM sim_av_patient")
        .await
        .expect("still answering");
    assert_eq!(one(&after).num_rows(), 1);
}
