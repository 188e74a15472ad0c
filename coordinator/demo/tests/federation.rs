//! End to end on loopback: real nodes behind mutual TLS, a real coordinator, a real Flight
//! SQL client with a bearer token.

use std::time::{Duration, Instant};

use trustql_client::{Client, QueryResult};
use trustql_coordinator::{
    CoordinatorConfig, NodeEntry, Quorum, ResearcherEntry, TlsFiles, token_hash,
};
use trustql_demo::{DemoOptions, Federation, PROJECT, RESEARCHER, launch};
use trustql_protocol::TrustStatus;
use trustql_schemas::TrustSchema;
use trustql_testkit::federation::{central, client, one};
use trustql_testkit::oracle;

fn options(unprotected: bool) -> DemoOptions {
    DemoOptions {
        trusts: 3,
        patients: 3_000,
        seed: 21,
        unprotected,
        node_deadline_ms: 5_000,
        ..DemoOptions::default()
    }
}

/// Suppression and rounding to 5 instead of the cell-key default, for the tests that read
/// rounded counts and the rounding note.
fn rounded() -> DemoOptions {
    DemoOptions {
        rounding: true,
        ..options(false)
    }
}

#[tokio::test]
async fn the_panel_through_the_coordinator_equals_one_process_over_the_union() {
    let fed = launch(&options(true)).await.expect("launch");
    let mut client = client(&fed).await;
    let central = central(&fed).await;
    for sql in oracle::PANEL {
        let result = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let got = one(&result);
        let want = oracle::run(&central, sql).await;
        oracle::assert_same(sql, &got, &want, sql.contains("ORDER BY"));
        let coverage = result.coverage.expect("coverage travels with every answer");
        assert!(coverage.complete, "{sql}: {coverage}");
        assert_eq!(coverage.trusts.len(), 3);
        if sql.contains("DISTINCT") {
            assert!(
                coverage.notes.iter().any(|n| n.contains("two trusts")),
                "{sql}: {coverage}"
            );
        }
    }
    // Every node recorded every query under the same request id.
    for audit in &fed.audit_dirs {
        let verified = trustql_audit_records(audit);
        assert_eq!(
            verified,
            oracle::PANEL.len() + 1,
            "start record plus one per query"
        );
    }
}

fn trustql_audit_records(dir: &std::path::Path) -> usize {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .expect("audit")
        .lines()
        .count()
}

