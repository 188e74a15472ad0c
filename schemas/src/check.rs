//! `trustql schema check`: validates one site's Parquet files against the schema.
//!
//! Problems are reported as counts. Identifier values never appear in a report; for other coded
//! columns a few offending codes are shown so the site can find them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::SchemaError;
use crate::model::{Column, ColumnType, DisclosureClass, Table, TrustSchema};

/// How many offending codes a report shows per column.
const EXAMPLES: usize = 3;

/// One thing wrong with a table's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `<table>.parquet` is absent.
    MissingFile,
    /// The file is not Parquet, is truncated, or could not be decoded.
    Unreadable {
        /// What the Parquet reader said (structural, never row values).
        reason: String,
    },
    /// A column the schema requires is absent.
    MissingColumn {
        /// Column name.
        column: String,
    },
    /// A column the schema does not define.
    ExtraColumn {
        /// Column name.
        column: String,
    },
    /// A column has the wrong Arrow type.
    WrongType {
        /// Column name.
        column: String,
        /// The schema's type.
        expected: ColumnType,
        /// The type found in the file.
        found: String,
    },
    /// Values that are not codes of the column's code set.
    OutsideCodeSet {
        /// Column name.
        column: String,
        /// The code set.
        code_set: String,
        /// Number of rows affected.
        rows: u64,
        /// A few offending codes (empty for identifier columns).
        examples: Vec<String>,
    },
    /// Rows whose key (primary or foreign) is null.
    NullKey {
        /// Column name.
        column: String,
        /// Number of rows affected.
        rows: u64,
    },
    /// Rows whose primary key repeats an earlier row's.
    DuplicateKey {
        /// Column name.
        column: String,
        /// Number of rows affected.
        rows: u64,
    },
    /// Rows whose foreign key has no matching row in the referenced table.
    BrokenReference {
        /// Column name.
        column: String,
        /// The referenced `table.column`.
        references: String,
        /// Number of rows affected.
        rows: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::MissingFile => write!(f, "file is missing"),
            Problem::Unreadable { reason } => write!(f, "not a readable Parquet file: {reason}"),
            Problem::MissingColumn { column } => write!(f, "column `{column}` is missing"),
            Problem::ExtraColumn { column } => {
                write!(f, "column `{column}` is not in the schema")
            }
            Problem::WrongType {
                column,
                expected,
                found,
            } => write!(
                f,
                "column `{column}` has type {found}; the schema says {}",
                expected.name()
            ),
            Problem::OutsideCodeSet {
                column,
                code_set,
                rows,
                examples,
            } => {
                write!(
                    f,
                    "column `{column}`: {rows} row(s) hold values outside code set `{code_set}`"
                )?;
                if !examples.is_empty() {
                    write!(f, " (e.g. {})", examples.join(", "))?;
                }
                Ok(())
            }
            Problem::NullKey { column, rows } => {
                write!(f, "column `{column}`: {rows} row(s) have no key")
            }
            Problem::DuplicateKey { column, rows } => {
                write!(f, "column `{column}`: {rows} row(s) repeat a key")
            }
            Problem::BrokenReference {
                column,
                references,
                rows,
            } => write!(
                f,
                "column `{column}`: {rows} row(s) point to no row of `{references}`"
            ),
        }
    }
}

/// The result of checking one table.
#[derive(Debug, Clone)]
pub struct TableReport {
    /// Table name.
    pub table: String,
    /// Rows read, when the file could be read.
    pub rows: Option<u64>,
    /// What is wrong (empty when the table is fine).
    pub problems: Vec<Problem>,
}

/// The result of checking one site directory.
#[derive(Debug, Clone)]
pub struct SiteReport {
    /// The directory checked.
    pub dir: PathBuf,
    /// Schema name and version checked against.
    pub schema_version: String,
    /// One report per schema table.
    pub tables: Vec<TableReport>,
    /// Files in the directory that are not schema tables (reported, not an error).
    pub extra_files: Vec<String>,
}

impl SiteReport {
    /// True when no table has a problem.
    pub fn is_ok(&self) -> bool {
        self.tables.iter().all(|t| t.problems.is_empty())
    }

    /// Total number of problems across tables.
    pub fn problem_count(&self) -> usize {
        self.tables.iter().map(|t| t.problems.len()).sum()
    }
}

