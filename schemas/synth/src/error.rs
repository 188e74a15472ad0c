use std::path::PathBuf;

/// Errors from generating a synthetic federation.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The request cannot be met as given.
    #[error("invalid synthetic data request: {0}")]
    Config(String),
    /// The output directory already holds data that generation would overwrite.
    #[error("{0} already holds files; choose an empty directory (or allow overwriting)")]
    OutputNotEmpty(PathBuf),
    /// A file or directory could not be written.
    #[error("cannot write {path}: {reason}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The reason.
        reason: String,
    },
    /// The schema this generator was built for does not match the loaded schema.
    #[error("the schema does not match the generator: {0}")]
    Schema(String),
    /// Arrow or Parquet refused a batch (a bug in the generator, reported rather than panicking).
    #[error("could not encode generated data: {0}")]
    Encode(String),
}
