//! Availability (attack class 12) at the coordinator: SQL too big or too deep is refused on its
//! tokens before the parser and planner see it (a few thousand terms used to overflow the
//! stack and abort the process), and one researcher's un-fetched results never keep another
//! researcher from being answered.

use std::time::Duration;

use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use trustql_client::{Client, PROJECT_HEADER};
use trustql_coordinator::{
    CoordinatorConfig, Limits, NodeEntry, ResearcherEntry, RunningCoordinator, TlsFiles, token_hash,
};
use trustql_demo::{COLLEAGUE, DemoOptions, Federation, PROJECT, RESEARCHER, launch};
use trustql_schemas::TrustSchema;

const COUNT: &str = "SELECT gender, COUNT(*) FROM sim_av_patient GROUP BY gender";

async fn federation() -> Federation {
    launch(&DemoOptions {
        trusts: 2,
        patients: 1_000,
        seed: 5,
        node_deadline_ms: 10_000,
        ..DemoOptions::default()
    })
    .await
    .expect("launch")
}

/// A bare Flight SQL client, to see status codes and to leave results un-fetched.
async fn raw(url: &str, ca: &[u8], token: &str) -> FlightSqlServiceClient<Channel> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let channel = Endpoint::from_shared(url.to_string())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_token(token.to_string());
    client.set_header(PROJECT_HEADER, PROJECT);
    client
}

fn status(e: FlightError) -> (Code, String) {
    match e {
        FlightError::Tonic(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a status, got {other}"),
    }
}

fn sum_of_ones(terms: usize) -> String {
    format!("SELECT {}", vec!["1"; terms].join("+"))
}

#[tokio::test]
async fn an_enormous_expression_is_refused_and_the_coordinator_keeps_answering() {
    let fed = federation().await;
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    let mut client = raw(&fed.info.url, &ca, &fed.info.token).await;
    // Planned, 2,000 terms overflowed the coordinator's stack; 700 burned seconds of CPU.
    for terms in [700, 2_000] {
        let (code, message) = status(
            client
                .execute(sum_of_ones(terms), None)
                .await
                .expect_err("refused"),
        );
        assert_eq!(code, Code::InvalidArgument, "{terms}: {message}");
        assert!(message.contains("query-complexity"), "{terms}: {message}");
    }
    let deep = format!(
        "SELECT COUNT(*) FROM sim_av_patient WHERE {}1 = 1{}",
        "(".repeat(5_000),
        ")".repeat(5_000)
    );
    let (code, message) = status(client.execute(deep, None).await.expect_err("refused"));
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains("query-length"), "{message}");
    let deep = format!(
        "SELECT COUNT(*) FROM sim_av_patient WHERE {}1 = 1{}",
        "(".repeat(1_000),
        ")".repeat(1_000)
    );
    let (code, message) = status(client.execute(deep, None).await.expect_err("refused"));
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains("nests"), "{message}");
    // Preparing a statement plans it too.
    let (code, message) = match client.prepare(sum_of_ones(2_000), None).await {
        Ok(_) => panic!("preparing 2,000 terms must be refused"),
        Err(e) => status(e),
    };
    assert_eq!(code, Code::InvalidArgument, "{message}");

    // Still up, and answering.
    let mut researcher = Client::connect(&fed.info.url, Some(&ca), &fed.info.token, Some(PROJECT))
        .await
        .expect("connect");
    let result = researcher.query(COUNT).await.expect("answered");
    assert!(result.batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0);
}

/// A coordinator over the demo's nodes for two researchers, with `limits`.
async fn coordinator(fed: &Federation, limits: Limits) -> (RunningCoordinator, String, String) {
    let pki = fed.work_dir().join("pki");
    let (analyst, colleague) = ("analyst-token".to_string(), "colleague-token".to_string());
    let config = CoordinatorConfig {
        audit_dir: fed.work_dir().join("quota-audit"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        node_deadline_ms: 10_000,
        quorum: Default::default(),
        tls: TlsFiles {
            cert: pki.join("coordinator.pem"),
            key: pki.join("coordinator.key"),
        },
        node_client: TlsFiles {
            cert: pki.join("coordinator-client.pem"),
            key: pki.join("coordinator-client.key"),
        },
        request_signing_key: pki.join("coordinator-requests.key"),
        nodes: fed
            .nodes
            .iter()
            .map(|n| NodeEntry {
                trust: n.trust().into(),
                url: format!("https://{}", n.addr()),
                ca: fed.info.ca.clone(),
                server_name: Some("localhost".into()),
            })
            .collect(),
        disclosure: Default::default(),
        researchers: vec![
            ResearcherEntry {
                name: RESEARCHER.into(),
                token_sha256: token_hash(&analyst),
                projects: vec![PROJECT.into()],
            },
            ResearcherEntry {
                name: COLLEAGUE.into(),
                token_sha256: token_hash(&colleague),
                projects: vec![PROJECT.into()],
            },
        ],
        limits,
    };
    config.validate().expect("valid");
    let running = trustql_coordinator::start(&config, TrustSchema::cancer().expect("schema"))
        .await
        .expect("start");
    (running, analyst, colleague)
}

#[tokio::test]
async fn one_researchers_unfetched_results_do_not_block_another() {
    let fed = federation().await;
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    let limits = Limits {
        max_waiting_results: 2,
        ..Limits::default()
    };
    let (running, analyst, colleague) = coordinator(&fed, limits).await;
    let url = format!("https://127.0.0.1:{}", running.addr().port());

    let mut hoarder = raw(&url, &ca, &analyst).await;
    let mut tickets = Vec::new();
    for _ in 0..2 {
        let info = hoarder.execute(COUNT.into(), None).await.expect("answered");
        tickets.push(info.endpoint[0].ticket.clone().expect("a ticket"));
    }
    let (code, message) = status(
        hoarder
            .execute(COUNT.into(), None)
            .await
            .expect_err("over the quota"),
    );
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains("waiting to be fetched"), "{message}");

    // The other researcher is answered all the same.
    let mut other = Client::connect(&url, Some(&ca), &colleague, Some(PROJECT))
        .await
        .expect("connect");
    for _ in 0..3 {
        let result = other.query(COUNT).await.expect("answered");
        assert!(result.batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0);
    }

    // Fetching a result gives its place back.
    let fetched = hoarder.do_get(tickets.remove(0)).await.expect("fetch");
    drop(fetched);
    hoarder
        .execute(COUNT.into(), None)
        .await
        .expect("answered again");
}

#[tokio::test]
async fn waiting_results_expire_and_give_their_place_back() {
    let fed = federation().await;
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    let limits = Limits {
        max_waiting_results: 1,
        result_ttl_secs: 1,
        ..Limits::default()
    };
    let (running, analyst, _) = coordinator(&fed, limits).await;
    let url = format!("https://127.0.0.1:{}", running.addr().port());
    let mut client = raw(&url, &ca, &analyst).await;
    let info = client.execute(COUNT.into(), None).await.expect("answered");
    let ticket = info.endpoint[0].ticket.clone().expect("a ticket");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The quota of one is free again, and the old result is gone.
    client
        .execute(COUNT.into(), None)
        .await
        .expect("the expired result no longer counts");
    let (code, _) = match client.do_get(ticket).await {
        Ok(_) => panic!("an expired result must not be fetched"),
        Err(e) => status(e),
    };
    assert_eq!(code, Code::NotFound);
}