impl fmt::Display for SiteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} against schema {}",
            self.dir.display(),
            self.schema_version
        )?;
        for table in &self.tables {
            let rows = table
                .rows
                .map(|r| format!("{r} rows"))
                .unwrap_or_else(|| "not read".to_string());
            let status = if table.problems.is_empty() {
                "ok"
            } else {
                "PROBLEMS"
            };
            writeln!(f, "  {:<24} {:>14}  {status}", table.table, rows)?;
            for problem in &table.problems {
                writeln!(f, "      - {problem}")?;
            }
        }
        for extra in &self.extra_files {
            writeln!(f, "  note: `{extra}` is not a schema table and is ignored")?;
        }
        if self.is_ok() {
            write!(f, "OK: every table matches the schema")
        } else {
            write!(f, "FAILED: {} problem(s)", self.problem_count())
        }
    }
}

/// Checks every table of `schema` in `dir` (laid out as `<table>.parquet`).
///
/// Errors only when the directory itself cannot be read; everything wrong with the files is
/// reported in the [`SiteReport`].
pub fn check_site(schema: &TrustSchema, dir: &Path) -> Result<SiteReport, SchemaError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SchemaError::Io {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let known: HashSet<String> = schema
        .tables()
        .iter()
        .map(|t| format!("{}.parquet", t.name))
        .collect();
    let mut extra_files = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|e| SchemaError::Io {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !known.contains(&name) {
            extra_files.insert(name);
        }
    }

    // Parents are checked before children so their keys are known; the schema's foreign keys
    // form a tree rooted at the patient table.
    let mut order: Vec<(usize, &Table)> = schema
        .tables()
        .iter()
        .map(|t| (schema.patient_path(&t.name).map(|p| p.len()), t))
        .map(|(depth, t)| depth.map(|d| (d, t)))
        .collect::<Result<_, _>>()?;
    order.sort_by_key(|(depth, _)| *depth);

    let mut keys: HashMap<String, HashSet<i64>> = HashMap::new();
    let mut reports: HashMap<String, TableReport> = HashMap::new();
    for (_, table) in order {
        let path = dir.join(format!("{}.parquet", table.name));
        let (report, table_keys) = check_table(schema, table, &path, &keys);
        if let Some(table_keys) = table_keys {
            keys.insert(table.name.clone(), table_keys);
        }
        reports.insert(table.name.clone(), report);
    }
    let tables = schema
        .tables()
        .iter()
        .filter_map(|t| reports.remove(&t.name))
        .collect();
    Ok(SiteReport {
        dir: dir.to_path_buf(),
        schema_version: format!("{} {}", schema.info().name, schema.info().version),
        tables,
        extra_files: extra_files.into_iter().collect(),
    })
}

/// What to verify in one column while streaming a table.
enum ValueCheck<'a> {
    Codes {
        column: &'a Column,
        codes: HashSet<&'a str>,
        rows: u64,
        examples: BTreeSet<String>,
    },
    PrimaryKey {
        column: &'a Column,
        seen: HashSet<i64>,
        nulls: u64,
        duplicates: u64,
    },
    ForeignKey {
        column: &'a Column,
        parent: &'a HashSet<i64>,
        nulls: u64,
        broken: u64,
    },
}

