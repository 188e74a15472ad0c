//! Table-builder shapes: what a project protected by suppression and rounding is answered,
//! and the crafted queries that would average rounding away, each refused there and answered
//! by differential privacy instead.

mod common;

use common::{schema, session};
use trustql_policies::{Policy, Refusal, Rule, vet_sql};

const POLICY: &str = r#"
[policy]
version = "table-builder-1"
trust = "TQ01"

[disclosure]
min_patients = 10
rounding = "base"
rounding_base = 5

[classes.clinical]
group_by = true
filter = true
aggregate = true
min_max = true

[dp]
default_rows_per_patient = 1
bounds = { "sim_av_tumour.age" = [0, 100] }

[[project]]
id = "sdc"
researchers = ["alice"]
tables = ["sim_av_patient", "sim_av_tumour", "sim_sact_regimen", "sim_sact_cycle"]
expires = "2099-12-31"

[[project]]
id = "dp"
researchers = ["alice"]
tables = ["sim_av_patient", "sim_av_tumour", "sim_sact_regimen", "sim_sact_cycle"]
expires = "2099-12-31"
dp = { epsilon_budget = 10.0, epsilon_per_query = 1.0 }
"#;

async fn vet(project: &str, sql: &str) -> Result<(), Refusal> {
    let policy = Policy::from_toml(POLICY).expect("policy");
    let project = policy.project(project).expect("project");
    vet_sql(&session(), &schema(), &policy, project, sql)
        .await
        .map(|_| ())
}

async fn answered(sql: &str) {
    if let Err(r) = vet("sdc", sql).await {
        panic!("a table-builder query should be answered: {sql}\n{r}");
    }
}

/// Refused in SDC mode as no table-builder query, with a reason that names DP mode.
async fn not_table_builder(sql: &str) -> Refusal {
    match vet("sdc", sql).await {
        Ok(()) => panic!("should be refused in SDC mode: {sql}"),
        Err(r) => {
            assert_eq!(r.rule, Rule::TableBuilder, "{sql}\n{r}");
            assert!(r.reason.contains("differential-privacy mode"), "{r}");
            r
        }
    }
}

#[tokio::test]
async fn the_usual_cancer_tables_are_table_builder_queries() {
    // Incidence by site × stage × year × sex × age band × deprivation.
    answered(
        "SELECT site_icd10_o2_3char, substr(stage_best, 1, 1) AS stage, \
         date_part('year', diagnosisdatebest) AS year, gender, \
         CASE WHEN age < 50 THEN '0-49' WHEN age BETWEEN 50 AND 69 THEN '50-69' \
              WHEN age >= 70 THEN '70+' ELSE 'unknown' END AS age_band, \
         quintile_2019, COUNT(*) AS n, COUNT(DISTINCT patientid) AS patients \
         FROM sim_av_tumour \
         WHERE site_icd10_o2_3char IN ('C50', 'C34', 'C18') AND diagnosisdatebest >= DATE '2016-01-01' \
         GROUP BY 1, 2, 3, 4, 5, 6 HAVING COUNT(*) > 10 ORDER BY n DESC LIMIT 100",
    )
    .await;
    // Treatment by intent, joined along the key path to the patient.
    answered(
        "SELECT r.intent_of_treatment, p.vitalstatus, COUNT(*), AVG(t.age) \
         FROM sim_sact_regimen r JOIN sim_av_patient p ON r.encore_patient_id = p.patientid \
         JOIN sim_av_tumour t ON t.patientid = p.patientid \
         WHERE p.vitalstatus IN ('D', 'D3', 'D4', 'D5') OR p.vitalstatus IS NULL GROUP BY 1, 2",
    )
    .await;
    // Bands computed in a CTE, margins by ROLLUP, codes by prefix and pattern.
    answered(
        "WITH banded AS (SELECT patientid, left(site_icd10_o2, 2) AS site, \
           CASE WHEN age < 60 THEN 'under 60' ELSE '60+' END AS band FROM sim_av_tumour \
           WHERE site_icd10_o2 LIKE 'C5%' AND NOT (stage_best = 'X')) \
         SELECT site, band, COUNT(*) FROM banded GROUP BY ROLLUP(site, band)",
    )
    .await;
    answered("SELECT COUNT(*), SUM(age), VAR(age), STDDEV(age), COUNT(age) FROM sim_av_tumour")
        .await;
    answered(
        "SELECT c.cycle_number, COUNT(*) FROM sim_sact_regimen r \
         JOIN sim_sact_cycle c ON c.merged_regimen_id = r.merged_regimen_id GROUP BY 1",
    )
    .await;
    // Where the policy's classes allow extremes.
    answered("SELECT MAX(chrl_tot_27_03) FROM sim_av_tumour GROUP BY gender").await;
}

