//! Who is asking, at the node (attack class 10): a real node on 127.0.0.1 behind mutual TLS
//! answers only its pinned coordinator client, and only requests that coordinator signed for
//! this trust, recently, once. Everything else is refused before the engine sees it: no
//! answer, no privacy budget spent, and a refusal on the audit record.

mod common;

use std::path::{Path, PathBuf};

use arrow_flight::Ticket;
use futures::TryStreamExt;
use tonic::Code;
use trustql_audit::{Decision, verify};
use trustql_devcerts::{Issued, Usage};
use trustql_node::{Limits, NodeError, RunningNode, start};
use trustql_protocol::SiteRequest;

struct Site {
    _dir: tempfile::TempDir,
    node: RunningNode,
    pki: common::Pki,
    /// Pinned too, but issued without the clientAuth extended key usage.
    pinned_without_client_auth: Issued,
    audit: PathBuf,
    ledger: PathBuf,
    /// Before the node started (its own start time is a little later).
    started_ms: u64,
    config: trustql_node::NodeConfig,
}

/// p1 is in differential-privacy mode, so an answer spends budget in the node's ledger.
fn dp_policy(dir: &Path) -> PathBuf {
    let path = dir.join("policy.toml");
    let tables = common::ALL_TABLES;
    let text = format!(
        "[policy]\nversion = \"identity-test\"\ntrust = \"TQ01\"\n\n[dp]\ndefault_rows_per_patient = 1\n\
         rows_per_patient = {{ sim_av_tumour = 3 }}\nbounds = {{ \"sim_av_tumour.age\" = [0, 100] }}\n\n\
         [[project]]\nid = \"p1\"\nresearchers = [\"alice\"]\ntables = {tables}\nexpires = \"2099-12-31\"\n\
         dp = {{ epsilon_budget = 10.0, epsilon_per_query = 1.0 }}\n\n\
         [[project]]\nid = \"p2\"\nresearchers = [\"alice\"]\ntables = {tables}\nexpires = \"2099-12-31\"\n"
    );
    std::fs::write(&path, text).expect("write policy");
    trustql_policies::approve(&path, "Test Controller", &common::schema()).expect("approve");
    path
}

/// A node pinning the coordinator's client certificate (and one without clientAuth).
async fn site() -> Site {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = common::synth(dir.path(), 400);
    let policy = dp_policy(dir.path());
    let pki = common::pki(dir.path());
    let pinned_without_client_auth = pki
        .authority
        .issue("coordinator (client)", &[], Usage::Unrestricted)
        .expect("cert");
    let mut config = common::node_config(dir.path(), &fed, &policy, &pki, Limits::default());
    config
        .coordinator
        .client_cert_sha256
        .push(pinned_without_client_auth.sha256_fingerprint());
    let started_ms = common::now_ms();
    let node = start(&config, common::schema()).await.expect("node starts");
    Site {
        started_ms,
        audit: config.audit_dir.clone(),
        ledger: config.ledger_path(),
        config,
        node,
        pki,
        pinned_without_client_auth,
        _dir: dir,
    }
}

fn request(id: &str, project: &str, sql: &str) -> SiteRequest {
    SiteRequest {
        request_id: id.into(),
        researcher: "alice".into(),
        project: project.into(),
        sql: sql.into(),
        ..Default::default()
    }
}

/// A differentially private query no other one repeats (so none is a free repeat).
fn dp_sql(n: u32) -> String {
    format!("SELECT stage_best, COUNT(*) FROM sim_av_tumour WHERE age > {n} GROUP BY stage_best")
}

/// Sends `ticket` as `identity` and reads the whole answer; a TLS refusal is `Err(None)`.
async fn get(
    site: &Site,
    identity: &Issued,
    ticket: Ticket,
) -> Result<usize, Option<tonic::Status>> {
    get_at(site.node.addr(), &site.pki, identity, ticket).await
}

async fn get_at(
    addr: std::net::SocketAddr,
    pki: &common::Pki,
    identity: &Issued,
    ticket: Ticket,
) -> Result<usize, Option<tonic::Status>> {
    let mut client = common::client(addr, &pki.ca_pem, Some(identity))
        .await
        .map_err(|_| None)?;
    let stream = client.do_get(ticket).await.map_err(tls_or_status)?;
    let messages: Vec<_> = stream
        .into_inner()
        .try_collect()
        .await
        .map_err(tls_or_status)?;
    Ok(messages.len())
}

