//! The site layout shared by every producer and reader: `DIR/<TRUST_CODE>/<table>.parquet`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
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

/// One trust's Parquet writers, one per schema table, in schema order.
///
/// Files are written under a `.partial` name and renamed only when [`SiteWriter::finish`]
/// succeeds, so an interrupted run never leaves a file that looks complete.
pub struct SiteWriter {
    dir: PathBuf,
    writers: Vec<(String, ArrowWriter<File>, u64)>,
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
            .build();
        let mut writers = Vec::with_capacity(schema.tables().len());
        for table in schema.tables() {
            let path = dir.join(format!("{}.parquet.partial", table.name));
            let file = File::create(&path).map_err(|e| io(&path, e))?;
            let writer = ArrowWriter::try_new(file, table.arrow_schema(), Some(properties.clone()))
                .map_err(|e| SchemaError::Write(e.to_string()))?;
            writers.push((table.name.clone(), writer, 0));
        }
        Ok(SiteWriter {
            dir: dir.to_path_buf(),
            writers,
        })
    }

    /// Writes one batch per table (in schema order); empty batches are skipped.
    pub fn write(&mut self, batches: &[RecordBatch]) -> Result<(), SchemaError> {
        for ((_, writer, rows), batch) in self.writers.iter_mut().zip(batches) {
            self::write_one(writer, rows, batch)?;
        }
        Ok(())
    }

    /// Writes a batch to the table at position `table` in schema order.
    pub fn write_table(&mut self, table: usize, batch: &RecordBatch) -> Result<(), SchemaError> {
        let Some((_, writer, rows)) = self.writers.get_mut(table) else {
            return Err(SchemaError::Write(format!("no table at position {table}")));
        };
        write_one(writer, rows, batch)
    }

    /// Closes every file and moves it to its final name; returns rows per table.
    pub fn finish(self) -> Result<BTreeMap<String, u64>, SchemaError> {
        let mut rows = BTreeMap::new();
        for (name, writer, count) in self.writers {
            writer
                .close()
                .map_err(|e| SchemaError::Write(e.to_string()))?;
            let partial = self.dir.join(format!("{name}.parquet.partial"));
            let done = table_path(&self.dir, &name);
            std::fs::rename(&partial, &done).map_err(|e| SchemaError::Io {
                path: done.clone(),
                reason: e.to_string(),
            })?;
            rows.insert(name, count);
        }
        Ok(rows)
    }
}

fn write_one(
    writer: &mut ArrowWriter<File>,
    rows: &mut u64,
    batch: &RecordBatch,
) -> Result<(), SchemaError> {
    if batch.num_rows() > 0 {
        writer
            .write(batch)
            .map_err(|e| SchemaError::Write(e.to_string()))?;
        *rows += batch.num_rows() as u64;
    }
    Ok(())
}