#[tokio::test]
async fn researchers_browse_and_are_refused_clearly() {
    let fed = launch(&rounded()).await.expect("launch");
    let mut client = client(&fed).await;
    let tables = client.tables().await.expect("tables");
    assert!(
        tables.contains(&"sim_av_tumour".to_string()) && tables.len() == 8,
        "{tables:?}"
    );

    // Protected: small groups are withheld at each trust, and how many stays there: the
    // number of a trust's small groups under a fine key is an exact count of its patients.
    let result = client
        .query("SELECT ethnicity, site_icd10_o2_3char, COUNT(*) FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid GROUP BY 1, 2")
        .await
        .expect("answer");
    let coverage = result.coverage.clone().expect("coverage");
    let withheld: usize = fed
        .audit_dirs
        .iter()
        .map(|dir| {
            std::fs::read_to_string(dir.join(trustql_audit::LOG_FILE))
                .expect("node audit")
                .lines()
                .filter_map(|l| serde_json::from_str::<trustql_audit::AuditRecord>(l).ok())
                .filter(|r| r.entry.sql.starts_with("SELECT ethnicity"))
                .map(|r| r.entry.withheld.small)
                .sum::<usize>()
        })
        .sum();
    assert!(withheld > 0, "each trust's log records what it withheld");
    assert!(
        coverage.trusts.iter().all(|t| t.released.is_none()),
        "{coverage}"
    );
    let json = coverage.to_json().expect("json");
    assert!(
        !json.contains("withheld\":") && !json.contains("released\":"),
        "no per-trust group counts travel: {json}"
    );
    assert!(
        coverage
            .notes
            .iter()
            .any(|n| n.contains("how many groups a trust withheld is not reported")),
        "{coverage}"
    );
    // What a researcher reads beside the answer, word for word (the request id is random).
    insta::assert_snapshot!(
        "coverage_protected",
        coverage
            .to_string()
            .replace(&coverage.request_id, "<request>")
    );
    assert!(
        coverage
            .notes
            .iter()
            .any(|n| n.contains("rounded to the nearest 5")),
        "{coverage}"
    );
    let counts = one(&result);
    let counts =
        arrow::compute::cast(counts.column(2), &arrow::datatypes::DataType::Int64).expect("cast");
    let counts = counts
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .expect("ints");
    assert!(
        counts.iter().flatten().all(|c| c % 5 == 0 && c >= 10),
        "released totals are rounded and not small"
    );

    let err = client
        .query("SELECT patientid FROM sim_av_patient")
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("aggregate"), "{err}");
    let err = client
        .query("DROP TABLE sim_av_patient")
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("only SELECT"), "{err}");

    // The coordinator recorded each request in its own hash-chained log: who, what, which
    // trusts answered, what was released, and the refusals.
    let verified = trustql_audit::verify(&fed.coordinator_audit).expect("an intact chain");
    assert_eq!(verified.records, 3);
    let records: Vec<trustql_audit::AuditRecord> =
        std::fs::read_to_string(fed.coordinator_audit.join(trustql_audit::LOG_FILE))
            .expect("coordinator audit")
            .lines()
            .map(|l| serde_json::from_str(l).expect("record"))
            .collect();
    let answered = &records[0].entry;
    assert_eq!(answered.decision, trustql_audit::Decision::Answered);
    assert_eq!(answered.researcher, RESEARCHER);
    assert_eq!(answered.project, PROJECT);
    assert!(answered.sql.starts_with("SELECT ethnicity"));
    assert_eq!(answered.released, counts.len());
    assert_eq!(
        answered.withheld,
        Default::default(),
        "no count of withheld groups reaches the coordinator"
    );
    let statuses: Vec<(&str, TrustStatus)> = answered
        .trusts
        .iter()
        .map(|t| (t.trust.as_str(), t.status))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("TQ01", TrustStatus::Answered),
            ("TQ02", TrustStatus::Answered),
            ("TQ03", TrustStatus::Answered)
        ]
    );
    for (record, sql) in records[1..].iter().zip(["SELECT patientid", "DROP TABLE"]) {
        assert_eq!(record.entry.decision, trustql_audit::Decision::Refused);
        assert!(record.entry.sql.starts_with(sql));
        assert!(record.entry.reason.is_some());
    }

    // Tokens and projects.
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    for (token, project, expect) in [
        ("wrong", Some(PROJECT), "token"),
        (fed.info.token.as_str(), Some("another"), "not on project"),
    ] {
        let mut other = Client::connect(&fed.info.url, Some(&ca), token, project)
            .await
            .expect("connect");
        let err = other
            .query("SELECT COUNT(*) FROM sim_av_patient")
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(expect), "{err}");
    }
    // A single-project researcher may leave the project out.
    let mut implicit = Client::connect(&fed.info.url, Some(&ca), &fed.info.token, None)
        .await
        .expect("connect");
    implicit
        .query("SELECT COUNT(*) FROM sim_av_patient")
        .await
        .expect("implicit project");

    // A client that does not trust the coordinator's certificate does not connect.
    let other_ca = trustql_devcerts::DevCa::new("other")
        .expect("ca")
        .cert_pem();
    let refused = match Client::connect(
        &fed.info.url,
        Some(other_ca.as_bytes()),
        &fed.info.token,
        None,
    )
    .await
    {
        Err(_) => true,
        Ok(mut c) => c
            .query("SELECT COUNT(*) FROM sim_av_patient")
            .await
            .is_err(),
    };
    assert!(refused);
}

/// A coordinator over the demo's nodes plus a silent node and a node whose CA it does not
/// trust, with the given quorum.
async fn faulty_coordinator(
    fed: &Federation,
    quorum: Quorum,
    deadline_ms: u64,
) -> (
    trustql_coordinator::RunningCoordinator,
    String,
    std::path::PathBuf,
) {
    let pki = fed.work_dir().join("pki");
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            held.push(stream);
        }
    });
    let stranger = trustql_devcerts::DevCa::new("stranger").expect("ca");
    let stranger_ca = stranger.write_cert(&pki, "stranger.pem").expect("write");
    let mut nodes: Vec<NodeEntry> = fed
        .nodes
        .iter()
        .map(|n| NodeEntry {
            trust: n.trust().into(),
            url: format!("https://{}", n.addr()),
            ca: fed.info.ca.clone(),
            server_name: Some("localhost".into()),
        })
        .collect();
    nodes.push(NodeEntry {
        trust: "TQ98".into(),
        url: format!("https://{silent_addr}"),
        ca: fed.info.ca.clone(),
        server_name: Some("localhost".into()),
    });
    nodes.push(NodeEntry {
        trust: "TQ99".into(),
        url: format!("https://{}", fed.nodes[0].addr()),
        ca: stranger_ca,
        server_name: Some("localhost".into()),
    });
    let token = "fault-token".to_string();
    // Its own log: the demo's coordinator holds the demo's.
    let audit_dir = std::env::temp_dir().join(format!(
        "trustql-faulty-audit-{}",
        trustql_coordinator::random_hex(8).expect("random")
    ));
    let config = CoordinatorConfig {
        audit_dir: audit_dir.clone(),
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
        limits: Default::default(),
        nodes,
        disclosure: Default::default(),
        researchers: vec![ResearcherEntry {
            name: RESEARCHER.into(),
            token_sha256: token_hash(&token),
            projects: vec![PROJECT.into()],
        }],
    };
    let running = trustql_coordinator::start(&config, TrustSchema::cancer().expect("schema"))
        .await
        .expect("start");
    (running, token, audit_dir)
}

