//! The schema file's model: tables, columns, disclosure classes and code sets.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::Deserialize;

use crate::error::SchemaError;

/// The Arrow type a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// 64-bit signed integer.
    Int64,
    /// UTF-8 text (Utf8, LargeUtf8 and Utf8View are all accepted in site files).
    Utf8,
    /// Calendar date (days since 1970-01-01).
    Date32,
    /// 64-bit float.
    Float64,
}

impl ColumnType {
    /// The Arrow data type written by TrustQL for this column type.
    pub fn data_type(self) -> DataType {
        match self {
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::Date32 => DataType::Date32,
            ColumnType::Float64 => DataType::Float64,
        }
    }

    /// Whether a site file's Arrow type is acceptable for this column.
    pub fn accepts(self, found: &DataType) -> bool {
        match self {
            ColumnType::Utf8 => matches!(
                found,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ),
            other => &other.data_type() == found,
        }
    }

    /// The name used in the schema file.
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Int64 => "int64",
            ColumnType::Utf8 => "utf8",
            ColumnType::Date32 => "date32",
            ColumnType::Float64 => "float64",
        }
    }
}

/// How much a column could reveal about a person; policies build their rules on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisclosureClass {
    /// Identifies a patient or a record: may only join on the patient key or be counted.
    DirectIdentifier,
    /// Could single a patient out in combination (dates, age, gender, area…).
    QuasiIdentifier,
    /// Clinical detail.
    Clinical,
}

impl DisclosureClass {
    /// The name used in the schema file.
    pub fn name(self) -> &'static str {
        match self {
            DisclosureClass::DirectIdentifier => "direct_identifier",
            DisclosureClass::QuasiIdentifier => "quasi_identifier",
            DisclosureClass::Clinical => "clinical",
        }
    }
}

/// One column of a table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    /// Lower-case column name (the Simulacrum field name).
    pub name: String,
    /// Arrow type.
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// Disclosure class.
    pub class: DisclosureClass,
    /// The code set its values must come from, if any.
    #[serde(default)]
    pub code_set: Option<String>,
    /// `table.column` this column refers to (a foreign key), if any.
    #[serde(default)]
    pub references: Option<String>,
    /// Public `[lower, upper]` range of a numeric column: known to anyone, so it may bound a
    /// sum's sensitivity and its perturbation. SDC modes sum, average and take variances only
    /// of columns that have one; a trust's policy may narrow it.
    #[serde(default)]
    pub bounds: Option<[f64; 2]>,
    /// Narrowest band a CASE may cut a numeric column into (ages in bands at least 5 years
    /// wide): a narrower band singles out fewer patients than the table builder allows.
    #[serde(default)]
    pub band_width: Option<f64>,
    /// Width of the public bins its percentiles are read from (every trust counts rows per
    /// bin between the bounds; a median is within one bin of the exact value). Needs bounds;
    /// at least `band_width`, so a histogram shows no finer band than a CASE may cut.
    #[serde(default)]
    pub bin_width: Option<f64>,
    /// What the column holds.
    pub description: String,
}

impl Column {
    /// The referenced `(table, column)`, if this column is a foreign key.
    pub fn reference(&self) -> Option<(&str, &str)> {
        self.references.as_deref().and_then(|r| r.split_once('.'))
    }
}

/// One table of the schema.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// Lower-case table name (the Simulacrum table name).
    pub name: String,
    /// What one row is.
    pub description: String,
    /// The column that identifies a row, if the table has one.
    #[serde(default)]
    pub primary_key: Option<String>,
    /// The columns, in file order.
    pub columns: Vec<Column>,
}

impl Table {
    /// The column with this name.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The Arrow schema for this table (all columns nullable, as in Simulacrum).
    pub fn arrow_schema(&self) -> SchemaRef {
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.data_type(), true))
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// The first foreign-key column, which leads towards the patient table.
    fn parent_reference(&self) -> Option<(&Column, &str, &str)> {
        self.columns
            .iter()
            .find_map(|c| c.reference().map(|(t, col)| (c, t, col)))
    }
}

/// One code of a code set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Code {
    /// The code as stored in the data.
    pub code: String,
    /// Its meaning, where the lookup gives one.
    #[serde(default)]
    pub label: Option<String>,
}

