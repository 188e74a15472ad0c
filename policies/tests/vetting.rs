//! Vetting: queries a researcher should be able to run, and attacks that must be refused.

mod common;

use common::{schema, session};
use trustql_policies::{Policy, Refusal, Rule, Vetted, authorise, parse_date, vet_sql};

const POLICY: &str = r#"
[policy]
version = "test-1"
trust = "TQ01"

[[project]]
id = "p1"
researchers = ["alice"]
tables = ["sim_av_patient", "sim_av_tumour", "sim_sact_regimen", "sim_sact_cycle",
          "sim_sact_drug_detail", "sim_sact_outcome", "sim_rtds_episode", "sim_rtds_prescription"]
expires = "2099-12-31"

[[project]]
id = "tumours-only"
researchers = ["bob"]
tables = ["sim_av_tumour"]
expires = "2099-12-31"

[[project]]
id = "expired"
researchers = ["alice"]
tables = ["sim_av_tumour"]
expires = "2020-01-01"
"#;

fn policy() -> Policy {
    Policy::from_toml(POLICY).expect("policy")
}

async fn vet_with(policy: &Policy, project: &str, sql: &str) -> Result<Vetted, Refusal> {
    let project = policy.project(project).expect("project");
    vet_sql(&session(), &schema(), policy, project, sql)
        .await
        .map(|(_, _, vetted)| vetted)
}

async fn vet(sql: &str) -> Result<Vetted, Refusal> {
    vet_with(&policy(), "p1", sql).await
}

/// The same projects in the unprotected correctness mode, which answers the full aggregate SQL.
fn full_sql_policy() -> Policy {
    Policy::from_toml(&format!(
        "{POLICY}\n[disclosure]\nmin_patients = 1\nrounding = \"none\"\n"
    ))
    .expect("policy")
}

/// Accepted as full SQL, and refused as no table-builder query under the default SDC policy.
async fn accepted_beyond_table_builder(sql: &str) {
    if let Err(r) = vet_with(&full_sql_policy(), "p1", sql).await {
        panic!("should be accepted in full-SQL mode: {sql}\n{r}");
    }
    refused(sql, Rule::TableBuilder).await;
}

async fn accepted(sql: &str) -> Vetted {
    match vet(sql).await {
        Ok(v) => v,
        Err(r) => panic!("should be accepted: {sql}\n{r}"),
    }
}

async fn refused(sql: &str, rule: Rule) -> Refusal {
    match vet(sql).await {
        Ok(v) => panic!(
            "should be refused ({}): {sql}\naccepted as {v:?}",
            rule.name()
        ),
        Err(r) => {
            assert_eq!(r.rule, rule, "{sql}\n{r}");
            r
        }
    }
}

// ---- what researchers need ------------------------------------------------------------------

