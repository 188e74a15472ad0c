//! Class 7 (extremes): MIN/MAX of a clinical column releases one patient's value, so the
//! built-in default refuses it and a controller must allow it in `[classes.clinical]`.

mod common;

use common::{schema, session};
use trustql_policies::{Policy, Rule, vet_sql};

const PROJECT: &str = r#"
[policy]
version = "test-1"
trust = "TQ01"

[[project]]
id = "p1"
researchers = ["alice"]
tables = ["sim_av_tumour", "sim_sact_drug_detail"]
expires = "2099-12-31"
"#;

const ALLOWED: &str =
    "\n[classes.clinical]\ngroup_by = true\nfilter = true\naggregate = true\nmin_max = true\n";

async fn vet(policy: &str, sql: &str) -> Result<(), trustql_policies::Refusal> {
    let policy = Policy::from_toml(policy).expect("policy");
    let project = policy.project("p1").expect("project");
    vet_sql(&session(), &schema(), &policy, project, sql)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn extremes_of_clinical_columns_are_off_unless_the_policy_allows_them() {
    for sql in [
        "SELECT MAX(actual_dose_per_administration) FROM sim_sact_drug_detail",
        "SELECT site_icd10_o2_3char, MIN(chrl_tot_27_03) FROM sim_av_tumour GROUP BY 1",
    ] {
        let refused = vet(PROJECT, sql).await.expect_err(sql);
        assert_eq!(refused.rule, Rule::ColumnClass, "{sql}: {refused}");
        assert!(refused.to_string().contains("MIN or MAX"), "{refused}");
        let allowed = format!("{PROJECT}{ALLOWED}");
        vet(&allowed, sql)
            .await
            .unwrap_or_else(|r| panic!("allowed by the policy: {sql}: {r}"));
    }
    // The lint says so when a controller turns them on.
    let lint = Policy::from_toml(&format!("{PROJECT}{ALLOWED}"))
        .expect("policy")
        .lint(&schema());
    assert!(
        lint.iter()
            .any(|f| format!("{f:?}").contains("one patient's value")),
        "{lint:?}"
    );
}
