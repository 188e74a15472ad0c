//! Loads the real Simulacrum v2.1.0 CSV download into TrustQL's layout.
//!
//! The download has one CSV per table with upper-case headers in data-dictionary order. The
//! Simulacrum has no trust column, so every patient is assigned to one of N trusts by a hash of
//! their `PATIENTID` (skewed like real trust sizes), and all their rows follow them: tumours,
//! regimens and radiotherapy by patient id, cycles and outcomes by regimen, drugs by cycle.
//! Rows whose parent is absent are counted and left out, never guessed.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

mod error;
mod values;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use trustql_schemas::{
    ColumnType, MAX_TRUSTS, SiteWriter, Table, TrustSchema, trust_codes, trust_weights,
};

pub use error::ImportError;
use values::{ColumnValues, parse_column};

/// CSV rows parsed per batch.
const BATCH_ROWS: usize = 65_536;

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportConfig {
    /// Number of trusts to spread patients over (1–99).
    pub trusts: usize,
    /// Whether existing files in the output directory may be replaced.
    pub overwrite: bool,
}

/// What an import did.
#[derive(Debug, Clone, Default)]
pub struct ImportSummary {
    /// Trust code → table → rows written.
    pub rows: BTreeMap<String, BTreeMap<String, u64>>,
    /// Table → rows left out because their parent row is absent.
    pub orphans: BTreeMap<String, u64>,
    /// Schema tables with no CSV (written empty).
    pub missing_tables: Vec<String>,
    /// Files in the CSV directory that are not schema tables (e.g. sim_av_gene.csv).
    pub skipped_files: Vec<String>,
    /// Table → CSV fields that are not in the schema and were ignored.
    pub ignored_columns: BTreeMap<String, Vec<String>>,
}

impl ImportSummary {
    /// Rows of one table summed over trusts.
    pub fn total(&self, table: &str) -> u64 {
        self.rows.values().filter_map(|t| t.get(table)).sum()
    }
}

