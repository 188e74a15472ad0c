use std::path::PathBuf;

/// Errors from importing the Simulacrum CSV download.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The request cannot be met as given.
    #[error("invalid import request: {0}")]
    Config(String),
    /// The patient table is needed to assign patients to trusts.
    #[error("no sim_av_patient.csv in {0}: the patient table is required")]
    MissingPatients(PathBuf),
    /// A CSV header does not have the v2.1.0 fields.
    #[error("{file}: {reason}")]
    Header {
        /// The CSV file.
        file: String,
        /// What is wrong with the header.
        reason: String,
    },
    /// A value cannot be read as its column's type (the value itself is not repeated).
    #[error("{file}, line {line}, column {column}: the value is not a valid {expected}")]
    Value {
        /// The CSV file.
        file: String,
        /// Line in the file (1 = header).
        line: u64,
        /// Upper-case field name.
        column: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The CSV is malformed (unbalanced quotes, ragged rows…).
    #[error("{file}: malformed CSV near line {line}: {reason}")]
    Csv {
        /// The CSV file.
        file: String,
        /// Line in the file.
        line: u64,
        /// The reader's reason.
        reason: String,
    },
    /// A file or directory could not be read.
    #[error("cannot read {path}: {reason}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The reason.
        reason: String,
    },
    /// The output could not be written.
    #[error(transparent)]
    Output(#[from] trustql_schemas::SchemaError),
}
