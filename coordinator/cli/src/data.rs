//! The data subcommands: `synth`, `import simulacrum`, `schema check`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use trustql_import::{ImportConfig, import_simulacrum};
use trustql_schemas::{TrustSchema, check_site, patients_in_order, table_path};
use trustql_synth::{SynthConfig, generate};

/// `trustql synth` options.
#[derive(Args)]
pub(crate) struct SynthArgs {
    /// Number of trusts (1–99).
    #[arg(long, default_value_t = 3)]
    trusts: usize,
    /// Number of distinct patients across all trusts.
    #[arg(long, default_value_t = 10_000)]
    patients: u64,
    /// Random seed: the same seed writes the same data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of patients diagnosed at one trust and treated at another (0–1).
    #[arg(long, default_value_t = 0.1)]
    shared: f64,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Output directory (DIR/<TRUST>/<table>.parquet).
    #[arg(long)]
    out: PathBuf,
    /// Replace files already in the output directory.
    #[arg(long)]
    force: bool,
}

/// `trustql import simulacrum` options.
#[derive(Args)]
pub(crate) struct ImportArgs {
    /// Directory holding the v2.1.0 CSVs (sim_av_patient.csv, sim_av_tumour.csv, …).
    #[arg(long)]
    csv: PathBuf,
    /// Number of trusts to spread patients over (1–99).
    #[arg(long, default_value_t = 3)]
    trusts: usize,
    /// Output directory (DIR/<TRUST>/<table>.parquet).
    #[arg(long)]
    out: PathBuf,
    /// Replace files already in the output directory.
    #[arg(long)]
    force: bool,
}

/// Prints rows per table (schema order) and trust.
fn print_rows(schema: &TrustSchema, rows: &BTreeMap<String, BTreeMap<String, u64>>) {
    let tables = schema.tables().iter().map(|t| t.name.clone());
    print!("{:<24}", "table");
    for trust in rows.keys() {
        print!("{trust:>12}");
    }
    println!();
    for table in tables {
        print!("{table:<24}");
        for counts in rows.values() {
            print!("{:>12}", counts.get(&table).copied().unwrap_or(0));
        }
        println!();
    }
}

/// Runs `trustql synth`.
pub(crate) fn synth(args: &SynthArgs) -> Result<bool> {
    let schema = TrustSchema::cancer().context("loading the built-in schema")?;
    let config = SynthConfig {
        trusts: args.trusts,
        patients: args.patients,
        seed: args.seed,
        shared_share: args.shared,
        threads: args.threads,
        overwrite: args.force,
    };
    let started = Instant::now();
    let summary = generate(&schema, &config, &args.out)?;
    let seconds = started.elapsed().as_secs_f64();
    print_rows(&schema, &summary.rows);
    println!(
        "{} patients over {} trusts written to {} in {seconds:.1} s ({:.0} patients/s)",
        args.patients,
        args.trusts,
        args.out.display(),
        args.patients as f64 / seconds.max(1e-9)
    );
    Ok(true)
}

/// Runs `trustql import simulacrum`.
pub(crate) fn import(args: &ImportArgs) -> Result<bool> {
    let schema = TrustSchema::cancer().context("loading the built-in schema")?;
    let config = ImportConfig {
        trusts: args.trusts,
        overwrite: args.force,
    };
    let summary = import_simulacrum(&schema, &args.csv, &config, &args.out)?;
    print_rows(&schema, &summary.rows);
    for (table, rows) in &summary.orphans {
        println!(
            "note: {rows} row(s) of {table} refer to a parent that is absent and were left out"
        );
    }
    for table in &summary.missing_tables {
        println!("note: no CSV for {table}; it was written empty");
    }
    for file in &summary.skipped_files {
        println!("note: {file} is not a TrustQL table and was skipped");
    }
    for (table, columns) in &summary.ignored_columns {
        println!(
            "note: {table}: fields not in the schema were ignored: {}",
            columns.join(", ")
        );
    }
    println!("imported into {}", args.out.display());
    Ok(true)
}

/// Runs `trustql schema check`; false when any problem is found.
pub(crate) fn check(dir: &Path, schema_file: Option<&Path>) -> Result<bool> {
    let schema = match schema_file {
        Some(path) => TrustSchema::from_path(path)?,
        None => TrustSchema::cancer().context("loading the built-in schema")?,
    };
    let sites = site_dirs(dir)?;
    let mut ok = true;
    for site in sites {
        let report = check_site(&schema, &site)?;
        println!("{report}");
        ok &= report.is_ok();
        if report.is_ok() {
            print_patient_order(&schema, &site)?;
        }
    }
    Ok(ok)
}

/// Says which tables a node can count patients in without hash sets (files in patient order).
fn print_patient_order(schema: &TrustSchema, site: &Path) -> Result<()> {
    let mut out_of_order = Vec::new();
    for table in schema.tables() {
        if let Some(column) = schema.patient_column(&table.name)?
            && !patients_in_order(&table_path(site, &table.name), &column)?
        {
            out_of_order.push(table.name.as_str());
        }
    }
    if out_of_order.is_empty() {
        println!(
            "patient order: every table with a patient column keeps each patient in one row \
             group, ascending, so a node counts their patients without hash sets"
        );
    } else {
        println!(
            "patient order: {} not in patient order; a node counts their patients exactly but \
             with hash sets, which is slower. Rows written sorted by patient are faster.",
            out_of_order.join(", ")
        );
    }
    Ok(())
}

/// A site directory itself, or the trust directories under a federation directory.
fn site_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read {}", dir.display()))?;
    let has_files = entries.iter().any(|e| e.path().is_file());
    let mut subdirs: Vec<PathBuf> = entries
        .iter()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    if has_files || subdirs.is_empty() {
        Ok(vec![dir.to_path_buf()])
    } else {
        Ok(subdirs)
    }
}
