//! Bearer tokens and projects.

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::config::ResearcherEntry;
use crate::error::CoordinatorError;

/// The gRPC header naming the project a query is for.
pub const PROJECT_HEADER: &str = "x-trustql-project";

/// SHA-256 (hex) of a token, as `coordinator.toml` stores it.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An authenticated researcher and the project of this call.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Their name.
    pub researcher: String,
    /// The project the call is for.
    pub project: String,
}

/// The known researchers.
#[derive(Debug, Clone)]
pub struct Researchers {
    entries: Vec<ResearcherEntry>,
}

impl Researchers {
    /// From the configuration.
    pub fn new(entries: Vec<ResearcherEntry>) -> Self {
        Researchers { entries }
    }

    /// Checks the bearer token and resolves the project.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, CoordinatorError> {
        let header = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or(CoordinatorError::Unauthenticated)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(CoordinatorError::Unauthenticated)?;
        let hash = token_hash(token.trim());
        // Compare every entry in constant time, so timing does not reveal a near match.
        let mut found = None;
        for entry in &self.entries {
            if constant_time_eq(entry.token_sha256.as_bytes(), hash.as_bytes()) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or(CoordinatorError::Unauthenticated)?;
        let named = metadata
            .get(PROJECT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|p| !p.is_empty());
        let project = match (named, entry.projects.as_slice()) {
            (Some(p), projects) if projects.iter().any(|q| q == p) => p.to_string(),
            (Some(p), _) => {
                return Err(CoordinatorError::Forbidden(format!(
                    "you are not on project {p}; your projects: {}",
                    entry.projects.join(", ")
                )));
            }
            (None, [only]) => only.clone(),
            (None, _) => {
                return Err(CoordinatorError::Forbidden(format!(
                    "name your project in the {PROJECT_HEADER} header; your projects: {}",
                    entry.projects.join(", ")
                )));
            }
        };
        Ok(Caller {
            researcher: entry.name.clone(),
            project,
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