/// A set of permitted codes (a Simulacrum lookup table).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeSet {
    /// Which lookup table or dictionary note the codes come from.
    pub lookup: String,
    /// The codes.
    pub codes: Vec<Code>,
}

impl CodeSet {
    /// The codes as a set, for membership tests over many rows.
    pub fn code_set(&self) -> HashSet<&str> {
        self.codes.iter().map(|c| c.code.as_str()).collect()
    }
}

/// The `[schema]` header: name and version.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaInfo {
    /// Schema name.
    pub name: String,
    /// Schema version (semantic versioning).
    pub version: String,
    /// What it follows.
    pub based_on: String,
    /// The table with one row per patient, which every other table reaches.
    pub patient_table: String,
}

/// One step from a table towards the patient table along a foreign key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// Table the step starts from.
    pub table: String,
    /// Its foreign-key column.
    pub column: String,
    /// The referenced table.
    pub parent_table: String,
    /// The referenced column.
    pub parent_column: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    schema: SchemaInfo,
    table: Vec<Table>,
    #[serde(default)]
    code_sets: BTreeMap<String, CodeSet>,
}

/// The whole common schema, loaded and checked for consistency.
#[derive(Debug, Clone)]
pub struct TrustSchema {
    info: SchemaInfo,
    tables: Vec<Table>,
    code_sets: BTreeMap<String, CodeSet>,
}

impl TrustSchema {
    /// The schema shipped with this build (`schemas/cancer_schema.toml`).
    pub fn cancer() -> Result<Self, SchemaError> {
        Self::from_toml(crate::CANCER_SCHEMA_TOML)
    }

