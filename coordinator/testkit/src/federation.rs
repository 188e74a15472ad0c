//! A researcher's view of a loopback demo federation: a connected Flight SQL client, its
//! answers as one batch, their columns as text or numbers, and the oracle over the same
//! trusts' Parquet.

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type};
use datafusion::prelude::SessionContext;
use trustql_client::{Client, QueryResult};
use trustql_demo::{Federation, PROJECT};

/// A researcher's client of `fed`'s coordinator: its CA, its token, the demo project.
pub async fn client(fed: &Federation) -> Client {
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    Client::connect(&fed.info.url, Some(&ca), &fed.info.token, Some(PROJECT))
        .await
        .expect("connect")
}

/// A federated answer as one batch.
pub fn one(result: &QueryResult) -> RecordBatch {
    concat_batches(&result.schema, &result.batches).expect("concat")
}

/// Column `column` as text, a null as `"null"`.
pub fn texts(batch: &RecordBatch, column: usize) -> Vec<String> {
    let text = cast(batch.column(column), &DataType::Utf8).expect("cast");
    text.as_string::<i32>()
        .iter()
        .map(|v| v.unwrap_or("null").to_string())
        .collect()
}

/// Column `column` as numbers.
pub fn floats(batch: &RecordBatch, column: usize) -> Vec<Option<f64>> {
    let values = cast(batch.column(column), &DataType::Float64).expect("cast");
    values.as_primitive::<Float64Type>().iter().collect()
}

/// The oracle over the union of every trust's Parquet in `fed`.
pub async fn central(fed: &Federation) -> SessionContext {
    crate::oracle::union(&fed.info.data_dir, &fed.info.trusts).await
}

/// The oracle over one trust's own Parquet.
pub async fn at_trust(fed: &Federation, trust: &str) -> SessionContext {
    crate::oracle::union(&fed.info.data_dir, &[trust.to_string()]).await
}
