/// Errors from generating a synthetic federation.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The request cannot be met as given.
    #[error("invalid synthetic data request: {0}")]
    Config(String),
    /// The output could not be written.
    #[error(transparent)]
    Output(#[from] trustql_schemas::SchemaError),
    /// The schema this generator was built for does not match the loaded schema.
    #[error("the schema does not match the generator: {0}")]
    Schema(String),
    /// Arrow or Parquet refused a batch (a bug in the generator, reported rather than panicking).
    #[error("could not encode generated data: {0}")]
    Encode(String),
}
