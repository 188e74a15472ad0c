//! A real node on 127.0.0.1 behind mutual TLS, queried through a real Flight client.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use arrow_flight::{FlightData, Ticket};
use futures::TryStreamExt;
use tonic::Code;
use trustql_audit::{Decision, verify};
use trustql_node::{Limits, NodeError, RunningNode, start};
use trustql_protocol::{ANSWER_META_KEY, AnswerMeta, SiteRequest};

struct Site {
    _dir: tempfile::TempDir,
    node: RunningNode,
    pki: common::Pki,
    audit: std::path::PathBuf,
    fed: std::path::PathBuf,
    policy_hash: String,
}

async fn site(patients: u64, disclosure: &str, limits: Limits) -> Site {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = common::synth(dir.path(), patients);
    let (policy_path, policy) = common::policy(dir.path(), disclosure);
    let pki = common::pki(dir.path());
    let config = common::node_config(dir.path(), &fed, &policy_path, &pki, limits);
    let node = start(&config, common::schema()).await.expect("node starts");
    Site {
        audit: config.audit_dir.clone(),
        fed,
        policy_hash: policy.hash,
        node,
        pki,
        _dir: dir,
    }
}

/// A request as the coordinator sends it: signed, for TQ01, issued now.
fn ticket(site: &Site, id: &str, sql: &str) -> Ticket {
    common::signed_ticket(
        &site.pki,
        SiteRequest {
            request_id: id.into(),
            researcher: "alice".into(),
            project: "p1".into(),
            sql: sql.into(),
            ..Default::default()
        },
    )
}

/// Sends a ticket and reads the raw Flight messages the node streams back.
async fn raw_get(site: &Site, ticket: Ticket) -> Result<Vec<FlightData>, tonic::Status> {
    let mut client = common::client(
        site.node.addr(),
        &site.pki.ca_pem,
        Some(&site.pki.coordinator),
    )
    .await
    .expect("a trusted coordinator connects");
    let stream = client.do_get(ticket).await?.into_inner();
    stream.try_collect().await
}

fn decode(messages: &[FlightData]) -> (AnswerMeta, Vec<RecordBatch>) {
    let batches = arrow_flight::utils::flight_data_to_batches(messages).expect("decodable stream");
    let first = batches.first().expect("at least one batch");
    let meta = first
        .schema()
        .metadata()
        .get(ANSWER_META_KEY)
        .map(|m| AnswerMeta::from_json(m).expect("metadata parses"))
        .expect("answer metadata travels with the schema");
    (meta, batches)
}

use common::records;

async fn identifiers(fed: &Path) -> HashSet<i64> {
    let ctx = common::plain_session(&fed.join("TQ01")).await;
    let sql = "SELECT patientid FROM sim_av_patient UNION ALL SELECT linknumber FROM sim_av_patient \
               UNION ALL SELECT tumourid FROM sim_av_tumour UNION ALL SELECT merged_regimen_id FROM sim_sact_regimen";
    let batches = ctx
        .sql(sql)
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
    batches
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_primitive::<Int64Type>()
                .iter()
                .flatten()
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn answers_travel_over_mutual_tls_without_identifiers_and_are_recorded_first() {
    let site = site(2_000, common::UNPROTECTED, Limits::default()).await;
    let sql = "SELECT t.stage_best, r.intent_of_treatment, COUNT(DISTINCT t.patientid), COUNT(*), AVG(t.age) \
               FROM sim_av_tumour t JOIN sim_sact_regimen r ON r.encore_patient_id = t.patientid \
               GROUP BY t.stage_best, r.intent_of_treatment";
    let messages = raw_get(&site, ticket(&site, "req-1", sql))
        .await
        .expect("answered");
    let (meta, batches) = decode(&messages);

    assert_eq!(meta.trust, "TQ01");
    assert_eq!(meta.request_id, "req-1");
    assert_eq!(meta.policy_hash, site.policy_hash);
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert!(rows > 3, "several groups released");
    assert_eq!(meta.released, rows);

    // Nothing row-level on the wire: no list columns, no identifier among the numbers, and
    // no identifier's bytes anywhere in the message bodies.
    let ids = identifiers(&site.fed).await;
    for batch in &batches {
        for (i, field) in batch.schema().fields().iter().enumerate() {
            assert!(
                !matches!(
                    field.data_type(),
                    DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..)
                ),
                "a list column ({}) crossed the wire",
                field.name()
            );
            if let Some(ints) = batch.column(i).as_primitive_opt::<Int64Type>() {
                assert!(
                    ints.iter().flatten().all(|v| !ids.contains(&v)),
                    "an identifier crossed the wire"
                );
            }
        }
    }
    for message in &messages {
        for chunk in message.data_body.chunks_exact(8) {
            let v = i64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            assert!(!ids.contains(&v), "an identifier's bytes crossed the wire");
        }
    }

    // The request is on record, after the node's start, and the chain holds.
    let log = records(&site.audit);
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].entry.decision, Decision::Node);
    let entry = &log[1].entry;
    assert_eq!(
        (
            entry.decision,
            entry.request_id.as_str(),
            entry.researcher.as_str(),
            entry.project.as_str()
        ),
        (Decision::Answered, "req-1", "alice", "p1")
    );
    assert_eq!(entry.sql, sql);
    assert_eq!(entry.released, rows);
    assert_eq!(entry.policy_hash, site.policy_hash);
    assert_eq!(entry.plan_fingerprint.as_ref().map(String::len), Some(64));
    assert_eq!(verify(&site.audit).expect("chain holds").records, 2);
}

