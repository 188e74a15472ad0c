//! Issue 15's attacks, run as a researcher would: through the real coordinator and nodes of a
//! protected demo federation (minimum 10 patients, counts rounded to 5: `--rounding`, as the
//! attacks were written against rounding; tests/cell_key.rs runs them under the cell-key
//! default), each answer checked against the trusts' own Parquet, so a test fails if an attack
//! recovers an exact count.

use std::collections::HashMap;

use arrow::array::AsArray;
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Int64Type};
use datafusion::prelude::SessionContext;
use trustql_demo::{DemoOptions, Federation, launch};
use trustql_testkit::federation::{at_trust, central, client, floats, one, texts};
use trustql_testkit::oracle;

async fn protected() -> Federation {
    launch(&DemoOptions {
        trusts: 3,
        patients: 3_000,
        seed: 15,
        rounding: true,
        node_deadline_ms: 10_000,
        ..DemoOptions::default()
    })
    .await
    .expect("launch")
}

/// Exact tumour counts per site over the union of the trusts' Parquet: the ground truth.
async fn exact_counts(central: &SessionContext) -> HashMap<String, i64> {
    let batch = oracle::run(
        central,
        "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    )
    .await;
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
    let central = central(&fed).await;
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
    // Padding through COUNT(DISTINCT) of no patient key is refused in every mode: distinct
    // counts do not add up across trusts.
    for sql in [
        "SELECT g, COUNT(DISTINCT pid) FROM (SELECT gender AS g, patientid AS pid FROM \
         sim_av_patient UNION ALL SELECT '1' AS g, 1 AS pid) GROUP BY g",
        "SELECT COUNT(DISTINCT CASE WHEN age = 57 THEN age WHEN age % 15 < 3 THEN -1 - (age % 15) \
         END) FROM sim_av_tumour",
    ] {
        let err = client.query(sql).await.expect_err(sql);
        let text = err.to_string();
        assert!(
            text.contains("count-distinct") && text.contains("only for the patient key"),
            "{sql}: {text}"
        );
    }
    let after = client
        .query("SELECT COUNT(*) FROM sim_av_patient")
        .await
        .expect("still answering");
    assert_eq!(one(&after).num_rows(), 1);
}

/// Distinct tumour ages at one trust, from its own Parquet.
async fn ages_at(fed: &Federation, trust: &str) -> Vec<i64> {
    let site = at_trust(fed, trust).await;
    let batches = site
        .sql("SELECT DISTINCT age FROM sim_av_tumour WHERE age IS NOT NULL")
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
    let mut ages = Vec::new();
    for b in batches {
        let v = cast(b.column(0), &DataType::Int64).expect("cast");
        ages.extend(v.as_primitive::<Int64Type>().iter().flatten());
    }
    ages
}

/// A tumour age fewer than all trusts hold (held by one trust, if the data has one), from the
/// trusts' own Parquet.
async fn age_some_trust_lacks(fed: &Federation) -> i64 {
    let mut held: HashMap<i64, usize> = HashMap::new();
    for trust in &fed.info.trusts {
        for age in ages_at(fed, trust).await {
            *held.entry(age).or_default() += 1;
        }
    }
    held.iter()
        .filter(|(_, n)| **n < fed.info.trusts.len())
        .min_by_key(|(age, n)| (**n, **age))
        .map(|(age, _)| *age)
        .expect("an age some trust lacks")
}

#[tokio::test]
async fn a_runtime_error_does_not_tell_which_trust_holds_a_row() {
    // Class 4, through the coordinator: queries built to fail where a tumour of age T exists
    // are answered in full by every trust, whether T is held by one trust or by none, so the
    // answer and its coverage report say nothing of where T is. Unprotected mode answers the
    // full aggregate SQL, so the oracle is not merely refused.
    let fed = launch(&DemoOptions {
        trusts: 3,
        patients: 3_000,
        seed: 15,
        unprotected: true,
        node_deadline_ms: 10_000,
        ..DemoOptions::default()
    })
    .await
    .expect("launch");
    let mut client = client(&fed).await;
    let target = age_some_trust_lacks(&fed).await;
    let absent = 200;
    for template in [
        "SELECT SUM(600 / (age - {T})), COUNT(*) FROM sim_av_tumour",
        "SELECT SUM(age % (age - {T})), COUNT(*) FROM sim_av_tumour",
        "SELECT SUM(abs(age - {T} + (-9223372036854775807 - 1))), COUNT(*) FROM sim_av_tumour",
        "SELECT SUM(CAST(CASE WHEN age = {T} THEN 'x' ELSE '1' END AS INT)), COUNT(*) \
         FROM sim_av_tumour",
    ] {
        let mut shapes = Vec::new();
        for age in [target, absent] {
            let sql = template.replace("{T}", &age.to_string());
            let result = client
                .query(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let coverage = result.coverage.clone().expect("coverage");
            assert!(coverage.complete, "{sql}: {coverage:?}");
            shapes.push((coverage.trusts.len(), one(&result).num_rows()));
        }
        assert_eq!(shapes[0], shapes[1], "{template}");
    }
    // The answer is the union's over every row that does not fail.
    let central = central(&fed).await;
    let sql = format!("SELECT SUM(600 / (age - {target})) FROM sim_av_tumour");
    let answered = one(&client.query(&sql).await.expect("answered"));
    let exact = central
        .sql(&format!("{sql} WHERE age <> {target}"))
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
    let exact = floats(
        &concat_batches(&exact[0].schema(), &exact).expect("concat"),
        0,
    );
    assert_eq!(floats(&answered, 0), exact);
}

#[tokio::test]
async fn in_dp_mode_a_runtime_error_neither_tells_where_a_row_is_nor_goes_uncharged() {
    // Class 4 under differential privacy, which answers the full aggregate SQL it can bound:
    // a filter built to fail where a tumour of age T exists is answered by every trust, and
    // charged at every trust, whether T is held by one trust or by none.
    let fed = launch(&DemoOptions {
        trusts: 3,
        patients: 3_000,
        seed: 15,
        node_deadline_ms: 10_000,
        dp: Some(trustql_demo::DemoDp {
            epsilon_per_query: 0.5,
            epsilon_budget: 50.0,
        }),
        ..DemoOptions::default()
    })
    .await
    .expect("launch");
    let mut client = client(&fed).await;
    let target = age_some_trust_lacks(&fed).await;
    for template in [
        "SELECT COUNT(*) FILTER (WHERE 600 / (age - {T}) > 0) FROM sim_av_tumour",
        "SELECT COUNT(*) FILTER (WHERE age % (age - {T}) = 0) FROM sim_av_tumour",
        "SELECT COUNT(*) FILTER (WHERE abs(age - {T} + (-9223372036854775807 - 1)) > 0) \
         FROM sim_av_tumour",
        "SELECT COUNT(*) FILTER (WHERE CAST(CASE WHEN age = {T} THEN 'x' ELSE '1' END AS INT) \
         = 1) FROM sim_av_tumour",
    ] {
        for age in [target, 200] {
            let sql = template.replace("{T}", &age.to_string());
            let result = client
                .query(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let coverage = result.coverage.clone().expect("coverage");
            assert!(coverage.complete, "{sql}: {coverage}");
            assert_eq!(coverage.incomplete, 0, "{sql}: {coverage}");
            for t in &coverage.trusts {
                let dp = t.dp.as_ref().expect("a DP answer");
                assert_eq!(
                    dp.epsilon_charged, 0.5,
                    "{sql}: {} was not charged",
                    t.trust
                );
            }
            assert_eq!(one(&result).num_rows(), 1, "{sql}");
        }
    }
}
