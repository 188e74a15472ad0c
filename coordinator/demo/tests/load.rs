//! Load and faults (issue 15, "Done when": load; attack class 12, fairness between
//! researchers): a hundred researchers, each with their own token and their own TLS
//! connection, query a real federation at once, and every answer is either right or a clear
//! "busy, try again"; one researcher flooding the coordinator never keeps another from being
//! answered; and a node killed, slowed or answering garbage in the middle of a query leaves
//! the coordinator answering with a coverage report, and answering the next query in full.
//!
//! The load runs for at most `TRUSTQL_LOAD_SECONDS` (default 20) of issuing queries; nothing
//! here asserts how fast anything is, only that every call ends within a bound and how.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::{Stream, StreamExt, TryStreamExt, stream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Code, Request, Response, Status, Streaming};
use trustql_client::PROJECT_HEADER;
use trustql_coordinator::{
    CoordinatorConfig, Limits, NodeEntry, Quorum, ResearcherEntry, RunningCoordinator, TlsFiles,
    token_hash,
};
use trustql_demo::{COLLEAGUE, DemoOptions, Federation, PROJECT, RESEARCHER, launch};
use trustql_protocol::Coverage;
use trustql_schemas::TrustSchema;
use trustql_testkit::oracle;

/// Researchers querying at once.
const RESEARCHERS: usize = 100;
/// Queries each researcher sends (retrying a busy one until the time budget runs out).
const QUERIES_EACH: usize = 3;
/// No single call may take longer than this, however loaded the coordinator is.
const CALL_BOUND: Duration = Duration::from_secs(120);

/// Aggregates the researchers send, cycled through; unprotected, so each has one right answer.
const LOAD_QUERIES: &[&str] = &[
    "SELECT gender, COUNT(*) AS n FROM sim_av_patient GROUP BY gender",
    "SELECT stage_best, COUNT(*) AS n, AVG(age) AS mean_age FROM sim_av_tumour GROUP BY stage_best",
    "SELECT COUNT(*) AS n FROM sim_sact_regimen",
    "SELECT intent_of_treatment, COUNT(*) AS n FROM sim_sact_regimen GROUP BY intent_of_treatment",
];

/// One test at a time: the load would starve the fault test's short deadlines of CPU.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the load test keeps issuing queries.
fn load_budget() -> Duration {
    let seconds = std::env::var("TRUSTQL_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(20);
    Duration::from_secs(seconds.max(1))
}

async fn federation(researchers: Vec<String>) -> Federation {
    launch(&DemoOptions {
        trusts: 3,
        patients: 1_500,
        seed: 15,
        unprotected: true,
        node_deadline_ms: 30_000,
        researchers,
        ..DemoOptions::default()
    })
    .await
    .expect("launch")
}

/// The demo's nodes, as a coordinator lists them.
fn direct(fed: &Federation) -> Vec<NodeEntry> {
    fed.nodes
        .iter()
        .map(|n| NodeEntry {
            trust: n.trust().into(),
            url: format!("https://{}", n.addr()),
            ca: fed.info.ca.clone(),
            server_name: Some("localhost".into()),
        })
        .collect()
}

/// A coordinator of its own over `nodes`, for `researchers` (name, token).
async fn coordinator(
    fed: &Federation,
    nodes: Vec<NodeEntry>,
    researchers: &[(String, String)],
    quorum: Quorum,
    deadline_ms: u64,
    limits: Limits,
) -> (RunningCoordinator, String) {
    let pki = fed.work_dir().join("pki");
    let audit = format!(
        "load-audit-{}",
        trustql_coordinator::random_hex(6).expect("random")
    );
    let config = CoordinatorConfig {
        audit_dir: fed.work_dir().join(audit),
        listen: "127.0.0.1:0".parse().expect("addr"),
        node_deadline_ms: deadline_ms,
        quorum,
        tls: TlsFiles {
            cert: pki.join("coordinator.pem"),
            key: pki.join("coordinator.key"),
        },
        node_client: TlsFiles {
            cert: pki.join("coordinator-client.pem"),
            key: pki.join("coordinator-client.key"),
        },
        request_signing_key: pki.join("coordinator-requests.key"),
        nodes,
        disclosure: Default::default(),
        researchers: researchers
            .iter()
            .map(|(name, token)| ResearcherEntry {
                name: name.clone(),
                token_sha256: token_hash(token),
                projects: vec![PROJECT.into()],
            })
            .collect(),
        limits,
    };
    config.validate().expect("valid");
    let running = trustql_coordinator::start(&config, TrustSchema::cancer().expect("schema"))
        .await
        .expect("start");
    let url = format!("https://127.0.0.1:{}", running.addr().port());
    (running, url)
}

/// A researcher's own Flight SQL connection over TLS, to see status codes.
async fn researcher(url: &str, ca: &[u8], token: &str) -> FlightSqlServiceClient<Channel> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let channel = Endpoint::from_shared(url.to_string())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await
        .expect("connect");
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_token(token.to_string());
    client.set_header(PROJECT_HEADER, PROJECT);
    client
}