/// rustls refuses a certificate during the handshake, which tonic reports on the first call
/// as a transport failure (`unavailable` or `unknown`), never as the node's own status.
fn tls_or_status(status: tonic::Status) -> Option<tonic::Status> {
    match status.code() {
        Code::Unavailable | Code::Unknown => None,
        _ => Some(status),
    }
}

fn ledger_bytes(site: &Site) -> u64 {
    std::fs::metadata(&site.ledger).map_or(0, |m| m.len())
}

#[tokio::test]
async fn a_node_answers_only_the_pinned_coordinator_client() {
    let site = site().await;
    let ca = &site.pki.authority;
    let hosts = ["localhost", "127.0.0.1"];
    let issue = |name: &str, hosts: &[&str], usage| ca.issue(name, hosts, usage).expect("cert");

    // Certificates of the right CA that the TLS handshake itself refuses as clients: another
    // trust's node certificate and the coordinator's researcher-facing server certificate,
    // as the development CA issues them (serverAuth only).
    for (what, cert) in [
        (
            "another trust's node certificate",
            issue("TQ02 node", &hosts, Usage::Server),
        ),
        (
            "the coordinator's server certificate",
            issue("coordinator", &hosts, Usage::Server),
        ),
    ] {
        let ticket = common::signed_ticket(&site.pki, request("x", "p1", &dp_sql(1)));
        let outcome = get(&site, &cert, ticket).await;
        assert!(
            matches!(outcome, Err(None) | Err(Some(_))),
            "{what} was answered"
        );
        if let Err(Some(status)) = outcome {
            assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        }
    }

    // Certificates the handshake lets through, which only the pin stops: the same two as a
    // CA that adds both usages would issue them, a client certificate of the right CA with
    // the coordinator's very name, and a pinned one without the clientAuth usage. Each
    // carries a request the coordinator really signed.
    let strangers = [
        (
            "another trust's node certificate",
            issue("TQ02 node", &hosts, Usage::ServerAndClient),
        ),
        (
            "the coordinator's server certificate",
            issue("coordinator", &hosts, Usage::ServerAndClient),
        ),
        (
            "an unpinned client certificate",
            ca.issue_client("coordinator (client)").expect("cert"),
        ),
        (
            "a pinned certificate without clientAuth",
            site.pinned_without_client_auth.clone(),
        ),
    ];
    for (n, (what, cert)) in strangers.iter().enumerate() {
        let ticket = common::signed_ticket(&site.pki, request(&format!("s{n}"), "p1", &dp_sql(2)));
        let status = get(&site, cert, ticket)
            .await
            .err()
            .flatten()
            .unwrap_or_else(|| panic!("{what}: answered, or refused by TLS instead of the pin"));
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        assert_eq!(
            status.message(),
            "this trust takes site requests only from the coordinator it is configured to trust",
            "{what}: the refusal says nothing of the certificate"
        );
    }
    assert_eq!(ledger_bytes(&site), 0, "nothing was charged");

    // The audit log has each stranger refused, with its certificate, and nothing it claimed.
    let log = common::records(&site.audit);
    let refused: Vec<_> = log[1..].iter().map(|r| &r.entry).collect();
    assert_eq!(refused.len(), strangers.len(), "{refused:#?}");
    for (entry, (what, cert)) in refused.iter().zip(&strangers) {
        assert_eq!(entry.decision, Decision::Refused, "{what}");
        assert_eq!(
            (
                entry.request_id.as_str(),
                entry.researcher.as_str(),
                entry.sql.as_str()
            ),
            ("", "", ""),
            "{what}"
        );
        let reason = entry.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains(&cert.sha256_fingerprint()),
            "{what}: {reason}"
        );
    }
    assert!(
        refused[3]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("clientAuth")),
        "{:?}",
        refused[3].reason
    );

    // The pinned coordinator client is answered, and that is charged.
    let ticket = common::signed_ticket(&site.pki, request("ok", "p1", &dp_sql(3)));
    let messages = get(&site, &site.pki.coordinator, ticket)
        .await
        .expect("the pinned coordinator is answered");
    assert!(messages > 0);
    assert!(ledger_bytes(&site) > 0, "an answer to p1 spends budget");
    let last = common::records(&site.audit).pop().expect("record");
    assert_eq!(
        (last.entry.decision, last.entry.request_id.as_str()),
        (Decision::Answered, "ok")
    );
    verify(&site.audit).expect("chain holds");
}