#[tokio::test]
async fn ordinary_aggregate_queries_are_accepted() {
    let v = accepted(
        "SELECT site_icd10_o2_3char, stage_best, COUNT(*) FROM sim_av_tumour GROUP BY 1, 2",
    )
    .await;
    assert_eq!(v.tables, vec!["sim_av_tumour".to_string()]);
    assert_eq!(v.group_exprs, 2);
    accepted("SELECT site_icd10_o2_3char, AVG(age), STDDEV(age), VAR(age) FROM sim_av_tumour GROUP BY site_icd10_o2_3char").await;
    accepted("SELECT COUNT(*) FROM sim_av_patient").await;
    accepted("SELECT CASE WHEN age < 50 THEN 'under 50' ELSE '50+' END AS band, COUNT(*) FROM sim_av_tumour GROUP BY 1").await;
    accepted(
        "SELECT date_part('year', diagnosisdatebest) AS y, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    )
    .await;
    accepted(
        "SELECT EXTRACT(YEAR FROM diagnosisdatebest) AS y, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    )
    .await;
    accepted("SELECT stage_best, COUNT(*) AS n FROM sim_av_tumour WHERE site_icd10_o2_3char IN ('C50', 'C34', 'C18') GROUP BY stage_best HAVING COUNT(*) > 5 ORDER BY n DESC LIMIT 10").await;
    accepted("SELECT SUM(actual_dose_per_administration), drug_group FROM sim_sact_drug_detail GROUP BY drug_group").await;
    // Extremes of clinical columns are off by default (tests/extremes.rs).
    refused(
        "SELECT MAX(actual_dose_per_administration) FROM sim_sact_drug_detail",
        Rule::ColumnClass,
    )
    .await;
    accepted("SELECT COUNT(patientid), COUNT(DISTINCT patientid) FROM sim_av_tumour").await;
    accepted_beyond_table_builder(
        "SELECT COUNT(*) FROM sim_av_tumour WHERE TRY_CAST(stage_best AS INT) = 3",
    )
    .await;
}

#[tokio::test]
async fn joins_on_the_patient_key_are_accepted() {
    let v = accepted("SELECT p.gender, COUNT(DISTINCT p.patientid) FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid GROUP BY p.gender").await;
    assert_eq!(
        v.tables,
        vec!["sim_av_patient".to_string(), "sim_av_tumour".to_string()]
    );
    accepted("SELECT t.stage_best, COUNT(*) FROM sim_av_patient p, sim_av_tumour t WHERE p.patientid = t.patientid AND p.vitalstatus = 'D' GROUP BY 1").await;
    accepted("SELECT r.intent_of_treatment, COUNT(*) FROM sim_av_patient p JOIN sim_sact_regimen r ON r.encore_patient_id = p.patientid GROUP BY 1").await;
    accepted("SELECT c.cycle_number, COUNT(*) FROM sim_sact_regimen r JOIN sim_sact_cycle c ON c.merged_regimen_id = r.merged_regimen_id GROUP BY 1").await;
    accepted("SELECT COUNT(*) FROM (SELECT patientid AS pid FROM sim_av_tumour) t JOIN sim_av_patient p ON t.pid = p.patientid").await;
}

#[tokio::test]
async fn grouping_sets_are_accepted_and_flagged() {
    let v = accepted("SELECT site_icd10_o2_3char, stage_best, COUNT(*) FROM sim_av_tumour GROUP BY ROLLUP(site_icd10_o2_3char, stage_best)").await;
    assert!(v.grouping_sets);
}

// ---- project and table rules ------------------------------------------------------------------

#[test]
fn projects_check_researcher_and_expiry() {
    let policy = policy();
    let today = parse_date("2026-11-23").expect("date");
    assert!(authorise(&policy, "p1", "alice", today).is_ok());
    let not_on = authorise(&policy, "p1", "mallory", today).expect_err("not on project");
    assert_eq!(not_on.rule, Rule::Project);
    let unknown = authorise(&policy, "other", "alice", today).expect_err("unknown project");
    assert_eq!(unknown.rule, Rule::Project);
    let expired = authorise(&policy, "expired", "alice", today).expect_err("expired");
    assert_eq!(expired.rule, Rule::Project);
    assert!(expired.reason.contains("2020-01-01"));
}

#[tokio::test]
async fn tables_outside_the_project_are_refused() {
    let r = vet_with(
        &policy(),
        "tumours-only",
        "SELECT COUNT(*) FROM sim_av_patient",
    )
    .await
    .expect_err("patient table not approved");
    assert_eq!(r.rule, Rule::Table);
    vet_with(
        &policy(),
        "tumours-only",
        "SELECT COUNT(*) FROM sim_av_tumour",
    )
    .await
    .expect("tumour table approved");
}

// ---- attacks: identifiers in output ------------------------------------------------------------

#[tokio::test]
async fn attack_row_level_select() {
    refused("SELECT patientid FROM sim_av_patient", Rule::NotAggregate).await;
    refused("SELECT * FROM sim_av_tumour", Rule::NotAggregate).await;
}

#[tokio::test]
async fn attack_group_by_identifier() {
    refused(
        "SELECT patientid, COUNT(*) FROM sim_av_tumour GROUP BY patientid",
        Rule::Identifier,
    )
    .await;
}

#[tokio::test]
async fn attack_group_by_transformed_identifier() {
    refused(
        "SELECT linknumber % 10, COUNT(*) FROM sim_av_patient GROUP BY 1",
        Rule::Identifier,
    )
    .await;
}

#[tokio::test]
async fn attack_max_of_identifier() {
    refused(
        "SELECT MAX(patientid) FROM sim_av_patient",
        Rule::Identifier,
    )
    .await;
}

#[tokio::test]
async fn attack_sum_of_identifier() {
    refused(
        "SELECT SUM(linknumber) FROM sim_av_patient",
        Rule::Identifier,
    )
    .await;
}

#[tokio::test]
async fn attack_identifier_renamed_in_derived_table() {
    refused(
        "SELECT pid, COUNT(*) FROM (SELECT patientid AS pid FROM sim_av_tumour) t GROUP BY pid",
        Rule::Identifier,
    )
    .await;
}

#[tokio::test]
async fn attack_identifier_hidden_in_union() {
    refused("SELECT x, COUNT(*) FROM (SELECT age AS x FROM sim_av_tumour UNION ALL SELECT tumourid FROM sim_av_tumour) u GROUP BY x", Rule::Identifier).await;
}

/// The test projects under differential privacy.
fn dp_policy() -> Policy {
    Policy::from_toml(&format!(
        "{POLICY}\n[[project]]\nid = \"dp\"\nresearchers = [\"alice\"]\n\
         tables = [\"sim_av_patient\", \"sim_av_tumour\", \"sim_sact_regimen\"]\n\
         expires = \"2099-12-31\"\ndp = {{ epsilon_budget = 10.0, epsilon_per_query = 1.0 }}\n\
         \n[dp]\ndefault_rows_per_patient = 1\n"
    ))
    .expect("policy")
}

#[tokio::test]
async fn count_distinct_is_answered_only_for_the_patient_key_in_every_mode() {
    // Each trust's distinct count is summed: for any column but the patient key the sum
    // counts a value once per trust holding it (COUNT(DISTINCT gender) over 3 trusts gives 6).
    let modes = [
        (policy(), "p1"),
        (full_sql_policy(), "p1"),
        (dp_policy(), "dp"),
    ];
    for sql in [
        "SELECT COUNT(DISTINCT gender) FROM sim_av_patient",
        "SELECT stage_best, COUNT(DISTINCT site_icd10_o2_3char) FROM sim_av_tumour GROUP BY 1",
        "SELECT COUNT(*), COUNT(DISTINCT tumourid) FROM sim_av_tumour",
        "SELECT COUNT(DISTINCT CASE WHEN age = 57 THEN age END) FROM sim_av_tumour",
        "SELECT COUNT(DISTINCT 1) FROM sim_av_tumour",
        // Not all its rows are patients', so it is no patient key.
        "SELECT g, COUNT(DISTINCT pid) FROM (SELECT gender AS g, patientid AS pid FROM \
         sim_av_patient UNION ALL SELECT '1' AS g, 1 AS pid) GROUP BY g",
    ] {
        for (policy, project) in &modes {
            match vet_with(policy, project, sql).await {
                Ok(v) => panic!("should be refused ({project}): {sql}\naccepted as {v:?}"),
                Err(r) => {
                    assert_eq!(r.rule, Rule::DistinctCount, "{project}: {sql}\n{r}");
                    assert!(
                        r.to_string().contains(
                            "answered only for the patient key: distinct values cannot be \
                             combined across trusts without sending them"
                        ),
                        "{r}"
                    );
                }
            }
        }
    }
    for sql in [
        "SELECT COUNT(DISTINCT patientid) FROM sim_av_tumour",
        "SELECT stage_best, COUNT(DISTINCT patientid) FROM sim_av_tumour GROUP BY 1",
        "SELECT COUNT(DISTINCT encore_patient_id) FROM sim_sact_regimen",
        "SELECT g, COUNT(DISTINCT pid) FROM (SELECT gender AS g, patientid AS pid FROM \
         sim_av_patient) GROUP BY g",
    ] {
        for (policy, project) in &modes {
            if let Err(r) = vet_with(policy, project, sql).await {
                panic!("should be accepted ({project}): {sql}\n{r}");
            }
        }
    }
}

#[tokio::test]
async fn attack_count_distinct_of_transformed_identifier() {
    refused(
        "SELECT COUNT(DISTINCT patientid / 2) FROM sim_av_tumour",
        Rule::Identifier,
    )
    .await;
}

// ---- attacks: predicates on identifiers --------------------------------------------------------

#[tokio::test]
async fn attack_equality_on_identifier() {
    refused(
        "SELECT COUNT(*) FROM sim_av_patient WHERE patientid = 10000001",
        Rule::Identifier,
    )
    .await;
}

#[tokio::test]
async fn attack_range_on_identifier() {
    refused(
        "SELECT COUNT(*) FROM sim_av_patient WHERE linknumber BETWEEN 100000000 AND 100000005",
        Rule::Identifier,
    )
    .await;
}

#[tokio::test]
async fn attack_pattern_match_on_identifier() {
    refused(
        "SELECT COUNT(*) FROM sim_rtds_episode WHERE attendid LIKE '3000%'",
        Rule::Identifier,
    )
    .await;
}

#[tokio::test]
async fn attack_in_list_on_identifier() {
    refused(
        "SELECT COUNT(*) FROM sim_av_patient WHERE patientid IN (10000001, 10000003)",
        Rule::Identifier,
    )
    .await;
}

#[tokio::test]
async fn attack_identifier_in_aggregate_filter() {
    refused(
        "SELECT COUNT(*) FILTER (WHERE patientid > 10000001) FROM sim_av_patient",
        Rule::Identifier,
    )
    .await;
}

#[tokio::test]
async fn attack_identifier_in_case() {
    refused("SELECT CASE WHEN patientid = 10000001 THEN 'x' ELSE 'y' END AS c, COUNT(*) FROM sim_av_patient GROUP BY 1", Rule::Identifier).await;
}

// ---- attacks: functions that reveal row values ------------------------------------------------

#[tokio::test]
async fn attack_array_agg() {
    refused("SELECT array_agg(age) FROM sim_av_tumour", Rule::Function).await;
}

#[tokio::test]
async fn attack_string_agg() {
    refused(
        "SELECT string_agg(gender, ',') FROM sim_av_patient",
        Rule::Function,
    )
    .await;
}

#[tokio::test]
async fn attack_first_value() {
    refused("SELECT first_value(age) FROM sim_av_tumour", Rule::Function).await;
}

#[tokio::test]
async fn percentiles_read_binned_columns_only() {
    // DataFusion's percentiles keep every value; ours count a column's public bins.
    for sql in [
        "SELECT site_icd10_o2_3char, median(age) FROM sim_av_tumour GROUP BY 1",
        "SELECT percentile_cont(t.age, 0.9) FROM sim_av_tumour t",
        "SELECT percentile_cont(0.25) WITHIN GROUP (ORDER BY weight_at_start_of_regimen) \
         FROM sim_sact_regimen",
        "SELECT approx_percentile_cont(age, 0.5) FROM sim_av_tumour",
    ] {
        accepted(sql).await;
    }
    // A computed value, and another column renamed to a binned one (whose grid the aggregate
    // would read), are not table-builder percentiles.
    for sql in [
        "SELECT median(age + 1) FROM sim_av_tumour",
        "SELECT median(age) FROM (SELECT chrl_tot_27_03 AS age FROM sim_av_tumour)",
    ] {
        refused(sql, Rule::TableBuilder).await;
    }
    // Value-list aggregates stay locked out.
    refused(
        "SELECT approx_median(age) FROM sim_av_tumour",
        Rule::Function,
    )
    .await;
}

#[tokio::test]
async fn attack_window_function() {
    refused("SELECT COUNT(*) OVER () FROM sim_av_tumour", Rule::Function).await;
}

#[tokio::test]
async fn attack_sum_distinct_ships_values() {
    refused(
        "SELECT SUM(DISTINCT age) FROM sim_av_tumour",
        Rule::Aggregate,
    )
    .await;
}

#[tokio::test]
async fn attack_non_allow_listed_scalar_function() {
    refused(
        "SELECT md5(gender), COUNT(*) FROM sim_av_patient GROUP BY 1",
        Rule::Function,
    )
    .await;
}

#[tokio::test]
async fn attack_aggregate_not_in_policy() {
    let mut narrow = policy();
    narrow.query.aggregates = vec!["count".into()];
    let r = vet_with(&narrow, "p1", "SELECT AVG(age) FROM sim_av_tumour")
        .await
        .expect_err("avg not allowed");
    assert_eq!(r.rule, Rule::Aggregate);
}

// ---- attacks: extreme values -------------------------------------------------------------------

#[tokio::test]
async fn attack_min_of_exact_date() {
    refused(
        "SELECT MIN(diagnosisdatebest) FROM sim_av_tumour",
        Rule::ColumnClass,
    )
    .await;
}

#[tokio::test]
async fn attack_max_age_on_small_group() {
    refused(
        "SELECT MAX(age) FROM sim_av_tumour WHERE site_icd10_o2_3char = 'C69'",
        Rule::ColumnClass,
    )
    .await;
}

#[tokio::test]
async fn class_rules_follow_the_policy() {
    let mut strict = policy();
    strict.classes.quasi_identifier.group_by = false;
    let r = vet_with(
        &strict,
        "p1",
        "SELECT ethnicity, COUNT(*) FROM sim_av_patient GROUP BY 1",
    )
    .await
    .expect_err("quasi-identifier grouping forbidden");
    assert_eq!(r.rule, Rule::ColumnClass);
    assert!(r.reason.contains("sim_av_patient.ethnicity"), "{r}");
}

// ---- attacks: joins not on the patient key ----------------------------------------------------

#[tokio::test]
async fn attack_join_on_non_key() {
    refused(
        "SELECT COUNT(*) FROM sim_av_patient p JOIN sim_av_tumour t ON p.gender = t.gender",
        Rule::Join,
    )
    .await;
}

#[tokio::test]
async fn attack_join_on_mismatched_identifiers() {
    refused("SELECT COUNT(*) FROM sim_av_tumour t JOIN sim_sact_regimen r ON t.tumourid = r.merged_regimen_id", Rule::Join).await;
}

#[tokio::test]
async fn attack_join_on_link_number() {
    refused("SELECT COUNT(*) FROM sim_av_patient p JOIN sim_sact_regimen r ON r.link_number = p.linknumber", Rule::Join).await;
}

#[tokio::test]
async fn attack_implicit_join_on_non_key() {
    refused(
        "SELECT COUNT(*) FROM sim_av_patient p, sim_av_tumour t WHERE p.gender = t.gender",
        Rule::Join,
    )
    .await;
}

// ---- attacks: statements and file access ------------------------------------------------------

#[tokio::test]
async fn attack_create_external_table() {
    refused(
        "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc/'",
        Rule::Statement,
    )
    .await;
}

#[tokio::test]
async fn attack_copy_to_file() {
    refused(
        "COPY (SELECT COUNT(*) FROM sim_av_patient) TO '/tmp/out.csv'",
        Rule::Statement,
    )
    .await;
}

#[tokio::test]
async fn attack_set_option() {
    refused("SET datafusion.execution.batch_size = 1", Rule::Statement).await;
}

#[tokio::test]
async fn attack_explain() {
    refused(
        "EXPLAIN SELECT COUNT(*) FROM sim_av_patient",
        Rule::Statement,
    )
    .await;
}

#[tokio::test]
async fn attack_insert_and_drop() {
    refused(
        "INSERT INTO sim_av_patient (patientid) VALUES (1)",
        Rule::Statement,
    )
    .await;
    refused("DROP TABLE sim_av_patient", Rule::Statement).await;
}

#[tokio::test]
async fn attack_file_as_table() {
    let r = vet("SELECT COUNT(*) FROM '/etc/passwd'")
        .await
        .expect_err("file table");
    assert!(matches!(r.rule, Rule::Invalid | Rule::Table), "{r}");
}

#[tokio::test]
async fn attack_table_function() {
    let r = vet("SELECT COUNT(*) FROM generate_series(1, 10)")
        .await
        .expect_err("table function");
    assert_eq!(r.rule, Rule::Function, "{r}");
}

#[tokio::test]
async fn functions_are_checked_by_name_wherever_they_are_called() {
    // Found on the parsed query, not in the planner's words: deep inside an expression, under
    // another name's case, or qualified by a schema.
    for sql in [
        "SELECT SUM(CASE WHEN age > 50 THEN array_length(make_array(age)) ELSE 0 END) FROM sim_av_tumour",
        "SELECT COUNT(*) FROM sim_av_tumour WHERE \"ABS\"(age) > 1",
        "SELECT COUNT(*) FROM sim_av_tumour WHERE public.abs(age) > 1",
        "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY stage_best HAVING random() > 0.5",
    ] {
        let r = vet(sql).await.expect_err(sql);
        assert_eq!(r.rule, Rule::Function, "{sql}: {r}");
    }
    // The same function unquoted is the allow-listed one.
    accepted_beyond_table_builder("SELECT COUNT(*) FROM sim_av_tumour WHERE ABS(age) > 1").await;
}

#[tokio::test]
async fn attack_information_schema() {
    let r = vet("SELECT COUNT(*) FROM information_schema.tables")
        .await
        .expect_err("catalog");
    assert!(matches!(r.rule, Rule::Invalid | Rule::Table), "{r}");
}

// ---- attacks: resource exhaustion --------------------------------------------------------------

#[tokio::test]
async fn attack_cross_join() {
    refused(
        "SELECT COUNT(*) FROM sim_rtds_episode a, sim_rtds_prescription b",
        Rule::CrossJoin,
    )
    .await;
}

#[tokio::test]
async fn attack_huge_in_list() {
    let list: Vec<String> = (0..200).map(|i| format!("'C{i:02}'")).collect();
    let sql = format!(
        "SELECT COUNT(*) FROM sim_av_tumour WHERE site_icd10_o2_3char IN ({})",
        list.join(", ")
    );
    refused(&sql, Rule::InList).await;
}

#[tokio::test]
async fn attack_recursive_query() {
    let r = vet(
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r",
    )
    .await
    .expect_err("recursion");
    assert!(
        matches!(r.rule, Rule::Recursion | Rule::Invalid | Rule::Unsupported),
        "{r}"
    );
}

#[tokio::test]
async fn attack_very_long_query() {
    let sql = format!(
        "SELECT COUNT(*) FROM sim_av_tumour WHERE {}",
        vec!["age > 1"; 2_000].join(" AND ")
    );
    refused(&sql, Rule::QueryLength).await;
}

#[tokio::test]
async fn attack_many_joins() {
    let sql = "SELECT COUNT(*) FROM sim_av_patient p \
        JOIN sim_av_tumour a ON a.patientid = p.patientid \
        JOIN sim_av_tumour b ON b.patientid = p.patientid \
        JOIN sim_av_tumour c ON c.patientid = p.patientid \
        JOIN sim_av_tumour d ON d.patientid = p.patientid \
        JOIN sim_av_tumour e ON e.patientid = p.patientid";
    refused(sql, Rule::TooManyJoins).await;
}

// ---- attacks: error oracles --------------------------------------------------------------------
// Division, casts and substr of data are made total by the rewrite (tests/total.rs runs them on
// hostile values): full SQL answers them, the table builder still refuses them as arithmetic.

#[tokio::test]
async fn attack_division_by_data() {
    accepted_beyond_table_builder("SELECT COUNT(*) FROM sim_av_tumour WHERE 100 / (age - 50) > 0")
        .await;
}

#[tokio::test]
async fn attack_cast_of_text() {
    accepted_beyond_table_builder(
        "SELECT COUNT(*) FROM sim_av_tumour WHERE CAST(stage_best AS INT) = 3",
    )
    .await;
}

#[tokio::test]
async fn attack_data_dependent_substring() {
    accepted_beyond_table_builder(
        "SELECT substr(gender, 1, chrl_tot_27_03) AS g, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    )
    .await;
}

// ---- attacks: subqueries and nesting ------------------------------------------------------------

#[tokio::test]
async fn attack_scalar_subquery() {
    refused(
        "SELECT COUNT(*) FROM sim_av_tumour WHERE age > (SELECT AVG(age) FROM sim_av_tumour)",
        Rule::Subquery,
    )
    .await;
}

#[tokio::test]
async fn attack_in_subquery_on_identifiers() {
    refused("SELECT COUNT(*) FROM sim_av_patient WHERE patientid IN (SELECT encore_patient_id FROM sim_sact_regimen)", Rule::Subquery).await;
}

#[tokio::test]
async fn attack_nested_aggregation() {
    refused("SELECT COUNT(*) FROM (SELECT site_icd10_o2_3char, COUNT(*) AS c FROM sim_av_tumour GROUP BY 1) s WHERE c < 3", Rule::Nested).await;
}

// ---- refusals never echo values ------------------------------------------------------------------

#[tokio::test]
async fn refusals_do_not_repeat_literals() {
    let r = refused(
        "SELECT COUNT(*) FROM sim_av_patient WHERE patientid = 10000123",
        Rule::Identifier,
    )
    .await;
    assert!(!r.reason.contains("10000123"), "{r}");
    assert!(r.reason.contains("sim_av_patient.patientid"), "{r}");
}

#[tokio::test]
async fn unnest_reads_released_curves_only() {
    // Above the aggregation: one row per interval of a released curve.
    accepted(
        "SELECT t.stage_best, unnest(km_curve(t.diagnosisdatebest, p.vitalstatusdate, \
         p.vitalstatus = 'D')) FROM sim_av_tumour t JOIN sim_av_patient p \
         ON t.patientid = p.patientid GROUP BY t.stage_best",
    )
    .await;
    // Below it, an unnest would make rows of its own for the aggregate to count.
    refused(
        "SELECT COUNT(*) FROM (SELECT unnest(make_array(age, age)) AS a FROM sim_av_tumour) x",
        Rule::Function,
    )
    .await;
    refused(
        "SELECT COUNT(*) FROM (SELECT unnest(string_to_array(gender, '')) AS a \
         FROM sim_av_tumour) x",
        Rule::Function,
    )
    .await;
}
