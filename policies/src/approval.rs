//! Approval of a policy by its data controller, bound to the policy's exact content.
//!
//! `trustql policy approve FILE --by NAME` writes `FILE.approval` recording who approved, when,
//! and the SHA-256 of the file's bytes. A node loads a policy only through [`load_approved`],
//! which refuses a policy that was never approved or changed since.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trustql_schemas::TrustSchema;

use crate::date::now_rfc3339;
use crate::error::PolicyError;
use crate::policy::{Finding, Policy};

/// The approval record kept next to a policy file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// Who approved (the data controller's name).
    pub approved_by: String,
    /// When, as an RFC 3339 UTC timestamp.
    pub approved_at: String,
    /// The policy's version label at approval.
    pub version: String,
    /// SHA-256 of the policy file's bytes, hex.
    pub sha256: String,
}

/// A policy whose content matches its approval: the only kind a node serves.
#[derive(Debug, Clone)]
pub struct ApprovedPolicy {
    /// The policy.
    pub policy: Policy,
    /// SHA-256 of its content (named in every answer).
    pub hash: String,
    /// The approval record.
    pub approval: Approval,
}

/// SHA-256 of bytes, as lower-case hex.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where a policy's approval record lives: `FILE.approval`.
pub fn approval_path(policy: &Path) -> PathBuf {
    let mut name = policy.as_os_str().to_owned();
    name.push(".approval");
    PathBuf::from(name)
}

fn read(path: &Path) -> Result<Vec<u8>, PolicyError> {
    std::fs::read(path).map_err(|e| PolicyError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Parses and lints a policy file; lint errors make it unusable.
pub fn load_checked(path: &Path, schema: &TrustSchema) -> Result<(Policy, Vec<u8>), PolicyError> {
    let bytes = read(path)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| PolicyError::Parse("the file is not UTF-8 text".into()))?;
    let policy = Policy::from_toml(text)?;
    let errors: Vec<String> = policy
        .lint(schema)
        .into_iter()
        .filter_map(|f| match f {
            Finding::Error(m) => Some(m),
            Finding::Warning(_) => None,
        })
        .collect();
    if !errors.is_empty() {
        return Err(PolicyError::Invalid(errors));
    }
    Ok((policy, bytes))
}

/// Records `by`'s approval of the policy at `path` (which must lint clean).
pub fn approve(path: &Path, by: &str, schema: &TrustSchema) -> Result<Approval, PolicyError> {
    if by.trim().is_empty() {
        return Err(PolicyError::Invalid(vec![
            "--by needs the approver's name".into(),
        ]));
    }
    let (policy, bytes) = load_checked(path, schema)?;
    let approval = Approval {
        approved_by: by.trim().to_string(),
        approved_at: now_rfc3339(),
        version: policy.policy.version.clone(),
        sha256: content_hash(&bytes),
    };
    let text = toml::to_string(&approval).map_err(|e| PolicyError::Parse(e.to_string()))?;
    let target = approval_path(path);
    let partial = approval_path(&target);
    let io = |p: &Path, e: std::io::Error| PolicyError::Io {
        path: p.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::write(&partial, text).map_err(|e| io(&partial, e))?;
    std::fs::rename(&partial, &target).map_err(|e| io(&target, e))?;
    Ok(approval)
}

/// Loads a policy only if it lints clean and its content matches its approval.
pub fn load_approved(path: &Path, schema: &TrustSchema) -> Result<ApprovedPolicy, PolicyError> {
    let (policy, bytes) = load_checked(path, schema)?;
    let record_path = approval_path(path);
    if !record_path.exists() {
        return Err(PolicyError::NotApproved(path.to_path_buf()));
    }
    let record = read(&record_path)?;
    let record = std::str::from_utf8(&record)
        .map_err(|_| PolicyError::Parse("the approval record is not UTF-8 text".into()))?;
    let approval: Approval =
        toml::from_str(record).map_err(|e| PolicyError::Parse(format!("approval record: {e}")))?;
    let hash = content_hash(&bytes);
    if approval.sha256 != hash {
        return Err(PolicyError::ChangedSinceApproval {
            path: path.to_path_buf(),
            approved: approval.sha256,
            actual: hash,
        });
    }
    Ok(ApprovedPolicy {
        policy,
        hash,
        approval,
    })
}
