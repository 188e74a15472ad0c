//! The policy file: parsing, lint, description and approval.

use std::path::{Path, PathBuf};

use trustql_policies::{
    Finding, MAX_MIN_PATIENTS, Method, Policy, PolicyError, Rounding, approval_path, approve,
    content_hash, load_approved,
};
use trustql_schemas::TrustSchema;

fn schema() -> TrustSchema {
    TrustSchema::cancer().expect("schema")
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

const MINIMAL: &str = r#"
[policy]
version = "1"
trust = "TQ01"

[[project]]
id = "p"
researchers = ["r"]
tables = ["sim_av_tumour"]
expires = "2030-01-01"
"#;

fn errors(policy: &Policy) -> Vec<String> {
    policy
        .lint(&schema())
        .into_iter()
        .filter_map(|f| match f {
            Finding::Error(m) => Some(m),
            Finding::Warning(_) => None,
        })
        .collect()
}

#[test]
fn examples_lint_clean() {
    for name in [
        "standard.toml",
        "midpoint6.toml",
        "strict.toml",
        "dp.toml",
        "cell-key.toml",
        "pooled.toml",
    ] {
        let text = std::fs::read_to_string(example(name)).expect("example");
        let policy = Policy::from_toml(&text).expect(name);
        assert!(errors(&policy).is_empty(), "{name}: {:?}", errors(&policy));
    }
}

#[test]
fn defaults_are_the_safe_ones() {
    let policy = Policy::from_toml(MINIMAL).expect("minimal");
    assert_eq!(policy.disclosure.min_patients, 10);
    assert_eq!(policy.disclosure.rounding, Rounding::None);
    assert!(policy.disclosure.withhold_whole_margin_cells);
    assert!(!policy.classes.quasi_identifier.min_max);
    assert!(!policy.query.aggregates.contains(&"array_agg".to_string()));
    // No rounding is allowed but earns a warning.
    assert!(
        policy
            .lint(&schema())
            .iter()
            .any(|f| matches!(f, Finding::Warning(m) if m.contains("not rounded")))
    );
}

#[test]
fn unknown_keys_are_an_error() {
    let text = MINIMAL.replace(
        "trust = \"TQ01\"",
        "trust = \"TQ01\"\nallow_everything = true",
    );
    assert!(matches!(
        Policy::from_toml(&text),
        Err(PolicyError::Parse(_))
    ));
    let text = format!("{MINIMAL}\n[disclosure]\nmin_cell = 5\n");
    assert!(matches!(
        Policy::from_toml(&text),
        Err(PolicyError::Parse(_))
    ));
}

#[test]
fn lint_finds_each_kind_of_mistake() {
    let base = Policy::from_toml(MINIMAL).expect("minimal");
    let has = |p: &Policy, needle: &str| errors(p).iter().any(|e| e.contains(needle));

    let mut p = base.clone();
    p.disclosure.min_patients = 0;
    assert!(has(&p, "min_patients"));

    // Nodes count patients per group only up to twice MAX_MIN_PATIENTS.
    let mut p = base.clone();
    p.disclosure.min_patients = MAX_MIN_PATIENTS + 1;
    assert!(has(&p, "at most 1000"));
    p.disclosure.min_patients = MAX_MIN_PATIENTS;
    assert!(!has(&p, "min_patients"));

    let mut p = base.clone();
    p.disclosure.rounding = Rounding::Base;
    p.disclosure.rounding_base = MAX_MIN_PATIENTS + 1;
    assert!(has(&p, "rounding_base may be at most 1000"));

    let mut p = base.clone();
    p.disclosure.rounding = Rounding::Base;
    p.disclosure.rounding_base = 1;
    assert!(has(&p, "rounding_base"));

    let mut p = base.clone();
    p.disclosure.dominance = Some(trustql_policies::Dominance { n: 0, k: 120.0 });
    assert!(has(&p, "dominance"));

    let mut p = base.clone();
    p.query.aggregates.push("array_agg".into());
    assert!(has(&p, "array_agg"));

    let mut p = base.clone();
    p.projects[0].tables.push("sim_av_gene".into());
    assert!(has(&p, "sim_av_gene"));

    let mut p = base.clone();
    p.projects[0].expires = "31/12/2030".into();
    assert!(has(&p, "not a date"));

    let mut p = base.clone();
    p.projects[0].researchers.clear();
    assert!(has(&p, "no researchers"));

    let mut p = base.clone();
    p.projects.push(p.projects[0].clone());
    assert!(has(&p, "listed twice"));
}

#[test]
fn survival_rules_are_described_and_checked() {
    let standard = std::fs::read_to_string(example("standard.toml")).expect("example");
    let policy = Policy::from_toml(&standard).expect("standard");
    let words = policy.describe();
    assert!(
        words.contains("survival curves")
            && words.contains("band of 5")
            && words.contains("at least 30 days wide"),
        "{words}"
    );
    // A policy that does not allow curves does not talk about them.
    let strict = std::fs::read_to_string(example("strict.toml")).expect("example");
    let words = Policy::from_toml(&strict).expect("strict").describe();
    assert!(!words.contains("survival curves"), "{words}");
    let bad = standard.replace(
        "[disclosure]",
        "[disclosure.survival]\nmin_interval_days = 0\nrounding_base = 0\n\n[disclosure]",
    );
    let policy = Policy::from_toml(&bad).expect("parses");
    let found = errors(&policy);
    assert!(
        found.iter().any(|e| e.contains("min_interval_days"))
            && found
                .iter()
                .any(|e| e.contains("[disclosure.survival] rounding_base")),
        "{found:?}"
    );
}

#[test]
fn description_is_in_plain_words() {
    let text = std::fs::read_to_string(example("strict.toml")).expect("example");
    let words = Policy::from_toml(&text).expect("strict").describe();
    assert!(words.contains("at least 20 distinct patients"), "{words}");
    assert!(words.contains("nearest multiple of 10"), "{words}");
    assert!(
        words.contains("sums are exact"),
        "a controller is told what rounding does not cover: {words}"
    );
    assert!(
        words.contains("table-builder queries only"),
        "and which queries SDC answers: {words}"
    );
    assert!(
        words.contains("2 largest contributions make up more than 85% "),
        "{words}"
    );
    assert!(
        words.contains("quasi-identifiers may be grouped on"),
        "{words}"
    );
    assert!(words.contains("may not be summed or averaged"), "{words}");
    assert!(words.contains("survival-2026"), "{words}");
}

#[test]
fn approval_binds_the_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, MINIMAL).expect("write");
    let schema = schema();

    assert!(matches!(
        load_approved(&path, &schema),
        Err(PolicyError::NotApproved(_))
    ));

    let approval = approve(&path, "Jane Smith", &schema).expect("approve");
    assert_eq!(approval.approved_by, "Jane Smith");
    assert_eq!(approval.sha256, content_hash(MINIMAL.as_bytes()));
    assert!(approval_path(&path).exists());
    let loaded = load_approved(&path, &schema).expect("approved policy loads");
    assert_eq!(loaded.hash, approval.sha256);
    assert_eq!(loaded.policy.policy.version, "1");

    // Any edit after approval, even a comment, stops the node from serving it.
    std::fs::write(&path, format!("{MINIMAL}# edited\n")).expect("edit");
    assert!(matches!(
        load_approved(&path, &schema),
        Err(PolicyError::ChangedSinceApproval { .. })
    ));
}

