//! The comparison harness: the same cancer query panel through TrustQL (protection on, end to
//! end over TLS), through DataFusion in one process over the union of the trusts' Parquet, and
//! through DuckDB over the same union; engines alternate, each query repeats, and the report
//! gives per-query medians and the ratios. Beside them, the slowest trust's node answering
//! alone, in process: what a deployment with one machine per trust waits for, before the
//! coordinator's few milliseconds. Then COUNT(*) fan-out latency over 16 nodes.
//!
//! `cargo run --release -p trustql-benches --bin compare -- [--patients N] [--repeats R]`

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use trustql_benches::{
    CANCER_PANEL, median, ms, open_node, panel_request, percentile, python_with, researcher,
    run_python, union,
};
use trustql_demo::{DemoOptions, launch};
use trustql_policies::today;
use trustql_schemas::TrustSchema;

/// Command-line options.
#[derive(Parser)]
struct Args {
    /// Patients across the federation.
    #[arg(long, default_value_t = 1_000_000)]
    patients: u64,
    /// Trusts in the federation.
    #[arg(long, default_value_t = 3)]
    trusts: usize,
    /// Runs of each query per engine.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Nodes for the fan-out latency test.
    #[arg(long, default_value_t = 16)]
    fanout_nodes: usize,
    /// COUNT(*) queries for the fan-out latency test.
    #[arg(long, default_value_t = 200)]
    fanout_queries: usize,
    /// Python with duckdb installed (default: make target/py-venv and install it).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Leave DuckDB out.
    #[arg(long)]
    no_duckdb: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let schema = TrustSchema::cancer()?;
    println!(
        "Generating {} patients across {} trusts and starting the federation…",
        args.patients, args.trusts
    );
    let federation = launch(&DemoOptions {
        trusts: args.trusts,
        patients: args.patients,
        node_deadline_ms: 600_000,
        ..DemoOptions::default()
    })
    .await?;
    let mut client = researcher(&federation).await?;

    let union = union(&schema, &federation.info.data_dir, &federation.info.trusts).await?;
    // Each trust's node again, answering in this process: with one machine per trust, as
    // deployed, the federation waits for the slowest of them, plus the coordinator.
    let mut nodes = Vec::with_capacity(federation.info.trusts.len());
    for trust in &federation.info.trusts {
        nodes.push(open_node(&schema, &federation.info.data_dir, trust).await?);
    }

    let duckdb = if args.no_duckdb {
        None
    } else {
        Some(python_with(&["duckdb"], args.python.as_deref())?)
    };
    let panel_json = federation.work_dir().join("panel.json");
    let tables: Vec<&str> = schema.tables().iter().map(|t| t.name.as_str()).collect();
    std::fs::write(
        &panel_json,
        serde_json::to_string(&serde_json::json!({"tables": tables, "queries": CANCER_PANEL}))?,
    )?;

    let mut federated = vec![Vec::new(); CANCER_PANEL.len()];
    let mut datafusion = vec![Vec::new(); CANCER_PANEL.len()];
    let mut duck = vec![Vec::new(); CANCER_PANEL.len()];
    let mut alone = vec![Vec::new(); CANCER_PANEL.len()];
    // Warm-up: every engine reads every file once.
    for (name, sql) in CANCER_PANEL {
        client
            .query(sql)
            .await
            .with_context(|| format!("federated: {sql}"))?;
        union.sql(sql).await?.collect().await?;
        for node in &nodes {
            node.answer(&panel_request(name, sql), today()).await?;
        }
    }
    for round in 0..args.repeats {
        println!("round {} of {}", round + 1, args.repeats);
        for (i, (name, sql)) in CANCER_PANEL.iter().enumerate() {
            let start = Instant::now();
            client.query(sql).await?;
            federated[i].push(start.elapsed());
            let start = Instant::now();
            union.sql(sql).await?.collect().await?;
            datafusion[i].push(start.elapsed());
            let mut slowest = Duration::ZERO;
            for node in &nodes {
                let start = Instant::now();
                node.answer(&panel_request(name, sql), today()).await?;
                slowest = slowest.max(start.elapsed());
            }
            alone[i].push(slowest);
        }
        if let Some(python) = &duckdb {
            let times = run_duckdb(python, &federation.info.data_dir, &panel_json, 1)?;
            for (i, (name, _)) in CANCER_PANEL.iter().enumerate() {
                let secs = times
                    .get(*name)
                    .and_then(|v| v.as_array())
                    .and_then(|v| v.first())
                    .and_then(serde_json::Value::as_f64)
                    .context("DuckDB timing missing")?;
                duck[i].push(Duration::from_secs_f64(secs));
            }
        }
    }

    println!(
        "\n| query | TrustQL (ms) | DataFusion (ms) | DuckDB (ms) | TrustQL / DataFusion | TrustQL / DuckDB | slowest node alone (ms) | slowest node / DataFusion |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, (name, _)) in CANCER_PANEL.iter().enumerate() {
        let f = ms(median(&mut federated[i]));
        let d = ms(median(&mut datafusion[i]));
        let a = ms(median(&mut alone[i]));
        let (k, kr) = if duck[i].is_empty() {
            ("–".to_string(), "–".to_string())
        } else {
            let k = ms(median(&mut duck[i]));
            (format!("{k:.1}"), format!("{:.2}", f / k))
        };
        println!(
            "| {name} | {f:.1} | {d:.1} | {k} | {:.2} | {kr} | {a:.1} | {:.2} |",
            f / d,
            a / d
        );
    }
    drop(client);
    drop(nodes);
    drop(federation);

    println!(
        "\nFan-out: COUNT(*) over {} nodes on loopback…",
        args.fanout_nodes
    );
    let fanout = launch(&DemoOptions {
        trusts: args.fanout_nodes,
        patients: 100 * args.fanout_nodes as u64,
        ..DemoOptions::default()
    })
    .await?;
    let mut client = researcher(&fanout).await?;
    client.query("SELECT COUNT(*) FROM sim_av_patient").await?;
    let mut latencies = Vec::with_capacity(args.fanout_queries);
    for _ in 0..args.fanout_queries {
        let start = Instant::now();
        client.query("SELECT COUNT(*) FROM sim_av_patient").await?;
        latencies.push(start.elapsed());
    }
    println!(
        "{} nodes: p50 {:.1} ms, p99 {:.1} ms over {} queries",
        args.fanout_nodes,
        ms(percentile(&mut latencies, 0.5)),
        ms(percentile(&mut latencies, 0.99)),
        args.fanout_queries
    );
    Ok(())
}

fn run_duckdb(
    python: &Path,
    data: &Path,
    panel: &Path,
    repeats: usize,
) -> Result<serde_json::Value> {
    run_python(
        python,
        "duckdb_panel.py",
        &[data, panel],
        &[repeats.to_string()],
    )
}