#[tokio::test]
async fn counts_in_disguise_are_refused() {
    // Each would give an exact count beside a rounded one (attack class 1).
    for sql in [
        "SELECT COUNT(*), SUM(CASE WHEN vitalstatus = 'D' THEN 1 ELSE 0 END) FROM sim_av_patient",
        "SELECT COUNT(*), SUM(1) FROM sim_av_patient",
        "SELECT COUNT(*), AVG(CASE WHEN age > 80 THEN 1.0 ELSE 0.0 END) FROM sim_av_tumour",
        "SELECT COUNT(*) FILTER (WHERE age > 80), COUNT(*) FROM sim_av_tumour",
        "SELECT COUNT(*), SUM(age - age + 1) FROM sim_av_tumour",
        "SELECT COUNT(*), VAR(CASE WHEN age > 90 THEN 1 END) FROM sim_av_tumour",
        // A constant offset per row hides a dominant contributor from the dominance rule
        // (class 8): the rule must see the quantity released, so only columns are summed.
        "SELECT SUM(CASE WHEN age > 90 THEN 1001 ELSE 1000 END) - SUM(1000) FROM sim_av_tumour",
    ] {
        not_table_builder(sql).await;
        // DP answers them, its budget paying for what they reveal.
        vet("dp", sql)
            .await
            .unwrap_or_else(|r| panic!("{sql}: {r}"));
    }
}

#[tokio::test]
async fn padding_with_rows_or_known_offsets_is_refused() {
    // Rows that are not patients (class 2) and padding by k real rows (class 11), all through
    // COUNT(DISTINCT) of something other than the patient key: refused in every mode, as
    // per-trust distinct counts do not add up across trusts.
    for sql in [
        "SELECT g, COUNT(DISTINCT pid) FROM (SELECT gender AS g, patientid AS pid FROM \
         sim_av_patient UNION ALL SELECT '1' AS g, 1 AS pid) GROUP BY g",
        "SELECT COUNT(DISTINCT CASE WHEN vitalstatus = 'D' THEN vitalstatusdate END) FROM \
         sim_av_patient",
        "SELECT COUNT(DISTINCT CASE WHEN age = 57 THEN age WHEN age % 15 < 3 THEN -1 - (age % 15) \
         END) FROM sim_av_tumour",
        "SELECT COUNT(DISTINCT stage_best) FROM sim_av_tumour",
    ] {
        for project in ["sdc", "dp"] {
            match vet(project, sql).await {
                Ok(()) => panic!("should be refused ({project}): {sql}"),
                Err(r) => assert_eq!(r.rule, Rule::DistinctCount, "{project}: {sql}\n{r}"),
            }
        }
    }
}

#[tokio::test]
async fn crafted_keys_and_conditions_are_refused() {
    for sql in [
        // Arithmetic in a key, CASE with data in its result or over two columns (class 5).
        "SELECT age + 1, COUNT(*) FROM sim_av_tumour GROUP BY 1",
        "SELECT CASE WHEN age > 50 THEN stage_best ELSE 'x' END, COUNT(*) FROM sim_av_tumour GROUP BY 1",
        "SELECT CASE WHEN age > 50 AND stage_best = '3' THEN 'a' ELSE 'b' END, COUNT(*) FROM sim_av_tumour GROUP BY 1",
        "SELECT COUNT(*) FROM sim_av_tumour WHERE age + chrl_tot_27_03 > 90",
        "SELECT COUNT(*) FROM sim_av_tumour WHERE age % 15 < 3",
        "SELECT COUNT(*) FROM sim_av_tumour WHERE lower(stage_best) = '3'",
        // A suffix, not a prefix; a date unit finer than a month.
        "SELECT substr(site_icd10_o2, 2, 2), COUNT(*) FROM sim_av_tumour GROUP BY 1",
        "SELECT date_trunc('day', diagnosisdatebest), COUNT(*) FROM sim_av_tumour GROUP BY 1",
        // Picking rows one by one below the aggregation.
        "SELECT COUNT(*) FROM (SELECT * FROM sim_av_tumour ORDER BY age DESC LIMIT 1)",
        // Two columns compared with each other, not with constants.
        "SELECT COUNT(*) FROM sim_av_tumour WHERE date_first_surgery < diagnosisdatebest",
    ] {
        not_table_builder(sql).await;
    }
}