/// The trust (index) a patient is assigned to: a stable hash of the id, weighted by trust size.
pub fn assign_trust(patientid: i64, trusts: usize) -> usize {
    // SplitMix64 finaliser: spreads consecutive ids evenly.
    let mut z = (patientid as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let weights = trust_weights(trusts);
    let total: f64 = weights.iter().sum();
    let mut x = (z >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (trust, w) in weights.iter().enumerate() {
        if x < *w {
            return trust;
        }
        x -= w;
    }
    trusts.saturating_sub(1)
}

/// Imports the CSVs in `csv_dir` into `out/<TRUST_CODE>/<table>.parquet`.
pub fn import_simulacrum(
    schema: &TrustSchema,
    csv_dir: &Path,
    config: &ImportConfig,
    out: &Path,
) -> Result<ImportSummary, ImportError> {
    if config.trusts == 0 || config.trusts > MAX_TRUSTS {
        return Err(ImportError::Config(format!(
            "--trusts must be between 1 and {MAX_TRUSTS}"
        )));
    }
    let mut summary = ImportSummary::default();
    let files = find_files(schema, csv_dir, &mut summary)?;
    let patient_table = &schema.info().patient_table;
    if !files.contains_key(patient_table) {
        return Err(ImportError::MissingPatients(csv_dir.to_path_buf()));
    }

    let codes = trust_codes(config.trusts);
    let mut sites = codes
        .iter()
        .map(|code| SiteWriter::create(schema, &out.join(code), config.overwrite))
        .collect::<Result<Vec<_>, _>>()?;

    // Key → trust for every table that others reference, filled parents first.
    let mut owners: HashMap<String, HashMap<i64, usize>> = HashMap::new();
    let mut order: Vec<(usize, usize, &Table)> = Vec::new();
    for (position, table) in schema.tables().iter().enumerate() {
        let depth = schema.patient_path(&table.name)?.len();
        order.push((depth, position, table));
    }
    order.sort_by_key(|(depth, position, _)| (*depth, *position));

    for (_, position, table) in order {
        let Some(path) = files.get(&table.name) else {
            summary.missing_tables.push(table.name.clone());
            continue;
        };
        let router = Router::for_table(schema, table, config.trusts, &owners)?;
        let keep_keys = table.primary_key.is_some()
            && schema.tables().iter().any(|t| {
                t.columns
                    .iter()
                    .any(|c| c.reference().is_some_and(|(p, _)| p == table.name))
            });
        let mut table_owners = HashMap::new();
        let (orphans, ignored) = import_table(
            table,
            path,
            &router,
            keep_keys.then_some(&mut table_owners),
            |trust, batch| {
                sites[trust]
                    .write_table(position, batch)
                    .map_err(Into::into)
            },
        )?;
        if orphans > 0 {
            summary.orphans.insert(table.name.clone(), orphans);
        }
        if !ignored.is_empty() {
            summary.ignored_columns.insert(table.name.clone(), ignored);
        }
        if keep_keys {
            owners.insert(table.name.clone(), table_owners);
        }
    }

    for (code, site) in codes.iter().zip(sites) {
        summary.rows.insert(code.clone(), site.finish()?);
    }
    Ok(summary)
}

/// Finds `<table>.csv` (any case) for each schema table; notes the other files.
fn find_files(
    schema: &TrustSchema,
    csv_dir: &Path,
    summary: &mut ImportSummary,
) -> Result<BTreeMap<String, PathBuf>, ImportError> {
    let io = |e: std::io::Error| ImportError::Io {
        path: csv_dir.to_path_buf(),
        reason: e.to_string(),
    };
    let mut files = BTreeMap::new();
    let mut entries: Vec<_> = std::fs::read_dir(csv_dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let lower = name.to_lowercase();
        let table = lower
            .strip_suffix(".csv")
            .filter(|stem| schema.table(stem).is_ok());
        match table {
            Some(stem) => {
                files.insert(stem.to_string(), entry.path());
            }
            None => summary.skipped_files.push(name),
        }
    }
    Ok(files)
}

/// Decides each row's trust from its link to the patient.
enum Router<'a> {
    /// The patient table: hash of the primary key.
    Patient { key: usize, trusts: usize },
    /// A table whose foreign key names a parent already imported.
    Parent {
        key: usize,
        owners: &'a HashMap<i64, usize>,
    },
    /// A table whose parent was not imported: every row is an orphan.
    NoParent { key: usize },
}

impl<'a> Router<'a> {
    fn for_table(
        schema: &TrustSchema,
        table: &'a Table,
        trusts: usize,
        owners: &'a HashMap<String, HashMap<i64, usize>>,
    ) -> Result<Self, ImportError> {
        let position = |name: &str| {
            table
                .columns
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| {
                    ImportError::Config(format!("schema table {} lacks {name}", table.name))
                })
        };
        let path = schema.patient_path(&table.name)?;
        let Some(hop) = path.first() else {
            let key = table.primary_key.as_deref().unwrap_or_default();
            return Ok(Router::Patient {
                key: position(key)?,
                trusts,
            });
        };
        let key = position(&hop.column)?;
        if table.columns[key].ty != ColumnType::Int64 {
            return Err(ImportError::Config(format!(
                "key {}.{} must be an integer",
                table.name, hop.column
            )));
        }
        Ok(match owners.get(&hop.parent_table) {
            Some(owners) => Router::Parent { key, owners },
            None => Router::NoParent { key },
        })
    }

    fn key(&self) -> usize {
        match self {
            Router::Patient { key, .. } | Router::Parent { key, .. } | Router::NoParent { key } => {
                *key
            }
        }
    }

    fn route(&self, key: Option<i64>) -> Option<usize> {
        let key = key?;
        match self {
            Router::Patient { trusts, .. } => Some(assign_trust(key, *trusts)),
            Router::Parent { owners, .. } => owners.get(&key).copied(),
            Router::NoParent { .. } => None,
        }
    }
}