#[tokio::test]
async fn refusals_are_clear_statuses_and_are_recorded() {
    let site = site(500, "min_patients = 10", Limits::default()).await;

    let status = raw_get(
        &site,
        ticket(&site, "r-id", "SELECT patientid FROM sim_av_patient"),
    )
    .await
    .expect_err("identifiers are refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("aggregate-only"),
        "{}",
        status.message()
    );

    let status = raw_get(
        &site,
        ticket(&site, "r-file", "SELECT COUNT(*) FROM '/etc/passwd'"),
    )
    .await
    .expect_err("file tables are refused");
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );

    let status = raw_get(&site, Ticket::new(b"{not a request".to_vec()))
        .await
        .expect_err("garbage is refused");
    assert_eq!(status.code(), Code::InvalidArgument);

    let log = records(&site.audit);
    let decisions: Vec<(Decision, &str)> = log[1..]
        .iter()
        .map(|r| (r.entry.decision, r.entry.request_id.as_str()))
        .collect();
    assert_eq!(
        decisions,
        vec![
            (Decision::Refused, "r-id"),
            (Decision::Refused, "r-file"),
            (Decision::Refused, "")
        ]
    );
    assert!(
        log[1]
            .entry
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("aggregate-only"))
    );
    assert!(log[1].entry.plan_fingerprint.is_none());
    verify(&site.audit).expect("chain holds");

    // The other Flight calls are closed.
    let mut client = common::client(
        site.node.addr(),
        &site.pki.ca_pem,
        Some(&site.pki.coordinator),
    )
    .await
    .expect("connect");
    let status = client
        .list_flights(arrow_flight::Criteria::default())
        .await
        .expect_err("ListFlights is closed");
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test]
async fn clients_without_a_trusted_certificate_are_refused_at_the_handshake() {
    let site = site(300, "min_patients = 10", Limits::default()).await;
    let sql = "SELECT COUNT(*) FROM sim_av_patient";

    for identity in [None, Some(&site.pki.impostor)] {
        let refused = match common::client(site.node.addr(), &site.pki.ca_pem, identity).await {
            Err(_) => true,
            Ok(mut client) => client.do_get(ticket(&site, "x", sql)).await.is_err(),
        };
        assert!(
            refused,
            "a client without a trusted certificate got through"
        );
    }
    // A client that does not trust the node's certificate does not talk to it either.
    let other = trustql_devcerts::DevCa::new("Other CA").expect("ca");
    let refused = match common::client(
        site.node.addr(),
        &other.cert_pem(),
        Some(&site.pki.coordinator),
    )
    .await
    {
        Err(_) => true,
        Ok(mut client) => client.do_get(ticket(&site, "y", sql)).await.is_err(),
    };
    assert!(
        refused,
        "the client accepted a node certificate it does not trust"
    );

    // None of them reached the engine; the trusted coordinator still does.
    assert_eq!(records(&site.audit).len(), 1);
    let messages = raw_get(&site, ticket(&site, "ok", sql))
        .await
        .expect("trusted client answered");
    assert_eq!(decode(&messages).0.request_id, "ok");
}

/// A join that multiplies rows: every cycle of a regimen with every other, six ways (tens of
/// millions of rows), so it runs far past the limit whatever the machine.
const SLOW: &str = "SELECT r.intent_of_treatment, COUNT(*) FROM sim_sact_regimen r \
    JOIN sim_sact_cycle a ON a.merged_regimen_id = r.merged_regimen_id \
    JOIN sim_sact_cycle b ON b.merged_regimen_id = r.merged_regimen_id \
    JOIN sim_sact_cycle c ON c.merged_regimen_id = r.merged_regimen_id \
    JOIN sim_sact_cycle d ON d.merged_regimen_id = r.merged_regimen_id \
    JOIN sim_sact_cycle e ON e.merged_regimen_id = r.merged_regimen_id \
    JOIN sim_sact_cycle f ON f.merged_regimen_id = r.merged_regimen_id \
    GROUP BY r.intent_of_treatment";
const FAST: &str = "SELECT gender, COUNT(*) FROM sim_av_patient GROUP BY gender";