    /// Loads a schema file from disk.
    pub fn from_path(path: &Path) -> Result<Self, SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|e| SchemaError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_toml(&text)
    }

    /// Parses and validates schema text.
    pub fn from_toml(text: &str) -> Result<Self, SchemaError> {
        let file: SchemaFile =
            toml::from_str(text).map_err(|e| SchemaError::Parse(e.to_string()))?;
        let schema = TrustSchema {
            info: file.schema,
            tables: file.table,
            code_sets: file.code_sets,
        };
        schema.validate()?;
        Ok(schema)
    }

    /// Name, version and provenance.
    pub fn info(&self) -> &SchemaInfo {
        &self.info
    }

    /// All tables, in file order (parents before children).
    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// The table with this name.
    pub fn table(&self, name: &str) -> Result<&Table, SchemaError> {
        self.tables
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| SchemaError::UnknownTable(name.to_string()))
    }

    /// The code set with this name.
    pub fn code_set(&self, name: &str) -> Option<&CodeSet> {
        self.code_sets.get(name)
    }

    /// All code sets by name.
    pub fn code_sets(&self) -> &BTreeMap<String, CodeSet> {
        &self.code_sets
    }

    /// The Arrow schema of a table.
    pub fn arrow_schema(&self, table: &str) -> Result<SchemaRef, SchemaError> {
        Ok(self.table(table)?.arrow_schema())
    }

    /// The column of `table` that holds the patient key itself: the patient table's key, or a
    /// foreign key straight to it (`None` for tables that reach the patient through another).
    pub fn patient_column(&self, table: &str) -> Result<Option<String>, SchemaError> {
        let hops = self.patient_path(table)?;
        Ok(match hops.as_slice() {
            [] => self.table(table)?.primary_key.clone(),
            [hop] => Some(hop.column.clone()),
            _ => None,
        })
    }

    /// The foreign-key steps from `table` to the patient table (empty for the patient table).
    pub fn patient_path(&self, table: &str) -> Result<Vec<Hop>, SchemaError> {
        let mut hops = Vec::new();
        let mut current = self.table(table)?;
        while current.name != self.info.patient_table {
            let Some((column, parent, parent_column)) = current.parent_reference() else {
                return Err(SchemaError::Inconsistent(format!(
                    "table `{}` has no foreign key leading to the patient table",
                    current.name
                )));
            };
            hops.push(Hop {
                table: current.name.clone(),
                column: column.name.clone(),
                parent_table: parent.to_string(),
                parent_column: parent_column.to_string(),
            });
            if hops.len() > self.tables.len() {
                return Err(SchemaError::Inconsistent(format!(
                    "foreign keys from `{table}` go round in a cycle"
                )));
            }
            current = self.table(parent)?;
        }
        Ok(hops)
    }

    fn validate(&self) -> Result<(), SchemaError> {
        let bad = |msg: String| Err(SchemaError::Inconsistent(msg));
        let mut table_names = HashSet::new();
        for table in &self.tables {
            if !table_names.insert(table.name.as_str()) {
                return bad(format!("table `{}` is defined twice", table.name));
            }
            if table.columns.is_empty() {
                return bad(format!("table `{}` has no columns", table.name));
            }
            let mut column_names = HashSet::new();
            for column in &table.columns {
                if column.name != column.name.to_lowercase() {
                    return bad(format!(
                        "column `{}.{}` must be lower case so SQL can name it unquoted",
                        table.name, column.name
                    ));
                }
                if !column_names.insert(column.name.as_str()) {
                    return bad(format!(
                        "column `{}.{}` is defined twice",
                        table.name, column.name
                    ));
                }
                if let Some(set) = &column.code_set
                    && !self.code_sets.contains_key(set)
                {
                    return bad(format!(
                        "column `{}.{}` names code set `{set}`, which is not defined",
                        table.name, column.name
                    ));
                }
                if let Some(reference) = &column.references {
                    self.validate_reference(&table.name, column, reference)?;
                }
                let numeric = matches!(column.ty, ColumnType::Int64 | ColumnType::Float64);
                if let Some([lower, upper]) = column.bounds
                    && (!numeric || !lower.is_finite() || !upper.is_finite() || lower >= upper)
                {
                    return bad(format!(
                        "bounds of `{}.{}` must be finite with lower < upper, on a numeric column",
                        table.name, column.name
                    ));
                }
                if let Some(width) = column.band_width
                    && (!numeric || !width.is_finite() || width <= 0.0)
                {
                    return bad(format!(
                        "band_width of `{}.{}` must be positive, on a numeric column",
                        table.name, column.name
                    ));
                }
                if let Some(width) = column.bin_width {
                    let bounded = column.bounds.is_some_and(|[lower, upper]| {
                        width.is_finite() && width > 0.0 && (upper - lower) / width <= 10_000.0
                    });
                    if !bounded || column.band_width.is_some_and(|band| width < band) {
                        return bad(format!(
                            "bin_width of `{}.{}` must be positive, at least its band_width, on a \
                             column with bounds that it cuts into at most 10000 bins",
                            table.name, column.name
                        ));
                    }
                }
            }
            if let Some(pk) = &table.primary_key
                && table.column(pk).is_none()
            {
                return bad(format!(
                    "primary key `{pk}` of table `{}` is not one of its columns",
                    table.name
                ));
            }
        }
        let patient = self.table(&self.info.patient_table).map_err(|_| {
            SchemaError::Inconsistent(format!(
                "patient table `{}` is not defined",
                self.info.patient_table
            ))
        })?;
        if patient.primary_key.is_none() {
            return bad("the patient table needs a primary key".to_string());
        }
        for (name, set) in &self.code_sets {
            let mut seen = HashSet::new();
            for code in &set.codes {
                if !seen.insert(code.code.as_str()) {
                    return bad(format!("code set `{name}` lists a code twice"));
                }
            }
        }
        for table in &self.tables {
            self.patient_path(&table.name)?;
        }
        Ok(())
    }

    fn validate_reference(
        &self,
        table: &str,
        column: &Column,
        reference: &str,
    ) -> Result<(), SchemaError> {
        let Some((parent, parent_column)) = column.reference() else {
            return Err(SchemaError::Inconsistent(format!(
                "`{table}.{}` references `{reference}`; write it as table.column",
                column.name
            )));
        };
        let parent_table = self.table(parent).map_err(|_| {
            SchemaError::Inconsistent(format!(
                "`{table}.{}` references table `{parent}`, which is not defined",
                column.name
            ))
        })?;
        let Some(target) = parent_table.column(parent_column) else {
            return Err(SchemaError::Inconsistent(format!(
                "`{table}.{}` references `{reference}`, which is not a column",
                column.name
            )));
        };
        if parent_table.primary_key.as_deref() != Some(parent_column) {
            return Err(SchemaError::Inconsistent(format!(
                "`{table}.{}` must reference the primary key of `{parent}`",
                column.name
            )));
        }
        if target.ty != column.ty {
            return Err(SchemaError::Inconsistent(format!(
                "`{table}.{}` and `{reference}` have different types",
                column.name
            )));
        }
        Ok(())
    }
}
