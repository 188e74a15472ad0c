//! Pool-then-protect against protecting each trust's piece (issue 17), side by side in one run
//! over the same data: a 20-query cancer panel of counts, answered
//!
//! 1. **pooled**: the trusts add their exact counts under masks; a minimum of 10 patients and
//!    rounding to 5 apply once, to the pooled total;
//! 2. **per-trust**: the same policy (minimum 10, rounding to 5) at every trust, as TrustQL does
//!    without a pool (the coordinator sums what each trust released);
//! 3. **naive baseline**: computed from the Parquet, each trust suppresses counts of 7 or fewer
//!    and rounds to 5, and the results are summed (weaker: a count of 8 passes).
//!
//! For each it reports the mean relative error over every cell the union holds (a withheld
//! cell counts as 0: an error of 1), the share of cells released, the median latency (pooled
//! over per-trust) and the bytes each trust sends per query.
//!
//! `cargo run --release -p trustql-benches --bin pool-compare -- [--patients N] [--trusts T]
//! [--repeats R]`

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::prelude::SessionContext;
use trustql_benches::{median, ms, researcher, union};
use trustql_demo::{DemoOptions, launch};
use trustql_schemas::TrustSchema;

/// Command-line options.
#[derive(Parser)]
struct Args {
    /// Patients across the federation.
    #[arg(long, default_value_t = 50_000)]
    patients: u64,
    /// Trusts in the federation.
    #[arg(long, default_value_t = 5)]
    trusts: usize,
    /// Runs of each query per federation, for latency.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// The panel: counts grouped by coded columns, as an ICS cancer team asks them.
const PANEL: &[&str] = &[
    "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    "SELECT site_icd10_o2_3char, stage_best, COUNT(*) FROM sim_av_tumour GROUP BY 1, 2",
    "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour WHERE stage_best = '4' GROUP BY 1",
    "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour WHERE stage_best = '1' GROUP BY 1",
    "SELECT stage_best, COUNT(*) FROM sim_av_tumour WHERE site_icd10_o2_3char = 'C50' GROUP BY 1",
    "SELECT stage_best, COUNT(*) FROM sim_av_tumour WHERE site_icd10_o2_3char = 'C34' GROUP BY 1",
    "SELECT stage_best, COUNT(*) FROM sim_av_tumour WHERE site_icd10_o2_3char = 'C18' GROUP BY 1",
    "SELECT gender, COUNT(*) FROM sim_av_patient GROUP BY 1",
    "SELECT vitalstatus, COUNT(*) FROM sim_av_patient GROUP BY 1",
    "SELECT ethnicity, COUNT(*) FROM sim_av_patient GROUP BY 1",
    "SELECT gender, vitalstatus, COUNT(*) FROM sim_av_patient GROUP BY 1, 2",
    "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour WHERE age >= 80 GROUP BY 1",
    "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour WHERE age < 50 GROUP BY 1",
    "SELECT stage_best, COUNT(*) FROM sim_av_tumour WHERE age >= 75 GROUP BY 1",
    "SELECT grade, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    "SELECT site_icd10_o2_3char, grade, COUNT(*) FROM sim_av_tumour GROUP BY 1, 2",
    "SELECT quintile_2019, stage_best, COUNT(*) FROM sim_av_tumour GROUP BY 1, 2",
    "SELECT laterality, COUNT(*) FROM sim_av_tumour WHERE site_icd10_o2_3char = 'C50' GROUP BY 1",
    "SELECT intent_of_treatment, COUNT(*) FROM sim_sact_regimen GROUP BY 1",
];

/// A table of counts: the key columns' text, joined, to the count (the last column).
type Cells = BTreeMap<String, f64>;

fn cells(batch: &RecordBatch) -> Result<Cells> {
    let last = batch.num_columns() - 1;
    let keys: Vec<_> = (0..last)
        .map(|c| cast(batch.column(c), &DataType::Utf8))
        .collect::<Result<_, _>>()?;
    let counts = cast(batch.column(last), &DataType::Float64)?;
    let counts = counts.as_primitive::<Float64Type>();
    Ok((0..batch.num_rows())
        .map(|r| {
            let key: Vec<&str> = keys
                .iter()
                .map(|k| {
                    let k = k.as_string::<i32>();
                    if k.is_null(r) { "∅" } else { k.value(r) }
                })
                .collect();
            (key.join("|"), counts.value(r))
        })
        .collect())
}

async fn exact(ctx: &SessionContext, sql: &str) -> Result<Cells> {
    let batches = ctx.sql(sql).await?.collect().await?;
    let schema = batches
        .first()
        .map(|b| b.schema())
        .context("no batch from DataFusion")?;
    cells(&concat_batches(&schema, &batches)?)
}

/// Mean relative error over the union's cells, and the share of them released.
fn score(truth: &Cells, released: &Cells) -> (f64, f64, usize) {
    let mut error = 0.0;
    let mut shown = 0;
    for (key, &t) in truth {
        let r = released.get(key).copied().unwrap_or(0.0);
        if released.contains_key(key) {
            shown += 1;
        }
        error += (r - t).abs() / t;
    }
    let n = truth.len().max(1) as f64;
    (error / n, shown as f64 / n, truth.len())
}

fn round5(x: f64) -> f64 {
    (x / 5.0).round() * 5.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let schema = TrustSchema::cancer()?;
    println!(
        "Generating {} patients across {} trusts; starting a pooled and a per-trust federation \
         over the same data…",
        args.patients, args.trusts
    );
    let options = DemoOptions {
        trusts: args.trusts,
        patients: args.patients,
        node_deadline_ms: 600_000,
        rounding: true,
        ..DemoOptions::default()
    };
    let per_trust = launch(&options).await?;
    let data = per_trust.info.data_dir.clone();
    let pooled = launch(&DemoOptions {
        data: Some(data.clone()),
        pool: true,
        ..options.clone()
    })
    .await?;
    let mut per_trust_client = researcher(&per_trust).await?;
    let mut pooled_client = researcher(&pooled).await?;
    let trusts = per_trust.info.trusts.clone();
    let central = union(&schema, &data, &trusts).await?;
    let mut sites = Vec::with_capacity(trusts.len());
    for trust in &trusts {
        sites.push(union(&schema, &data, std::slice::from_ref(trust)).await?);
    }

    let mut totals = [(0.0, 0.0); 3];
    let (mut pooled_times, mut per_trust_times) = (Vec::new(), Vec::new());
    let mut bytes = Vec::new();
    println!(
        "\n{:<4} {:>6} | {:>9} {:>7} | {:>9} {:>7} | {:>9} {:>7}",
        "q", "cells", "pooled", "shown", "per-trust", "shown", "naive≤7", "shown"
    );
    for (i, sql) in PANEL.iter().enumerate() {
        let truth = exact(&central, sql).await?;
        // The naive baseline: each trust suppresses ≤ 7 and rounds to 5; sums of what is left.
        let mut naive = Cells::new();
        for site in &sites {
            for (key, count) in exact(site, sql).await? {
                if count > 7.0 {
                    *naive.entry(key).or_default() += round5(count);
                }
            }
        }
        let answer = |result: trustql_client::QueryResult| {
            concat_batches(&result.schema, &result.batches)
                .map_err(anyhow::Error::from)
                .and_then(|b| cells(&b))
        };
        let mut pooled_cells = Cells::new();
        let mut per_trust_cells = Cells::new();
        for _ in 0..args.repeats.max(1) {
            let started = Instant::now();
            let result = pooled_client
                .query(sql)
                .await
                .with_context(|| format!("pooled: {sql}"))?;
            pooled_times.push(started.elapsed());
            pooled_cells = answer(result)?;
            let started = Instant::now();
            let result = per_trust_client
                .query(sql)
                .await
                .with_context(|| format!("per-trust: {sql}"))?;
            per_trust_times.push(started.elapsed());
            per_trust_cells = answer(result)?;
        }
        let scores = [
            score(&truth, &pooled_cells),
            score(&truth, &per_trust_cells),
            score(&truth, &naive),
        ];
        for (total, (mre, shown, _)) in totals.iter_mut().zip(scores) {
            total.0 += mre;
            total.1 += shown;
        }
        // A pooled answer is one word per public cell and state, and the canary.
        bytes.push(pooled_words(sql, &schema)? * 8);
        println!(
            "{:<4} {:>6} | {:>9.4} {:>6.0}% | {:>9.4} {:>6.0}% | {:>9.4} {:>6.0}%",
            i + 1,
            scores[0].2,
            scores[0].0,
            scores[0].1 * 100.0,
            scores[1].0,
            scores[1].1 * 100.0,
            scores[2].0,
            scores[2].1 * 100.0
        );
    }
    let n = PANEL.len() as f64;
    let [pooled_score, per_trust_score, naive_score] = totals.map(|(e, s)| (e / n, s / n));
    println!(
        "\nMean relative error over the panel (withheld cells count as 0):\n  pooled (min 10, round \
         to 5 once)   {:.4}  ({:.0}% of cells released)\n  per-trust (min 10, round to 5)     \
         {:.4}  ({:.0}%)\n  naive per-trust ≤7 + round to 5    {:.4}  ({:.0}%)\n  pooled / naive: \
         {:.2}; pooled / per-trust: {:.2}",
        pooled_score.0,
        pooled_score.1 * 100.0,
        per_trust_score.0,
        per_trust_score.1 * 100.0,
        naive_score.0,
        naive_score.1 * 100.0,
        pooled_score.0 / naive_score.0,
        pooled_score.0 / per_trust_score.0
    );
    let (p, t) = (median(&mut pooled_times), median(&mut per_trust_times));
    println!(
        "Median latency per query: pooled {:.1} ms, per-trust {:.1} ms (ratio {:.2})",
        ms(p),
        ms(t),
        ms(p) / ms(t)
    );
    bytes.sort_unstable();
    println!(
        "Masked words each trust sends per query: median {} bytes, largest {} bytes",
        bytes[bytes.len() / 2],
        bytes.last().copied().unwrap_or(0)
    );
    drop(pooled);
    drop(per_trust);
    Ok(())
}

/// How many masked words a pooled answer to `sql` has: (∏ codes + 1) × states, plus the canary.
/// COUNT(*) carries its count and the patient count.
fn pooled_words(sql: &str, schema: &TrustSchema) -> Result<usize> {
    let keys = sql
        .split(" FROM ")
        .next()
        .and_then(|s| s.strip_prefix("SELECT "))
        .context("a panel query")?;
    let mut cells = 1usize;
    for key in keys.split(", ").filter(|k| !k.starts_with("COUNT")) {
        let column = schema
            .tables()
            .iter()
            .flat_map(|t| t.columns.iter())
            .find(|c| c.name == key)
            .with_context(|| format!("no column {key}"))?;
        let set = column
            .code_set
            .as_deref()
            .and_then(|s| schema.code_set(s))
            .with_context(|| format!("{key} has no code set"))?;
        cells *= set.codes.len() + 1;
    }
    Ok(cells * 2 + 1)
}