#[tokio::test]
async fn faulty_nodes_are_reported_within_the_deadline() {
    let mut fed = launch(&options(false)).await.expect("launch");
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    let sql = "SELECT gender, COUNT(*) FROM sim_av_patient GROUP BY gender";

    // Quorum 2 of 5: three real nodes answer; the silent one times out; the stranger fails TLS.
    let (coordinator, token, audit_dir) = faulty_coordinator(&fed, Quorum::AtLeast(2), 1_500).await;
    let url = format!("https://127.0.0.1:{}", coordinator.addr().port());
    let mut client = Client::connect(&url, Some(&ca), &token, None)
        .await
        .expect("connect");
    let started = Instant::now();
    let result = client.query(sql).await.expect("an answer from the quorum");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the deadline bounds the query"
    );
    let coverage = result.coverage.expect("coverage");
    let status = |trust: &str| {
        coverage
            .trusts
            .iter()
            .find(|t| t.trust == trust)
            .map(|t| t.status)
    };
    // A trust that took the query and ran out of time is not named, nor are the trusts that
    // answered: a timeout (or an error) while running could depend on the trust's data.
    assert_eq!(status("TQ01"), Some(TrustStatus::Asked), "{coverage}");
    assert_eq!(status("TQ98"), Some(TrustStatus::Asked), "{coverage}");
    assert_eq!(status("TQ99"), Some(TrustStatus::Unreachable), "{coverage}");
    assert_eq!(coverage.incomplete, 1, "{coverage}");
    assert!(!coverage.complete);
    assert!(
        coverage
            .trusts
            .iter()
            .filter(|t| t.status == TrustStatus::Asked)
            .all(|t| t.reason.is_none() && t.released.is_none() && t.dp.is_none()),
        "{coverage}"
    );
    let text = coverage.to_string();
    assert!(
        !text.contains("timed out") && !text.contains("no answer within"),
        "{text}"
    );
    assert!(
        coverage.notes.iter().any(|n| n.contains("TQ99")),
        "{coverage}"
    );
    assert!(
        !coverage.notes.iter().any(|n| n.contains("TQ98")),
        "{coverage}"
    );
    // The coordinator's own log keeps what really happened, for its operator.
    let log = std::fs::read_to_string(audit_dir.join(trustql_audit::LOG_FILE)).expect("log");
    let record: trustql_audit::AuditRecord =
        serde_json::from_str(log.lines().last().expect("a record")).expect("record");
    let really = |trust: &str| {
        record
            .entry
            .trusts
            .iter()
            .find(|t| t.trust == trust)
            .map(|t| t.status)
    };
    assert_eq!(really("TQ01"), Some(TrustStatus::Answered));
    assert_eq!(really("TQ98"), Some(TrustStatus::TimedOut));

    // A node stopped before the query: unreachable, and with quorum "all" no answer.
    let stopped = fed.nodes.remove(2);
    let trust = stopped.trust().to_string();
    let stopped_addr = stopped.addr();
    stopped.stop().await.expect("stop");
    let mut demo_client = client_for(&fed, &ca).await;
    let err = demo_client.query(sql).await.expect_err("quorum all fails");
    let text = err.to_string();
    assert!(
        text.contains(&trust) && text.contains("unreachable"),
        "{text}"
    );

    // The coordinator itself stays up and answers what it can.
    let again = client.query(sql).await.expect("still serving");
    assert!(again.coverage.is_some());

    // The node comes back on the same address: the coordinator's channel reconnects.
    let mut config = fed.node_configs[2].clone();
    assert_eq!(config.trust, trust);
    config.listen = stopped_addr;
    let _back = trustql_node::start(&config, TrustSchema::cancer().expect("schema"))
        .await
        .expect("the node restarts");
    let mut answered = None;
    for _ in 0..20 {
        match demo_client.query(sql).await {
            Ok(result) => {
                answered = Some(result);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    let coverage = answered
        .expect("answered once the node is back")
        .coverage
        .expect("coverage");
    assert!(coverage.complete, "{coverage}");
}

async fn client_for(fed: &Federation, ca: &[u8]) -> Client {
    Client::connect(&fed.info.url, Some(ca), &fed.info.token, Some(PROJECT))
        .await
        .expect("connect")
}

#[tokio::test]
async fn prepared_statements_and_sql_info_work_for_standard_clients() {
    use arrow_flight::sql::SqlInfo;
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures::TryStreamExt;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    let fed = launch(&options(false)).await.expect("launch");
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    let channel = Endpoint::from_shared(fed.info.url.clone())
        .expect("url")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca)))
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_token(fed.info.token.clone());
    client.set_header("x-trustql-project", PROJECT);

    let mut prepared = client
        .prepare(
            "SELECT gender, COUNT(*) AS n FROM sim_av_patient GROUP BY gender".into(),
            None,
        )
        .await
        .expect("prepare");
    let fields: Vec<String> = prepared
        .dataset_schema()
        .expect("schema")
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(fields, vec!["gender", "n"]);
    let info = prepared.execute().await.expect("execute");
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let batches: Vec<_> = client
        .do_get(ticket)
        .await
        .expect("do_get")
        .try_collect()
        .await
        .expect("read");
    assert!(batches.iter().map(|b| b.num_rows()).sum::<usize>() >= 2);
    prepared.close().await.expect("close");

    // A prepared statement that can never be answered is refused when prepared.
    let err = client
        .prepare("SELECT patientid FROM sim_av_patient".into(), None)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("aggregate"), "{err}");

    let info = client
        .get_sql_info(vec![
            SqlInfo::FlightSqlServerName,
            SqlInfo::FlightSqlServerReadOnly,
        ])
        .await
        .expect("sql info");
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let batches: Vec<_> = client
        .do_get(ticket)
        .await
        .expect("do_get")
        .try_collect()
        .await
        .expect("read");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);

    // Without a token nothing is answered, not even the server's description.
    client.clear_token();
    assert!(
        client
            .get_sql_info(vec![SqlInfo::FlightSqlServerName])
            .await
            .is_err()
    );
}

