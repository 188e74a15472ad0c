//! The audit chain: appends survive reopening, and every kind of tampering is named.

use std::path::Path;

use trustql_audit::{
    AuditEntry, AuditError, AuditLog, Decision, GENESIS, HEAD_FILE, HeadProblem, KEY_FILE,
    LOG_FILE, Unacknowledged, verify, verify_with_key,
};

fn entry(n: usize) -> AuditEntry {
    AuditEntry {
        time: "2026-11-23T10:00:00Z".into(),
        request_id: format!("req-{n}"),
        researcher: "alice".into(),
        project: "p1".into(),
        sql: format!("SELECT COUNT(*) FROM sim_av_patient -- {n}"),
        plan_fingerprint: Some("ab".repeat(32)),
        decision: if n.is_multiple_of(2) {
            Decision::Answered
        } else {
            Decision::Refused
        },
        reason: (n % 2 == 1).then(|| "refused".to_string()),
        released: n,
        withheld: Default::default(),
        policy_hash: "cd".repeat(32),
        epsilon: None,
        trusts: Vec::new(),
        pool: Vec::new(),
    }
}

fn write_log(dir: &Path, n: usize) {
    let log = AuditLog::open(dir, "2026-11-23T10:00:00Z").expect("open");
    for i in 0..n {
        log.append(entry(i)).expect("append");
    }
}

fn lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(LOG_FILE))
        .expect("read")
        .lines()
        .map(str::to_string)
        .collect()
}

fn rewrite(dir: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(dir.join(LOG_FILE), text).expect("write");
}

fn broken_line(dir: &Path) -> (usize, String) {
    match verify(dir) {
        Err(AuditError::Broken { line, problem, .. }) => (line, problem),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[test]
fn an_empty_log_verifies_at_genesis() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 0);
    let verified = verify(dir.path()).expect("verify");
    assert_eq!((verified.records, verified.head.as_str()), (0, GENESIS));
}

#[test]
fn records_chain_across_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 3);
    let first = verify(dir.path()).expect("verify");
    assert_eq!(first.records, 3);
    let log = AuditLog::open(dir.path(), "t").expect("reopen");
    let record = log.append(entry(9)).expect("append");
    assert_eq!(record.seq, 4);
    assert_eq!(record.prev, first.head);
    drop(log);
    let second = verify(dir.path()).expect("verify");
    assert_eq!((second.records, second.head), (4, record.hash));
}

#[test]
fn an_edited_record_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 5);
    let mut all = lines(dir.path());
    all[2] = all[2].replace("\"released\":2", "\"released\":20");
    assert_ne!(
        all[2],
        lines(dir.path())[2],
        "the edit must change the line"
    );
    rewrite(dir.path(), &all);
    let (line, problem) = broken_line(dir.path());
    assert_eq!(line, 3);
    assert!(problem.contains("edited"), "{problem}");
}

#[test]
fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 4);
    let mut all = lines(dir.path());
    let mut record: trustql_audit::AuditRecord = serde_json::from_str(&all[1]).expect("parse");
    record.entry.decision = Decision::Answered;
    record.hash = record.expected_hash().expect("hash");
    all[1] = serde_json::to_string(&record).expect("json");
    rewrite(dir.path(), &all);
    let (line, problem) = broken_line(dir.path());
    assert_eq!(line, 3, "{problem}");
}

#[test]
fn a_removed_record_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 5);
    let mut all = lines(dir.path());
    all.remove(1);
    rewrite(dir.path(), &all);
    let (line, problem) = broken_line(dir.path());
    assert_eq!(line, 2);
    assert!(problem.contains("removed"), "{problem}");
}

#[test]
fn reordered_records_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 5);
    let mut all = lines(dir.path());
    all.swap(2, 3);
    rewrite(dir.path(), &all);
    let (line, problem) = broken_line(dir.path());
    assert_eq!(line, 3);
    assert!(problem.contains("reordered"), "{problem}");
}

