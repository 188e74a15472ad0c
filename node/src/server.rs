//! Starting a node: check everything, then serve Flight over mutual TLS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use trustql_audit::{AuditEntry, AuditLog};
use trustql_budget::Ledger;
use trustql_policies::{load_approved, now_rfc3339};
use trustql_schemas::TrustSchema;

use crate::config::NodeConfig;
use crate::engine::SiteEngine;
use crate::error::NodeError;
use crate::gate::Gate;
use crate::pool_keys::PoolKeys;
use crate::record_keys::RecordKeySecret;
use crate::service::{MAX_REQUEST_BYTES, NodeService};

/// A node serving in the background.
pub struct RunningNode {
    addr: SocketAddr,
    trust: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningNode {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The trust it serves.
    pub fn trust(&self) -> &str {
        &self.trust
    }

    /// Stops accepting, lets running requests finish, and waits.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.wait().await
    }

    /// Waits until the server ends.
    pub async fn wait(&mut self) -> Result<(), NodeError> {
        match (&mut self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NodeError::Config(format!("the Flight server stopped: {e}"))),
            Err(_) => Err(NodeError::Config("the Flight server task failed".into())),
        }
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Checks the configuration, policy, data, audit log and certificates, then starts serving.
pub async fn start(config: &NodeConfig, schema: TrustSchema) -> Result<RunningNode, NodeError> {
    let policy = load_approved(&config.policy, &schema)?;
    let policy_hash = policy.hash.clone();
    let engine = SiteEngine::open(
        &config.trust,
        schema,
        policy,
        &config.data_dir,
        &config.limits,
    )
    .await?
    .with_ledger(Arc::new(Ledger::open(&config.ledger_path())?))
    // Every start: the same secret gives the same keys, so cells keep their adjustments.
    .with_record_keys(&RecordKeySecret::load_or_create(&config.state_dir)?)
    .await?
    .with_pool_keys(PoolKeys::load_or_create(
        &config.pool_key_path(),
        &config.pool,
    )?)?;
    let tls = tls_config(config)?;
    let gate = Gate::new(&config.trust, &config.coordinator)?;
    let audit = Arc::new(AuditLog::open(&config.audit_dir, &now_rfc3339())?);
    audit.append(AuditEntry::node_note(
        &now_rfc3339(),
        format!("node for {} started", config.trust),
        &policy_hash,
    ))?;

    let incoming = TcpIncoming::bind(config.listen).map_err(|e| NodeError::Io {
        path: config.listen.to_string().into(),
        reason: format!("cannot listen: {e}"),
    })?;
    // Small requests and answers: never let Nagle's algorithm hold them back.
    let incoming = incoming.with_nodelay(Some(true));
    let addr = incoming.local_addr().map_err(|e| NodeError::Io {
        path: config.listen.to_string().into(),
        reason: e.to_string(),
    })?;
    let service = FlightServiceServer::new(NodeService::new(Arc::new(engine), audit, gate))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let router = Server::builder()
        .tls_config(tls)
        .map_err(|e| NodeError::Tls(format!("the certificate or key is not usable: {e}")))?
        .add_service(service);
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = rx.await;
    }));
    Ok(RunningNode {
        addr,
        trust: config.trust.clone(),
        shutdown: Some(tx),
        task,
    })
}

fn tls_config(config: &NodeConfig) -> Result<ServerTlsConfig, NodeError> {
    let cert = read_pem(&config.tls.cert, "certificate")?;
    let key = read_pem(&config.tls.key, "private key")?;
    let ca = read_pem(&config.tls.client_ca, "coordinator CA certificate")?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca)))
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, NodeError> {
    let bytes = std::fs::read(path)
        .map_err(|e| NodeError::Tls(format!("cannot read the {what} {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(NodeError::Tls(format!(
            "the {what} {} is not a PEM file",
            path.display()
        )));
    }
    Ok(bytes)
}