fn status(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(s) => *s,
        other => Status::unknown(format!("not a status: {other}")),
    }
}

/// An answer: its rows (one batch) and its coverage report.
struct Answer {
    batch: RecordBatch,
    coverage: Coverage,
}

/// Runs `sql` (execute, then fetch), within [`CALL_BOUND`].
async fn ask(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Result<Answer, Status> {
    let call = async {
        let info = client
            .execute(sql.to_string(), None)
            .await
            .map_err(status)?;
        let coverage = std::str::from_utf8(&info.app_metadata)
            .ok()
            .and_then(|text| Coverage::from_json(text).ok())
            .ok_or_else(|| Status::unknown("the answer carried no coverage report"))?;
        let schema = Arc::new(
            info.clone()
                .try_decode_schema()
                .map_err(|e| Status::unknown(format!("the schema could not be read: {e}")))?,
        );
        let ticket = info
            .endpoint
            .first()
            .and_then(|e| e.ticket.clone())
            .ok_or_else(|| Status::unknown("the answer had no ticket"))?;
        let batches: Vec<RecordBatch> = client
            .do_get(ticket)
            .await
            .map_err(status)?
            .try_collect()
            .await
            .map_err(status)?;
        let batch = concat_batches(&schema, &batches)
            .map_err(|e| Status::unknown(format!("the batches did not fit: {e}")))?;
        Ok(Answer { batch, coverage })
    };
    tokio::time::timeout(CALL_BOUND, call)
        .await
        .unwrap_or_else(|_| Err(Status::unknown("no answer within the call bound (a hang)")))
}

/// Whether a status is the clear "busy, try again" a loaded coordinator may give.
fn is_busy(s: &Status) -> bool {
    s.code() == Code::ResourceExhausted && s.message().contains("again")
}

/// The right answers, from one DataFusion session over the trusts' Parquet.
async fn central(fed: &Federation, trusts: &[String], sql: &str) -> RecordBatch {
    oracle::run(&oracle::union(&fed.info.data_dir, trusts).await, sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_researchers_at_once_get_right_answers_or_a_clear_busy() {
    let _one = SERIAL.lock().await;
    let names: Vec<String> = (0..RESEARCHERS).map(|i| format!("load{i:03}")).collect();
    let fed = federation(names.clone()).await;
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    let researchers: Vec<(String, String)> = names
        .iter()
        .map(|n| (n.clone(), format!("token-of-{n}")))
        .collect();
    let (_running, url) = coordinator(
        &fed,
        direct(&fed),
        &researchers,
        Quorum::All,
        30_000,
        Limits::default(),
    )
    .await;
    let mut want = Vec::new();
    for sql in LOAD_QUERIES {
        want.push(central(&fed, &fed.info.trusts, sql).await);
    }

    let budget = load_budget();
    let started = Instant::now();
    let answered = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, (_, token)) in researchers.iter().enumerate() {
        let (url, ca, token) = (url.clone(), ca.clone(), token.clone());
        let (answered, busy) = (Arc::clone(&answered), Arc::clone(&busy));
        tasks.push(tokio::spawn(async move {
            let mut client = researcher(&url, &ca, &token).await;
            // (query index, answer) for each answer; the failures, in words.
            let mut got = Vec::new();
            let mut failures = Vec::new();
            'queries: for k in 0..QUERIES_EACH {
                let q = (i + k) % LOAD_QUERIES.len();
                let mut backoff = Duration::from_millis(50 + (i as u64 % 7) * 20);
                loop {
                    match ask(&mut client, LOAD_QUERIES[q]).await {
                        Ok(answer) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                            got.push((q, answer));
                            break;
                        }
                        Err(s) if is_busy(&s) => {
                            busy.fetch_add(1, Ordering::Relaxed);
                            if started.elapsed() > budget {
                                break 'queries;
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                        Err(s) => {
                            failures.push(format!("{:?}: {}", s.code(), s.message()));
                            break;
                        }
                    }
                }
                if started.elapsed() > budget {
                    break;
                }
            }
            (got, failures)
        }));
    }
    let mut failures = Vec::new();
    let mut answers = 0;
    for task in tasks {
        let (got, failed) = task.await.expect("a researcher's task panicked");
        failures.extend(failed);
        for (q, answer) in got {
            oracle::assert_same(LOAD_QUERIES[q], &answer.batch, &want[q], false);
            assert!(answer.coverage.complete, "{}", answer.coverage);
            answers += 1;
        }
    }
    let busy = busy.load(Ordering::Relaxed);
    println!(
        "{RESEARCHERS} researchers: {answers} answers, {busy} busy answers, {} failures, in {:.1} s",
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} calls failed other than busy, e.g.:\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(answers > 0, "nothing was answered ({busy} busy)");

    // The load is over: the next query is answered at once, right and complete.
    let mut next = researcher(&url, &ca, &researchers[0].1).await;
    let answer = ask(&mut next, LOAD_QUERIES[0])
        .await
        .expect("the next query is answered");
    oracle::assert_same(LOAD_QUERIES[0], &answer.batch, &want[0], false);
    assert!(answer.coverage.complete, "{}", answer.coverage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_researcher_flooding_the_coordinator_does_not_starve_another() {
    let _one = SERIAL.lock().await;
    let fed = federation(Vec::new()).await;
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    let researchers = vec![
        (RESEARCHER.to_string(), "flooder-token".to_string()),
        (COLLEAGUE.to_string(), "other-token".to_string()),
    ];
    let (_running, url) = coordinator(
        &fed,
        direct(&fed),
        &researchers,
        Quorum::All,
        30_000,
        Limits::default(),
    )
    .await;
    let sql = LOAD_QUERIES[1];
    let want = central(&fed, &fed.info.trusts, sql).await;

    // Far more at once than the coordinator keeps running for one researcher.
    let stop = Arc::new(AtomicBool::new(false));
    let flooder_busy = Arc::new(AtomicUsize::new(0));
    let flooder_answered = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..24 {
        let (url, ca, token) = (url.clone(), ca.clone(), researchers[0].1.clone());
        let (stop, busy, answered) = (
            Arc::clone(&stop),
            Arc::clone(&flooder_busy),
            Arc::clone(&flooder_answered),
        );
        flood.push(tokio::spawn(async move {
            let mut client = researcher(&url, &ca, &token).await;
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match ask(&mut client, sql).await {
                    Ok(_) => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) if is_busy(&s) => {
                        busy.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(s) => failures.push(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            failures
        }));
    }
    // The flood is on once the flooder is being told busy.
    let waiting = Instant::now();
    while flooder_busy.load(Ordering::Relaxed) == 0 {
        assert!(
            waiting.elapsed() < CALL_BOUND,
            "the flood never reached the flooder's limit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let busy_before = flooder_busy.load(Ordering::Relaxed);

    // Meanwhile the other researcher's queries are each answered, first time.
    let mut other = researcher(&url, &ca, &researchers[1].1).await;
    for _ in 0..3 {
        let answer = ask(&mut other, sql)
            .await
            .expect("the other researcher is answered while the flooder is busy");
        oracle::assert_same(sql, &answer.batch, &want, false);
        assert!(answer.coverage.complete, "{}", answer.coverage);
    }
    let busy_during = flooder_busy.load(Ordering::Relaxed) - busy_before;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for task in flood {
        failures.extend(task.await.expect("a flooding task panicked"));
    }
    println!(
        "flooder: {} answered, {} busy ({busy_during} while the other was answered)",
        flooder_answered.load(Ordering::Relaxed),
        flooder_busy.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "the flooder got errors other than busy: {failures:?}"
    );
    assert!(busy_during > 0, "the flooder was still being told busy");
}

// ---------------------------------------------------------------------------------------------
// Faults in the middle of a query.

/// What the tampering relay does to a trust's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Tamper {
    /// Passes the answer on unchanged.
    None = 0,
    /// Waits far past the coordinator's deadline before answering (a slowed node).
    Stall = 1,
    /// Replaces the header of the record batch message with bytes that are not Arrow.
    Garbage = 2,
    /// Drops a column: a stream of the wrong schema.
    WrongSchema = 3,
    /// Sends the schema and none of the rows, then ends the stream normally.
    Truncated = 4,
    /// Cuts the record batch's body in half.
    CutBody = 5,
    /// Sends the schema, then fails the stream.
    FailMidStream = 6,
}

/// A fake node for one trust: takes the coordinator's signed ticket, asks the trust's real
/// node with it (as the coordinator would), and returns the answer tampered with.
struct Relay {
    upstream: FlightServiceClient<Channel>,
    tamper: Arc<AtomicU8>,
    seen: Arc<AtomicUsize>,
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unsupported<T>() -> Result<T, Status> {
    Err(Status::unimplemented("the relay only relays DoGet"))
}

async fn tampered(messages: Vec<FlightData>, tamper: Tamper) -> Result<Vec<FlightData>, Status> {
    let mut messages = messages;
    match tamper {
        Tamper::None | Tamper::Stall | Tamper::FailMidStream => {}
        Tamper::Garbage => {
            for m in messages.iter_mut().skip(1) {
                m.data_header = vec![0xA5u8; 64].into();
            }
        }
        Tamper::Truncated => messages.truncate(1),
        Tamper::CutBody => {
            for m in messages.iter_mut().skip(1) {
                let half = m.data_body.len() / 2;
                m.data_body = m.data_body.slice(..half);
            }
        }
        Tamper::WrongSchema => {
            let mut decoded = FlightRecordBatchStream::new_from_flight_data(stream::iter(
                messages.into_iter().map(Ok),
            ));
            let mut batches = Vec::new();
            while let Some(batch) = decoded.try_next().await.map_err(status)? {
                let keep: Vec<usize> = (0..batch.num_columns().saturating_sub(1)).collect();
                batches.push(
                    batch
                        .project(&keep)
                        .map_err(|e| Status::internal(e.to_string()))?,
                );
            }
            let schema = batches
                .first()
                .map(|b| b.schema())
                .ok_or_else(|| Status::internal("no batch to tamper with"))?;
            messages = FlightDataEncoderBuilder::new()
                .with_schema(schema)
                .build(stream::iter(batches.into_iter().map(Ok)))
                .try_collect()
                .await
                .map_err(status)?;
        }
    }
    Ok(messages)
}

#[tonic::async_trait]
impl FlightService for Relay {
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
        let tamper = match self.tamper.load(Ordering::SeqCst) {
            1 => Tamper::Stall,
            2 => Tamper::Garbage,
            3 => Tamper::WrongSchema,
            4 => Tamper::Truncated,
            5 => Tamper::CutBody,
            6 => Tamper::FailMidStream,
            _ => Tamper::None,
        };
        let mut upstream = self.upstream.clone();
        let messages: Vec<FlightData> = upstream
            .do_get(request.into_inner())
            .await?
            .into_inner()
            .try_collect()
            .await?;
        self.seen.fetch_add(1, Ordering::SeqCst);
        if tamper == Tamper::Stall {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        let messages = tampered(messages, tamper).await?;
        let out: Boxed<FlightData> = if tamper == Tamper::FailMidStream {
            let first = messages.into_iter().take(1).map(Ok);
            stream::iter(first)
                .chain(stream::once(async {
                    Err(Status::internal("the node failed while sending"))
                }))
                .boxed()
        } else {
            stream::iter(messages.into_iter().map(Ok)).boxed()
        };
        Ok(Response::new(out))
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unsupported()
    }
    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        unsupported()
    }
    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        unsupported()
    }
    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unsupported()
    }
    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        unsupported()
    }
    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        unsupported()
    }
    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unsupported()
    }
    async fn do_action(
        &self,
        _: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        unsupported()
    }
    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        unsupported()
    }
}

/// Starts a relay for the trust `index` of `fed` over TLS with that node's own certificate.
async fn relay(fed: &Federation, index: usize) -> (SocketAddr, Arc<AtomicU8>, Arc<AtomicUsize>) {
    let pki = fed.work_dir().join("pki");
    let read = |name: &str| std::fs::read(pki.join(name)).expect("pki file");
    let trust = fed.nodes[index].trust().to_string();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read("coordinator-client.pem"),
            read("coordinator-client.key"),
        ))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", fed.nodes[index].addr()))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect_lazy();
    let tamper = Arc::new(AtomicU8::new(Tamper::None as u8));
    let seen = Arc::new(AtomicUsize::new(0));
    let service = Relay {
        upstream: FlightServiceClient::new(channel),
        tamper: Arc::clone(&tamper),
        seen: Arc::clone(&seen),
    };
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = incoming.local_addr().expect("addr");
    let identity = Identity::from_pem(
        read(&format!("node-{trust}.pem")),
        read(&format!("node-{trust}.key")),
    );
    let server = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .expect("relay tls")
        .add_service(FlightServiceServer::new(service))
        .serve_with_incoming(incoming);
    tokio::spawn(server);
    (addr, tamper, seen)
}