fn check_table(
    schema: &TrustSchema,
    table: &Table,
    path: &Path,
    keys: &HashMap<String, HashSet<i64>>,
) -> (TableReport, Option<HashSet<i64>>) {
    let mut report = TableReport {
        table: table.name.clone(),
        rows: None,
        problems: Vec::new(),
    };
    if !path.exists() {
        report.problems.push(Problem::MissingFile);
        return (report, None);
    }
    let builder = match File::open(path)
        .map_err(|e| e.to_string())
        .and_then(|f| ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| e.to_string()))
    {
        Ok(builder) => builder,
        Err(reason) => {
            report.problems.push(Problem::Unreadable { reason });
            return (report, None);
        }
    };

    // Structure: names and types.
    let file_schema = Arc::clone(builder.schema());
    let mut usable: HashMap<&str, usize> = HashMap::new();
    for column in &table.columns {
        match file_schema.index_of(&column.name) {
            Err(_) => report.problems.push(Problem::MissingColumn {
                column: column.name.clone(),
            }),
            Ok(index) => {
                let found = file_schema.field(index).data_type();
                if column.ty.accepts(found) {
                    usable.insert(column.name.as_str(), index);
                } else {
                    report.problems.push(Problem::WrongType {
                        column: column.name.clone(),
                        expected: column.ty,
                        found: found.to_string(),
                    });
                }
            }
        }
    }
    for field in file_schema.fields() {
        if table.column(field.name()).is_none() {
            report.problems.push(Problem::ExtraColumn {
                column: field.name().clone(),
            });
        }
    }

    // Values: code sets and keys, over the usable columns only.
    let mut checks = Vec::new();
    let mut projection = Vec::new();
    for column in &table.columns {
        let Some(&index) = usable.get(column.name.as_str()) else {
            continue;
        };
        let check = if table.primary_key.as_deref() == Some(column.name.as_str()) {
            Some(ValueCheck::PrimaryKey {
                column,
                seen: HashSet::new(),
                nulls: 0,
                duplicates: 0,
            })
        } else if let Some((parent, _)) = column.reference() {
            // An unreadable parent is already reported; its children are not blamed for it.
            keys.get(parent).map(|parent| ValueCheck::ForeignKey {
                column,
                parent,
                nulls: 0,
                broken: 0,
            })
        } else {
            column
                .code_set
                .as_deref()
                .and_then(|name| schema.code_set(name))
                .map(|set| ValueCheck::Codes {
                    column,
                    codes: set.code_set(),
                    rows: 0,
                    examples: BTreeSet::new(),
                })
        };
        if let Some(check) = check {
            projection.push(index);
            checks.push((projection.len() - 1, check));
        }
    }

    let mask = ProjectionMask::roots(builder.parquet_schema(), projection.iter().copied());
    let reader = match builder.with_projection(mask).build() {
        Ok(reader) => reader,
        Err(e) => {
            report.problems.push(Problem::Unreadable {
                reason: e.to_string(),
            });
            return (report, None);
        }
    };
    let mut rows = 0u64;
    for batch in reader {
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                report.problems.push(Problem::Unreadable {
                    reason: e.to_string(),
                });
                return (report, None);
            }
        };
        rows += batch.num_rows() as u64;
        for (position, check) in &mut checks {
            if let Err(reason) = apply(check, &batch, *position) {
                report.problems.push(Problem::Unreadable { reason });
                return (report, None);
            }
        }
    }
    report.rows = Some(rows);
    let mut table_keys = None;

    for (_, check) in checks {
        match check {
            ValueCheck::Codes {
                column,
                rows,
                examples,
                ..
            } => {
                if rows > 0 {
                    let examples = if column.class == DisclosureClass::DirectIdentifier {
                        Vec::new()
                    } else {
                        examples.into_iter().collect()
                    };
                    report.problems.push(Problem::OutsideCodeSet {
                        column: column.name.clone(),
                        code_set: column.code_set.clone().unwrap_or_default(),
                        rows,
                        examples,
                    });
                }
            }
            ValueCheck::PrimaryKey {
                column,
                seen,
                nulls,
                duplicates,
            } => {
                if nulls > 0 {
                    report.problems.push(Problem::NullKey {
                        column: column.name.clone(),
                        rows: nulls,
                    });
                }
                if duplicates > 0 {
                    report.problems.push(Problem::DuplicateKey {
                        column: column.name.clone(),
                        rows: duplicates,
                    });
                }
                table_keys = Some(seen);
            }
            ValueCheck::ForeignKey {
                column,
                nulls,
                broken,
                ..
            } => {
                if nulls > 0 {
                    report.problems.push(Problem::NullKey {
                        column: column.name.clone(),
                        rows: nulls,
                    });
                }
                if broken > 0 {
                    report.problems.push(Problem::BrokenReference {
                        column: column.name.clone(),
                        references: column.references.clone().unwrap_or_default(),
                        rows: broken,
                    });
                }
            }
        }
    }
    (report, table_keys)
}

/// Folds one batch's column into a check; errors only if the column cannot be decoded.
fn apply(check: &mut ValueCheck<'_>, batch: &RecordBatch, position: usize) -> Result<(), String> {
    let array = batch.column(position);
    match check {
        ValueCheck::Codes {
            codes,
            rows,
            examples,
            ..
        } => {
            let strings = cast(array, &DataType::Utf8).map_err(|e| e.to_string())?;
            for value in strings.as_string::<i32>().iter().flatten() {
                if !codes.contains(value) {
                    *rows += 1;
                    if examples.len() < EXAMPLES {
                        examples.insert(value.to_string());
                    }
                }
            }
        }
        ValueCheck::PrimaryKey {
            seen,
            nulls,
            duplicates,
            ..
        } => {
            let ints = array
                .as_primitive_opt::<Int64Type>()
                .ok_or("key column is not int64")?;
            *nulls += ints.null_count() as u64;
            for value in ints.iter().flatten() {
                if !seen.insert(value) {
                    *duplicates += 1;
                }
            }
        }
        ValueCheck::ForeignKey {
            parent,
            nulls,
            broken,
            ..
        } => {
            let ints = array
                .as_primitive_opt::<Int64Type>()
                .ok_or("key column is not int64")?;
            *nulls += ints.null_count() as u64;
            *broken += ints
                .iter()
                .flatten()
                .filter(|v| !parent.contains(v))
                .count() as u64;
        }
    }
    Ok(())
}
