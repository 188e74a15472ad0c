//! Snapshot of every refusal text a researcher can meet at a node: the vetting rules and the
//! rules that decide how an answer may be released (patient key, preview outside DP,
//! dominance with grouping sets, ε bounds, budget). The texts are part of the contract: a
//! change shows up as a reviewable diff.

mod common;

use trustql_node::{NodeError, SiteEngine};
use trustql_policies::{approve, load_approved};
use trustql_protocol::SiteRequest;

const TODAY: i32 = 20_415;

/// `sdc` has a dominance rule; `dp` is in DP mode with ε 1 per query and 1.5 in all.
async fn engine(dir: &std::path::Path) -> SiteEngine {
    let fed = common::synth(dir, 400);
    let path = dir.join("policy.toml");
    let tables = common::ALL_TABLES;
    let text = format!(
        r#"[policy]
version = "refusals"
trust = "TQ01"

[disclosure]
min_patients = 10
dominance = {{ n = 1, k = 60.0 }}

[dp]
default_rows_per_patient = 1
bounds = {{ "sim_av_tumour.age" = [0, 100] }}

[[project]]
id = "sdc"
researchers = ["alice"]
tables = {tables}
expires = "2099-12-31"

[[project]]
id = "dp"
researchers = ["alice"]
tables = {tables}
expires = "2099-12-31"
dp = {{ epsilon_budget = 1.5, epsilon_per_query = 1.0 }}

[[project]]
id = "old"
researchers = ["alice"]
tables = ["sim_av_tumour"]
expires = "2020-01-01"
"#
    );
    std::fs::write(&path, text).expect("write policy");
    approve(&path, "Test Controller", &common::schema()).expect("approve");
    let policy = load_approved(&path, &common::schema()).expect("load");
    common::open_engine(dir, &fed, policy, true).await
}

struct Ask {
    project: &'static str,
    sql: &'static str,
    epsilon: Option<f64>,
    preview: bool,
}

const fn sdc(sql: &'static str) -> Ask {
    Ask {
        project: "sdc",
        sql,
        epsilon: None,
        preview: false,
    }
}

const fn dp(sql: &'static str) -> Ask {
    Ask {
        project: "dp",
        sql,
        epsilon: None,
        preview: false,
    }
}

const COUNT: &str = "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY stage_best";

const PANEL: &[Ask] = &[
    Ask {
        project: "nobody",
        ..sdc(COUNT)
    },
    Ask {
        project: "old",
        ..sdc(COUNT)
    },
    sdc("SELECT patientid FROM sim_av_tumour"),
    sdc("DROP TABLE sim_av_tumour"),
    sdc("SELECT COUNT(*) FROM no_such_table"),
    sdc("SELECT linknumber, COUNT(*) FROM sim_av_patient GROUP BY linknumber"),
    sdc("SELECT COUNT(*) FROM sim_av_tumour WHERE patientid = 5"),
    sdc("SELECT COUNT(*) FROM sim_av_tumour t, sim_av_patient p"),
    sdc("SELECT COUNT(*) FROM (SELECT COUNT(*) AS n FROM sim_av_tumour) x"),
    sdc("SELECT COUNT(*) FROM sim_av_tumour WHERE age IN (SELECT age FROM sim_av_tumour)"),
    sdc("SELECT array_agg(age) FROM sim_av_tumour"),
    sdc("SELECT COUNT(*) FROM sim_av_tumour WHERE CAST(site_icd10_o2 AS INT) > 3"),
    sdc("SELEC COUNT(*) FROM sim_av_tumour"),
    // Table-builder shapes, in SDC mode only.
    sdc("SELECT COUNT(*), SUM(CASE WHEN age > 80 THEN 1 ELSE 0 END) FROM sim_av_tumour"),
    sdc("SELECT age + 1, COUNT(*) FROM sim_av_tumour GROUP BY 1"),
    sdc(
        "SELECT CASE WHEN age < 50 THEN 'a' WHEN age < 52 THEN 'b' END, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    ),
    // Release rules.
    sdc("SELECT COUNT(*) FROM sim_sact_cycle"),
    Ask {
        preview: true,
        ..sdc(COUNT)
    },
    sdc("SELECT stage_best, SUM(age) FROM sim_av_tumour GROUP BY ROLLUP(stage_best)"),
    Ask {
        epsilon: Some(2.0),
        ..dp(COUNT)
    },
    Ask {
        epsilon: Some(-1.0),
        ..dp(COUNT)
    },
    dp("SELECT stage_best, SUM(age) FROM sim_av_tumour GROUP BY ROLLUP(stage_best)"),
    dp("SELECT stage_best, SUM(chrl_tot_27_03) FROM sim_av_tumour GROUP BY stage_best"),
    // The first spends 1 of 1.5; the second finds too little left.
    dp("SELECT gender, COUNT(*) FROM sim_av_tumour GROUP BY gender"),
    dp("SELECT stage_best, gender, COUNT(*) FROM sim_av_tumour GROUP BY 1, 2"),
];

#[tokio::test]
async fn refusal_texts_are_as_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path()).await;
    let mut lines = Vec::new();
    for ask in PANEL {
        let request = SiteRequest {
            request_id: "r".into(),
            researcher: "alice".into(),
            project: ask.project.into(),
            sql: ask.sql.into(),
            epsilon: ask.epsilon,
            preview: ask.preview,
        };
        let outcome = match engine.answer(&request, TODAY).await {
            Ok(answer) => format!("answered ({} groups)", answer.meta.released),
            Err(NodeError::Refused(r)) => r.to_string(),
            Err(other) => format!("failed: {other}"),
        };
        let flags = match (ask.epsilon, ask.preview) {
            (Some(e), _) => format!(" [ε {e}]"),
            (None, true) => " [preview]".to_string(),
            (None, false) => String::new(),
        };
        lines.push(format!("{} {}{flags}\n  → {outcome}", ask.project, ask.sql));
    }
    insta::assert_snapshot!(lines.join("\n"));
}