#[test]
fn garbage_is_named_without_panicking() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 2);
    let mut all = lines(dir.path());
    all.insert(1, "{not json".into());
    rewrite(dir.path(), &all);
    assert_eq!(broken_line(dir.path()).0, 2);
    assert!(matches!(
        AuditLog::open(dir.path(), "t"),
        Err(AuditError::Broken { line: 2, .. })
    ));
}

#[test]
fn a_cut_off_record_is_dropped_and_noted_at_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 3);
    let path = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&path).expect("read");
    let whole = bytes.clone();
    bytes.extend_from_slice(b"{\"seq\":4,\"prev\":\"ab");
    std::fs::write(&path, &bytes).expect("write");
    // A crash state, not tampering: the sealed records verify, and the tail is named.
    let crashed = verify(dir.path()).expect("the sealed records verify");
    assert_eq!(crashed.records, 3);
    assert_eq!(
        crashed.unacknowledged,
        Some(Unacknowledged::Torn { line: 4 })
    );

    let log = AuditLog::open(dir.path(), "t").expect("open repairs the tail");
    assert_eq!(log.len(), 4, "three records and the note of the drop");
    drop(log);
    let verified = verify(dir.path()).expect("verify after repair");
    assert_eq!(verified.records, 4);
    let last = lines(dir.path()).pop().expect("a line");
    assert!(last.contains("\"decision\":\"node\""), "{last}");
    let after = std::fs::read(&path).expect("read");
    assert_eq!(
        &after[..whole.len()],
        &whole[..],
        "whole records are never touched"
    );
}

#[test]
fn one_writer_per_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _held = AuditLog::open(dir.path(), "t").expect("open");
    assert!(matches!(
        AuditLog::open(dir.path(), "t"),
        Err(AuditError::Locked(_))
    ));
}

#[test]
fn a_missing_log_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = verify(dir.path()).expect_err("no log");
    assert!(err.to_string().contains(LOG_FILE), "{err}");
}

fn head_problem(result: Result<impl std::fmt::Debug, AuditError>) -> HeadProblem {
    match result {
        Err(AuditError::Head { problem, .. }) => problem,
        other => panic!("expected a head problem, got {other:?}"),
    }
}

#[test]
fn an_intact_log_matches_its_sealed_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 3);
    assert_eq!(verify(dir.path()).expect("intact").records, 3);
    assert!(dir.path().join(HEAD_FILE).exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key is its owner's only");
    }
}

#[test]
fn a_removed_last_record_is_a_truncation() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 4);
    let mut all = lines(dir.path());
    all.pop();
    rewrite(dir.path(), &all);
    assert_eq!(
        head_problem(verify(dir.path())),
        HeadProblem::Truncated {
            records: 3,
            sealed: 4
        }
    );
    // Nor will a node append to it.
    assert_eq!(
        head_problem(AuditLog::open(dir.path(), "t")),
        HeadProblem::Truncated {
            records: 3,
            sealed: 4
        }
    );
}

#[test]
fn an_emptied_or_deleted_log_is_a_truncation() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 2);
    std::fs::write(dir.path().join(LOG_FILE), "").expect("empty");
    assert!(matches!(
        head_problem(verify(dir.path())),
        HeadProblem::Truncated { records: 0, .. }
    ));
    std::fs::remove_file(dir.path().join(LOG_FILE)).expect("delete");
    assert!(matches!(
        head_problem(AuditLog::open(dir.path(), "t")),
        HeadProblem::Truncated { records: 0, .. }
    ));
}

#[test]
fn a_rewritten_last_record_with_a_recomputed_hash_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 4);
    let mut all = lines(dir.path());
    let mut record: trustql_audit::AuditRecord = serde_json::from_str(&all[3]).expect("parse");
    record.entry.sql = "SELECT 1".into();
    record.hash = record.expected_hash().expect("hash");
    all[3] = serde_json::to_string(&record).expect("json");
    rewrite(dir.path(), &all);
    assert_eq!(
        head_problem(verify(dir.path())),
        HeadProblem::Rewritten { record: 4 }
    );
}

