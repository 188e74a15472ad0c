//! The node's Arrow Flight service: one `DoGet` per site request, audited before it answers.
//! Before anything else it checks who is asking (see `gate`).

use std::sync::Arc;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use trustql_audit::{AuditEntry, AuditLog, Decision};
use trustql_policies::{now_rfc3339, today};
use trustql_protocol::{SiteRequest, Withheld};

use crate::engine::{SiteAnswer, SiteEngine};
use crate::error::NodeError;
use crate::gate::{Gate, now_unix_ms};

/// Largest site request the node decodes (the SQL is capped far below this by policy).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// The Flight service a trust exposes to its coordinator.
pub struct NodeService {
    engine: Arc<SiteEngine>,
    audit: Arc<AuditLog>,
    gate: Gate,
}

impl NodeService {
    /// A service answering from `engine` and recording to `audit`, for the caller `gate`
    /// admits.
    pub(crate) fn new(engine: Arc<SiteEngine>, audit: Arc<AuditLog>, gate: Gate) -> Self {
        NodeService {
            engine,
            audit,
            gate,
        }
    }

    /// Answers one ticket: who is asking, decode, answer, record; nothing is sent before the
    /// record is on disk.
    async fn serve(&self, request: Request<Ticket>) -> Result<SiteAnswer, Status> {
        let peer = request.peer_certs();
        let (request, outcome) = match self.gate.admit_peer(peer.as_deref().map(Vec::as_slice)) {
            // The ticket of a stranger is not even opened.
            Err(e) => (SiteRequest::default(), Err(e)),
            Ok(()) => match self.gate.open(&request.get_ref().ticket, now_unix_ms()) {
                (request, Err(e)) => (request, Err(e)),
                (request, Ok(())) => {
                    // Every line logged while answering carries the coordinator's request id.
                    let span = tracing::info_span!(
                        "request",
                        id = %request.request_id,
                        trust = %self.engine.trust(),
                        project = %request.project,
                    );
                    let outcome = self.engine.answer(&request, today()).instrument(span).await;
                    (request, outcome)
                }
            },
        };
        log_outcome(&request, &outcome);
        let entry = self.entry(&request, &outcome);
        let audit = Arc::clone(&self.audit);
        let recorded = tokio::task::spawn_blocking(move || audit.append(entry))
            .await
            .map_err(|e| NodeError::Audit(e.to_string()))
            .and_then(|r| r.map_err(NodeError::from));
        if let Err(e) = &recorded {
            tracing::error!(id = %request.request_id, error = ?e, "the audit record was not written");
        }
        recorded.map_err(|e| e.to_status())?;
        outcome.map_err(|e| e.to_status())
    }

    fn entry(&self, request: &SiteRequest, outcome: &Result<SiteAnswer, NodeError>) -> AuditEntry {
        let (decision, reason, released, withheld, plan_fingerprint) = match outcome {
            Ok(answer) => (
                Decision::Answered,
                None,
                answer.meta.released,
                answer.withheld.clone(),
                Some(answer.plan_fingerprint.clone()),
            ),
            Err(e) => (
                match e {
                    NodeError::Refused(_)
                    | NodeError::BadRequest(_)
                    | NodeError::NotCoordinator(_)
                    | NodeError::Unvouched(_)
                    | NodeError::OtherTrust
                    | NodeError::Stale { .. }
                    | NodeError::Early { .. }
                    | NodeError::BeforeStart
                    | NodeError::Replayed => Decision::Refused,
                    _ => Decision::Failed,
                },
                Some(e.to_string()),
                0,
                Withheld::default(),
                None,
            ),
        };
        AuditEntry {
            time: now_rfc3339(),
            request_id: request.request_id.clone(),
            researcher: request.researcher.clone(),
            project: request.project.clone(),
            sql: request.sql.clone(),
            plan_fingerprint,
            decision,
            reason,
            released,
            withheld,
            policy_hash: self.engine.policy().hash.clone(),
            epsilon: outcome
                .as_ref()
                .ok()
                .and_then(|a| a.meta.dp.as_ref())
                .map(|dp| dp.epsilon_charged),
            trusts: Vec::new(),
            pool: outcome
                .as_ref()
                .ok()
                .and_then(|a| a.meta.pool.as_ref())
                .map(|p| p.members.clone())
                .unwrap_or_default(),
        }
    }
}

/// One line per request in the node's own log: refusals as information, failures with their
/// cause (which never goes to the researcher).
fn log_outcome(request: &SiteRequest, outcome: &Result<SiteAnswer, NodeError>) {
    let id = request.request_id.as_str();
    match outcome {
        Ok(answer) => tracing::info!(
            id,
            released = answer.meta.released,
            vetting_ms = answer.timings.vetting.as_secs_f64() * 1e3,
            execution_ms = answer.timings.execution.as_secs_f64() * 1e3,
            "answered"
        ),
        Err(NodeError::Refused(r)) => tracing::info!(id, rule = r.rule.name(), "refused"),
        Err(e @ NodeError::BadRequest(_)) => tracing::info!(id, error = %e, "bad request"),
        Err(
            e @ (NodeError::NotCoordinator(_)
            | NodeError::Unvouched(_)
            | NodeError::OtherTrust
            | NodeError::Stale { .. }
            | NodeError::Early { .. }
            | NodeError::BeforeStart
            | NodeError::Replayed),
        ) => tracing::warn!(id, error = %e, "refused: not vouched for by the coordinator"),
        Err(e) => tracing::warn!(id, error = ?e, "failed"),
    }
}

impl NodeService {
    /// The peer check for calls that carry no site request: a refused peer is logged here
    /// (it reached no data, so it is not an audited request).
    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let peer = request.peer_certs();
        self.gate
            .admit_peer(peer.as_deref().map(Vec::as_slice))
            .map_err(|e| {
                tracing::warn!(error = %e, "refused a call from a stranger");
                e.to_status()
            })
    }
}

type Boxed<T> = BoxStream<'static, Result<T, Status>>;

fn unsupported<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "a TrustQL node only answers DoGet site requests, not {what}"
    )))
}

#[tonic::async_trait]
impl FlightService for NodeService {
    type HandshakeStream = Boxed<HandshakeResponse>;
    type ListFlightsStream = Boxed<FlightInfo>;
    type DoGetStream = Boxed<FlightData>;
    type DoPutStream = Boxed<PutResult>;
    type DoExchangeStream = Boxed<FlightData>;
    type DoActionStream = Boxed<arrow_flight::Result>;
    type ListActionsStream = Boxed<ActionType>;

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let answer = self.serve(request).await?;
        let schema = answer.batch.schema();
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(stream::once(async move { Ok(answer.batch) }))
            .map_err(|_| Status::internal("the answer could not be encoded"));
        Ok(Response::new(stream.boxed()))
    }

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        self.admit(&request)?;
        unsupported("Handshake (nodes authenticate by mutual TLS)")
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.admit(&request)?;
        unsupported("ListFlights")
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.admit(&request)?;
        unsupported("GetFlightInfo")
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        self.admit(&request)?;
        unsupported("PollFlightInfo")
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        self.admit(&request)?;
        unsupported("GetSchema")
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        self.admit(&request)?;
        unsupported("DoPut")
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.admit(&request)?;
        unsupported("DoExchange")
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        self.admit(&request)?;
        unsupported("DoAction")
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.admit(&request)?;
        unsupported("ListActions")
    }
}