#[test]
fn a_policy_with_errors_cannot_be_approved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, MINIMAL.replace("sim_av_tumour", "no_such_table")).expect("write");
    let err = approve(&path, "Jane Smith", &schema()).expect_err("lint errors");
    assert!(matches!(err, PolicyError::Invalid(_)), "{err}");
    assert!(!approval_path(&path).exists());
    let err = approve(&path, "  ", &schema()).expect_err("no approver");
    assert!(matches!(err, PolicyError::Invalid(_)));
}

#[test]
fn dp_settings_are_linted_and_described() {
    let text = std::fs::read_to_string(example("dp.toml")).expect("example");
    let policy = Policy::from_toml(&text).expect("dp example");
    let dp = policy
        .project("ics-population-health")
        .and_then(|p| p.dp)
        .expect("a DP project");
    assert_eq!(dp.epsilon_per_query, 0.5);
    assert_eq!(policy.dp.rows_per_patient("sim_av_tumour"), 3);
    assert_eq!(policy.dp.rows_per_patient("sim_sact_cycle"), 1);
    let described = policy.describe();
    assert!(
        described.contains("ε 0.5 per query, 20 in all"),
        "{described}"
    );
    assert!(
        described.contains("sim_av_tumour.age [0, 110]"),
        "{described}"
    );
    assert!(
        described.contains("noisy patient count passes a threshold"),
        "{described}"
    );

    let has = |p: &Policy, needle: &str| errors(p).iter().any(|e| e.contains(needle));
    let mut p = policy.clone();
    p.projects[0].dp = Some(trustql_policies::ProjectDp {
        epsilon_per_query: 2.0,
        ..dp
    });
    p.projects[0].dp.as_mut().expect("dp").epsilon_budget = 1.0;
    assert!(has(&p, "epsilon_per_query exceeds epsilon_budget"));
    let mut p = policy.clone();
    p.projects[0].dp.as_mut().expect("dp").epsilon_budget = f64::NAN;
    assert!(has(&p, "must be positive"));
    let mut p = policy.clone();
    p.projects[0].dp.as_mut().expect("dp").delta_per_query = 0.5;
    assert!(has(&p, "delta_per_query"));
    let mut p = policy.clone();
    p.dp.bounds
        .insert("sim_av_tumour.stage_best".into(), [0.0, 1.0]);
    assert!(has(&p, "only numeric columns"));
    let mut p = policy.clone();
    p.dp.bounds.insert("sim_av_tumour.age".into(), [5.0, 5.0]);
    assert!(has(&p, "lower < upper"));
    let mut p = policy.clone();
    p.dp.bounds.insert("sim_av_tumour.nope".into(), [0.0, 1.0]);
    assert!(has(&p, "not a `table.column`"));
    let mut p = policy.clone();
    p.dp.rows_per_patient.insert("sim_av_gene".into(), 2);
    assert!(has(&p, "sim_av_gene"));
    let mut p = policy;
    p.dp.rows_per_patient.insert("sim_av_tumour".into(), 0);
    assert!(has(&p, "at least 1"));
}

