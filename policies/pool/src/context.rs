//! What a pooled round is about, bound into every pairwise seed.

use crate::PoolError;

/// The fewest members a pool may have: with two, either member could subtract its own values
/// from the total and learn the other's; with three, the coordinator and all but one trust
/// would still have to collude to recover the last one.
pub const MIN_MEMBERS: usize = 3;

/// Tags the encoding so a later change of fields cannot collide with this one.
const CONTEXT_TAG: &[u8] = b"trustql-pool/context/1";

/// The context of one pooled round: every member must hold the same one, or the masks do not
/// cancel and the canary fails.
///
/// The member list is sorted (byte order of the codes), so the order a policy lists them in
/// does not matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskContext {
    project: String,
    request_id: String,
    plan_fingerprint: String,
    members: Vec<String>,
    layout_hash: [u8; 32],
    parameters_hash: [u8; 32],
}

impl MaskContext {
    /// The context of a round: the project, the request, the plan's fingerprint, the pool's
    /// members (any order; each once, at least [`MIN_MEMBERS`]), the hash of the cell layout and
    /// the hash of the pooled protection parameters (so members whose policies disagree fail
    /// loudly rather than pool under different rules).
    pub fn new(
        project: impl Into<String>,
        request_id: impl Into<String>,
        plan_fingerprint: impl Into<String>,
        mut members: Vec<String>,
        layout_hash: [u8; 32],
        parameters_hash: [u8; 32],
    ) -> Result<MaskContext, PoolError> {
        members.sort();
        if let Some(pair) = members.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(PoolError::DuplicateMember {
                member: pair[0].clone(),
            });
        }
        if members.len() < MIN_MEMBERS {
            return Err(PoolError::TooFewMembers {
                count: members.len(),
                min: MIN_MEMBERS,
            });
        }
        Ok(MaskContext {
            project: project.into(),
            request_id: request_id.into(),
            plan_fingerprint: plan_fingerprint.into(),
            members,
            layout_hash,
            parameters_hash,
        })
    }

    /// The project.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The plan's fingerprint.
    pub fn plan_fingerprint(&self) -> &str {
        &self.plan_fingerprint
    }

    /// The members, sorted.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// The hash of the cell layout.
    pub fn layout_hash(&self) -> &[u8; 32] {
        &self.layout_hash
    }

    /// The hash of the pooled protection parameters.
    pub fn parameters_hash(&self) -> &[u8; 32] {
        &self.parameters_hash
    }

    /// Whether `code` is a member.
    pub fn contains(&self, code: &str) -> bool {
        self.members
            .binary_search_by(|member| member.as_str().cmp(code))
            .is_ok()
    }

    /// The canonical bytes: a version tag, then every field length-prefixed (u64 big-endian),
    /// the member list prefixed by its count, then the two hashes. No two contexts share an
    /// encoding, however their strings split.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_field(&mut out, CONTEXT_TAG);
        put_field(&mut out, self.project.as_bytes());
        put_field(&mut out, self.request_id.as_bytes());
        put_field(&mut out, self.plan_fingerprint.as_bytes());
        put_len(&mut out, self.members.len());
        for member in &self.members {
            put_field(&mut out, member.as_bytes());
        }
        out.extend_from_slice(&self.layout_hash);
        out.extend_from_slice(&self.parameters_hash);
        out
    }
}

pub(crate) fn put_field(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // usize is at most 64 bits on every target Rust supports, so this never saturates.
    let len = u64::try_from(len).unwrap_or(u64::MAX);
    out.extend_from_slice(&len.to_be_bytes());
}
