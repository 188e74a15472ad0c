//! `trustql node` as a child process: it serves, and a SIGKILL in the middle of queries leaves
//! an audit log that `trustql audit verify` passes, with every released answer on record.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_flight::Ticket;
use arrow_flight::flight_service_client::FlightServiceClient;
use futures::TryStreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use trustql_devcerts::{DevCa, Issued, SigningKey};
use trustql_protocol::{RequestSigner, SignedRequest, SiteRequest};

mod common;
use common::{text, trustql};

struct Site {
    config: PathBuf,
    audit: PathBuf,
    ca_pem: String,
    /// The coordinator's client certificate, which the node pins.
    coordinator: Issued,
    /// The coordinator's request-signing key.
    signer: Arc<RequestSigner>,
}

/// One synthetic trust, an approved policy, certificates and a node.toml with relative paths.
fn site(dir: &Path) -> Site {
    let fed = dir.join("fed");
    let made = trustql(&[
        "synth",
        "--trusts",
        "1",
        "--patients",
        "3000",
        "--seed",
        "3",
        "--out",
        fed.to_str().expect("path"),
    ]);
    assert!(made.status.success(), "{}", text(&made));
    let tables = r#"["sim_av_patient", "sim_av_tumour", "sim_sact_regimen", "sim_sact_cycle"]"#;
    std::fs::write(
        dir.join("policy.toml"),
        format!(
            "[policy]\nversion = \"kill-test\"\ntrust = \"TQ01\"\n\n[disclosure]\nmin_patients = 5\n\n\
             [query]\nmax_joins = 8\n\n\
             [[project]]\nid = \"p1\"\nresearchers = [\"alice\"]\ntables = {tables}\nexpires = \"2099-12-31\"\n\n\
             [[project]]\nid = \"dp\"\nresearchers = [\"alice\"]\ntables = {tables}\nexpires = \"2099-12-31\"\n\
             dp = {{ epsilon_budget = 1000.0, epsilon_per_query = 0.01 }}\n"
        ),
    )
    .expect("policy");
    let approved = trustql(&[
        "policy",
        "approve",
        dir.join("policy.toml").to_str().expect("path"),
        "--by",
        "Test Controller",
    ]);
    assert!(approved.status.success(), "{}", text(&approved));

    let ca = DevCa::new("kill test CA").expect("ca");
    let pki = dir.join("pki");
    ca.write_cert(&pki, "ca.pem").expect("ca pem");
    ca.issue_server("TQ01", &["localhost", "127.0.0.1"])
        .expect("node cert")
        .write(&pki, "node")
        .expect("write");
    let coordinator = ca
        .issue_client("coordinator (client)")
        .expect("coordinator cert");
    // The researcher-facing certificate, for the test that runs a coordinator.
    ca.issue_server("coordinator", &["localhost"])
        .expect("server cert")
        .write(&pki, "coordinator")
        .expect("write server cert");
    let key = SigningKey::generate().expect("signing key");
    key.write(&pki, "coordinator-requests").expect("write key");
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "trust = \"TQ01\"\ndata_dir = \"fed/TQ01\"\npolicy = \"policy.toml\"\nlisten = \"127.0.0.1:0\"\n\
             audit_dir = \"audit\"\nstate_dir = \"state\"\n\n[tls]\ncert = \"pki/node.pem\"\nkey = \"pki/node.key\"\n\
             client_ca = \"pki/ca.pem\"\n\n[coordinator]\nclient_cert_sha256 = [\"{}\"]\n\
             request_keys = [\"pki/coordinator-requests.pub\"]\n",
            coordinator.sha256_fingerprint()
        ),
    )
    .expect("node.toml");
    Site {
        config,
        audit: dir.join("audit"),
        ca_pem: ca.cert_pem(),
        coordinator,
        signer: Arc::new(RequestSigner::from_pem(key.key_pem.as_bytes()).expect("key")),
    }
}

/// `request` signed by the coordinator for TQ01, now.
fn signed(signer: &RequestSigner, request: SiteRequest) -> Ticket {
    let signed = SignedRequest {
        trust: "TQ01".into(),
        issued_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64,
        request,
    };
    Ticket::new(signer.sign(&signed).expect("signed"))
}

/// Starts `trustql node` and reads the address it announces.
fn spawn_node(site: &Site) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trustql"))
        .args(["node", "--config", site.config.to_str().expect("path")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    let addr = line
        .split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address announced: {line:?}"));
    (child, addr)
}

async fn client(site: &Site, addr: SocketAddr) -> FlightServiceClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&site.ca_pem))
        .identity(Identity::from_pem(
            &site.coordinator.cert_pem,
            &site.coordinator.key_pem,
        ))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    FlightServiceClient::new(channel)
}

