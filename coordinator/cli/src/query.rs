//! `trustql query` and `trustql coordinator`, and printing results with their coverage.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use arrow::array::RecordBatch;
use clap::{Args, ValueEnum};
use trustql_client::{Client, QueryResult};
use trustql_coordinator::{CoordinatorConfig, start};
use trustql_schemas::TrustSchema;

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// An aligned table, then the coverage report.
    Table,
    /// CSV on stdout; the coverage report on stderr.
    Csv,
    /// One JSON object: `rows` and `coverage`.
    Json,
}

/// `trustql query` arguments.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The coordinator's URL (https://host:port).
    #[arg(long)]
    coordinator: String,
    /// Your bearer token.
    #[arg(long, env = "TRUSTQL_TOKEN")]
    token: String,
    /// The CA certificate (PEM) that signed the coordinator's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The project the query is for (may be left out if you have only one).
    #[arg(long)]
    project: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// The SQL query.
    sql: String,
}

/// Runs one query and prints it; false if it was refused.
pub fn query(args: &QueryArgs) -> Result<bool> {
    let ca = match &args.ca {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("cannot read the CA {}", path.display()))?,
        ),
        None => None,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut client = Client::connect(
            &args.coordinator,
            ca.as_deref(),
            &args.token,
            args.project.as_deref(),
        )
        .await?;
        match client.query(&args.sql).await {
            Ok(result) => {
                print_result(&result, args.format)?;
                Ok(true)
            }
            Err(e) => {
                eprintln!("refused: {e}");
                Ok(false)
            }
        }
    })
}

/// Prints a result in the chosen format.
pub fn print_result(result: &QueryResult, format: Format) -> Result<()> {
    match format {
        Format::Table => {
            let table = arrow::util::pretty::pretty_format_batches(&result.batches)
                .context("cannot format the result")?;
            println!("{table}");
            if let Some(coverage) = &result.coverage {
                print!("{coverage}");
            }
        }
        Format::Csv => {
            let mut writer = arrow::csv::Writer::new(std::io::stdout());
            for batch in &result.batches {
                writer
                    .write(&without_metadata(batch)?)
                    .context("cannot write CSV")?;
            }
            if let Some(coverage) = &result.coverage {
                eprint!("{coverage}");
            }
        }
        Format::Json => {
            let mut writer = arrow::json::ArrayWriter::new(Vec::new());
            let batches: Vec<RecordBatch> = result
                .batches
                .iter()
                .map(without_metadata)
                .collect::<Result<_>>()?;
            writer
                .write_batches(&batches.iter().collect::<Vec<_>>())
                .context("cannot write JSON")?;
            writer.finish().context("cannot write JSON")?;
            let rows: serde_json::Value = if batches.is_empty() {
                serde_json::Value::Array(Vec::new())
            } else {
                serde_json::from_slice(&writer.into_inner()).context("cannot write JSON")?
            };
            let out = serde_json::json!({ "rows": rows, "coverage": result.coverage });
            println!("{out}");
        }
    }
    Ok(())
}

fn without_metadata(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = batch
        .schema()
        .as_ref()
        .clone()
        .with_metadata(Default::default());
    RecordBatch::try_new(std::sync::Arc::new(schema), batch.columns().to_vec())
        .context("cannot prepare the result")
}

/// Runs a coordinator until Ctrl-C.
pub fn coordinator(config_path: &Path) -> Result<bool> {
    let config = CoordinatorConfig::load(config_path)?;
    let schema = TrustSchema::cancer().context("loading the built-in schema")?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut running = start(&config, schema).await?;
        println!(
            "coordinator listening on {} for {} trust(s)",
            running.addr(),
            config.nodes.len()
        );
        tokio::select! {
            result = running.wait() => result?,
            () = crate::node::shutdown_signal() => {
                println!("coordinator stopping");
                running.stop().await?;
            }
        }
        Ok(true)
    })
}
