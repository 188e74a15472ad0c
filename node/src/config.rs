//! `node.toml`: what a node serves, under which policy, with which certificates and limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::NodeError;

/// The node configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The trust code this node serves.
    pub trust: String,
    /// Directory holding `<table>.parquet` for this trust.
    pub data_dir: PathBuf,
    /// The approved policy file (its `.approval` record sits next to it).
    pub policy: PathBuf,
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Directory of the append-only audit log.
    pub audit_dir: PathBuf,
    /// Directory for other durable state.
    pub state_dir: PathBuf,
    /// TLS material.
    pub tls: TlsConfig,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
}

/// Certificates for mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This node's certificate chain (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The certificate authority whose clients (coordinators) are trusted (PEM).
    pub client_ca: PathBuf,
}

/// Resource limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Memory for query execution, in MiB.
    pub memory_mb: usize,
    /// Longest a query may run, in milliseconds.
    pub query_timeout_ms: u64,
    /// Queries run at once; more are refused as busy.
    pub max_concurrent_queries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mb: 1024,
            query_timeout_ms: 30_000,
            max_concurrent_queries: 4,
        }
    }
}

/// File name of the privacy-budget ledger inside `state_dir`.
pub const LEDGER_FILE: &str = "budget.ledger";

impl NodeConfig {
    /// Where this node keeps its privacy-budget ledger.
    pub fn ledger_path(&self) -> PathBuf {
        self.state_dir.join(LEDGER_FILE)
    }

    /// Reads a config file; relative paths are taken from the file's directory.
    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|e| NodeError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut config: NodeConfig =
            toml::from_str(&text).map_err(|e| NodeError::Config(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.data_dir,
            &mut config.policy,
            &mut config.audit_dir,
            &mut config.state_dir,
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.tls.client_ca,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if config.limits.max_concurrent_queries == 0 || config.limits.query_timeout_ms == 0 {
            return Err(NodeError::Config(
                "limits.max_concurrent_queries and limits.query_timeout_ms must be positive".into(),
            ));
        }
        Ok(config)
    }
}