/// A coordinator over the demo's nodes presenting `node_client` and signing with
/// `request_signing_key`; its researcher's token.
async fn coordinator_as(
    fed: &Federation,
    node_client: TlsFiles,
    request_signing_key: std::path::PathBuf,
) -> (trustql_coordinator::RunningCoordinator, String) {
    let pki = fed.work_dir().join("pki");
    let token = "identity-token".to_string();
    let config = CoordinatorConfig {
        audit_dir: fed.work_dir().join(format!(
            "coordinator-audit-{}",
            trustql_coordinator::random_hex(8).expect("random")
        )),
        listen: "127.0.0.1:0".parse().expect("addr"),
        node_deadline_ms: 5_000,
        quorum: Quorum::All,
        tls: TlsFiles {
            cert: pki.join("coordinator.pem"),
            key: pki.join("coordinator.key"),
        },
        node_client,
        request_signing_key,
        limits: Default::default(),
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
        researchers: vec![ResearcherEntry {
            name: RESEARCHER.into(),
            token_sha256: token_hash(&token),
            projects: vec![PROJECT.into()],
        }],
    };
    let running = trustql_coordinator::start(&config, TrustSchema::cancer().expect("schema"))
        .await
        .expect("start");
    (running, token)
}

#[tokio::test]
async fn nodes_answer_only_the_pinned_coordinator_client_and_its_signing_key() {
    let fed = launch(&options(false)).await.expect("launch");
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    let pki = fed.work_dir().join("pki");
    let files = |stem: &str| TlsFiles {
        cert: pki.join(format!("{stem}.pem")),
        key: pki.join(format!("{stem}.key")),
    };
    let signing_key = pki.join("coordinator-requests.key");
    let other_key = trustql_devcerts::SigningKey::generate()
        .expect("key")
        .write(&pki, "other-requests")
        .expect("write")
        .key;
    let sql = "SELECT gender, COUNT(*) FROM sim_av_patient GROUP BY gender";
    let answered = |fed: &Federation| -> usize {
        fed.audit_dirs
            .iter()
            .map(|dir| {
                std::fs::read_to_string(dir.join("audit.jsonl"))
                    .expect("audit")
                    .matches("\"decision\":\"answered\"")
                    .count()
            })
            .sum()
    };

    for (what, node_client, key, expect) in [
        (
            "the researcher-facing server certificate",
            files("coordinator"),
            signing_key.clone(),
            TrustStatus::Unreachable,
        ),
        (
            "another trust's node certificate",
            files("node-TQ02"),
            signing_key.clone(),
            TrustStatus::Unreachable,
        ),
        (
            "the pinned client certificate with another signing key",
            files("coordinator-client"),
            other_key,
            TrustStatus::Failed,
        ),
    ] {
        let (coordinator, token) = coordinator_as(&fed, node_client, key).await;
        let url = format!("https://127.0.0.1:{}", coordinator.addr().port());
        let mut client = Client::connect(&url, Some(&ca), &token, None)
            .await
            .expect("connect");
        let err = client
            .query(sql)
            .await
            .expect_err(&format!("{what}: no trust answers"));
        let text = err.to_string();
        let status = match expect {
            TrustStatus::Unreachable => "unreachable",
            _ => "failed",
        };
        for trust in &fed.info.trusts {
            assert!(text.contains(trust), "{what}: {text}");
        }
        assert!(text.contains(status), "{what}: {text}");
        if expect == TrustStatus::Failed {
            assert!(text.contains("not vouched for"), "{what}: {text}");
        }
        assert_eq!(answered(&fed), 0, "{what}: a node answered");
    }

    // The demo's own coordinator (pinned client certificate, pinned key) is answered.
    let mut demo = client(&fed).await;
    let result = demo.query(sql).await.expect("answered");
    assert!(result.coverage.expect("coverage").complete);
    assert_eq!(answered(&fed), fed.info.trusts.len());
}

