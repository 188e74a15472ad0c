//! A fault inside the release (forced with the `fault-injection` feature) is a failure, not a
//! refusal: nothing is released, the audit log records a failure, the node's own log has the
//! cause, and the researcher's message says nothing about it.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use tonic::Code;
use trustql_audit::Decision;
use trustql_node::{Limits, faults, start};
use trustql_protocol::SiteRequest;

/// The log lines written while the test runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// One thread: the server's tasks run where the test's log subscriber is installed.
#[tokio::test(flavor = "current_thread")]
async fn a_fault_in_the_release_is_logged_with_its_cause_and_audited_as_a_failure() {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().expect("tempdir");
    let fed = common::synth(dir.path(), 300);
    let (policy_path, _) = common::policy(dir.path(), "min_patients = 10");
    let pki = common::pki(dir.path());
    let config = common::node_config(dir.path(), &fed, &policy_path, &pki, Limits::default());
    let node = start(&config, common::schema()).await.expect("node starts");
    let mut client = common::client(node.addr(), &pki.ca_pem, Some(&pki.coordinator))
        .await
        .expect("connect");

    faults::break_releases(true);
    let ticket = common::signed_ticket(
        &pki,
        SiteRequest {
            request_id: "fault-1".into(),
            researcher: "alice".into(),
            project: "p1".into(),
            sql: "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY stage_best".into(),
            ..Default::default()
        },
    );
    let outcome = match client.do_get(ticket).await {
        Ok(stream) => stream
            .into_inner()
            .try_collect::<Vec<_>>()
            .await
            .map(|_| ()),
        Err(status) => Err(status),
    };
    faults::break_releases(false);
    let status = outcome.expect_err("nothing is released");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(
        status.message(),
        "the trust could not protect the answer, so nothing was released"
    );

    // Audited as a failure, not as a policy decision.
    let records = common::records(&config.audit_dir);
    let last = records.last().expect("a record");
    assert_eq!(last.entry.request_id, "fault-1");
    assert_eq!(last.entry.decision, Decision::Failed);

    // The node's log has the cause, under the request's id.
    let text = String::from_utf8(log.0.lock().expect("log").clone()).expect("utf-8");
    let line = text
        .lines()
        .find(|l| l.contains("fault-1") && l.contains("failed"))
        .unwrap_or_else(|| panic!("no failure logged for the request:\n{text}"));
    assert!(
        line.contains("column descriptions do not match the answer"),
        "{line}"
    );
    node.stop().await.expect("stops");
}