#[tokio::test]
async fn age_bands_are_at_least_the_schemas_width() {
    let r = not_table_builder(
        "SELECT CASE WHEN age BETWEEN 57 AND 58 THEN 'target' ELSE 'rest' END, COUNT(*) \
         FROM sim_av_tumour GROUP BY 1",
    )
    .await;
    assert!(r.reason.contains("at least 5"), "{r}");
    not_table_builder(
        "SELECT CASE WHEN age < 50 THEN 'a' WHEN age < 52 THEN 'b' ELSE 'c' END, COUNT(*) \
         FROM sim_av_tumour GROUP BY 1",
    )
    .await;
    not_table_builder(
        "SELECT CASE age WHEN 57 THEN 'target' ELSE 'rest' END, COUNT(*) FROM sim_av_tumour \
         GROUP BY 1",
    )
    .await;
    answered(
        "SELECT CASE WHEN age < 50 THEN 'a' WHEN age < 55 THEN 'b' WHEN age <= 59 THEN 'c' \
         ELSE 'd' END, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    )
    .await;
}

#[tokio::test]
async fn sums_need_public_bounds() {
    // The shared schema without Charlson's bounds (nor its bins, which need them): its sum
    // is refused unless the policy gives bounds of its own.
    let text =
        trustql_schemas::CANCER_SCHEMA_TOML.replace("bounds = [0.0, 30.0], bin_width = 1.0, ", "");
    let unbounded = trustql_schemas::TrustSchema::from_toml(&text).expect("schema");
    let sql = "SELECT SUM(chrl_tot_27_03) FROM sim_av_tumour";
    for (policy, answered) in [
        (POLICY.to_string(), false),
        (
            POLICY.replace(
                "bounds = { ",
                "bounds = { \"sim_av_tumour.chrl_tot_27_03\" = [0, 20], ",
            ),
            true,
        ),
    ] {
        let policy = Policy::from_toml(&policy).expect("policy");
        let project = policy.project("sdc").expect("project");
        let vetted = vet_sql(&session(), &unbounded, &policy, project, sql).await;
        match vetted {
            Ok(_) => assert!(answered, "an unbounded column was summed"),
            Err(r) => {
                assert!(!answered, "{r}");
                assert_eq!(r.rule, Rule::TableBuilder);
                assert!(r.reason.contains("public bounds"), "{r}");
            }
        }
    }
    answered("SELECT AVG(height_at_start_of_regimen) FROM sim_sact_regimen").await;
}

#[tokio::test]
async fn percentiles_need_public_bins() {
    // The shared schema without Charlson's bins: its median is refused, its sum still answered.
    let text = trustql_schemas::CANCER_SCHEMA_TOML.replace(
        "bounds = [0.0, 30.0], bin_width = 1.0, ",
        "bounds = [0.0, 30.0], ",
    );
    let unbinned = trustql_schemas::TrustSchema::from_toml(&text).expect("schema");
    let policy = Policy::from_toml(POLICY).expect("policy");
    let project = policy.project("sdc").expect("project");
    let median = "SELECT median(chrl_tot_27_03) FROM sim_av_tumour";
    let r = vet_sql(&session(), &unbinned, &policy, project, median)
        .await
        .expect_err("a column without bins has no median");
    assert_eq!(r.rule, Rule::TableBuilder, "{r}");
    assert!(r.reason.contains("bin width"), "{r}");
    let sum = "SELECT SUM(chrl_tot_27_03) FROM sim_av_tumour";
    assert!(
        vet_sql(&session(), &unbinned, &policy, project, sum)
            .await
            .is_ok()
    );
    answered(median).await;
}
