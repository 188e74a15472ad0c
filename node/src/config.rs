//! `node.toml`: what a node serves, under which policy, with which certificates and limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::NodeError;
use crate::record_keys::RECORD_KEYS_FILE;

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
    /// Who may ask this node: the coordinator's client certificate and request-signing key.
    pub coordinator: CoordinatorIdentity,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// The other members of this trust's pools, by their pinned public keys (issue 17).
    #[serde(default)]
    pub pool: PoolConfig,
}

/// `[pool]`: the public keys of the trusts this node pools with. This node's own key pair is
/// [`POOL_KEY_FILE`] in `state_dir`, made at first start; `trustql pool key` prints its public
/// half for the other members to pin.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Each peer's X25519 public key (64 hex digits or 44 base64 characters), by trust code.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
}

/// File name of this node's pool secret inside `state_dir`.
pub const POOL_KEY_FILE: &str = "pool.key";

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

/// The coordinator this node answers, pinned: a certificate of the client CA is not enough
/// (another trust's node, or the coordinator's researcher-facing server, has one too), and
/// the coordinator must sign each request it vouches for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorIdentity {
    /// SHA-256 of the DER of each coordinator client certificate accepted (hex; colons, as
    /// `openssl x509 -fingerprint -sha256` prints, are allowed). The certificate must also
    /// carry the clientAuth extended key usage.
    pub client_cert_sha256: Vec<String>,
    /// The coordinator's Ed25519 request-signing public keys (PEM `PUBLIC KEY` files); more
    /// than one while a key is being replaced.
    pub request_keys: Vec<PathBuf>,
    /// How far a signed request's issue time may be from the node's clock, in seconds;
    /// request ids are remembered this long to refuse replays.
    #[serde(default = "default_max_request_age")]
    pub max_request_age_secs: u64,
    /// How far ahead of the node's clock a request's issue time may be, in seconds (at most
    /// `max_request_age_secs`): the node forgets the ids it saw when it restarts and refuses
    /// requests issued before it started, so only a request signed for later than its clock
    /// could be replayed, and only within this much.
    #[serde(default = "default_max_clock_ahead")]
    pub max_clock_ahead_secs: u64,
}

fn default_max_request_age() -> u64 {
    300
}

fn default_max_clock_ahead() -> u64 {
    5
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

    /// Where this node keeps its pool secret.
    pub fn pool_key_path(&self) -> PathBuf {
        self.state_dir.join(POOL_KEY_FILE)
    }

    /// Where this node keeps the secret of its patients' record keys.
    pub fn record_keys_path(&self) -> PathBuf {
        self.state_dir.join(RECORD_KEYS_FILE)
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
        ]
        .into_iter()
        .chain(config.coordinator.request_keys.iter_mut())
        {
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
