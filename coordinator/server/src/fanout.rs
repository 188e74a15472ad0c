//! One long-lived mutual-TLS channel per node, and asking them all at once. Each request is
//! signed for the node it goes to, so the node can tell the coordinator vouched for it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::compute::concat_batches;
use arrow::ipc::MessageHeader;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{FlightData, Ticket};
use futures::TryStreamExt;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use trustql_merge::SiteStates;
use trustql_protocol::{
    ANSWER_META_KEY, AnswerMeta, BUSY_HEADER, RequestSigner, SignedRequest, SiteRequest,
    TrustStatus,
};

use crate::config::NodeEntry;
use crate::error::CoordinatorError;

/// Largest answer a node may send (protected aggregates are small).
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// What became of a request at one node.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The node's protected states.
    Answered(Box<SiteStates>),
    /// Anything else, with the reason, and whether it happened after the node took the query
    /// (a failure or a timeout while it ran), where its cause could be the node's data.
    Not(TrustStatus, String, Taken),
}

/// Whether a trust's failure came after it took the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Before it ran anything: the channel, the trust's identity checks or its policy.
    Before,
    /// While it ran: an error, running out of memory or time, which the data could cause.
    While,
}

/// Reads the coordinator's request-signing key (`request_signing_key`).
pub(crate) fn load_signer(path: &Path) -> Result<Arc<RequestSigner>, CoordinatorError> {
    let pem = std::fs::read(path).map_err(|e| {
        CoordinatorError::Config(format!(
            "cannot read the request-signing key {}: {e}",
            path.display()
        ))
    })?;
    RequestSigner::from_pem(&pem).map(Arc::new).map_err(|e| {
        CoordinatorError::Config(format!("the request-signing key {}: {e}", path.display()))
    })
}

/// A node and the channel to it (connected lazily, reconnected by tonic when it returns).
#[derive(Clone)]
pub(crate) struct NodeLink {
    trust: String,
    channel: Channel,
    signer: Arc<RequestSigner>,
}

impl NodeLink {
    /// Sets up the channel; nothing is dialled until the first query.
    pub(crate) fn new(
        entry: &NodeEntry,
        identity: &Identity,
        signer: Arc<RequestSigner>,
    ) -> Result<Self, CoordinatorError> {
        let ca = std::fs::read(&entry.ca).map_err(|e| {
            CoordinatorError::Tls(format!(
                "cannot read the CA for {} ({}): {e}",
                entry.trust,
                entry.ca.display()
            ))
        })?;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(identity.clone());
        if let Some(name) = &entry.server_name {
            tls = tls.domain_name(name.clone());
        }
        let channel = Endpoint::from_shared(entry.url.clone())
            .map_err(|_| CoordinatorError::Config(format!("bad URL for {}", entry.trust)))?
            .tls_config(tls)
            .map_err(|e| CoordinatorError::Tls(format!("node {}: {e}", entry.trust)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(NodeLink {
            trust: entry.trust.clone(),
            channel,
            signer,
        })
    }

    /// The trust code.
    pub(crate) fn trust(&self) -> &str {
        &self.trust
    }

    /// Sends the request and reads the answer, all within `deadline`.
    pub(crate) async fn ask(&self, request: &SiteRequest, deadline: Duration) -> Outcome {
        match tokio::time::timeout(deadline, self.exchange(request)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Not(
                TrustStatus::TimedOut,
                format!("no answer within {} ms", deadline.as_millis()),
                Taken::While,
            ),
        }
    }

    async fn exchange(&self, request: &SiteRequest) -> Outcome {
        let mut client = FlightServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_ANSWER_BYTES);
        // Signed for this trust, now: the node refuses it anywhere else, later, or twice.
        let signed = SignedRequest {
            trust: self.trust.clone(),
            issued_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            request: request.clone(),
        };
        let Ok(ticket) = self.signer.sign(&signed) else {
            return garbage("the request could not be encoded");
        };
        let stream = match client.do_get(Ticket::new(ticket)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return from_status(&status),
        };
        let mut stream = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
            stream
                .map_err(|status| arrow_flight::error::FlightError::Tonic(Box::new(status)))
                .and_then(|data| std::future::ready(within_body(data))),
        );
        let mut batches = Vec::new();
        loop {
            match stream.try_next().await {
                Ok(Some(batch)) => batches.push(batch),
                Ok(None) => break,
                Err(arrow_flight::error::FlightError::Tonic(status)) => {
                    return from_status(status.as_ref());
                }
                Err(_) => return garbage("its answer could not be decoded"),
            }
        }
        // An answer with no groups (a preview, or everything withheld) is a schema alone.
        let Some(schema) = batches
            .first()
            .map(|b| b.schema())
            .or_else(|| stream.schema().cloned())
        else {
            return garbage("its answer was empty");
        };
        let Some(meta) = schema
            .metadata()
            .get(ANSWER_META_KEY)
            .and_then(|m| AnswerMeta::from_json(m).ok())
        else {
            return garbage("its answer had no TrustQL metadata");
        };
        if meta.trust != self.trust || meta.request_id != request.request_id {
            return garbage("its answer was for another trust or request");
        }
        match concat_batches(&schema, &batches) {
            // The metadata, sent first, says how many groups follow: fewer is a stream cut short
            // (a node dying mid-answer, or a hostile one), never an answer with fewer groups.
            Ok(batch) if batch.num_rows() != meta.released => {
                garbage("its answer did not hold the groups its metadata announced")
            }
            Ok(batch) => Outcome::Answered(Box::new(SiteStates {
                trust: self.trust.clone(),
                batch,
                meta,
            })),
            Err(_) => garbage("its answer's batches did not fit together"),
        }
    }
}

