//! A real Python researcher (pyarrow + adbc-driver-flightsql) against `trustql demo --serve`,
//! and the federated Kaplan–Meier curve checked against `lifelines`.
//!
//! The interpreter is `$TRUSTQL_PYTHON` (`.ci/run` prepares one); without it the test makes
//! its own virtual environment and installs the packages there.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::serve_demo;

/// The interpreter, prepared once: the tests run side by side, and two of them making the
/// same virtual environment at once break it.
fn python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(prepare_python).clone()
}

fn prepare_python() -> PathBuf {
    if let Some(p) = std::env::var_os("TRUSTQL_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("py-client-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for the Python client test");
        assert!(made.success(), "could not create a virtual environment");
    }
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "pyarrow",
            "adbc-driver-flightsql",
            "adbc-driver-manager",
            "lifelines",
            "pandas",
            "matplotlib",
        ])
        .status()
        .expect("run pip");
    assert!(
        installed.success(),
        "could not install pyarrow, adbc-driver-flightsql and lifelines"
    );
    python
}

/// Runs `script` (relative to this crate) with `args`; its output, after checking it succeeded.
fn run_script(python: &Path, script: &str, args: &[&Path]) -> String {
    let output = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .args(args)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn federated_kaplan_meier_equals_lifelines_on_the_trusts_rows() {
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = serve_demo(
        dir.path(),
        &["--trusts", "3", "--patients", "6000", "--unprotected"],
    );
    let out = run_script(
        &python,
        "tests/python/survival_lifelines.py",
        &[&demo.info_path],
    );
    drop(demo);
    assert!(out.contains("survival ok"), "{out}");
    assert!(out.contains("logrank ok"), "{out}");
}

#[test]
fn the_kaplan_meier_plot_example_draws_a_federated_curve() {
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = serve_demo(dir.path(), &["--trusts", "2", "--patients", "4000"]);
    let png = dir.path().join("km.png");
    let out = run_script(
        &python,
        "../client/examples/km_plot.py",
        &[&demo.info_path, &png],
    );
    drop(demo);
    assert!(out.contains("4 stages"), "{out}");
    let bytes = std::fs::read(&png).expect("the plot");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "not a plot"
    );
}

#[test]
fn a_python_adbc_client_browses_and_queries_over_tls_with_a_token() {
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    // The script checks that counts are rounded to 5.
    let demo = serve_demo(
        dir.path(),
        &["--trusts", "2", "--patients", "3000", "--rounding"],
    );
    let out = run_script(
        &python,
        "tests/python/flight_sql_client.py",
        &[&demo.info_path],
    );
    drop(demo);
    assert!(out.contains("python client ok"), "{out}");
}