#[test]
fn a_minimum_epsilon_per_query_is_linted_and_described() {
    let text = std::fs::read_to_string(example("dp.toml")).expect("example");
    let policy = Policy::from_toml(&text).expect("dp example");
    assert_eq!(policy.dp.min_epsilon_per_query, 0.01, "the default");
    let described = policy.describe();
    assert!(
        described.contains("a query spends at least ε 0.01"),
        "{described}"
    );
    assert!(described.contains("at most 2000 releases"), "{described}");

    let has = |p: &Policy, needle: &str| errors(p).iter().any(|e| e.contains(needle));
    for bad in [0.0, -1.0, 1e-300, f64::NAN, f64::INFINITY] {
        let mut p = policy.clone();
        p.dp.min_epsilon_per_query = bad;
        assert!(has(&p, "min_epsilon_per_query must be"), "{bad}");
    }
    let mut p = policy.clone();
    p.dp.min_epsilon_per_query = 1.0;
    assert!(has(&p, "below [dp] min_epsilon_per_query"));
    // Set in the file.
    let text = text.replace("[dp]\n", "[dp]\nmin_epsilon_per_query = 0.1\n");
    let p = Policy::from_toml(&text).expect("with a minimum");
    assert_eq!(p.dp.min_epsilon_per_query, 0.1);
    assert!(errors(&p).is_empty(), "{:?}", errors(&p));
}

