//! Differential privacy side by side: the same DP query panel through TrustQL (every node adds
//! OpenDP noise and charges its ledger; end to end over TLS) and through SmartNoise SQL over
//! the union of the trusts' Parquet, at the same ε, with the same rows-per-patient and
//! clamping bounds. Reports per query the median times and their ratio, and each engine's mean
//! absolute error against the exact answer over the union.
//!
//! `cargo run --release -p trustql-benches --bin dp-compare -- [--patients N] [--epsilon E]`
//!
//! SmartNoise SQL reads one table and trusts its analyst; the panel is therefore single-table.
//! Its time is for queries over a pandas frame already in memory, TrustQL's from Parquet at
//! each node through the coordinator.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use trustql_benches::{median, ms, python_with, researcher, run_python, union};
use trustql_demo::{DP_BOUNDS, DP_ROWS_PER_PATIENT, DemoDp, DemoOptions, launch};
use trustql_schemas::TrustSchema;

/// Command-line options.
#[derive(Parser)]
struct Args {
    /// Patients across the federation.
    #[arg(long, default_value_t = 200_000)]
    patients: u64,
    /// Trusts in the federation.
    #[arg(long, default_value_t = 3)]
    trusts: usize,
    /// ε per query (at each trust for TrustQL; over the union for SmartNoise).
    #[arg(long, default_value_t = 1.0)]
    epsilon: f64,
    /// δ for SmartNoise's and TrustQL's thresholds.
    #[arg(long, default_value_t = 1e-8)]
    delta: f64,
    /// Runs of each query per engine.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Python with smartnoise-sql installed (default: make target/py-venv and install it).
    #[arg(long)]
    python: Option<PathBuf>,
}

/// The panel: (name, table, SQL); every query has a count named `n`.
const PANEL: &[(&str, &str, &str)] = &[
    (
        "tumours_by_stage",
        "sim_av_tumour",
        "SELECT stage_best, COUNT(*) AS n FROM sim_av_tumour GROUP BY stage_best",
    ),
    (
        "patients_by_gender",
        "sim_av_patient",
        "SELECT gender, COUNT(*) AS n FROM sim_av_patient GROUP BY gender",
    ),
    (
        "regimens_by_intent",
        "sim_sact_regimen",
        "SELECT intent_of_treatment, COUNT(*) AS n FROM sim_sact_regimen GROUP BY intent_of_treatment",
    ),
    (
        "mean_age_by_stage",
        "sim_av_tumour",
        "SELECT stage_best, COUNT(*) AS n, AVG(age) AS mean_age FROM sim_av_tumour GROUP BY stage_best",
    ),
    (
        "all_tumours",
        "sim_av_tumour",
        "SELECT COUNT(*) AS n FROM sim_av_tumour",
    ),
];

/// Each table's patient column and the columns the panel reads (SmartNoise metadata).
fn tables() -> serde_json::Value {
    let rows = |table: &str| {
        DP_ROWS_PER_PATIENT
            .iter()
            .find(|(t, _)| *t == table)
            .map_or(1, |(_, n)| *n)
    };
    let (_, age_lower, age_upper) = DP_BOUNDS
        .iter()
        .find(|(c, _, _)| *c == "sim_av_tumour.age")
        .copied()
        .unwrap_or(("", 0.0, 110.0));
    serde_json::json!({
        "sim_av_tumour": {
            "pid": "patientid",
            "max_ids": rows("sim_av_tumour"),
            "columns": {
                "stage_best": {"type": "string"},
                "age": {"type": "int", "lower": age_lower, "upper": age_upper},
            },
        },
        "sim_av_patient": {
            "pid": "patientid",
            "max_ids": rows("sim_av_patient"),
            "columns": {"gender": {"type": "string"}},
        },
        "sim_sact_regimen": {
            "pid": "encore_patient_id",
            "max_ids": rows("sim_sact_regimen"),
            "columns": {"intent_of_treatment": {"type": "string"}},
        },
    })
}

/// Group key (or `<all>`) → the count `n`.
fn counts(batches: &[RecordBatch]) -> Result<HashMap<String, f64>> {
    let mut out = HashMap::new();
    for batch in batches {
        let n = batch
            .schema()
            .index_of("n")
            .context("the answer has no column n")?;
        let values = cast(batch.column(n), &DataType::Float64)?;
        let values = values.as_primitive::<Float64Type>();
        let keys = if n > 0 {
            Some(cast(batch.column(0), &DataType::Utf8)?)
        } else {
            None
        };
        for row in 0..batch.num_rows() {
            let key = match &keys {
                None => "<all>".to_string(),
                Some(k) if k.is_null(row) => "<null>".to_string(),
                Some(k) => k.as_string::<i32>().value(row).to_string(),
            };
            out.insert(key, values.value(row));
        }
    }
    Ok(out)
}

