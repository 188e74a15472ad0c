//! Survival end to end (issue 18): `km_curve` and `survival_at` through a researcher's Flight
//! SQL client, the coordinator and three nodes, against Kaplan–Meier over the union's rows.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, UInt64Type};
use trustql_demo::{DemoOptions, Federation, launch};
use trustql_testkit::federation::{at_trust, central, client, floats, one, texts};
use trustql_testkit::oracle;

const CURVE_BY_STAGE: &str = "SELECT t.stage_best, unnest(km_curve(t.diagnosisdatebest, \
     p.vitalstatusdate, p.vitalstatus = 'D')) AS step FROM sim_av_tumour t JOIN sim_av_patient p \
     ON t.patientid = p.patientid GROUP BY t.stage_best";

async fn federation(unprotected: bool, patients: u64) -> Federation {
    launch(&DemoOptions {
        trusts: 3,
        patients,
        seed: 18,
        node_deadline_ms: 30_000,
        unprotected,
        ..DemoOptions::default()
    })
    .await
    .expect("launch")
}

/// One interval of a released curve.
#[derive(Debug, Clone, Copy)]
struct Step {
    end: f64,
    at_risk: u64,
    survival: f64,
    lower: f64,
    upper: f64,
}

/// The curves of an answer whose first column is the stratum and second the unnested step.
fn curves(batch: &RecordBatch) -> BTreeMap<String, Vec<Step>> {
    let strata = texts(batch, 0);
    let steps = batch.column(1).as_struct();
    let f = |name: &str| {
        steps
            .column_by_name(name)
            .unwrap_or_else(|| panic!("no field {name}"))
            .as_primitive::<Float64Type>()
            .clone()
    };
    let (end, survival, lower, upper) = (
        f("interval_end_days"),
        f("survival"),
        f("lower_95"),
        f("upper_95"),
    );
    let at_risk = steps
        .column_by_name("at_risk")
        .expect("at_risk")
        .as_primitive::<UInt64Type>()
        .clone();
    let mut out: BTreeMap<String, Vec<Step>> = BTreeMap::new();
    for (row, stratum) in strata.iter().enumerate() {
        out.entry(stratum.clone()).or_default().push(Step {
            end: end.value(row),
            at_risk: at_risk.value(row),
            survival: survival.value(row),
            lower: lower.value(row),
            upper: upper.value(row),
        });
    }
    for steps in out.values_mut() {
        steps.sort_by(|a, b| a.end.total_cmp(&b.end));
    }
    out
}

/// Per stratum, each row's (duration in days, died) over the union, as a central database
/// holds them: rows with a start, an end and a vital status.
async fn rows(fed: &Federation) -> BTreeMap<String, Vec<(i64, bool)>> {
    let ctx = central(fed).await;
    let batch = oracle::run(
        &ctx,
        "SELECT t.stage_best, CAST(p.vitalstatusdate - t.diagnosisdatebest AS BIGINT), \
         p.vitalstatus = 'D' FROM sim_av_tumour t JOIN sim_av_patient p \
         ON t.patientid = p.patientid WHERE t.diagnosisdatebest IS NOT NULL \
         AND p.vitalstatusdate IS NOT NULL AND p.vitalstatus IS NOT NULL",
    )
    .await;
    let strata = texts(&batch, 0);
    let days = floats(&batch, 1);
    let died = batch.column(2).as_boolean().clone();
    let mut out: BTreeMap<String, Vec<(i64, bool)>> = BTreeMap::new();
    for row in 0..batch.num_rows() {
        let d = days[row].expect("a duration") as i64;
        out.entry(strata[row].clone())
            .or_default()
            .push((d, died.value(row)));
    }
    out
}