#[tokio::test]
async fn only_requests_the_coordinator_signed_for_this_trust_recently_and_once_are_answered() {
    let site = site().await;
    let pki = &site.pki;
    let coordinator = &pki.coordinator;

    // One real request first: answered and charged, so the refusals below are measured
    // against a node that does spend.
    let first = common::signed_ticket(pki, request("r-ok", "p1", &dp_sql(10)));
    get(&site, coordinator, first.clone())
        .await
        .expect("answered");
    let spent = ledger_bytes(&site);
    assert!(spent > 0, "an answer to p1 spends budget");

    let signed = String::from_utf8(
        common::signed_ticket(pki, request("r-forged", "p1", &dp_sql(11)))
            .ticket
            .to_vec(),
    )
    .expect("utf-8");
    // The researcher or project changed after signing (inside the signed body's JSON text).
    let other_researcher = signed.replace("alice", "mallory");
    let other_project = signed.replace(r#"\"project\":\"p1\""#, r#"\"project\":\"p2\""#);
    assert_ne!(other_researcher, signed);
    assert_ne!(other_project, signed);
    // A whole request signed by a key the node does not know.
    let rogue_key = trustql_devcerts::SigningKey::generate().expect("key");
    let rogue =
        trustql_protocol::RequestSigner::from_pem(rogue_key.key_pem.as_bytes()).expect("key");
    let rogue_ticket = rogue
        .sign(&trustql_protocol::SignedRequest {
            trust: "TQ01".into(),
            issued_unix_ms: common::now_ms(),
            request: request("r-rogue", "p1", &dp_sql(12)),
        })
        .expect("signed");
    let now = common::now_ms();
    let cases: Vec<(&str, Ticket, &str)> = vec![
        (
            "a modified researcher",
            Ticket::new(other_researcher),
            "signature does not verify",
        ),
        (
            "a modified project",
            Ticket::new(other_project),
            "signature does not verify",
        ),
        (
            "an unknown key",
            Ticket::new(rogue_ticket),
            "a key this trust does not know",
        ),
        (
            "an unsigned request",
            Ticket::new(
                request("r-bare", "p1", &dp_sql(13))
                    .to_ticket()
                    .expect("ticket"),
            ),
            "not signed by the coordinator",
        ),
        ("a replayed request id", first, "already used"),
        (
            "a stale request",
            common::signed_ticket_at(
                pki,
                request("r-stale", "p1", &dp_sql(14)),
                "TQ01",
                now - 600_000,
            ),
            "at most 300 s",
        ),
        (
            "a request from the future",
            common::signed_ticket_at(
                pki,
                request("r-future", "p1", &dp_sql(15)),
                "TQ01",
                now + 600_000,
            ),
            "at most 5 s",
        ),
        (
            // Inside the age window, but signed for later than the clock allows.
            "a request signed for a minute from now",
            common::signed_ticket_at(
                pki,
                request("r-later", "p1", &dp_sql(18)),
                "TQ01",
                now + 60_000,
            ),
            "ahead of this trust's clock",
        ),
        (
            "a request issued before the node started",
            common::signed_ticket_at(
                pki,
                request("r-old", "p1", &dp_sql(19)),
                "TQ01",
                site.started_ms - 1_000,
            ),
            "before this trust's node started",
        ),
        (
            "a request signed for another trust",
            common::signed_ticket_at(pki, request("r-tq02", "p1", &dp_sql(16)), "TQ02", now),
            "another trust",
        ),
    ];
    for (what, ticket, says) in &cases {
        let status = get(&site, coordinator, ticket.clone())
            .await
            .err()
            .flatten()
            .unwrap_or_else(|| panic!("{what} was answered"));
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(
            status.message().contains(says),
            "{what}: {}",
            status.message()
        );
        for leak in ["alice", "mallory", "SELECT", "p1"] {
            assert!(
                !status.message().contains(leak),
                "{what}: {}",
                status.message()
            );
        }
    }
    assert_eq!(
        ledger_bytes(&site),
        spent,
        "no refused request spent budget"
    );

    // On record as refusals; a request is recorded as who it names only when its signature
    // verified (the replay, stale, future and other-trust ones).
    let log = common::records(&site.audit);
    let refused: Vec<_> = log[2..].iter().map(|r| &r.entry).collect();
    assert_eq!(refused.len(), cases.len());
    let ids: Vec<&str> = refused.iter().map(|e| e.request_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "", "", "", "", "r-ok", "r-stale", "r-future", "r-later", "r-old", "r-tq02"
        ]
    );
    assert!(
        refused
            .iter()
            .all(|e| e.decision == Decision::Refused && e.released == 0)
    );
    verify(&site.audit).expect("chain holds");

    // The node still answers the coordinator's next request.
    let next = common::signed_ticket(pki, request("r-next", "p1", &dp_sql(17)));
    get(&site, coordinator, next).await.expect("answered");
}

