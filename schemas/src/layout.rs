//! The site layout shared by every producer and reader: `DIR/<TRUST_CODE>/<table>.parquet`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, Int64Array, RecordBatch};
use arrow::datatypes::Int64Type;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::SchemaError;
use crate::model::TrustSchema;

/// Most trusts a federation may have (trust codes are two-digit).
pub const MAX_TRUSTS: usize = 99;

/// The trust codes of an `n`-trust federation: `TQ01`, `TQ02`, …
pub fn trust_codes(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("TQ{i:02}")).collect()
}

/// Relative trust sizes: a Zipf-like skew, as real trusts' caseloads are.
pub fn trust_weights(n: usize) -> Vec<f64> {
    (0..n).map(|i| 1.0 / (i as f64 + 1.0).powf(0.8)).collect()
}

/// The path of one table's file in a site directory.
pub fn table_path(site_dir: &Path, table: &str) -> PathBuf {
    site_dir.join(format!("{table}.parquet"))
}

/// Rows a row group holds before it ends (at the next patient boundary, in tables with a
/// patient column): small enough that a node reads one file on all its cores.
pub const ROW_GROUP_ROWS: usize = 65_536;

/// One trust's Parquet writers, one per schema table, in schema order.
///
/// Files are written under a `.partial` name and renamed only when [`SiteWriter::finish`]
/// succeeds, so an interrupted run never leaves a file that looks complete. In a table with a
/// patient column, a row group never ends inside a run of one patient's rows, so rows written
/// in patient order keep each patient in one row group (see [`patients_in_order`]).
///
/// [`patients_in_order`]: crate::patients_in_order
pub struct SiteWriter {
    dir: PathBuf,
    writers: Vec<TableWriter>,
    row_group_rows: usize,
}

/// One table's file being written.
struct TableWriter {
    name: String,
    writer: ArrowWriter<File>,
    rows: u64,
    /// Position of the patient column, if the table has one.
    patient: Option<usize>,
    /// Rows in the row group being written.
    in_group: usize,
    /// The patient key of the last row written (`None` for a null or none yet).
    last: Option<i64>,
}

impl SiteWriter {
    /// Opens writers for every table in `dir`; refuses a non-empty `dir` unless `overwrite`.
    pub fn create(schema: &TrustSchema, dir: &Path, overwrite: bool) -> Result<Self, SchemaError> {
        let io = |path: &Path, e: std::io::Error| SchemaError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        if !overwrite
            && dir.exists()
            && std::fs::read_dir(dir)
                .map_err(|e| io(dir, e))?
                .next()
                .is_some()
        {
            return Err(SchemaError::OutputNotEmpty(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            // Row groups are ended by `TableWriter::write`, at patient boundaries.
            .set_max_row_group_row_count(None)
            .build();
        let mut writers = Vec::with_capacity(schema.tables().len());
        for table in schema.tables() {
            let path = dir.join(format!("{}.parquet.partial", table.name));
            let file = File::create(&path).map_err(|e| io(&path, e))?;
            let writer = ArrowWriter::try_new(file, table.arrow_schema(), Some(properties.clone()))
                .map_err(|e| SchemaError::Write(e.to_string()))?;
            let patient = schema
                .patient_column(&table.name)?
                .and_then(|c| table.columns.iter().position(|col| col.name == c));
            writers.push(TableWriter {
                name: table.name.clone(),
                writer,
                rows: 0,
                patient,
                in_group: 0,
                last: None,
            });
        }
        Ok(SiteWriter {
            dir: dir.to_path_buf(),
            writers,
            row_group_rows: ROW_GROUP_ROWS,
        })
    }

    /// The same writer with row groups of about `rows` rows (at least one) instead of
    /// [`ROW_GROUP_ROWS`].
    pub fn with_row_group_rows(mut self, rows: usize) -> Self {
        self.row_group_rows = rows.max(1);
        self
    }

    /// Writes one batch per table (in schema order); empty batches are skipped.
    pub fn write(&mut self, batches: &[RecordBatch]) -> Result<(), SchemaError> {
        for (writer, batch) in self.writers.iter_mut().zip(batches) {
            writer.write(batch, self.row_group_rows)?;
        }
        Ok(())
    }

    /// Writes a batch to the table at position `table` in schema order.
    pub fn write_table(&mut self, table: usize, batch: &RecordBatch) -> Result<(), SchemaError> {
        let Some(writer) = self.writers.get_mut(table) else {
            return Err(SchemaError::Write(format!("no table at position {table}")));
        };
        writer.write(batch, self.row_group_rows)
    }

    /// Closes every file and moves it to its final name; returns rows per table.
    pub fn finish(self) -> Result<BTreeMap<String, u64>, SchemaError> {
        let mut rows = BTreeMap::new();
        for table in self.writers {
            table
                .writer
                .close()
                .map_err(|e| SchemaError::Write(e.to_string()))?;
            let partial = self.dir.join(format!("{}.parquet.partial", table.name));
            let done = table_path(&self.dir, &table.name);
            std::fs::rename(&partial, &done).map_err(|e| SchemaError::Io {
                path: done.clone(),
                reason: e.to_string(),
            })?;
            rows.insert(table.name, table.rows);
        }
        Ok(rows)
    }
}

impl TableWriter {
    /// Writes `batch`, ending a row group at the first patient boundary once it holds
    /// `group_rows` rows (at the first row boundary in a table without a patient column).
    fn write(&mut self, batch: &RecordBatch, group_rows: usize) -> Result<(), SchemaError> {
        let encode = |e: parquet::errors::ParquetError| SchemaError::Write(e.to_string());
        let ids = self
            .patient
            .and_then(|i| batch.columns().get(i))
            .and_then(|c| c.as_primitive_opt::<Int64Type>());
        let key = |ids: Option<&Int64Array>, row: usize| {
            ids.and_then(|ids| ids.is_valid(row).then(|| ids.value(row)))
        };
        let rows = batch.num_rows();
        let mut start = 0;
        while start < rows {
            let from = start + group_rows.saturating_sub(self.in_group);
            let end = (from..rows).find(|&row| {
                // Without a patient column any row may start a new group.
                ids.is_none()
                    || key(ids, row)
                        != if row == 0 {
                            self.last
                        } else {
                            key(ids, row - 1)
                        }
            });
            let stop = end.unwrap_or(rows);
            if stop > start {
                self.writer
                    .write(&batch.slice(start, stop - start))
                    .map_err(encode)?;
                self.in_group += stop - start;
            }
            if end.is_some() {
                self.writer.flush().map_err(encode)?;
                self.in_group = 0;
            }
            start = stop;
        }
        if rows > 0 {
            self.last = key(ids, rows - 1);
            self.rows += rows as u64;
        }
        Ok(())
    }
}
