use std::path::PathBuf;

/// Errors from loading a schema or reading a site's files.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The schema file is not valid TOML or has unknown or missing keys.
    #[error("schema file is not valid: {0}")]
    Parse(String),
    /// The schema file parsed but contradicts itself.
    #[error("schema is inconsistent: {0}")]
    Inconsistent(String),
    /// A table name that the schema does not define.
    #[error("no table named `{0}` in the schema")]
    UnknownTable(String),
    /// A file or directory could not be read.
    #[error("cannot read {path}: {reason}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// The output directory already holds data that would be overwritten.
    #[error("{0} already holds files; choose an empty directory (or allow overwriting)")]
    OutputNotEmpty(PathBuf),
    /// Arrow or Parquet could not encode a file.
    #[error("cannot write Parquet: {0}")]
    Write(String),
}