#[tokio::test]
async fn a_request_answered_before_a_restart_is_not_answered_again_after_it() {
    let Site {
        node,
        pki,
        ledger,
        mut config,
        _dir,
        ..
    } = site().await;
    let ticket = common::signed_ticket(&pki, request("r-once", "p1", &dp_sql(20)));
    get_at(node.addr(), &pki, &pki.coordinator, ticket.clone())
        .await
        .expect("answered");
    let spent = std::fs::metadata(&ledger).map_or(0, |m| m.len());
    // The node restarts on the same address and forgets the ids it saw; the captured
    // request, still inside its age window, is replayed.
    let addr = node.addr();
    node.stop().await.expect("stop");
    config.listen = addr;
    let again = start(&config, common::schema()).await.expect("restarts");
    let status = get_at(again.addr(), &pki, &pki.coordinator, ticket)
        .await
        .err()
        .flatten()
        .expect("the replay is refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status
            .message()
            .contains("before this trust's node started"),
        "{}",
        status.message()
    );
    assert_eq!(
        std::fs::metadata(&ledger).map_or(0, |m| m.len()),
        spent,
        "the replay spent nothing"
    );
    // A fresh request is answered.
    let fresh = common::signed_ticket(&pki, request("r-fresh", "p1", &dp_sql(21)));
    get_at(again.addr(), &pki, &pki.coordinator, fresh)
        .await
        .expect("answered");
}

#[tokio::test]
async fn a_node_without_a_usable_coordinator_pin_will_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = common::synth(dir.path(), 200);
    let (policy, _) = common::policy(dir.path(), "min_patients = 10");
    let pki = common::pki(dir.path());
    let good = common::node_config(dir.path(), &fed, &policy, &pki, Limits::default());

    let mut no_pin = good.clone();
    no_pin.coordinator.client_cert_sha256.clear();
    let mut bad_pin = good.clone();
    bad_pin.coordinator.client_cert_sha256 = vec!["coordinator".into()];
    let mut no_key = good.clone();
    no_key.coordinator.request_keys.clear();
    // A certificate is not an Ed25519 public key.
    let mut wrong_key = good.clone();
    wrong_key.coordinator.request_keys = vec![pki.node.cert.clone()];
    let mut no_window = good.clone();
    no_window.coordinator.max_request_age_secs = 0;
    for (what, config) in [
        ("no pin", no_pin),
        ("a malformed pin", bad_pin),
        ("no request key", no_key),
        ("a key that is not Ed25519", wrong_key),
        ("no window", no_window),
    ] {
        let err = start(&config, common::schema())
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: the node started"));
        assert!(matches!(err, NodeError::Config(_)), "{what}: {err}");
        assert!(err.to_string().contains("[coordinator]"), "{what}: {err}");
    }
    start(&good, common::schema())
        .await
        .expect("starts")
        .stop()
        .await
        .expect("stops");
}
