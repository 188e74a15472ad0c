//! `trustql demo` and `trustql query` as a user runs them.

use std::time::{Duration, Instant};

mod common;
use common::{serve_demo, text, trustql};

#[test]
fn the_demo_runs_its_showcase_with_coverage() {
    let output = trustql(&["demo", "--trusts", "2", "--patients", "3000"]);
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    assert!(out.contains("Incidence by tumour site and stage"), "{out}");
    assert!(
        out.matches("Coverage: 2 of 2 trusts answered").count() >= 4,
        "{out}"
    );
    assert!(
        out.contains("how many groups a trust withheld is not reported"),
        "the demo says small cells are withheld, and not how many: {out}"
    );
    assert!(
        out.contains("Not answered: refused (aggregate-only)"),
        "{out}"
    );
    assert!(!out.to_lowercase().contains("refused: refused"), "{out}");
    // The survival table: every stage released, and how its curves were protected.
    assert!(
        out.contains("| stage | patients | one_year | five_years |"),
        "{out}"
    );
    for stage in ["| 1     |", "| 2     |", "| 3     |", "| 4     |"] {
        assert!(out.contains(stage), "stage row {stage} missing: {out}");
    }
    assert!(
        out.contains("survival curves: each trust withholds"),
        "{out}"
    );
    // Medians by site, and how close they are.
    assert!(out.contains("| median_age"), "{out}");
    assert!(
        out.contains("percentiles of age are read from a histogram"),
        "{out}"
    );
    assert!(
        !out.contains("UNPROTECTED") && !out.contains("WARNING"),
        "{out}"
    );
    // The default protection is the cell-key method, said at the start and beside answers.
    assert!(out.contains("Cell-key method: each trust"), "{out}");
    assert!(
        out.contains("perturb their counts and sums by the cell-key method"),
        "{out}"
    );
    assert!(!out.contains("rounded to the nearest"), "{out}");

    let rounded = trustql(&["demo", "--trusts", "2", "--patients", "1000", "--rounding"]);
    let out = text(&rounded);
    assert!(rounded.status.success(), "{out}");
    assert!(
        out.contains("Suppression and rounding: each trust"),
        "{out}"
    );
    assert!(out.contains("rounded to the nearest 5"), "{out}");
    assert!(!out.contains("cell-key method"), "{out}");

    let loud = trustql(&[
        "demo",
        "--trusts",
        "2",
        "--patients",
        "1000",
        "--unprotected",
    ]);
    assert!(loud.status.success(), "{}", text(&loud));
    assert!(
        text(&loud).contains("NOT disclosure-controlled"),
        "{}",
        text(&loud)
    );
}

#[test]
fn a_served_demo_answers_trustql_query_in_every_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = serve_demo(dir.path(), &["--trusts", "2", "--patients", "2000"]);
    let info = &demo.info;
    for key in ["url", "token", "project", "ca", "data_dir", "trusts"] {
        assert!(info.get(key).is_some(), "info has {key}: {info}");
    }

    let sql = "SELECT gender, COUNT(*) AS n FROM sim_av_patient GROUP BY gender ORDER BY gender";
    let json = demo.query(&["--format", "json", sql]);
    assert!(json.status.success(), "{}", text(&json));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON output");
    let rows = value["rows"].as_array().expect("rows");
    assert!(!rows.is_empty() && rows[0].get("n").is_some(), "{value}");
    assert_eq!(value["coverage"]["complete"], true, "{value}");

    let csv = demo.query(&["--project", "demo", "--format", "csv", sql]);
    assert!(csv.status.success(), "{}", text(&csv));
    let csv_text = String::from_utf8_lossy(&csv.stdout);
    assert!(csv_text.starts_with("gender,n"), "{csv_text}");
    assert!(
        String::from_utf8_lossy(&csv.stderr).contains("Coverage"),
        "coverage goes to stderr"
    );

    let table = demo.query(&[sql]);
    assert!(
        text(&table).contains("| gender |") && text(&table).contains("Coverage: 2 of 2"),
        "{}",
        text(&table)
    );

    // An empty result shows its columns.
    let empty = demo.query(&[
        "SELECT gender, COUNT(*) AS n FROM sim_av_patient WHERE gender = 'zz' GROUP BY gender",
    ]);
    assert!(empty.status.success(), "{}", text(&empty));
    assert!(text(&empty).contains("| gender | n |"), "{}", text(&empty));
    // A mean reads to six significant digits in the table, and keeps every digit in JSON.
    let mean = "SELECT AVG(age) AS mean_age FROM sim_av_tumour";
    let table = text(&demo.query(&[mean]));
    let cell = table
        .lines()
        .nth(3)
        .and_then(|l| l.trim_matches(|c| c == '|' || c == ' ').parse::<f64>().ok())
        .unwrap_or_else(|| panic!("one mean: {table}"));
    let json: serde_json::Value =
        serde_json::from_slice(&demo.query(&["--format", "json", mean]).stdout).expect("JSON");
    let exact = json["rows"][0]["mean_age"].as_f64().expect("mean in JSON");
    assert!(
        exact.fract() != 0.0 && (cell - exact).abs() < 1e-3,
        "{table} vs {exact}"
    );
    let digits = table
        .lines()
        .nth(3)
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .count();
    assert!(digits <= 6, "{table}");

    let refused = demo.query(&["SELECT linknumber FROM sim_av_patient"]);
    assert!(!refused.status.success());
    let said = text(&refused);
    assert!(said.contains("not answered: refused ("), "{said}");
    assert!(!said.contains("refused: refused"), "one word, once: {said}");

    let bad_token = demo.query_as("nope", &[sql]);
    assert!(!bad_token.status.success());
    assert!(text(&bad_token).contains("token"), "{}", text(&bad_token));
}

#[test]
fn a_served_dp_demo_previews_spends_and_prints_the_noise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = serve_demo(
        dir.path(),
        &[
            "--trusts",
            "2",
            "--patients",
            "2000",
            "--dp",
            "--epsilon-per-query",
            "0.5",
            "--epsilon-budget",
            "4",
        ],
    );
    let info = &demo.info;
    assert_eq!(info["epsilon_per_query"], 0.5, "{info}");
    assert_eq!(info["epsilon_budget"], 4.0, "{info}");
    // Wait until the showcase has finished spending, so the budget left is known.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !demo
        .lines
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .expect("the showcase finished")
        .starts_with("Serving.")
    {}
    let sql = "SELECT gender, COUNT(*) AS n FROM sim_av_patient GROUP BY gender ORDER BY gender";
    let preview = demo.query(&["--preview", sql]);
    assert!(preview.status.success(), "{}", text(&preview));
    assert!(
        text(&preview).contains("would spend ε 0.5"),
        "{}",
        text(&preview)
    );
    assert!(text(&preview).contains("Noise: n ±"), "{}", text(&preview));

    let spent = demo.query(&["--epsilon", "0.25", sql]);
    let out = text(&spent);
    assert!(spent.status.success(), "{out}");
    assert!(
        out.contains("| n ±95% |"),
        "the noise is printed next to the values: {out}"
    );
    assert!(out.contains("spent ε 0.25"), "{out}");
    // The showcase spent 4 × 0.5 of 4 (its fifth query is a repeat), then 0.25 here.
    assert!(out.contains("ε 1.7500 left"), "{out}");
}
