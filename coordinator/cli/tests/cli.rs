//! The `trustql` binary's data commands, run as a user would run them.

use std::path::Path;
use std::process::Output;

mod common;
use common::{text, trustql};

fn synth(out: &Path) -> Output {
    trustql(&[
        "synth",
        "--trusts",
        "2",
        "--patients",
        "2000",
        "--seed",
        "5",
        "--out",
        out.to_str().expect("utf-8 path"),
    ])
}

#[test]
fn synth_then_schema_check_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("fed");
    let made = synth(&out);
    assert!(made.status.success(), "{}", text(&made));
    assert!(text(&made).contains("2000 patients over 2 trusts"));
    assert!(out.join("TQ02/sim_sact_drug_detail.parquet").exists());

    // The federation directory checks every trust; a trust directory checks one site.
    let checked = trustql(&["schema", "check", out.to_str().expect("path")]);
    assert!(checked.status.success(), "{}", text(&checked));
    assert_eq!(text(&checked).matches("OK: every table").count(), 2);
    assert_eq!(
        text(&checked)
            .matches("patient order: every table with a patient column")
            .count(),
        2
    );
    let one = trustql(&["schema", "check", out.join("TQ01").to_str().expect("path")]);
    assert!(one.status.success(), "{}", text(&one));
    assert_eq!(text(&one).matches("OK: every table").count(), 1);
}

#[test]
fn schema_check_fails_on_a_broken_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("fed");
    assert!(synth(&out).status.success());
    std::fs::write(out.join("TQ01/sim_av_tumour.parquet"), "not parquet").expect("write");
    let checked = trustql(&["schema", "check", out.join("TQ01").to_str().expect("path")]);
    assert!(!checked.status.success());
    let output = text(&checked);
    assert!(output.contains("not a readable Parquet file"), "{output}");
    assert!(output.contains("FAILED"), "{output}");
    assert!(!output.contains("panicked"), "{output}");
}

#[test]
fn synth_refuses_to_overwrite_and_bad_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("fed");
    assert!(synth(&out).status.success());
    let again = synth(&out);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("already holds files"),
        "{}",
        text(&again)
    );

    let zero = trustql(&[
        "synth",
        "--trusts",
        "0",
        "--out",
        out.to_str().expect("path"),
    ]);
    assert!(!zero.status.success());
    assert!(
        text(&zero).contains("--trusts must be between 1 and 99"),
        "{}",
        text(&zero)
    );
}

const PATIENT_HEADER: &str = "PATIENTID,GENDER,ETHNICITY,DEATHCAUSECODE_1A,DEATHCAUSECODE_1B,\
DEATHCAUSECODE_1C,DEATHCAUSECODE_2,DEATHCAUSECODE_UNDERLYING,DEATHLOCATIONCODE,VITALSTATUS,\
VITALSTATUSDATE,LINKNUMBER\n";
const PATIENT_1: &str = "10000001,1,A,,,,,,,A,2022-07-05,900000001\n";
const PATIENT_2: &str = "10000002,2,Z,,,,,,,A,2022-07-05,900000002\n";

/// Imports a patient CSV of these rows into `trusts` trusts under `dir/out`.
fn import_patients(dir: &Path, rows: &[&str], trusts: &str) -> (Output, std::path::PathBuf) {
    let csv = dir.join("csv");
    std::fs::create_dir(&csv).expect("mkdir");
    std::fs::write(
        csv.join("sim_av_patient.csv"),
        format!("{PATIENT_HEADER}{}", rows.concat()),
    )
    .expect("csv");
    let out = dir.join("out");
    let imported = trustql(&[
        "import",
        "simulacrum",
        "--csv",
        csv.to_str().expect("path"),
        "--trusts",
        trusts,
        "--out",
        out.to_str().expect("path"),
    ]);
    (imported, out)
}

