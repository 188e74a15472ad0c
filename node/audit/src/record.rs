//! One audit record and its hash.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trustql_protocol::{TrustStatus, Withheld};

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What the node did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Answered (some groups may have been withheld).
    Answered,
    /// Refused by a rule of the policy.
    Refused,
    /// Accepted but not completed (time or memory limit, busy, engine failure).
    Failed,
    /// A note from the node itself (start, recovery of a cut-off record).
    Node,
}

/// What the node records about one request; the log adds sequence and chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When (RFC 3339, UTC).
    pub time: String,
    /// The request's id.
    pub request_id: String,
    /// The researcher the coordinator authenticated.
    pub researcher: String,
    /// The project.
    pub project: String,
    /// The SQL as received.
    pub sql: String,
    /// SHA-256 of the optimised logical plan, when the query planned.
    pub plan_fingerprint: Option<String>,
    /// The decision.
    pub decision: Decision,
    /// Why (the refusal or failure message), when not answered.
    pub reason: Option<String>,
    /// Groups released.
    pub released: usize,
    /// Groups withheld, by reason.
    pub withheld: Withheld,
    /// SHA-256 of the policy the request was evaluated under.
    pub policy_hash: String,
    /// ε charged to the project's privacy budget by this answer (differential privacy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// At the coordinator: what became of the request at each trust (absent in a node's log,
    /// so records written before it existed hash as they did).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusts: Vec<TrustOutcome>,
    /// For a pooled project's answer: the pool's members it was masked for (absent otherwise,
    /// so earlier records hash as they did).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool: Vec<String>,
}

/// What became of a request at one trust, as the coordinator records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustOutcome {
    /// The trust code.
    pub trust: String,
    /// Answered, refused, timed out, unreachable or failed.
    pub status: TrustStatus,
}

impl AuditEntry {
    /// A note from the node itself (not a request).
    pub fn node_note(time: &str, reason: String, policy_hash: &str) -> Self {
        AuditEntry {
            time: time.to_string(),
            request_id: String::new(),
            researcher: String::new(),
            project: String::new(),
            sql: String::new(),
            plan_fingerprint: None,
            decision: Decision::Node,
            reason: Some(reason),
            released: 0,
            withheld: Withheld::default(),
            policy_hash: policy_hash.to_string(),
            epsilon: None,
            trusts: Vec::new(),
            pool: Vec::new(),
        }
    }
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// 1-based position in the log.
    pub seq: u64,
    /// Hash of the record before ([`GENESIS`] for the first).
    pub prev: String,
    /// The entry.
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// SHA-256 of this record without this field.
    pub hash: String,
}

/// The hashed part of a record, serialised in a fixed field order.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    prev: &'a str,
    #[serde(flatten)]
    entry: &'a AuditEntry,
}

impl AuditRecord {
    /// Seals an entry into the chain after `prev`.
    pub fn seal(seq: u64, prev: &str, entry: AuditEntry) -> Result<Self, serde_json::Error> {
        let mut record = AuditRecord {
            seq,
            prev: prev.to_string(),
            entry,
            hash: String::new(),
        };
        record.hash = record.expected_hash()?;
        Ok(record)
    }

    /// The hash this record's content should carry.
    pub fn expected_hash(&self) -> Result<String, serde_json::Error> {
        let hashed = Hashed {
            seq: self.seq,
            prev: &self.prev,
            entry: &self.entry,
        };
        let bytes = serde_json::to_vec(&hashed)?;
        Ok(Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// The record as one line, newline included.
    pub fn to_line(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        Ok(line)
    }
}