/// The one value of an answer of one row and one column, as an integer (`None` for NULL).
fn single(result: &QueryResult, what: &str) -> Option<i64> {
    let batch = one(result);
    assert_eq!(batch.num_rows(), 1, "{what}: one row");
    let column =
        arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Int64).expect("a count");
    let column = column
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .expect("Int64");
    arrow::array::Array::is_valid(column, 0).then(|| column.value(0))
}

#[tokio::test]
async fn answers_are_a_central_databases_or_refused_saying_why() {
    for unprotected in [true, false] {
        let fed = launch(&options(unprotected)).await.expect("launch");
        let mut client = client(&fed).await;
        let mode = if unprotected { "unprotected" } else { "SDC" };

        // Distinct values other than patients cannot be combined across trusts: refused.
        let err = client
            .query("SELECT COUNT(DISTINCT gender) FROM sim_av_patient")
            .await
            .expect_err("COUNT(DISTINCT gender) is refused");
        assert!(
            err.to_string()
                .contains("COUNT(DISTINCT …) is answered only for the patient key"),
            "{mode}: {err}"
        );
        let contradiction = "FROM sim_av_tumour WHERE stage_best = '1' AND stage_best = '2'";
        let patients = client
            .query("SELECT COUNT(DISTINCT patientid) FROM sim_av_patient")
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(
            single(&patients, &format!("{mode} patients")).is_some_and(|n| n > 0),
            "{mode}"
        );

        // Over no rows, COUNT(DISTINCT) is answered as COUNT(*) is: 0 unprotected; under SDC
        // a total of no patients is no released group.
        let over_nothing = |agg: &str| format!("SELECT {agg} AS n {contradiction}");
        let empty = "FROM sim_av_tumour WHERE stage_best = 'no such stage'";
        let count = client
            .query(&format!("SELECT COUNT(*) AS n {empty}"))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        let released = one(&count).num_rows();
        assert_eq!(released, usize::from(unprotected), "{mode}");
        let zero = |result: &QueryResult, what: &str| {
            if released == 1 {
                assert_eq!(single(result, what), Some(0), "{what}");
            } else {
                assert_eq!(one(result).num_rows(), 0, "{what}");
            }
        };
        let none = client
            .query(&format!("SELECT COUNT(DISTINCT patientid) AS n {empty}"))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        zero(&none, &format!("{mode}: COUNT(DISTINCT) over no rows"));

        // A WHERE the optimiser proves false reads no rows and is answered as such.
        for agg in ["COUNT(*)", "COUNT(DISTINCT patientid)"] {
            let ungrouped = client
                .query(&over_nothing(agg))
                .await
                .unwrap_or_else(|e| panic!("{mode}: {e}"));
            zero(&ungrouped, &format!("{mode}: {agg} of a contradiction"));
        }
        let grouped = client
            .query(&format!(
                "SELECT site_icd10_o2_3char, COUNT(*) AS n {contradiction} GROUP BY 1"
            ))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(one(&grouped).num_rows(), 0, "{mode}");
        assert!(
            grouped.coverage.as_ref().is_some_and(|c| c.complete),
            "{mode}: every trust answered"
        );
    }
}
