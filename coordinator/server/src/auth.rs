//! Bearer tokens and projects.

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

pub use trustql_protocol::{EPSILON_HEADER, PREVIEW_HEADER, PROJECT_HEADER};

use crate::config::ResearcherEntry;
use crate::error::CoordinatorError;

/// SHA-256 (hex) of a token, as `coordinator.toml` stores it.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An authenticated researcher and the project of this call.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// Their name.
    pub researcher: String,
    /// The project the call is for.
    pub project: String,
    /// The ε asked for, when less than the project's default (differential privacy).
    pub epsilon: Option<f64>,
    /// Only preview the cost and noise.
    pub preview: bool,
}

/// The known researchers.
#[derive(Debug, Clone)]
pub(crate) struct Researchers {
    entries: Vec<ResearcherEntry>,
}

impl Researchers {
    /// From the configuration.
    pub(crate) fn new(entries: Vec<ResearcherEntry>) -> Self {
        Researchers { entries }
    }

    /// Checks the bearer token and resolves the project; a failure says who, when the token
    /// was good.
    pub(crate) fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, AuthFailure> {
        let entry = self.identify(metadata).map_err(|error| AuthFailure {
            researcher: None,
            error,
        })?;
        resolve(entry, metadata).map_err(|error| AuthFailure {
            researcher: Some(entry.name.clone()),
            error,
        })
    }

    /// The researcher whose bearer token this is.
    fn identify(&self, metadata: &MetadataMap) -> Result<&ResearcherEntry, CoordinatorError> {
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
        found.ok_or(CoordinatorError::Unauthenticated)
    }
}

/// Why a call was not let in, and whose it was when the token was good.
#[derive(Debug)]
pub(crate) struct AuthFailure {
    /// The researcher, when the token was theirs but the project or a header was not right.
    pub(crate) researcher: Option<String>,
    /// The refusal.
    pub(crate) error: CoordinatorError,
}

/// The project, ε and preview of an authenticated researcher's call.
fn resolve(entry: &ResearcherEntry, metadata: &MetadataMap) -> Result<Caller, CoordinatorError> {
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
    // An empty value means "the project's default", so a client can unset it.
    let epsilon = match metadata
        .get(EPSILON_HEADER)
        .map(|v| v.to_str().map(str::trim))
    {
        None | Some(Ok("")) => None,
        Some(value) => Some(
            value
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|e| e.is_finite() && *e > 0.0)
                .ok_or_else(|| {
                    CoordinatorError::BadHeader(format!(
                        "{EPSILON_HEADER} must be a positive number, such as 0.5"
                    ))
                })?,
        ),
    };
    let preview = match metadata.get(PREVIEW_HEADER).map(|v| v.to_str()) {
        None => false,
        Some(Ok(v)) if v.eq_ignore_ascii_case("true") || v == "1" => true,
        Some(Ok(v)) if v.eq_ignore_ascii_case("false") || v == "0" => false,
        Some(_) => {
            return Err(CoordinatorError::BadHeader(format!(
                "{PREVIEW_HEADER} must be true or false"
            )));
        }
    };
    Ok(Caller {
        researcher: entry.name.clone(),
        project,
        epsilon,
        preview,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
