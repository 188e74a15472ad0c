//! `trustql demo` and `trustql query` as a user runs them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{text, trustql};

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
    assert!(out.contains("withheld ("), "some cells are withheld: {out}");
    assert!(out.contains("Refused: refused (aggregate-only)"), "{out}");
    assert!(
        !out.contains("UNPROTECTED") && !out.contains("WARNING"),
        "{out}"
    );

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

fn wait_for(path: &Path) -> serde_json::Value {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(value) = serde_json::from_str(&text)
        {
            return value;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the demo never wrote {}", path.display());
}

#[test]
fn a_served_demo_answers_trustql_query_in_every_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let info_path = dir.path().join("info.json");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_trustql"))
        .args([
            "demo",
            "--trusts",
            "2",
            "--patients",
            "2000",
            "--serve",
            "--info",
        ])
        .arg(&info_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let info = wait_for(&info_path);
    for key in ["url", "token", "project", "ca", "data_dir", "trusts"] {
        assert!(info.get(key).is_some(), "info has {key}: {info}");
    }
    let (url, token, ca) = (
        info["url"].as_str().expect("url"),
        info["token"].as_str().expect("token"),
        info["ca"].as_str().expect("ca"),
    );
    // Drain the demo's output so it never blocks on a full pipe.
    let stdout = demo.stdout.take().expect("stdout");
    std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});

    let sql = "SELECT gender, COUNT(*) AS n FROM sim_av_patient GROUP BY gender ORDER BY gender";
    let json = trustql(&[
        "query",
        "--coordinator",
        url,
        "--ca",
        ca,
        "--token",
        token,
        "--format",
        "json",
        sql,
    ]);
    assert!(json.status.success(), "{}", text(&json));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON output");
    let rows = value["rows"].as_array().expect("rows");
    assert!(!rows.is_empty() && rows[0].get("n").is_some(), "{value}");
    assert_eq!(value["coverage"]["complete"], true, "{value}");

    let csv = trustql(&[
        "query",
        "--coordinator",
        url,
        "--ca",
        ca,
        "--token",
        token,
        "--project",
        "demo",
        "--format",
        "csv",
        sql,
    ]);
    assert!(csv.status.success(), "{}", text(&csv));
    let csv_text = String::from_utf8_lossy(&csv.stdout);
    assert!(csv_text.starts_with("gender,n"), "{csv_text}");
    assert!(
        String::from_utf8_lossy(&csv.stderr).contains("Coverage"),
        "coverage goes to stderr"
    );

    let table = trustql(&[
        "query",
        "--coordinator",
        url,
        "--ca",
        ca,
        "--token",
        token,
        sql,
    ]);
    assert!(
        text(&table).contains("| gender |") && text(&table).contains("Coverage: 2 of 2"),
        "{}",
        text(&table)
    );

    let refused = trustql(&[
        "query",
        "--coordinator",
        url,
        "--ca",
        ca,
        "--token",
        token,
        "SELECT linknumber FROM sim_av_patient",
    ]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("refused"), "{}", text(&refused));

    let bad_token = trustql(&[
        "query",
        "--coordinator",
        url,
        "--ca",
        ca,
        "--token",
        "nope",
        sql,
    ]);
    assert!(!bad_token.status.success());
    assert!(text(&bad_token).contains("token"), "{}", text(&bad_token));

    demo.kill().expect("stop the demo");
    let _ = demo.wait();
}

#[test]
fn a_served_dp_demo_previews_spends_and_prints_the_noise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let info_path = dir.path().join("info.json");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_trustql"))
        .args([
            "demo",
            "--trusts",
            "2",
            "--patients",
            "2000",
            "--dp",
            "--epsilon-per-query",
            "0.5",
            "--epsilon-budget",
            "4",
            "--serve",
            "--info",
        ])
        .arg(&info_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let info = wait_for(&info_path);
    assert_eq!(info["epsilon_per_query"], 0.5, "{info}");
    assert_eq!(info["epsilon_budget"], 4.0, "{info}");
    let (url, token, ca) = (
        info["url"].as_str().expect("url"),
        info["token"].as_str().expect("token"),
        info["ca"].as_str().expect("ca"),
    );
    // Wait until the showcase has finished spending, so the budget left is known.
    let stdout = demo.stdout.take().expect("stdout");
    let (serving, showcase_done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("Serving.") {
                let _ = serving.send(());
            }
        }
    });
    showcase_done
        .recv_timeout(Duration::from_secs(300))
        .expect("the showcase finished");
    let sql = "SELECT gender, COUNT(*) AS n FROM sim_av_patient GROUP BY gender ORDER BY gender";
    let query = |extra: &[&str]| {
        let mut args = vec!["query", "--coordinator", url, "--ca", ca, "--token", token];
        args.extend_from_slice(extra);
        args.push(sql);
        trustql(&args)
    };

    let preview = query(&["--preview"]);
    assert!(preview.status.success(), "{}", text(&preview));
    assert!(
        text(&preview).contains("would spend ε 0.5"),
        "{}",
        text(&preview)
    );
    assert!(text(&preview).contains("Noise: n ±"), "{}", text(&preview));

    let spent = query(&["--epsilon", "0.25"]);
    let out = text(&spent);
    assert!(spent.status.success(), "{out}");
    assert!(
        out.contains("| n ±95% |"),
        "the noise is printed next to the values: {out}"
    );
    assert!(out.contains("spent ε 0.25"), "{out}");
    // The showcase spent 4 × 0.5 of 4 (its fifth query is a repeat), then 0.25 here.
    assert!(out.contains("ε 1.7500 left"), "{out}");

    demo.kill().expect("stop the demo");
    let _ = demo.wait();
}