fn ticket(id: &str) -> SiteRequest {
    SiteRequest {
        request_id: id.into(),
        researcher: "alice".into(),
        project: "p1".into(),
        sql: "SELECT t.stage_best, COUNT(*), AVG(t.age) FROM sim_av_tumour t GROUP BY t.stage_best"
            .into(),
        ..Default::default()
    }
}

/// A differentially private query that no earlier one repeats.
fn dp_ticket(id: &str, worker: usize, n: usize) -> SiteRequest {
    SiteRequest {
        request_id: id.into(),
        researcher: "alice".into(),
        project: "dp".into(),
        sql: format!(
            "SELECT stage_best, COUNT(*) FROM sim_av_tumour \
             WHERE age > {n} AND age < {} GROUP BY stage_best",
            200 + worker
        ),
        ..Default::default()
    }
}

/// The ledger's lines as JSON; a SIGKILL may have torn the last one (never released), which
/// the node cuts off when it starts again.
fn ledger_records(dir: &Path, after_restart: bool) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("state/budget.ledger")).expect("ledger");
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match serde_json::from_str(l) {
            Ok(v) => Some(v),
            Err(_) if !after_restart && i + 1 == lines.len() => None,
            Err(e) => panic!("ledger line {} is damaged: {e}", i + 1),
        })
        .collect()
}

#[test]
fn a_sigkill_mid_query_never_releases_an_answer_the_ledger_did_not_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = site(dir.path());
    let (mut child, addr) = spawn_node(&site);

    let answered = hammer_then_kill(&site, addr, &mut child, |worker, n| {
        dp_ticket(&format!("dp{worker}-{n}"), worker, n)
    });
    // Each release is charged (a spend line) before it runs and recorded (an answer line)
    // before it leaves.
    let ledger = ledger_records(dir.path(), false);
    for id in &answered {
        for kind in ["spend", "answer"] {
            assert!(
                ledger
                    .iter()
                    .any(|r| r["request_id"] == id.as_str() && r["kind"] == kind),
                "answer {id} left the node without its {kind} line"
            );
        }
    }

    // The node starts again on the same ledger, and `budget show` reports every charge.
    let (mut again, _) = spawn_node(&site);
    again.kill().expect("kill");
    let _ = again.wait();
    let charged = ledger_records(dir.path(), true)
        .iter()
        .filter(|r| r["kind"] != "answer")
        .count();
    assert!(charged >= answered.len());
    let shown = trustql(&[
        "budget",
        "show",
        "--config",
        site.config.to_str().expect("path"),
        "--project",
        "dp",
    ]);
    assert!(shown.status.success(), "{}", text(&shown));
    let line = text(&shown)
        .lines()
        .find(|l| l.starts_with("dp "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no line for project dp:\n{}", text(&shown)));
    let columns: Vec<&str> = line.split_whitespace().collect();
    let spent: f64 = columns[1].parse().expect("ε spent");
    assert!(
        (spent - 0.01 * charged as f64).abs() < 1e-6,
        "ε spent {spent} for {charged} charges"
    );
    assert_eq!(columns[6], charged.to_string(), "releases");
}

/// Three workers ask queries (`make(worker, n)`, whose request id is returned when answered)
/// until the node is SIGKILLed 1.5 s in; the ids of the answers that arrived.
fn hammer_then_kill(
    site: &Site,
    addr: SocketAddr,
    child: &mut Child,
    make: fn(usize, usize) -> SiteRequest,
) -> Vec<String> {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for worker in 0..3 {
            let mut client = client(site, addr).await;
            let answered = Arc::clone(&answered);
            let signer = Arc::clone(&site.signer);
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    let request = make(worker, n);
                    let id = request.request_id.clone();
                    let Ok(response) = client.do_get(signed(&signer, request)).await else {
                        break;
                    };
                    let Ok(messages) = response.into_inner().try_collect::<Vec<_>>().await else {
                        break;
                    };
                    assert!(!messages.is_empty());
                    answered.lock().expect("lock").push(id);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        child.kill().expect("SIGKILL the node");
        for task in tasks {
            task.await.expect("worker");
        }
    });
    let _ = child.wait();
    let answered = answered.lock().expect("lock").clone();
    assert!(
        answered.len() >= 3,
        "queries were answered before the kill: {}",
        answered.len()
    );
    answered
}