#[tokio::test]
async fn a_query_over_the_time_limit_fails_clearly_and_the_node_answers_the_next() {
    let limits = Limits {
        query_timeout_ms: 2_000,
        max_concurrent_queries: 1,
        ..Limits::default()
    };
    let disclosure = format!("{}\n\n[query]\nmax_joins = 8", common::UNPROTECTED);
    let site = Arc::new(site(3_000, &disclosure, limits).await);

    let slow = {
        let site = Arc::clone(&site);
        tokio::spawn(async move { raw_get(&site, ticket(&site, "slow", SLOW)).await })
    };
    // Time for the first request to connect, pass vetting and hold the only slot.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !slow.is_finished(),
        "the slow query ended early: {:?}",
        slow.await.map(|r| r.map(|_| ()))
    );
    let busy = raw_get(&site, ticket(&site, "busy", FAST))
        .await
        .expect_err("one query at a time");
    assert_eq!(busy.code(), Code::ResourceExhausted);
    assert!(busy.message().contains("busy"), "{}", busy.message());
    // Marked as admission, so the coordinator may name the busy trust.
    assert!(busy.metadata().get(trustql_protocol::BUSY_HEADER).is_some());

    let status = slow
        .await
        .expect("task")
        .expect_err("the slow query times out");
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    assert!(status.message().contains("2000 ms"), "{}", status.message());

    let messages = raw_get(&site, ticket(&site, "next", FAST))
        .await
        .expect("the node still answers");
    assert_eq!(decode(&messages).0.request_id, "next");

    let log = records(&site.audit);
    let failed: Vec<&str> = log
        .iter()
        .filter(|r| r.entry.decision == Decision::Failed)
        .map(|r| r.entry.request_id.as_str())
        .collect();
    assert_eq!(
        failed.len(),
        2,
        "busy and timed-out requests are on record too"
    );
    assert!(failed.contains(&"slow") && failed.contains(&"busy"));
}

#[tokio::test]
async fn a_query_over_the_memory_limit_fails_clearly_and_the_node_answers_the_next() {
    let limits = Limits {
        memory_mb: 16,
        ..Limits::default()
    };
    let disclosure = format!("{}\n\n[query]\nmax_groups = 10000000", common::UNPROTECTED);
    let site = site(20_000, &disclosure, limits).await;
    let huge = "SELECT a.start_date_of_cycle, b.start_date_of_cycle, c.start_date_of_cycle, COUNT(*) \
        FROM sim_sact_regimen r \
        JOIN sim_sact_cycle a ON a.merged_regimen_id = r.merged_regimen_id \
        JOIN sim_sact_cycle b ON b.merged_regimen_id = r.merged_regimen_id \
        JOIN sim_sact_cycle c ON c.merged_regimen_id = r.merged_regimen_id \
        GROUP BY 1, 2, 3";
    let status = raw_get(&site, ticket(&site, "huge", huge))
        .await
        .expect_err("over the memory limit");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(status.message().contains("memory"), "{}", status.message());
    assert!(
        status
            .metadata()
            .get(trustql_protocol::BUSY_HEADER)
            .is_none(),
        "running out of memory mid-query is no admission"
    );
    let messages = raw_get(&site, ticket(&site, "next", FAST))
        .await
        .expect("the node still answers");
    assert_eq!(decode(&messages).0.request_id, "next");
}

#[tokio::test]
async fn a_node_with_a_broken_policy_or_certificate_will_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = common::synth(dir.path(), 200);
    let (policy_path, _) = common::policy(dir.path(), "min_patients = 10");
    let pki = common::pki(dir.path());
    let good = common::node_config(dir.path(), &fed, &policy_path, &pki, Limits::default());

    // A policy edited after its approval.
    let text = std::fs::read_to_string(&policy_path).expect("read");
    std::fs::write(
        &policy_path,
        text.replace("min_patients = 10", "min_patients = 1"),
    )
    .expect("edit");
    let err = start(&good, common::schema())
        .await
        .err()
        .expect("changed policy refused");
    assert!(matches!(err, NodeError::Policy(_)), "{err}");
    assert!(
        err.to_string().contains("changed after it was approved"),
        "{err}"
    );
    std::fs::write(&policy_path, text).expect("restore");

    // A key file that is not PEM, and a certificate file that is missing.
    let mut bad = good.clone();
    bad.tls.key = pki.dir.join("ca.pem.not-there");
    let err = start(&bad, common::schema())
        .await
        .err()
        .expect("missing key refused");
    assert!(matches!(err, NodeError::Tls(_)), "{err}");
    std::fs::write(pki.dir.join("junk.key"), "not a key").expect("write");
    bad.tls.key = pki.dir.join("junk.key");
    let err = start(&bad, common::schema())
        .await
        .err()
        .expect("junk key refused");
    assert!(err.to_string().contains("not a PEM file"), "{err}");

    // A certificate whose key does not match.
    let other = trustql_devcerts::DevCa::new("x")
        .expect("ca")
        .issue_server("n", &["localhost"])
        .expect("issue");
    let other = other.write(&pki.dir, "other").expect("write");
    bad.tls.key = other.key;
    let err = start(&bad, common::schema())
        .await
        .err()
        .expect("mismatched key refused");
    assert!(matches!(err, NodeError::Tls(_)), "{err}");

    // And the good configuration starts.
    let node = start(&good, common::schema()).await.expect("starts");
    node.stop().await.expect("stops");
}
