//! A researcher's client: connects to a coordinator over TLS with a bearer token, names the
//! project, runs SQL through Flight SQL, and reads the result with its coverage report.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::error::FlightError;
use arrow_flight::sql::CommandGetTables;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use trustql_protocol::Coverage;
pub use trustql_protocol::{EPSILON_HEADER, PREVIEW_HEADER, PROJECT_HEADER};

/// Errors a researcher can act on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator could not be reached or its certificate was not trusted.
    #[error("cannot connect to the coordinator at {url}: {reason}")]
    Connect {
        /// Where.
        url: String,
        /// Why.
        reason: String,
    },
    /// The coordinator refused or could not answer (its message says why).
    #[error("{0}")]
    Server(String),
    /// The CA file could not be read.
    #[error("cannot read the CA certificate {0}")]
    Ca(String),
}

/// A result and its coverage.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Result schema.
    pub schema: SchemaRef,
    /// Result rows.
    pub batches: Vec<RecordBatch>,
    /// Which trusts contributed (absent only if the server sent none).
    pub coverage: Option<Coverage>,
}

/// A connection to a coordinator.
pub struct Client {
    inner: FlightSqlServiceClient<Channel>,
}

impl Client {
    /// Connects over TLS, trusting `ca_pem` if given (else the system roots).
    pub async fn connect(
        url: &str,
        ca_pem: Option<&[u8]>,
        token: &str,
        project: Option<&str>,
    ) -> Result<Self, ClientError> {
        let connect = |reason: String| ClientError::Connect {
            url: url.to_string(),
            reason,
        };
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|_| connect("not a URL (expected https://host:port)".into()))?
            .tls_config(tls)
            .map_err(|e| connect(e.to_string()))?
            .connect_timeout(Duration::from_secs(10));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| connect(source_chain(&e)))?;
        let mut inner = FlightSqlServiceClient::new(channel);
        inner.set_token(token.to_string());
        if let Some(p) = project {
            inner.set_header(PROJECT_HEADER, p);
        }
        Ok(Client { inner })
    }

    /// For a project in differential-privacy mode: spend `epsilon` per query at each trust
    /// instead of the project's default (`None` for the default).
    pub fn set_epsilon(&mut self, epsilon: Option<f64>) {
        match epsilon {
            Some(e) => self.inner.set_header(EPSILON_HEADER, e.to_string()),
            None => {
                self.inner.set_header(EPSILON_HEADER, "");
            }
        }
    }

    /// Only ask what queries would cost and how noisy they would be; spend nothing.
    pub fn set_preview(&mut self, preview: bool) {
        self.inner
            .set_header(PREVIEW_HEADER, if preview { "true" } else { "false" });
    }

    /// Runs one SQL query.
    pub async fn query(&mut self, sql: &str) -> Result<QueryResult, ClientError> {
        let info = self
            .inner
            .execute(sql.to_string(), None)
            .await
            .map_err(server)?;
        let coverage = std::str::from_utf8(&info.app_metadata)
            .ok()
            .and_then(|text| Coverage::from_json(text).ok());
        let schema: SchemaRef = std::sync::Arc::new(
            info.clone()
                .try_decode_schema()
                .map_err(|_| ClientError::Server("the result schema could not be read".into()))?,
        );
        let mut batches = Vec::new();
        for endpoint in info.endpoint {
            let Some(ticket) = endpoint.ticket else {
                continue;
            };
            let stream = self.inner.do_get(ticket).await.map_err(server)?;
            let mut part: Vec<RecordBatch> = stream.try_collect().await.map_err(server)?;
            batches.append(&mut part);
        }
        Ok(QueryResult {
            schema,
            batches,
            coverage,
        })
    }

    /// The shared tables' names.
    pub async fn tables(&mut self) -> Result<Vec<String>, ClientError> {
        let info = self
            .inner
            .get_tables(CommandGetTables::default())
            .await
            .map_err(server)?;
        let mut names = Vec::new();
        for endpoint in info.endpoint {
            let Some(ticket) = endpoint.ticket else {
                continue;
            };
            let stream = self.inner.do_get(ticket).await.map_err(server)?;
            let batches: Vec<RecordBatch> = stream.try_collect().await.map_err(server)?;
            for batch in batches {
                if let Some(column) = batch.column_by_name("table_name") {
                    let column = arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8)
                        .map_err(|_| ClientError::Server("bad table listing".into()))?;
                    let strings = column
                        .as_any()
                        .downcast_ref::<arrow::array::StringArray>()
                        .ok_or_else(|| ClientError::Server("bad table listing".into()))?;
                    names.extend(strings.iter().flatten().map(str::to_string));
                }
            }
        }
        Ok(names)
    }
}

fn server(e: FlightError) -> ClientError {
    match e {
        FlightError::Tonic(status) => ClientError::Server(status.message().to_string()),
        other => ClientError::Server(other.to_string()),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
