//! `trustql query` and `trustql coordinator`, and printing results with their coverage.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, AsArray, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Float64Type, Schema};
use clap::{Args, ValueEnum};
use trustql_client::{Client, QueryResult};
use trustql_coordinator::{CoordinatorConfig, start};
use trustql_protocol::Coverage;
use trustql_schemas::TrustSchema;

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    /// An aligned table, then the coverage report.
    Table,
    /// CSV on stdout; the coverage report on stderr.
    Csv,
    /// One JSON object: `rows` and `coverage`.
    Json,
}

/// `trustql query` arguments.
#[derive(Debug, Args)]
pub(crate) struct QueryArgs {
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
    /// Differential privacy: spend this ε per trust instead of the project's default.
    #[arg(long)]
    epsilon: Option<f64>,
    /// Differential privacy: only report what each trust would charge and the expected
    /// error; nothing runs and nothing is spent.
    #[arg(long)]
    preview: bool,
    /// The SQL query.
    sql: String,
}

/// Runs one query and prints it; false if it was refused.
pub(crate) fn query(args: &QueryArgs) -> Result<bool> {
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
        client.set_epsilon(args.epsilon);
        client.set_preview(args.preview);
        match client.query(&args.sql).await {
            Ok(result) => {
                print_result(&result, args.format)?;
                Ok(true)
            }
            Err(e) => {
                // The message says itself whether it is a refusal ("refused (rule): …") or a fault.
                eprintln!("not answered: {e}");
                Ok(false)
            }
        }
    })
}

/// Prints a result in the chosen format.
pub(crate) fn print_result(result: &QueryResult, format: Format) -> Result<()> {
    match format {
        Format::Table => {
            let mut offset = 0;
            let mut batches = Vec::with_capacity(result.batches.len());
            for batch in &result.batches {
                let batch = with_noise_columns(batch, offset, result.coverage.as_ref())?;
                batches.push(readable_floats(&batch)?);
                offset += batch.num_rows();
            }
            // An empty result still shows its columns.
            let schema = match batches.first() {
                Some(b) => b.schema(),
                None => readable_floats(&with_noise_columns(
                    &RecordBatch::new_empty(Arc::clone(&result.schema)),
                    0,
                    result.coverage.as_ref(),
                )?)?
                .schema(),
            };
            let table = arrow::util::pretty::pretty_format_batches_with_schema(schema, &batches)
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

/// The batch (whose first row is row `offset` of the result) with a `± 95%` column after each
/// column that carries noise, so the reader sees each value with its uncertainty.
fn with_noise_columns(
    batch: &RecordBatch,
    offset: usize,
    coverage: Option<&Coverage>,
) -> Result<RecordBatch> {
    let Some(coverage) = coverage.filter(|c| !c.noise.is_empty()) else {
        return Ok(batch.clone());
    };
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        fields.push(field.as_ref().clone());
        columns.push(Arc::clone(column));
        if let Some(noise) = coverage.noise.iter().find(|n| &n.column == field.name()) {
            fields.push(Field::new(
                format!("{} ±95%", field.name()),
                DataType::Float64,
                true,
            ));
            let values: Float64Array = (0..batch.num_rows())
                .map(|row| {
                    noise
                        .ci95_at(offset + row)
                        .map(|ci| (ci * 10.0).round() / 10.0)
                })
                .collect();
            columns.push(Arc::new(values));
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .context("cannot prepare the result")
}

/// The batch with each float column as text to six significant digits (the table is for
/// reading; CSV and JSON keep every digit).
fn readable_floats(batch: &RecordBatch) -> Result<RecordBatch> {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if !matches!(
            field.data_type(),
            DataType::Float16 | DataType::Float32 | DataType::Float64
        ) {
            fields.push(field.as_ref().clone());
            columns.push(Arc::clone(column));
            continue;
        }
        let floats = arrow::compute::cast(column, &DataType::Float64)
            .context("cannot prepare the result")?;
        let text: StringArray = floats
            .as_primitive::<Float64Type>()
            .iter()
            .map(|v| v.map(significant))
            .collect();
        fields.push(Field::new(field.name(), DataType::Utf8, true));
        columns.push(Arc::new(text));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .context("cannot prepare the result")
}

/// `v` to six significant digits, without trailing zeros (`67.8462`, `0.5`, `1234568`).
fn significant(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let magnitude = v.abs().log10().floor() as i32;
    if !(-5..15).contains(&magnitude) {
        return format!("{v:.5e}");
    }
    let decimals = (5 - magnitude).max(0) as usize;
    let text = format!("{v:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
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
pub(crate) fn coordinator(config_path: &Path) -> Result<bool> {
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

#[cfg(test)]
mod tests {
    use super::significant;

    #[test]
    fn floats_read_to_six_significant_digits() {
        assert_eq!(significant(67.846_153_846_153_84), "67.8462");
        assert_eq!(significant(0.5), "0.5");
        assert_eq!(significant(-1_072.417_9), "-1072.42");
        assert_eq!(significant(1_234_567.8), "1234568");
        assert_eq!(significant(0.000_123_456_78), "0.000123457");
        assert_eq!(significant(20.0), "20");
        assert_eq!(significant(0.0), "0");
        assert_eq!(significant(f64::NAN), "NaN");
        assert_eq!(significant(1.5e-9), "1.50000e-9");
    }
}