/// Mean absolute error over the exact answer's groups (a group not released counts as 0).
fn mean_absolute_error(exact: &HashMap<String, f64>, noisy: &HashMap<String, f64>) -> f64 {
    let total: f64 = exact
        .iter()
        .map(|(key, truth)| (noisy.get(key).copied().unwrap_or(0.0) - truth).abs())
        .sum();
    total / exact.len().max(1) as f64
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let schema = TrustSchema::cancer()?;
    println!(
        "Generating {} patients across {} trusts and starting a DP federation (ε {} per query)…",
        args.patients, args.trusts, args.epsilon
    );
    let federation = launch(&DemoOptions {
        trusts: args.trusts,
        patients: args.patients,
        node_deadline_ms: 600_000,
        dp: Some(DemoDp {
            epsilon_per_query: args.epsilon,
            epsilon_budget: 1e9,
        }),
        ..DemoOptions::default()
    })
    .await?;
    let mut client = researcher(&federation).await?;
    let central = union(&schema, &federation.info.data_dir, &federation.info.trusts).await?;

    let python = python_with(
        &["smartnoise-sql", "pandas", "pyarrow"],
        args.python.as_deref(),
    )?;
    let panel_json = federation.work_dir().join("dp_panel.json");
    std::fs::write(
        &panel_json,
        serde_json::to_string(&serde_json::json!({
            "epsilon": args.epsilon,
            "delta": args.delta,
            "trusts": federation.info.trusts,
            "tables": tables(),
            "queries": PANEL,
        }))?,
    )?;
    println!("SmartNoise SQL…");
    let smartnoise = run_python(
        &python,
        "smartnoise_panel.py",
        &[&federation.info.data_dir, &panel_json],
        &[args.repeats.to_string()],
    )?;

    println!("TrustQL…");
    let mut report = Vec::new();
    for (name, _, sql) in PANEL {
        let exact = counts(&central.sql(sql).await?.collect().await?)?;
        // A repeat is answered from each node's ledger: a slightly different ε makes each run
        // a new release, so every run does the whole work. The first run warms the caches.
        let mut times = Vec::with_capacity(args.repeats);
        let mut errors = Vec::with_capacity(args.repeats);
        for run in 0..=args.repeats {
            client.set_epsilon(Some(args.epsilon * (1.0 - run as f64 * 1e-9)));
            let start = Instant::now();
            let result = client
                .query(sql)
                .await
                .with_context(|| format!("TrustQL: {sql}"))?;
            if run > 0 {
                times.push(start.elapsed());
                errors.push(mean_absolute_error(&exact, &counts(&result.batches)?));
            }
        }
        let trustql_error = errors.iter().sum::<f64>() / errors.len() as f64;
        let sn = &smartnoise[*name];
        let mut sn_times: Vec<Duration> = sn["seconds"]
            .as_array()
            .context("SmartNoise timings")?
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .map(Duration::from_secs_f64)
            .collect();
        let sn_errors: Vec<f64> = sn["runs"]
            .as_array()
            .context("SmartNoise rows")?
            .iter()
            .filter_map(|run| {
                let rows: HashMap<String, f64> = run
                    .as_array()?
                    .iter()
                    .filter_map(|row| {
                        let key = match &row[0] {
                            // A query without GROUP BY has no key.
                            serde_json::Value::Null if exact.contains_key("<all>") => {
                                "<all>".to_string()
                            }
                            serde_json::Value::Null => "<null>".to_string(),
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        Some((key, row[1].as_f64()?))
                    })
                    .collect();
                Some(mean_absolute_error(&exact, &rows))
            })
            .collect();
        let sn_error = sn_errors.iter().sum::<f64>() / sn_errors.len().max(1) as f64;
        report.push((
            *name,
            ms(median(&mut times)),
            ms(median(&mut sn_times)),
            trustql_error,
            sn_error,
        ));
    }

    println!(
        "\n| query | TrustQL (ms) | SmartNoise (ms) | time TrustQL / SmartNoise | TrustQL error | SmartNoise error | error TrustQL / SmartNoise |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, t, s, te, se) in report {
        println!(
            "| {name} | {t:.1} | {s:.1} | {:.2} | {te:.1} | {se:.1} | {:.2} |",
            t / s,
            te / se.max(f64::MIN_POSITIVE)
        );
    }
    println!(
        "\nErrors are mean absolute errors of the count n over the exact answer's groups (a group \
         not released counts as 0), averaged over the runs. TrustQL spends ε {} at each of {} \
         trusts, each adding its own noise; SmartNoise spends ε {} once over the union.",
        args.epsilon,
        federation.info.trusts.len(),
        args.epsilon
    );
    Ok(())
}