/// The audit log's records; a SIGKILL may have cut off the last line (never acknowledged).
fn audit_records(site: &Site) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(site.audit.join("audit.jsonl")).expect("audit log");
    let lines: Vec<&str> = text.lines().collect();
    let last = lines.len().saturating_sub(1);
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match serde_json::from_str(l) {
            Ok(record) => Some(record),
            Err(_) if i == last && !text.ends_with('\n') => None,
            Err(e) => panic!("line {} is no whole JSON record: {e}", i + 1),
        })
        .collect()
}

#[test]
fn a_sigkill_mid_query_leaves_a_verifiable_log_with_every_answer_on_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = site(dir.path());
    let (mut child, addr) = spawn_node(&site);

    let answered = hammer_then_kill(&site, addr, &mut child, |worker, n| {
        ticket(&format!("w{worker}-{n}"))
    });
    let verified = trustql(&["audit", "verify", site.audit.to_str().expect("path")]);
    assert!(verified.status.success(), "{}", text(&verified));
    // The kill may land between a record's write and its seal: the sealed records verify,
    // and the tail is named, never counted.
    let crashed = trustql_audit::verify(&site.audit).expect("the sealed records verify");
    assert_eq!(
        crashed.unacknowledged.is_some(),
        text(&verified).contains("never"),
        "{}",
        text(&verified)
    );
    let records = audit_records(&site);
    for id in &answered {
        assert!(
            records
                .iter()
                .any(|r| r["request_id"] == id.as_str() && r["decision"] == "answered"),
            "answer {id} left the node without its audit record"
        );
    }

    // The node starts again on the same log and the chain continues.
    let (mut again, _) = spawn_node(&site);
    again.kill().expect("kill");
    let _ = again.wait();
    let verified = trustql(&["audit", "verify", site.audit.to_str().expect("path")]);
    assert!(verified.status.success(), "{}", text(&verified));
    // The sealed records stay as they were; a dropped tail is noted, then the start.
    let after = audit_records(&site);
    let sealed = usize::try_from(crashed.records).expect("count");
    assert_eq!(
        &after[..sealed],
        &records[..sealed],
        "sealed records untouched"
    );
    let noted = usize::from(crashed.unacknowledged.is_some());
    assert_eq!(after.len(), sealed + noted + 1, "a start record follows");
    if noted == 1 {
        assert_eq!(after[sealed]["decision"], "node", "{}", after[sealed]);
    }

    // Every worker asked the same query: it counted once against p1's allowance (the rest
    // were repeats), and the count is in the ledger that `budget show` reads.
    let shown = trustql(&[
        "budget",
        "show",
        "--config",
        site.config.to_str().expect("path"),
        "--project",
        "p1",
    ]);
    assert!(shown.status.success(), "{}", text(&shown));
    let line = text(&shown)
        .lines()
        .find(|l| l.starts_with("p1 "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no line for project p1:\n{}", text(&shown)));
    let columns: Vec<&str> = line.split_whitespace().collect();
    // Counted before it ran: once, unless the kill came before any query passed vetting.
    // (Near midnight UTC the node's day and this one may differ; the count in all may not.)
    let counted = columns[3];
    assert!(
        counted == "1" || (answered.is_empty() && counted == "0"),
        "queries in all: {line}"
    );
    assert_eq!((columns[2], columns[4]), ("500", "-"), "{line}");
}

#[test]
fn audit_verify_names_an_edited_record_and_a_bad_config_is_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = site(dir.path());
    let (mut child, _) = spawn_node(&site);
    child.kill().expect("kill");
    let _ = child.wait();
    let (mut child, _) = spawn_node(&site);
    child.kill().expect("kill");
    let _ = child.wait();

    let log = site.audit.join("audit.jsonl");
    let original = std::fs::read_to_string(&log).expect("log");
    std::fs::write(&log, original.replacen("started", "STARTED", 1)).expect("edit");
    let verified = trustql(&["audit", "verify", site.audit.to_str().expect("path")]);
    assert!(!verified.status.success());
    assert!(text(&verified).contains("line 1"), "{}", text(&verified));
    assert!(text(&verified).contains("edited"), "{}", text(&verified));

    // A node refuses to start on a broken log.
    let output = trustql(&["node", "--config", site.config.to_str().expect("path")]);
    assert!(!output.status.success());
    assert!(text(&output).contains("audit"), "{}", text(&output));

    // A config with an unknown key.
    std::fs::write(&site.config, "trust = \"TQ01\"\nbogus = 1\n").expect("write");
    let output = trustql(&["node", "--config", site.config.to_str().expect("path")]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("node configuration"),
        "{}",
        text(&output)
    );
}