/// A TCP proxy in front of `upstream` that can drop every connection at once and then refuse
/// new ones, as a node process killed mid-query does.
struct Proxy {
    addr: SocketAddr,
    alive: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let alive = Arc::new(AtomicBool::new(true));
        let (cut, cuts) = watch::channel(0u64);
        let up = Arc::clone(&alive);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up.load(Ordering::SeqCst) {
                    continue;
                }
                let mut cuts = cuts.clone();
                // Only a kill after this connection came cuts it.
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, alive, cut }
    }

    /// Drops every connection and refuses new ones.
    fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn revive(&self) {
        self.alive.store(true, Ordering::SeqCst);
    }
}

/// Asks until the coordinator answers from every trust again (its channel to a revived node
/// reconnects on demand).
async fn complete_again(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Answer {
    let mut last = None;
    for _ in 0..40 {
        match ask(client, sql).await {
            Ok(answer) if answer.coverage.complete => return answer,
            Ok(answer) => last = Some(answer.coverage.to_string()),
            Err(s) => last = Some(format!("{:?}: {}", s.code(), s.message())),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("never answered in full again; last: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_slowed_or_answering_garbage_mid_query_leaves_a_partial_answer() {
    let _one = SERIAL.lock().await;
    let fed = federation(Vec::new()).await;
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    // The third trust is reached through a relay that tampers with its answers, behind a
    // proxy that can drop its connections.
    let (relay_addr, tamper, seen) = relay(&fed, 2).await;
    let proxy = Proxy::start(relay_addr).await;
    let mut nodes = direct(&fed);
    nodes[2].url = format!("https://{}", proxy.addr);
    let researchers = vec![(RESEARCHER.to_string(), "fault-token".to_string())];
    let deadline_ms = 4_000;
    let (_running, url) = coordinator(
        &fed,
        nodes,
        &researchers,
        Quorum::AtLeast(2),
        deadline_ms,
        Limits::default(),
    )
    .await;
    let sql = LOAD_QUERIES[0];
    let all = central(&fed, &fed.info.trusts, sql).await;
    let two = central(&fed, &fed.info.trusts[..2], sql).await;
    let mut client = researcher(&url, &ca, &researchers[0].1).await;

    // Through the relay, untouched: the full answer.
    let answer = complete_again(&mut client, sql).await;
    oracle::assert_same(sql, &answer.batch, &all, false);

    let partial = |what: &str, answer: &Answer| {
        let coverage = &answer.coverage;
        assert!(!coverage.complete, "{what}: {coverage}");
        assert_eq!(coverage.trusts.len(), 3, "{what}: {coverage}");
        // The result covers the two trusts that answered, and nothing of the third.
        oracle::assert_same(&format!("{what}: {sql}"), &answer.batch, &two, false);
    };

    for (what, how) in [
        ("garbage instead of Arrow", Tamper::Garbage),
        ("a stream of the wrong schema", Tamper::WrongSchema),
        ("a stream cut short after its schema", Tamper::Truncated),
        ("a record batch cut in half", Tamper::CutBody),
        ("a stream failing after its schema", Tamper::FailMidStream),
    ] {
        tamper.store(how as u8, Ordering::SeqCst);
        let answer = ask(&mut client, sql)
            .await
            .unwrap_or_else(|s| panic!("{what}: {:?}: {}", s.code(), s.message()));
        partial(what, &answer);
        tamper.store(Tamper::None as u8, Ordering::SeqCst);
        let answer = complete_again(&mut client, sql).await;
        oracle::assert_same(sql, &answer.batch, &all, false);
    }

    // Slowed past the deadline.
    tamper.store(Tamper::Stall as u8, Ordering::SeqCst);
    let started = Instant::now();
    let answer = ask(&mut client, sql)
        .await
        .expect("answered without the slow trust");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the deadline, not the slow node, ends the wait"
    );
    partial("a node slowed past the deadline", &answer);
    tamper.store(Tamper::None as u8, Ordering::SeqCst);
    let answer = complete_again(&mut client, sql).await;
    oracle::assert_same(sql, &answer.batch, &all, false);

    // Killed while it holds the query: every connection drops and no new one is taken.
    tamper.store(Tamper::Stall as u8, Ordering::SeqCst);
    let before = seen.load(Ordering::SeqCst);
    let mut killed_client = researcher(&url, &ca, &researchers[0].1).await;
    let query = tokio::spawn(async move { ask(&mut killed_client, sql).await });
    let waiting = Instant::now();
    while seen.load(Ordering::SeqCst) == before {
        assert!(
            waiting.elapsed() < CALL_BOUND,
            "the query never reached the node"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.kill();
    let answer = query
        .await
        .expect("task")
        .unwrap_or_else(|s| panic!("a killed node: {:?}: {}", s.code(), s.message()));
    partial("a node killed mid-query", &answer);
    // While it is down, the coordinator keeps answering from the others.
    let answer = ask(&mut client, sql)
        .await
        .expect("answered while the node is down");
    partial("a node that is down", &answer);
    tamper.store(Tamper::None as u8, Ordering::SeqCst);
    proxy.revive();
    let answer = complete_again(&mut client, sql).await;
    oracle::assert_same(sql, &answer.batch, &all, false);
}