/// Kaplan–Meier by the textbook, written out independently of the crate, on a grid of
/// `parts` equal intervals per `span` days, `intervals` of them: durations rounded up to the
/// grid (0 or less into the first interval), deaths before censorings at a tie. Per interval:
/// its end, at risk, survival.
fn reference(rows: &[(i64, bool)], span: i64, parts: i64, intervals: i64) -> Vec<(f64, u64, f64)> {
    let bin = |d: i64| {
        if d <= 0 {
            1
        } else {
            (d * parts + span - 1) / span
        }
    };
    let mut out = Vec::new();
    let mut survival = 1.0;
    for k in 1..=intervals {
        let at_risk = rows.iter().filter(|(d, _)| bin(*d) >= k).count() as u64;
        let deaths = rows
            .iter()
            .filter(|(d, died)| *died && bin(*d) == k)
            .count();
        if at_risk > 0 {
            survival *= 1.0 - deaths as f64 / at_risk as f64;
        }
        out.push((k as f64 * span as f64 / parts as f64, at_risk, survival));
    }
    out
}

#[tokio::test]
async fn unprotected_curves_equal_kaplan_meier_over_the_union() {
    let fed = federation(true, 6_000).await;
    let mut client = client(&fed).await;
    let result = client.query(CURVE_BY_STAGE).await.expect("a curve");
    let got = curves(&one(&result));
    let truth = rows(&fed).await;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        truth.keys().collect::<Vec<_>>(),
        "every stage has a curve"
    );
    for (stage, rows) in &truth {
        let want = reference(rows, 30, 1, 61);
        let steps = &got[stage];
        assert_eq!(steps.len(), want.len(), "stage {stage}: 61 intervals");
        for (s, (end, at_risk, survival)) in steps.iter().zip(&want) {
            assert_eq!(s.end, *end);
            assert_eq!(s.at_risk, *at_risk, "stage {stage} at {end}");
            assert!(
                (s.survival - survival).abs() < 1e-9,
                "stage {stage} at {end}: {} vs {survival}",
                s.survival
            );
            assert!(s.lower <= s.survival && s.survival <= s.upper);
        }
    }
}

