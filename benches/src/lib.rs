//! TrustQL's benchmarks live in `benches/`; run them with `cargo bench -p trustql-benches`.
//! This library holds what the comparison harnesses (`src/bin/`) share.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use trustql_node::{Limits, RecordKeySecret, SiteEngine};
use trustql_policies::{approve, load_approved};
use trustql_protocol::SiteRequest;
use trustql_schemas::{TrustSchema, table_path};

/// One DataFusion session over the union of every trust's Parquet: the central warehouse a
/// federation is compared with.
pub async fn union(schema: &TrustSchema, data: &Path, trusts: &[String]) -> Result<SessionContext> {
    let ctx = SessionContext::new();
    for table in schema.tables() {
        let paths: Vec<String> = trusts
            .iter()
            .map(|t| {
                table_path(&data.join(t), &table.name)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let frame = ctx
            .read_parquet(paths, ParquetReadOptions::default())
            .await?;
        ctx.register_table(table.name.as_str(), frame.into_view())?;
    }
    Ok(ctx)
}

/// Generates one trust, TQ01, of `patients` patients into `dir` (seed 7, no shared patients).
pub fn one_trust(schema: &TrustSchema, patients: u64, dir: &Path) -> Result<()> {
    let config = trustql_synth::SynthConfig {
        trusts: 1,
        patients,
        seed: 7,
        shared_share: 0.0,
        overwrite: true,
        ..trustql_synth::SynthConfig::default()
    };
    trustql_synth::generate(schema, &config, dir)?;
    Ok(())
}

/// The disclosure body of [`open_node`]'s policy: suppression under 10 patients and rounding
/// to 5.
pub const ROUNDING_TO_5: &str = "min_patients = 10\nrounding = \"base\"\nrounding_base = 5";

/// A disclosure body for the cell-key method, with the same minimum of 10 patients and the
/// built-in perturbation tables.
pub const CELL_KEY: &str = "method = \"cell_key\"\nmin_patients = 10\nrounding = \"none\"";

/// A node over `dir/<trust>` with its default limits (a ten-minute timeout), under a policy
/// written to `dir/policy-<trust>.toml` that lets researcher `r` of project `p` read the
/// panel's tables, with suppression and rounding to 5 ([`ROUNDING_TO_5`]).
pub async fn open_node(schema: &TrustSchema, dir: &Path, trust: &str) -> Result<SiteEngine> {
    open_node_with(schema, dir, trust, ROUNDING_TO_5).await
}

/// [`open_node`] under the policy's `[disclosure]` body `disclosure` (such as [`CELL_KEY`]),
/// record keys computed.
pub async fn open_node_with(
    schema: &TrustSchema,
    dir: &Path,
    trust: &str,
    disclosure: &str,
) -> Result<SiteEngine> {
    open_node_without_keys(schema, dir, trust, disclosure)
        .await?
        .with_record_keys(&RecordKeySecret::ephemeral()?)
        .await
        .context("computing the record keys")
}

/// [`open_node_with`] before the record keys are computed, so their one-off cost can be timed
/// on its own; call `SiteEngine::with_record_keys` before answering. The policy file is
/// rewritten by each call, and read only here: nodes opened one after another on the same
/// `dir` keep their own policies.
pub async fn open_node_without_keys(
    schema: &TrustSchema,
    dir: &Path,
    trust: &str,
    disclosure: &str,
) -> Result<SiteEngine> {
    let policy_path = dir.join(format!("policy-{trust}.toml"));
    std::fs::write(
        &policy_path,
        format!(
            "[policy]\nversion = \"bench\"\ntrust = \"{trust}\"\n\n[disclosure]\n{disclosure}\n\n\
         [query]\nmax_groups = 20000\n\n\
         [[project]]\nid = \"p\"\nresearchers = [\"r\"]\ntables = [\"sim_av_patient\", \
         \"sim_av_tumour\", \"sim_sact_regimen\", \"sim_rtds_prescription\"]\n\
         expires = \"2099-12-31\"\n"
        ),
    )?;
    approve(&policy_path, "Benchmark", schema)?;
    let policy = load_approved(&policy_path, schema)?;
    let limits = Limits {
        query_timeout_ms: 600_000,
        ..Limits::default()
    };
    SiteEngine::open(trust, schema.clone(), policy, &dir.join(trust), &limits)
        .await
        .context("opening the node")
}

/// Researcher `r`'s request in project `p` (see [`open_node`]).
pub fn panel_request(name: &str, sql: &str) -> SiteRequest {
    SiteRequest {
        request_id: name.into(),
        researcher: "r".into(),
        project: "p".into(),
        sql: sql.into(),
        ..Default::default()
    }
}

/// The demo researcher's client of a launched federation.
pub async fn researcher(federation: &trustql_demo::Federation) -> Result<trustql_client::Client> {
    let info = &federation.info;
    let ca = std::fs::read(&info.ca)?;
    Ok(trustql_client::Client::connect(&info.url, Some(&ca), &info.token, None).await?)
}

/// A Python with `packages`: the given one, or target/py-venv made and filled on first use.
pub fn python_with(packages: &[&str], given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv");
    let python = venv.join("bin/python");
    if !python.exists()
        && !Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?
            .success()
    {
        bail!(
            "could not create a Python virtual environment in {}",
            venv.display()
        );
    }
    if !Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(packages)
        .status()?
        .success()
    {
        bail!("could not install {} (pip install {0})", packages.join(" "));
    }
    Ok(python)
}

/// Runs `compare/<script>` with `args`; its stdout is one JSON value.
pub fn run_python(
    python: &Path,
    script: &str,
    args: &[&Path],
    extra: &[String],
) -> Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("compare")
        .join(script);
    let output = Command::new(python)
        .arg(&script)
        .args(args)
        .args(extra)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// The median of some timings.
pub fn median(times: &mut [Duration]) -> Duration {
    percentile(times, 0.5)
}

/// A percentile (0..=1) of some timings.
pub fn percentile(times: &mut [Duration], p: f64) -> Duration {
    times.sort();
    let index = ((times.len().max(1) as f64 - 1.0) * p).round() as usize;
    times.get(index).copied().unwrap_or_default()
}

/// Milliseconds, for reports.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The comparison panel: (name, SQL), representative cancer-registry questions.
pub const CANCER_PANEL: &[(&str, &str)] = &[
    (
        "incidence_site_stage",
        "SELECT site_icd10_o2_3char, stage_best, COUNT(*) FROM sim_av_tumour GROUP BY site_icd10_o2_3char, stage_best",
    ),
    (
        "incidence_by_year",
        "SELECT date_part('year', diagnosisdatebest) AS y, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    ),
    (
        "survival_status_by_site",
        "SELECT t.site_icd10_o2_3char, p.vitalstatus, COUNT(*) FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid GROUP BY 1, 2",
    ),
    (
        "mean_age_by_site",
        "SELECT site_icd10_o2_3char, COUNT(*), AVG(age), STDDEV(age) FROM sim_av_tumour GROUP BY site_icd10_o2_3char",
    ),
    (
        "age_bands",
        "SELECT CASE WHEN age < 50 THEN 'under 50' WHEN age < 70 THEN '50-69' ELSE '70+' END AS band, gender, COUNT(*) FROM sim_av_tumour GROUP BY 1, 2",
    ),
    (
        "regimens_by_intent",
        "SELECT intent_of_treatment, COUNT(*), COUNT(DISTINCT encore_patient_id) FROM sim_sact_regimen GROUP BY intent_of_treatment",
    ),
    (
        "regimens_by_benchmark",
        "SELECT benchmark_group, AVG(weight_at_start_of_regimen) FROM sim_sact_regimen GROUP BY benchmark_group",
    ),
    (
        "patient_tumour_regimen",
        "SELECT t.site_icd10_o2_3char, r.intent_of_treatment, COUNT(*) FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid JOIN sim_sact_regimen r ON r.encore_patient_id = p.patientid GROUP BY 1, 2",
    ),
    (
        "radiotherapy_by_region",
        "SELECT treatmentregion, COUNT(*), AVG(rtactualdose) FROM sim_rtds_prescription GROUP BY treatmentregion",
    ),
    (
        "ethnicity_breast",
        "SELECT p.ethnicity, COUNT(*) FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid WHERE t.site_icd10_o2_3char = 'C50' GROUP BY p.ethnicity",
    ),
];