/// Every cycle of a regimen with every other, six ways: runs for a long time.
const SLOW: &str = "SELECT r.intent_of_treatment, COUNT(*) FROM sim_sact_regimen r \
    JOIN sim_sact_cycle a ON a.merged_regimen_id = r.merged_regimen_id \
    JOIN sim_sact_cycle b ON b.merged_regimen_id = r.merged_regimen_id \
    JOIN sim_sact_cycle c ON c.merged_regimen_id = r.merged_regimen_id \
    JOIN sim_sact_cycle d ON d.merged_regimen_id = r.merged_regimen_id \
    JOIN sim_sact_cycle e ON e.merged_regimen_id = r.merged_regimen_id \
    JOIN sim_sact_cycle f ON f.merged_regimen_id = r.merged_regimen_id \
    GROUP BY r.intent_of_treatment";

#[test]
fn a_node_killed_during_a_query_is_reported_without_waiting_for_the_deadline() {
    use trustql_coordinator::{
        CoordinatorConfig, NodeEntry, Quorum, ResearcherEntry, TlsFiles, token_hash,
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let site = site(dir.path());
    let (mut child, addr) = spawn_node(&site);
    let pki = dir.path().join("pki");
    site.coordinator
        .write(&pki, "coordinator-client")
        .expect("write coordinator cert");
    let config = CoordinatorConfig {
        audit_dir: dir.path().join("coordinator-audit"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        node_deadline_ms: 60_000,
        quorum: Quorum::All,
        tls: TlsFiles {
            cert: pki.join("coordinator.pem"),
            key: pki.join("coordinator.key"),
        },
        node_client: TlsFiles {
            cert: pki.join("coordinator-client.pem"),
            key: pki.join("coordinator-client.key"),
        },
        request_signing_key: pki.join("coordinator-requests.key"),
        limits: Default::default(),
        nodes: vec![NodeEntry {
            trust: "TQ01".into(),
            url: format!("https://{addr}"),
            ca: pki.join("ca.pem"),
            server_name: Some("localhost".into()),
        }],
        researchers: vec![ResearcherEntry {
            name: "alice".into(),
            token_sha256: token_hash("t"),
            projects: vec!["p1".into()],
        }],
        disclosure: Default::default(),
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let coordinator = trustql_coordinator::start(
            &config,
            trustql_schemas::TrustSchema::cancer().expect("schema"),
        )
        .await
        .expect("coordinator");
        let url = format!("https://localhost:{}", coordinator.addr().port());
        let ca = std::fs::read(pki.join("ca.pem")).expect("ca");
        let mut client = trustql_client::Client::connect(&url, Some(&ca), "t", None)
            .await
            .expect("connect");
        let started = std::time::Instant::now();
        let query = tokio::spawn(async move { client.query(SLOW).await });
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        child.kill().expect("SIGKILL the node mid-query");
        let err = query
            .await
            .expect("task")
            .expect_err("no answer from a killed node");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "reported long before the 60 s deadline"
        );
        let text = err.to_string();
        assert!(
            text.contains("TQ01") && (text.contains("unreachable") || text.contains("failed")),
            "{text}"
        );
    });
    let _ = child.wait();
}

#[test]
fn pool_key_prints_the_same_public_key_every_time_and_never_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = site(dir.path());
    let config = site.config.to_str().expect("path");
    let first = trustql(&["pool", "key", "--config", config]);
    assert!(first.status.success(), "{}", text(&first));
    let again = trustql(&["pool", "key", "--config", config]);
    assert_eq!(first.stdout, again.stdout, "one key pair, made once");
    let printed = String::from_utf8(first.stdout).expect("utf-8");
    // 32 bytes in base64, as peers pin it.
    assert_eq!(printed.trim().len(), 44, "{printed}");
    let secret =
        std::fs::read_to_string(dir.path().join("state").join(trustql_node::POOL_KEY_FILE))
            .expect("the secret is kept in the state directory");
    assert!(!printed.contains(secret.trim()), "the secret was printed");

    // A peer key that is not a key stops the node with the reason.
    let mut text_config = std::fs::read_to_string(&site.config).expect("config");
    text_config.push_str("\n[pool]\npeers = { TQ02 = \"not a key\" }\n");
    std::fs::write(&site.config, text_config).expect("write");
    let output = trustql(&["node", "--config", config]);
    assert!(!output.status.success());
    assert!(text(&output).contains("peers.TQ02"), "{}", text(&output));
}