/// Streams one CSV into the per-trust writers; returns (orphan rows, ignored CSV fields).
fn import_table(
    table: &Table,
    path: &Path,
    router: &Router<'_>,
    mut keep_owners: Option<&mut HashMap<i64, usize>>,
    mut write: impl FnMut(usize, &RecordBatch) -> Result<(), ImportError>,
) -> Result<(u64, Vec<String>), ImportError> {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .map_err(|e| ImportError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let header = reader.headers().map_err(|e| csv_error(&file, &e))?.clone();
    let mut sources = Vec::with_capacity(table.columns.len());
    let mut missing = Vec::new();
    for column in &table.columns {
        match header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(&column.name))
        {
            Some(index) => sources.push(index),
            None => missing.push(column.name.to_uppercase()),
        }
    }
    if !missing.is_empty() {
        return Err(ImportError::Header {
            file,
            reason: format!(
                "the header lacks {}; is this the Simulacrum v2.1.0 {} table?",
                missing.join(", "),
                table.name
            ),
        });
    }
    let ignored: Vec<String> = header
        .iter()
        .filter(|h| table.column(&h.trim().to_lowercase()).is_none())
        .map(str::to_string)
        .collect();

    let schema = table.arrow_schema();
    let key_source = sources[router.key()];
    let key_column = table.columns[router.key()].name.to_uppercase();
    let owner_key = table
        .primary_key
        .as_deref()
        .and_then(|pk| table.columns.iter().position(|c| c.name == pk))
        .map(|p| sources[p]);
    let mut orphans = 0u64;
    let mut records = reader.into_records();
    loop {
        let mut rows: Vec<(usize, csv::StringRecord)> = Vec::with_capacity(BATCH_ROWS);
        for record in records.by_ref().take(BATCH_ROWS) {
            let record = record.map_err(|e| csv_error(&file, &e))?;
            let line = record.position().map_or(0, |p| p.line());
            let key = values::parse_key(record.get(key_source)).map_err(|expected| {
                ImportError::Value {
                    file: file.clone(),
                    line,
                    column: key_column.clone(),
                    expected,
                }
            })?;
            match router.route(key) {
                Some(trust) => {
                    if let (Some(owners), Some(pk)) = (keep_owners.as_deref_mut(), owner_key)
                        && let Ok(Some(id)) = values::parse_key(record.get(pk))
                    {
                        owners.insert(id, trust);
                    }
                    rows.push((trust, record));
                }
                None => orphans += 1,
            }
        }
        if rows.is_empty() {
            break;
        }
        let mut by_trust: BTreeMap<usize, Vec<&csv::StringRecord>> = BTreeMap::new();
        for (trust, record) in &rows {
            by_trust.entry(*trust).or_default().push(record);
        }
        for (trust, records) in by_trust {
            let mut arrays = Vec::with_capacity(table.columns.len());
            for (column, &source) in table.columns.iter().zip(&sources) {
                let values = ColumnValues {
                    records: &records,
                    source,
                };
                arrays.push(parse_column(column.ty, values).map_err(|(line, expected)| {
                    ImportError::Value {
                        file: file.clone(),
                        line,
                        column: column.name.to_uppercase(),
                        expected,
                    }
                })?);
            }
            let batch = RecordBatch::try_new(Arc::clone(&schema), arrays)
                .map_err(|e| ImportError::Config(e.to_string()))?;
            write(trust, &batch)?;
        }
    }
    Ok((orphans, ignored))
}

fn csv_error(file: &str, e: &csv::Error) -> ImportError {
    let line = e.position().map_or(0, |p| p.line());
    let reason = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            format!("a row has {len} fields where the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "a field is not valid UTF-8".to_string(),
        csv::ErrorKind::Io(io) => io.to_string(),
        _ => "the file is not valid CSV".to_string(),
    };
    ImportError::Csv {
        file: file.to_string(),
        line,
        reason,
    }
}
