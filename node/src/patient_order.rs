//! Which of the site's files keep their patients in order (checked when the node opens), and
//! whether an aggregate's input reaches it in patient runs.
//!
//! DataFusion reads a Parquet file in whole row groups: a partition's byte range takes the row
//! groups that start inside it, and work stealing moves whole ranges. So over a file that
//! keeps each patient in one row group, ascending ([`patients_in_order`]), every partition of
//! a scan sees each of its patients as one run of rows and no patient is in two partitions.
//! Filters and projections keep that; anything that moves rows between partitions or reorders
//! them (a repartition, a join) does not, and such a plan is counted with sets instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use datafusion::datasource::listing::ListingTableUrl;
use datafusion::datasource::physical_plan::{FileSource, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use trustql_schemas::{TrustSchema, patients_in_order, table_path};

/// The site's files whose patients are in order, by their location as DataFusion names it.
#[derive(Debug, Default)]
pub(crate) struct OrderedFiles {
    files: HashMap<String, OrderedFile>,
}

/// One file found in patient order, and what it was when it was checked.
#[derive(Debug)]
struct OrderedFile {
    path: PathBuf,
    /// Its patient column.
    column: String,
    len: u64,
    modified: Option<SystemTime>,
}

impl OrderedFiles {
    /// Checks every table of `site_dir` that has a patient column; a file that cannot be read
    /// or is not in order is simply left out (it is counted with sets).
    pub(crate) fn check(schema: &TrustSchema, site_dir: &Path) -> Self {
        let mut ordered = OrderedFiles::default();
        for table in schema.tables() {
            if let Ok(Some(column)) = schema.patient_column(&table.name) {
                ordered.add(&table_path(site_dir, &table.name), &column);
            }
        }
        ordered
    }

    /// Adds the file at `path` if its `column` is in patient order.
    pub(crate) fn add(&mut self, path: &Path, column: &str) {
        // Its size and age first: a file replaced while it is checked is then seen as changed.
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let location = path
            .to_str()
            .and_then(|p| ListingTableUrl::parse(p).ok())
            .map(|url| url.prefix().as_ref().to_string());
        if let (Some(location), Ok(true)) = (location, patients_in_order(path, column)) {
            self.files.insert(
                location,
                OrderedFile {
                    path: path.to_path_buf(),
                    column: column.to_string(),
                    len: meta.len(),
                    modified: meta.modified().ok(),
                },
            );
        }
    }

    /// Whether column `index` of `plan`'s output arrives in patient runs, no patient in two
    /// partitions: `plan` is filters and projections over a Parquet scan of files in order, and
    /// the column is their patient column, unchanged.
    pub(crate) fn in_runs(&self, plan: &Arc<dyn ExecutionPlan>, index: usize) -> bool {
        let mut plan = plan;
        let mut index = index;
        loop {
            if let Some(filter) = plan.downcast_ref::<FilterExec>() {
                if let Some(projection) = filter.projection() {
                    let Some(&i) = projection.get(index) else {
                        return false;
                    };
                    index = i;
                }
                plan = filter.input();
            } else if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
                let Some(column) = projection
                    .expr()
                    .get(index)
                    .and_then(|e| e.expr.downcast_ref::<Column>())
                else {
                    return false;
                };
                index = column.index();
                plan = projection.input();
            } else if let Some(scan) = plan.downcast_ref::<DataSourceExec>() {
                return self.scans_in_order(scan, index);
            } else {
                return false;
            }
        }
    }

    /// Whether `scan` reads only files in order and its column `index` is their patient column.
    fn scans_in_order(&self, scan: &DataSourceExec, index: usize) -> bool {
        let Some((config, source)) = scan.downcast_to_file_source::<ParquetSource>() else {
            return false;
        };
        // The scan's own projection, if it has one, maps output columns to file columns.
        let file_column = match source.projection() {
            Some(projection) => projection
                .iter()
                .nth(index)
                .and_then(|e| e.expr.downcast_ref::<Column>())
                .map(Column::index),
            None => Some(index),
        };
        let Some(name) = file_column
            .and_then(|i| config.file_schema().fields().get(i))
            .map(|f| f.name().clone())
        else {
            return false;
        };
        let mut files = config.file_groups.iter().flat_map(|g| g.iter()).peekable();
        files.peek().is_some()
            && files.all(|file| {
                self.files
                    .get(file.object_meta.location.as_ref())
                    .is_some_and(|f| f.column == name && f.unchanged())
            })
    }
}

impl OrderedFile {
    /// Whether the file is still the one that was checked (same size and modification time).
    fn unchanged(&self) -> bool {
        std::fs::metadata(&self.path)
            .is_ok_and(|meta| meta.len() == self.len && meta.modified().ok() == self.modified)
    }
}
