//! Where one node's time goes, beside plain DataFusion on the same Parquet: for each panel
//! query, the median time of DataFusion answering it and of the node answering it (vetting,
//! the partial aggregation with its distinct-patient count, and disclosure control), and the
//! share of the node's time spent on vetting and protection. Vetting includes parsing,
//! planning and optimising, which any engine does; DataFusion's own planning time is shown
//! and left out of the share.
//!
//! `cargo run --release -p trustql-benches --bin node-profile -- --patients 333000`
//!
//! Both run in this process with two partitions, alternating, after one warm-up each.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use trustql_benches::{CANCER_PANEL, median, ms, one_trust, open_node, panel_request};
use trustql_policies::today;
use trustql_schemas::{TrustSchema, table_path};

/// Command-line options.
#[derive(Parser)]
struct Args {
    /// Patients at the trust (333,000 is one of three trusts of a million patients).
    #[arg(long, default_value_t = 333_000)]
    patients: u64,
    /// Timed runs of each query on each side.
    #[arg(long, default_value_t = 7)]
    repeats: usize,
    /// Where the trust is written (kept for later runs of the same size).
    #[arg(long, default_value = "target/node-profile")]
    out: PathBuf,
}

/// One query's medians.
#[derive(Default)]
struct Row {
    datafusion: Duration,
    planning: Duration,
    node: Duration,
    vetting: Duration,
    execution: Duration,
    protection: Duration,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let schema = TrustSchema::cancer()?;
    let dir = args.out.join(args.patients.to_string());
    if !dir.join("TQ01/sim_av_tumour.parquet").exists() {
        println!("Generating one trust with {} patients…", args.patients);
        one_trust(&schema, args.patients, &dir)?;
    }
    let engine = open_node(&schema, &dir, "TQ01").await?;
    // The node's own partitioning, without its locks and limits.
    let plain = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
    for table in schema.tables() {
        let path = table_path(&dir.join("TQ01"), &table.name);
        plain
            .register_parquet(
                table.name.as_str(),
                path.to_string_lossy().as_ref(),
                ParquetReadOptions::default(),
            )
            .await?;
    }

    let mut rows = Vec::new();
    for (name, sql) in CANCER_PANEL {
        let request = panel_request(name, sql);
        plain.sql(sql).await?.collect().await?;
        engine.answer(&request, today()).await?;
        let mut samples: [Vec<Duration>; 6] = Default::default();
        for _ in 0..args.repeats {
            let start = Instant::now();
            plain.sql(sql).await?.collect().await?;
            samples[0].push(start.elapsed());
            let start = Instant::now();
            plain.sql(sql).await?.into_optimized_plan()?;
            samples[5].push(start.elapsed());
            let start = Instant::now();
            let answer = engine.answer(&request, today()).await?;
            samples[1].push(start.elapsed());
            samples[2].push(answer.timings.vetting);
            samples[3].push(answer.timings.execution);
            samples[4].push(answer.timings.protection);
        }
        let [df, node, vetting, execution, protection, planning] = &mut samples;
        rows.push(Row {
            datafusion: median(df),
            planning: median(planning),
            node: median(node),
            vetting: median(vetting),
            execution: median(execution),
            protection: median(protection),
        });
    }

    println!(
        "\nOne trust of {} patients, medians of {} runs (ms):\n",
        args.patients, args.repeats
    );
    println!(
        "| query | DataFusion | of which planning | node | node / DataFusion | vetting | execution | protection | vetting beyond planning + protection |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut total = Row::default();
    for ((name, _), row) in CANCER_PANEL.iter().zip(&rows) {
        println!(
            "| {name} | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} | {:.1}% |",
            ms(row.datafusion),
            ms(row.planning),
            ms(row.node),
            ms(row.node) / ms(row.datafusion),
            ms(row.vetting),
            ms(row.execution),
            ms(row.protection),
            share(row)
        );
        total.datafusion += row.datafusion;
        total.planning += row.planning;
        total.node += row.node;
        total.vetting += row.vetting;
        total.execution += row.execution;
        total.protection += row.protection;
    }
    println!(
        "| whole panel | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} | {:.1}% |",
        ms(total.datafusion),
        ms(total.planning),
        ms(total.node),
        ms(total.node) / ms(total.datafusion),
        ms(total.vetting),
        ms(total.execution),
        ms(total.protection),
        share(&total)
    );
    Ok(())
}

/// Vetting beyond DataFusion's own planning, and protection, as a share of the node's time.
fn share(row: &Row) -> f64 {
    let checks = row.vetting.saturating_sub(row.planning);
    100.0 * (ms(checks) + ms(row.protection)) / ms(row.node)
}