#[test]
fn import_simulacrum_writes_the_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (imported, out) = import_patients(dir.path(), &[PATIENT_1, PATIENT_2], "2");
    assert!(imported.status.success(), "{}", text(&imported));
    assert!(text(&imported).contains("no CSV for sim_av_tumour"));
    let checked = trustql(&["schema", "check", out.to_str().expect("path")]);
    assert!(checked.status.success(), "{}", text(&checked));
}

#[test]
fn schema_check_names_tables_out_of_patient_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Imported rows keep the CSV's order: here, descending.
    let (imported, out) = import_patients(dir.path(), &[PATIENT_2, PATIENT_1], "1");
    assert!(imported.status.success(), "{}", text(&imported));
    let checked = trustql(&["schema", "check", out.to_str().expect("path")]);
    // Out of order is slower, not wrong.
    assert!(checked.status.success(), "{}", text(&checked));
    let output = text(&checked);
    assert!(
        output.contains("patient order: sim_av_patient not in patient order"),
        "{output}"
    );
}

#[test]
fn policy_check_and_approve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../policies/examples/standard.toml"
    );
    std::fs::copy(example, &policy).expect("copy example");
    let path = policy.to_str().expect("path");

    let checked = trustql(&["policy", "check", path]);
    assert!(checked.status.success(), "{}", text(&checked));
    let out = text(&checked);
    assert!(out.contains("at least 10 distinct patients"), "{out}");
    assert!(
        out.contains("query allowance: 200 queries a day (UTC), 5000 in all"),
        "{out}"
    );
    assert!(out.contains("Not servable yet"), "{out}");

    let approved = trustql(&["policy", "approve", path, "--by", "Jane Smith"]);
    assert!(approved.status.success(), "{}", text(&approved));
    let checked = trustql(&["policy", "check", path]);
    assert!(
        text(&checked).contains("Approved by Jane Smith"),
        "{}",
        text(&checked)
    );

    std::fs::write(
        &policy,
        "[policy]\nversion = \"x\"\ntrust = \"TQ01\"\nbogus = 1\n",
    )
    .expect("w");
    let broken = trustql(&["policy", "check", path]);
    assert!(!broken.status.success());
    assert!(
        text(&broken).contains("policy file is not valid"),
        "{}",
        text(&broken)
    );
}

#[test]
fn audit_verify_names_a_truncated_log_and_takes_a_key() {
    use trustql_audit::{AuditEntry, AuditLog, KEY_FILE, LOG_FILE};
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit");
    let log = AuditLog::open(&audit, "2026-12-01T00:00:00Z").expect("open");
    for n in 0..3 {
        log.append(AuditEntry::node_note("t", format!("note {n}"), ""))
            .expect("append");
    }
    drop(log);
    let path = audit.to_str().expect("path");
    let intact = trustql(&["audit", "verify", path]);
    assert!(intact.status.success(), "{}", text(&intact));
    assert!(text(&intact).contains("3 record(s)"), "{}", text(&intact));

    // The key named explicitly; a key of another log fails.
    let key = audit.join(KEY_FILE);
    let keyed = trustql(&["audit", "verify", path, "--key", key.to_str().expect("key")]);
    assert!(keyed.status.success(), "{}", text(&keyed));
    let other = dir.path().join("other");
    drop(AuditLog::open(&other, "t").expect("open"));
    let other_key = other.join(KEY_FILE);
    let wrong = trustql(&[
        "audit",
        "verify",
        path,
        "--key",
        other_key.to_str().expect("key"),
    ]);
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("BROKEN"), "{}", text(&wrong));

    // The last record removed: the chain alone still holds, the head does not.
    let log_file = audit.join(LOG_FILE);
    let all = std::fs::read_to_string(&log_file).expect("log");
    let kept: String = all.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&log_file, kept).expect("truncate");
    let truncated = trustql(&["audit", "verify", path]);
    assert!(!truncated.status.success());
    assert!(
        text(&truncated).contains("removed from the end"),
        "{}",
        text(&truncated)
    );
}