#[test]
fn the_cell_key_method_is_chosen_checked_and_explained() {
    let text = std::fs::read_to_string(example("cell-key.toml")).expect("example");
    let policy = Policy::from_toml(&text).expect("cell-key policy");
    assert_eq!(policy.disclosure.method, Method::CellKey);
    // No rounding under the method, and no warning that counts are unrounded.
    assert!(
        !policy
            .lint(&schema())
            .iter()
            .any(|f| matches!(f, Finding::Warning(m) if m.contains("not rounded")))
    );
    let described = policy.describe();
    assert!(described.contains("cell-key method"), "{described}");
    assert!(described.contains("ONS"), "{described}");
    // Every row of the count table is shown unbiased, with its variance; V at the full rows.
    let rows: Vec<&str> = described
        .lines()
        .filter(|l| l.contains(": bias +") || l.contains(": bias -"))
        .collect();
    assert_eq!(rows.len(), 4, "{described}");
    assert!(rows.iter().all(|r| r.contains("bias +0.0000")), "{rows:?}");
    assert!(
        rows[3].contains(">= 4") && rows[3].contains("variance 1.500"),
        "{rows:?}"
    );
    assert!(!described.contains("withholds the totals"), "{described}");
    // `cell-key` is accepted for `cell_key`.
    let hyphen = text.replace("\"cell_key\"", "\"cell-key\"");
    assert_eq!(
        Policy::from_toml(&hyphen)
            .expect("hyphen")
            .disclosure
            .method,
        Method::CellKey
    );
}

#[test]
fn a_cell_key_policy_that_cannot_be_served_is_an_error() {
    let with = |disclosure: &str| {
        let text = MINIMAL.replace(
            "[[project]]",
            &format!("[disclosure]\nmethod = \"cell_key\"\n{disclosure}\n\n[[project]]"),
        );
        errors(&Policy::from_toml(&text).expect("policy"))
    };
    assert!(with("").is_empty(), "{:?}", with(""));
    assert!(
        with("rounding = \"base\"")
            .iter()
            .any(|e| e.contains("rounding on top"))
    );
    for table in [
        "counts = { max_adjustment = 0, variance = 1.0 }",
        "counts = { max_adjustment = 21, variance = 1.0 }",
        "counts = { max_adjustment = 2, variance = 4.0 }",
        "magnitudes = { max_adjustment = 3, variance = 1.5, scale = 0.0 }",
        "magnitudes = { max_adjustment = 3, variance = 1.5, scale = 2.0 }",
    ] {
        let errors = with(&format!("[disclosure.cell_key]\n{table}"));
        assert!(
            errors.iter().any(|e| e.contains("[disclosure.cell_key]")),
            "{table}: {errors:?}"
        );
    }
    // An unknown method is a parse error, not a silent default.
    let unknown = MINIMAL.replace(
        "[[project]]",
        "[disclosure]\nmethod = \"noise\"\n\n[[project]]",
    );
    assert!(Policy::from_toml(&unknown).is_err());
}

#[test]
fn pools_need_three_distinct_members_this_trust_among_them_and_no_dp_yet() {
    let pooled =
        |pool: &str| Policy::from_toml(&format!("{MINIMAL}pool = {pool}\n")).expect("parses");
    assert!(errors(&pooled(r#"{ members = ["TQ01", "TQ02", "TQ03"] }"#)).is_empty());
    let cases = [
        (r#"{ members = ["TQ01", "TQ02"] }"#, "at least 3"),
        (r#"{ members = ["TQ01", "TQ02", "TQ02"] }"#, "listed twice"),
        (
            r#"{ members = ["TQ02", "TQ03", "TQ04"] }"#,
            "must be one of the members",
        ),
        (
            r#"{ members = ["TQ01", "TQ02", "TQ03"], min_members = 2 }"#,
            "min_members must be at least 3",
        ),
        (
            r#"{ members = ["TQ01", "TQ02", "TQ03"], min_members = 4 }"#,
            "needs at least 4",
        ),
    ];
    for (pool, expected) in cases {
        let errors = errors(&pooled(pool));
        assert!(
            errors
                .iter()
                .any(|e| e.contains(expected) && e.contains("pool")),
            "{pool}: {errors:?}"
        );
    }
    let dp = Policy::from_toml(&format!(
        "{MINIMAL}pool = {{ members = [\"TQ01\", \"TQ02\", \"TQ03\"] }}\n\
         dp = {{ epsilon_budget = 1.0, epsilon_per_query = 0.1 }}\n"
    ))
    .expect("parses");
    assert!(
        errors(&dp).iter().any(|e| e.contains("noise shares")),
        "{:?}",
        errors(&dp)
    );
}
