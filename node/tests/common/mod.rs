//! Shared set-up for node tests: a synthetic trust, approved policies.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use trustql_policies::{ApprovedPolicy, approve, load_approved};
use trustql_schemas::TrustSchema;
use trustql_synth::{SynthConfig, generate};

pub const ALL_TABLES: &str = r#"["sim_av_patient", "sim_av_tumour", "sim_sact_regimen", "sim_sact_cycle", "sim_sact_drug_detail", "sim_sact_outcome", "sim_rtds_episode", "sim_rtds_prescription"]"#;

pub fn schema() -> TrustSchema {
    TrustSchema::cancer().expect("schema")
}

/// Generates one trust (TQ01) with `patients` patients; returns the federation directory.
pub fn synth(dir: &Path, patients: u64) -> PathBuf {
    let out = dir.join("fed");
    let config = SynthConfig {
        trusts: 1,
        patients,
        seed: 11,
        shared_share: 0.0,
        ..SynthConfig::default()
    };
    generate(&schema(), &config, &out).expect("generate");
    out
}

/// Writes, approves and loads a policy for TQ01 with the given [disclosure] body.
pub fn policy(dir: &Path, disclosure: &str) -> (PathBuf, ApprovedPolicy) {
    let path = dir.join("policy.toml");
    let text = format!(
        "[policy]\nversion = \"test\"\ntrust = \"TQ01\"\n\n[disclosure]\n{disclosure}\n\n\
         [[project]]\nid = \"p1\"\nresearchers = [\"alice\"]\ntables = {ALL_TABLES}\nexpires = \"2099-12-31\"\n"
    );
    std::fs::write(&path, text).expect("write policy");
    approve(&path, "Test Controller", &schema()).expect("approve");
    let loaded = load_approved(&path, &schema()).expect("load");
    (path, loaded)
}

/// No protection: every group, exact counts (for correctness checks only).
pub const UNPROTECTED: &str =
    "min_patients = 1\nrounding = \"none\"\nwithhold_whole_margin_cells = false";