#[tokio::test]
async fn protected_survival_stays_within_three_points_at_one_and_five_years() {
    // The default demo: the cell-key method and at least 10 patients a group at every trust,
    // curves rounded cumulatively to 5 within each trust.
    let fed = federation(false, 20_000).await;
    let mut client = client(&fed).await;
    let result = client
        .query(
            "SELECT t.stage_best, unnest(survival_at(t.diagnosisdatebest, p.vitalstatusdate, \
             p.vitalstatus = 'D', 365)) AS one_year, unnest(survival_at(t.diagnosisdatebest, \
             p.vitalstatusdate, p.vitalstatus = 'D', 1825)) AS five_years FROM sim_av_tumour t \
             JOIN sim_av_patient p ON t.patientid = p.patientid GROUP BY t.stage_best",
        )
        .await
        .expect("a survival table");
    let batch = one(&result);
    let schema = batch.schema();
    // Unnesting a struct names its columns `<call>.<field>`: the 1-year call comes first.
    let survival: Vec<usize> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name().ends_with(").survival"))
        .map(|(i, _)| i)
        .collect();
    let [one_year, five_years] = survival.as_slice() else {
        panic!("two survival columns expected in {schema:?}");
    };
    let (one_year, five_years) = (floats(&batch, *one_year), floats(&batch, *five_years));
    let strata = texts(&batch, 0);
    let truth = rows(&fed).await;
    let mut checked = 0;
    let mut worst = 0.0f64;
    for (stage, rows) in &truth {
        if rows.len() < 300 {
            continue;
        }
        let row = strata
            .iter()
            .position(|s| s == stage)
            .unwrap_or_else(|| panic!("stage {stage} ({} rows) withheld", rows.len()));
        for (got, days) in [(one_year[row], 365), (five_years[row], 1825)] {
            let parts = days / 30;
            let want = reference(rows, days, parts, parts)
                .last()
                .expect("a step")
                .2;
            let got = got.expect("a survival");
            let off = (got - want).abs();
            worst = worst.max(off);
            assert!(
                off <= 0.03,
                "stage {stage} ({} rows) at {days} days: {got:.4} released, {want:.4} true",
                rows.len()
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} survival figures checked");
    eprintln!("{checked} survival figures of strata with 300+ rows, worst error {worst:.4}");
}

#[tokio::test]
async fn intervals_narrower_than_the_policy_allows_are_refused() {
    let fed = federation(false, 3_000).await;
    let mut client = client(&fed).await;
    for sql in [
        "SELECT km_curve(t.diagnosisdatebest, p.vitalstatusdate, p.vitalstatus = 'D', 7) \
         FROM sim_av_tumour t JOIN sim_av_patient p ON t.patientid = p.patientid",
        "SELECT survival_at(t.diagnosisdatebest, p.vitalstatusdate, p.vitalstatus = 'D', 20) \
         FROM sim_av_tumour t JOIN sim_av_patient p ON t.patientid = p.patientid",
    ] {
        let refused = client.query(sql).await.expect_err("refused");
        let text = refused.to_string();
        assert!(
            text.contains("survival") && text.contains("30 days"),
            "{text}"
        );
    }
    // A grid parameter that is not a constant cannot choose the grid per row.
    let refused = client
        .query(
            "SELECT km_curve(t.diagnosisdatebest, p.vitalstatusdate, p.vitalstatus = 'D', \
             t.age) FROM sim_av_tumour t JOIN sim_av_patient p ON t.patientid = p.patientid",
        )
        .await
        .expect_err("refused");
    assert!(refused.to_string().contains("constant"), "{refused}");
}

/// The released cumulative events and censorings of one curve.
fn cumulative(steps: &RecordBatch) -> Vec<(u64, u64)> {
    let s = steps.column(0).as_struct();
    let events = s
        .column_by_name("events")
        .expect("events")
        .as_primitive::<UInt64Type>();
    let censored = s
        .column_by_name("censored")
        .expect("censored")
        .as_primitive::<UInt64Type>();
    let (mut e, mut c) = (0, 0);
    (0..steps.num_rows())
        .map(|k| {
            e += events.value(k);
            c += censored.value(k);
            (e, c)
        })
        .collect()
}

#[tokio::test]
async fn differencing_two_curves_does_not_tell_when_one_patient_died() {
    let fed = federation(false, 20_000).await;
    let mut client = client(&fed).await;
    let ctx = central(&fed).await;
    // Targets: patients who died within five years, alone on their diagnosis date in a large
    // stratum, so `diagnosisdatebest <> that date` removes exactly them.
    let targets = oracle::run(
        &ctx,
        "SELECT CAST(MIN(t.diagnosisdatebest) AS VARCHAR), \
         MIN(CAST(p.vitalstatusdate - t.diagnosisdatebest AS BIGINT)) \
         FROM sim_av_tumour t JOIN sim_av_patient p ON t.patientid = p.patientid \
         WHERE t.stage_best = '3' AND p.vitalstatusdate IS NOT NULL AND p.vitalstatus IS NOT NULL \
         GROUP BY t.diagnosisdatebest \
         HAVING COUNT(*) = 1 AND MIN(p.vitalstatus) = 'D' \
         AND MIN(CAST(p.vitalstatusdate - t.diagnosisdatebest AS BIGINT)) BETWEEN 1 AND 1800 \
         ORDER BY 1 LIMIT 12",
    )
    .await;
    let (dates, days) = (texts(&targets, 0), floats(&targets, 1));
    assert!(dates.len() >= 8, "too few targets: {}", dates.len());
    let curve = |filter: String| {
        format!(
            "SELECT unnest(km_curve(t.diagnosisdatebest, p.vitalstatusdate, \
             p.vitalstatus = 'D')) FROM sim_av_tumour t JOIN sim_av_patient p \
             ON t.patientid = p.patientid WHERE t.stage_best = '3'{filter}"
        )
    };
    let all = cumulative(&one(&client
        .query(&curve(String::new()))
        .await
        .expect("curve")));
    let mut found = 0;
    for (date, days) in dates.iter().zip(days) {
        let interval = (days.expect("days") as usize).div_ceil(30) - 1;
        let without = one(&client
            .query(&curve(format!(" AND t.diagnosisdatebest <> DATE '{date}'")))
            .await
            .expect("curve without the target"));
        let without = cumulative(&without);
        // Exact counts would differ by exactly one death from the target's interval on.
        let exact_step = (0..all.len()).all(|k| {
            all[k].0 - without[k].0 == u64::from(k >= interval) && all[k].1 == without[k].1
        });
        assert!(
            !exact_step,
            "the curves differ by exactly the target's death"
        );
        let first = (0..all.len()).find(|&k| all[k] != without[k]);
        if first == Some(interval) {
            found += 1;
        }
    }
    // Rounding moves a cumulative count only where it crosses a band's edge: the first
    // interval where the curves differ is the target's about one time in five.
    assert!(
        found * 2 < dates.len(),
        "the differing interval gave the target's away {found} times of {}",
        dates.len()
    );
    eprintln!(
        "first differing interval was the target's {found} times of {}",
        dates.len()
    );
}

/// Per stage and arm, the rows (duration in days, died) a `logrank` by `arm` reads.
async fn arm_rows(
    ctx: &datafusion::prelude::SessionContext,
    arm: &str,
) -> BTreeMap<String, BTreeMap<String, Vec<(i64, bool)>>> {
    let batch = oracle::run(
        ctx,
        &format!(
            "SELECT t.stage_best, CAST({arm} AS VARCHAR), \
             CAST(p.vitalstatusdate - t.diagnosisdatebest AS BIGINT), p.vitalstatus = 'D' \
             FROM sim_av_tumour t JOIN sim_av_patient p ON t.patientid = p.patientid \
             WHERE t.diagnosisdatebest IS NOT NULL AND p.vitalstatusdate IS NOT NULL \
             AND p.vitalstatus IS NOT NULL AND {arm} IS NOT NULL"
        ),
    )
    .await;
    let (strata, arms, days) = (texts(&batch, 0), texts(&batch, 1), floats(&batch, 2));
    let died = batch.column(3).as_boolean().clone();
    let mut out: BTreeMap<String, BTreeMap<String, Vec<(i64, bool)>>> = BTreeMap::new();
    for row in 0..batch.num_rows() {
        out.entry(strata[row].clone())
            .or_default()
            .entry(arms[row].clone())
            .or_default()
            .push((days[row].expect("a duration") as i64, died.value(row)));
    }
    out
}

/// One arm's exact counts on the default grid (61 intervals of 30 days; a row past the last
/// is at risk throughout).
fn exact_counts(rows: &[(i64, bool)]) -> trustql_survival::Counts {
    let mut c = trustql_survival::Counts {
        n: rows.len() as u64,
        events: vec![0; 61],
        censored: vec![0; 61],
    };
    for &(d, died) in rows {
        let k = if d <= 0 {
            0
        } else {
            (d as usize).div_ceil(30) - 1
        };
        if k < 61 {
            if died {
                c.events[k] += 1;
            } else {
                c.censored[k] += 1;
            }
        }
    }
    c
}

/// The released tests of a `SELECT stratum, logrank(…) AS test` answer: (χ², arms) by stratum.
fn tests_by_stratum(batch: &RecordBatch) -> BTreeMap<String, (Option<f64>, u64)> {
    let strata = texts(batch, 0);
    let tests = batch.column(1).as_struct();
    let chi = tests
        .column_by_name("chi_square")
        .expect("chi_square")
        .as_primitive::<Float64Type>()
        .clone();
    let arms = tests
        .column_by_name("arms")
        .expect("arms")
        .as_primitive::<UInt64Type>()
        .clone();
    (0..batch.num_rows())
        .map(|r| {
            let chi = (!chi.is_null(r)).then(|| chi.value(r));
            (strata[r].clone(), (chi, arms.value(r)))
        })
        .collect()
}

const LOGRANK_BY: &str = "SELECT t.stage_best, logrank(t.diagnosisdatebest, p.vitalstatusdate, \
     p.vitalstatus = 'D', ARM) AS test FROM sim_av_tumour t JOIN sim_av_patient p \
     ON t.patientid = p.patientid GROUP BY t.stage_best";

#[tokio::test]
async fn protected_logrank_stays_near_the_exact_test_and_leaves_small_arms_out() {
    // The default demo: every trust protects each arm as a stratum (at least 10 patients,
    // cumulative counts rounded), and the coordinator runs the test on the sums.
    let fed = federation(false, 20_000).await;
    let mut client = client(&fed).await;
    let ctx = central(&fed).await;

    // Between genders: the statistic on protected counts against the exact one.
    let got = tests_by_stratum(&one(&client
        .query(&LOGRANK_BY.replace("ARM", "p.gender"))
        .await
        .expect("a log-rank test by gender")));
    let truth = arm_rows(&ctx, "p.gender").await;
    let (mut checked, mut worst) = (0, 0.0f64);
    for (stage, arms) in &truth {
        if arms.len() < 2 || arms.values().any(|rows| rows.len() < 300) {
            continue;
        }
        let counts: Vec<_> = arms.values().map(|rows| exact_counts(rows)).collect();
        let want = trustql_survival::logrank(&counts)
            .expect("deaths in both arms")
            .chi_square;
        let (chi, n_arms) = got
            .get(stage)
            .unwrap_or_else(|| panic!("stage {stage} withheld"));
        assert_eq!(*n_arms, arms.len() as u64, "stage {stage}");
        let chi = chi.expect("a statistic");
        // On one degree of freedom √χ² is |O − E| in standard errors: rounding each trust's
        // cumulative counts moves it by well under one.
        let off = (chi.sqrt() - want.sqrt()).abs();
        worst = worst.max(off);
        eprintln!("stage {stage}: χ² {chi:.3} released, {want:.3} exact");
        assert!(
            off <= 1.0,
            "stage {stage}: χ² {chi:.3} released, {want:.3} exact"
        );
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} stages compared");
    eprintln!("{checked} stages' log-rank by gender, worst error {worst:.3} standard errors");

    // Between ethnicities, many of them rare: an arm enters the test only where some trust
    // holds at least 10 of its patients (each trust withholds the rest, as it would the
    // group of a GROUP BY stage, ethnicity), so no arm of one or two patients is released.
    let got = tests_by_stratum(&one(&client
        .query(&LOGRANK_BY.replace("ARM", "p.ethnicity"))
        .await
        .expect("a log-rank test by ethnicity")));
    let mut large: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for trust in &fed.info.trusts {
        let at = at_trust(&fed, trust).await;
        let batch = oracle::run(
            &at,
            "SELECT t.stage_best, p.ethnicity, COUNT(DISTINCT t.patientid) FROM sim_av_tumour t \
             JOIN sim_av_patient p ON t.patientid = p.patientid \
             WHERE t.diagnosisdatebest IS NOT NULL AND p.vitalstatusdate IS NOT NULL \
             AND p.vitalstatus IS NOT NULL AND p.ethnicity IS NOT NULL GROUP BY 1, 2",
        )
        .await;
        let (strata, arms, patients) = (texts(&batch, 0), texts(&batch, 1), floats(&batch, 2));
        for row in 0..batch.num_rows() {
            if patients[row].expect("a count") >= 10.0 {
                large
                    .entry(strata[row].clone())
                    .or_default()
                    .insert(arms[row].clone());
            }
        }
    }
    let all = arm_rows(&ctx, "p.ethnicity").await;
    let mut left_out = 0;
    for (stage, (_, n_arms)) in &got {
        let released = large.get(stage).map_or(0, |s| s.len()) as u64;
        assert_eq!(
            *n_arms, released,
            "stage {stage}: the test compares exactly the arms some trust may release"
        );
        left_out += all.get(stage).map_or(0, |a| a.len()) as u64 - released;
    }
    assert!(left_out > 0, "no arm was small enough to be left out");
}