#[test]
fn a_missing_or_forged_head_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 2);
    let head = dir.path().join(HEAD_FILE);
    let sealed = std::fs::read_to_string(&head).expect("head");

    // A head for one record fewer, with the MAC left as it was.
    let mut forged: serde_json::Value = serde_json::from_str(&sealed).expect("json");
    forged["records"] = 1.into();
    std::fs::write(&head, forged.to_string()).expect("write");
    assert_eq!(head_problem(verify(dir.path())), HeadProblem::Forged);

    std::fs::remove_file(&head).expect("remove");
    assert_eq!(head_problem(verify(dir.path())), HeadProblem::Missing);
    assert_eq!(
        head_problem(AuditLog::open(dir.path(), "t")),
        HeadProblem::Missing
    );
}

#[test]
fn the_wrong_key_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 2);
    let other = tempfile::tempdir().expect("tempdir");
    write_log(other.path(), 0);
    assert_eq!(
        head_problem(verify_with_key(dir.path(), &other.path().join(KEY_FILE))),
        HeadProblem::Forged
    );
    verify_with_key(dir.path(), &dir.path().join(KEY_FILE)).expect("its own key opens it");
    // A missing key is an error, never a pass, and a node does not make a new one for an
    // existing log.
    std::fs::remove_file(dir.path().join(KEY_FILE)).expect("remove");
    assert!(matches!(verify(dir.path()), Err(AuditError::Key { .. })));
    assert!(matches!(
        AuditLog::open(dir.path(), "t"),
        Err(AuditError::Key { .. })
    ));
}

#[test]
fn a_key_kept_elsewhere_seals_the_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = tempfile::tempdir().expect("tempdir");
    let key = keys.path().join("node-audit.key");
    let log = AuditLog::open_with_key(dir.path(), &key, "t").expect("open");
    log.append(entry(1)).expect("append");
    drop(log);
    assert!(!dir.path().join(KEY_FILE).exists());
    assert!(matches!(verify(dir.path()), Err(AuditError::Key { .. })));
    assert_eq!(
        verify_with_key(dir.path(), &key).expect("intact").records,
        1
    );
}

#[test]
fn a_record_the_head_never_sealed_is_dropped_at_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 3);
    let head = dir.path().join(HEAD_FILE);
    let sealed = std::fs::read(&head).expect("head");
    // A crash after the log's sync and before the head's replacement.
    write_log(dir.path(), 1);
    std::fs::write(&head, &sealed).expect("old head");
    let crashed = verify(dir.path()).expect("the sealed records verify");
    assert_eq!(crashed.records, 3, "the unsealed record is not counted");
    assert_eq!(
        crashed.unacknowledged,
        Some(Unacknowledged::Unsealed { line: 4 })
    );
    // A second record past the head is no crash: appends are serialised behind the seal.
    let log_path = dir.path().join(LOG_FILE);
    let crash_state = std::fs::read(&log_path).expect("log");
    write_log(dir.path(), 1);
    std::fs::write(&head, &sealed).expect("old head");
    assert_eq!(
        head_problem(verify(dir.path())),
        HeadProblem::Unsealed {
            sealed: 3,
            records: 5,
            interrupted: false
        }
    );
    std::fs::write(&log_path, &crash_state).expect("back to the crash state");
    let log = AuditLog::open(dir.path(), "t").expect("open drops it");
    assert_eq!(log.len(), 4, "three records and the note of the drop");
    drop(log);
    assert_eq!(verify(dir.path()).expect("intact").records, 4);
    let last = lines(dir.path()).pop().expect("a line");
    assert!(last.contains("\"decision\":\"node\""), "{last}");
}
