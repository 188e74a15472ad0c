//! End to end: the coordinator's audit log records the calls it refuses before any query runs
//! (a wrong token, a project the researcher is not on), with who and which call, and its chain
//! stays intact.

use trustql_audit::{AuditRecord, Decision, LOG_FILE, verify};
use trustql_client::Client;
use trustql_demo::{DemoOptions, PROJECT, RESEARCHER, launch};

fn records(dir: &std::path::Path) -> Vec<AuditRecord> {
    std::fs::read_to_string(dir.join(LOG_FILE))
        .expect("coordinator audit")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect()
}

#[tokio::test]
async fn calls_refused_at_the_door_are_on_record() {
    let fed = launch(&DemoOptions {
        trusts: 2,
        patients: 600,
        seed: 3,
        ..DemoOptions::default()
    })
    .await
    .expect("launch");
    let ca = std::fs::read(&fed.info.ca).expect("ca");
    let before = records(&fed.coordinator_audit).len();

    // A token nobody holds: refused, and recorded without a researcher.
    let stolen = "not-a-token-of-this-federation";
    let refused = match Client::connect(&fed.info.url, Some(&ca), stolen, Some(PROJECT)).await {
        Ok(mut client) => client
            .query("SELECT COUNT(*) FROM sim_av_patient")
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(refused.is_err(), "a wrong token was let in");

    // The right token on a project the researcher is not on: refused, and recorded as theirs.
    let wrong_project = match Client::connect(
        &fed.info.url,
        Some(&ca),
        &fed.info.token,
        Some("someone-elses-project"),
    )
    .await
    {
        Ok(mut client) => client
            .query("SELECT COUNT(*) FROM sim_av_patient")
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(
        wrong_project.is_err(),
        "a project the researcher is not on was let in"
    );

    let after = records(&fed.coordinator_audit);
    let new: Vec<&AuditRecord> = after[before..].iter().collect();
    assert!(
        new.iter().all(|r| r.entry.decision == Decision::Refused),
        "{new:#?}"
    );
    let unknown = new
        .iter()
        .find(|r| r.entry.researcher.is_empty())
        .expect("the wrong token's call is recorded");
    let reason = unknown.entry.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("127.0.0.1"), "{reason}");
    assert!(
        !reason.contains(stolen),
        "the record echoes the token: {reason}"
    );
    let theirs = new
        .iter()
        .find(|r| r.entry.researcher == RESEARCHER)
        .expect("the wrong project's call is recorded as the researcher's");
    assert_eq!(theirs.entry.project, "someone-elses-project");
    assert!(
        theirs
            .entry
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("not on project")),
        "{theirs:#?}"
    );
    // Nothing ran, and the chain is intact.
    assert!(
        new.iter()
            .all(|r| r.entry.trusts.is_empty() && r.entry.sql.is_empty())
    );
    let verified = verify(&fed.coordinator_audit).expect("an intact chain");
    assert_eq!(verified.records, after.len() as u64);
}
