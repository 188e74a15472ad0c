//! Starting the coordinator.

use std::net::SocketAddr;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use trustql_schemas::TrustSchema;

use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::federation::Coordinator;
use crate::flight_sql::ResearcherService;

/// Largest request a researcher may send.
const MAX_REQUEST_BYTES: usize = 1 << 20;

/// A coordinator serving in the background.
pub struct RunningCoordinator {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningCoordinator {
    /// The address researchers connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits.
    pub async fn stop(mut self) -> Result<(), CoordinatorError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.wait().await
    }

    /// Waits until the server ends.
    pub async fn wait(&mut self) -> Result<(), CoordinatorError> {
        match (&mut self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CoordinatorError::Config(format!("the server stopped: {e}"))),
            Err(_) => Err(CoordinatorError::Config("the server task failed".into())),
        }
    }
}

impl Drop for RunningCoordinator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Builds the coordinator and serves Flight SQL over TLS.
pub async fn start(
    config: &CoordinatorConfig,
    schema: TrustSchema,
) -> Result<RunningCoordinator, CoordinatorError> {
    let coordinator = Arc::new(Coordinator::new(config, schema)?);
    let cert = std::fs::read(&config.tls.cert).map_err(|e| {
        CoordinatorError::Tls(format!("cannot read {}: {e}", config.tls.cert.display()))
    })?;
    let key = std::fs::read(&config.tls.key).map_err(|e| {
        CoordinatorError::Tls(format!("cannot read {}: {e}", config.tls.key.display()))
    })?;
    let incoming = TcpIncoming::bind(config.listen).map_err(|e| {
        CoordinatorError::Config(format!("cannot listen on {}: {e}", config.listen))
    })?;
    // Small requests and answers: never let Nagle's algorithm hold them back.
    let incoming = incoming.with_nodelay(Some(true));
    let addr = incoming
        .local_addr()
        .map_err(|e| CoordinatorError::Config(e.to_string()))?;
    let service = FlightServiceServer::new(ResearcherService::new(coordinator))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let router = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        .map_err(|e| CoordinatorError::Tls(format!("the certificate or key is not usable: {e}")))?
        .add_service(service);
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = rx.await;
    }));
    Ok(RunningCoordinator {
        addr,
        shutdown: Some(tx),
        task,
    })
}