/// Refuses a message whose header points at buffers beyond its body before Arrow reads it:
/// the IPC reader slices those buffers without checking, and a node sending a record batch cut
/// short panicked the coordinator's task (the researcher got a cancelled call, not an answer).
fn within_body(data: FlightData) -> Result<FlightData, FlightError> {
    if data.data_header.is_empty() {
        return Ok(data);
    }
    let bad = || FlightError::DecodeError("a message's buffers lie outside its body".into());
    let message = arrow::ipc::root_as_message(&data.data_header).map_err(|_| bad())?;
    let buffers = match message.header_type() {
        MessageHeader::RecordBatch => message.header_as_record_batch().and_then(|b| b.buffers()),
        MessageHeader::DictionaryBatch => message
            .header_as_dictionary_batch()
            .and_then(|d| d.data())
            .and_then(|b| b.buffers()),
        _ => None,
    };
    let body = i64::try_from(data.data_body.len()).map_err(|_| bad())?;
    for buffer in buffers.iter().flat_map(|b| b.iter()) {
        let end = buffer.offset().checked_add(buffer.length());
        if buffer.offset() < 0 || buffer.length() < 0 || end.is_none_or(|end| end > body) {
            return Err(bad());
        }
    }
    Ok(data)
}

fn garbage(reason: &str) -> Outcome {
    // The node's protocol broke (a bug or a hostile node), not its query.
    Outcome::Not(TrustStatus::Failed, reason.to_string(), Taken::Before)
}

/// Whether a status came from the channel (connecting, TLS, the connection dropping) rather
/// than from the node: told by the error's source chain, not its text.
fn from_transport(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Maps a node's status to coverage; node messages are bounded and never hold data.
fn from_status(status: &tonic::Status) -> Outcome {
    let message: String = status.message().chars().take(500).collect();
    let (kind, taken) = match status.code() {
        Code::PermissionDenied | Code::InvalidArgument => (TrustStatus::Refused, Taken::Before),
        // Nodes never answer `unavailable` themselves: it is the transport (refused
        // connection, TLS).
        Code::Unavailable => {
            return Outcome::Not(
                TrustStatus::Unreachable,
                "the node could not be reached (down, or its certificate is not trusted)".into(),
                Taken::Before,
            );
        }
        Code::Unknown if from_transport(status) => {
            return Outcome::Not(
                TrustStatus::Unreachable,
                "the node could not be reached".into(),
                Taken::Before,
            );
        }
        // The node's identity checks (who asks, replay), its recording faults (audit, budget)
        // and its admission (busy) do not look at the data.
        Code::Unauthenticated | Code::Aborted => (TrustStatus::Failed, Taken::Before),
        Code::ResourceExhausted if status.metadata().get(BUSY_HEADER).is_some() => {
            (TrustStatus::Failed, Taken::Before)
        }
        // Its deadline, memory, execution and anything unforeseen may.
        _ => (TrustStatus::Failed, Taken::While),
    };
    Outcome::Not(kind, message, taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(outcome: Outcome) -> TrustStatus {
        match outcome {
            Outcome::Not(status, ..) => status,
            Outcome::Answered(_) => TrustStatus::Answered,
        }
    }

    #[test]
    fn a_dropped_connection_is_unreachable_by_its_source_not_its_words() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let status = tonic::Status::from_error(Box::new(reset));
        assert_eq!(status.code(), Code::Unknown);
        assert_eq!(status_of(from_status(&status)), TrustStatus::Unreachable);
        // A node's own message that happens to say "transport" is still the node's failure.
        let worded = tonic::Status::unknown("transport connect");
        assert_eq!(status_of(from_status(&worded)), TrustStatus::Failed);
        let refused = tonic::Status::permission_denied("refused (table): …");
        assert_eq!(status_of(from_status(&refused)), TrustStatus::Refused);
    }

    fn taken(status: &tonic::Status) -> Taken {
        match from_status(status) {
            Outcome::Not(_, _, taken) => taken,
            Outcome::Answered(_) => Taken::Before,
        }
    }

    fn busy() -> tonic::Status {
        let mut status = tonic::Status::resource_exhausted("busy");
        status.metadata_mut().insert(
            BUSY_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        status
    }

    #[test]
    fn only_failures_while_running_may_depend_on_the_data() {
        for status in [
            tonic::Status::internal("the query could not be completed"),
            tonic::Status::deadline_exceeded("deadline"),
            tonic::Status::resource_exhausted("memory"),
            tonic::Status::unknown("a node's own failure"),
        ] {
            assert_eq!(taken(&status), Taken::While, "{status:?}");
        }
        for status in [
            tonic::Status::permission_denied("refused"),
            tonic::Status::invalid_argument("bad request"),
            tonic::Status::unauthenticated("not vouched for"),
            tonic::Status::aborted("cannot record"),
            tonic::Status::unavailable("down"),
            busy(),
        ] {
            assert_eq!(taken(&status), Taken::Before, "{status:?}");
        }
    }
}
