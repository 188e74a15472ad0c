//! Who is asking: the node answers only its pinned coordinator, and only requests that
//! coordinator signed for this trust, recently, once.
//!
//! A certificate from the client CA is not enough: every trust's node and the coordinator's
//! researcher-facing server hold one. And the researcher and project in a request are the
//! coordinator's word, so it signs them (after checking the researcher's token and projects).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use trustql_protocol::{ProtocolError, RequestVerifier, SiteRequest, VerifyingKey};

use crate::config::CoordinatorIdentity;
use crate::error::NodeError;

/// Most request ids remembered at once. Only requests the coordinator signed are remembered,
/// so this bounds memory without ever being reached by honest traffic.
const MAX_REMEMBERED: usize = 200_000;

/// Longest window a node may be configured with: a day.
const MAX_WINDOW_SECS: u64 = 86_400;

/// The node's check on who is asking.
pub(crate) struct Gate {
    trust: String,
    pins: Vec<[u8; 32]>,
    verifier: RequestVerifier,
    window_ms: u64,
    /// How far ahead of this clock an issue time may be.
    ahead_ms: u64,
    /// When this node started (Unix ms): ids seen before are forgotten.
    started_ms: u64,
    /// Request ids seen, with when they leave the window (Unix ms).
    seen: Mutex<HashMap<String, u64>>,
}

impl Gate {
    /// From the node's `[coordinator]` table; refuses an empty or malformed pin.
    pub(crate) fn new(trust: &str, config: &CoordinatorIdentity) -> Result<Self, NodeError> {
        let bad = |m: String| NodeError::Config(format!("[coordinator] {m}"));
        if config.client_cert_sha256.is_empty() {
            return Err(bad(
                "client_cert_sha256 must name the coordinator's client certificate".into(),
            ));
        }
        let pins = config
            .client_cert_sha256
            .iter()
            .map(|f| {
                parse_fingerprint(f).ok_or_else(|| {
                    bad(format!(
                        "client_cert_sha256 {f:?} is not a SHA-256 fingerprint (64 hex digits)"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if config.request_keys.is_empty() {
            return Err(bad(
                "request_keys must name the coordinator's request-signing public key".into(),
            ));
        }
        let keys = config
            .request_keys
            .iter()
            .map(|path| {
                let pem = std::fs::read(path).map_err(|e| NodeError::Io {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                VerifyingKey::from_pem(&pem)
                    .map_err(|e| bad(format!("request key {}: {e}", path.display())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if config.max_request_age_secs == 0 || config.max_request_age_secs > MAX_WINDOW_SECS {
            return Err(bad(format!(
                "max_request_age_secs must be between 1 and {MAX_WINDOW_SECS}"
            )));
        }
        if config.max_clock_ahead_secs > config.max_request_age_secs {
            return Err(bad(
                "max_clock_ahead_secs may not exceed max_request_age_secs".into(),
            ));
        }
        Ok(Gate {
            trust: trust.to_string(),
            pins,
            verifier: RequestVerifier::new(keys),
            window_ms: config.max_request_age_secs * 1000,
            ahead_ms: config.max_clock_ahead_secs * 1000,
            started_ms: now_unix_ms(),
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Admits the TLS peer only if its leaf certificate is pinned and made for clients.
    pub(crate) fn admit_peer(&self, certs: Option<&[CertificateDer<'_>]>) -> Result<(), NodeError> {
        let Some(leaf) = certs.and_then(<[_]>::first) else {
            return Err(NodeError::NotCoordinator(
                "no client certificate was presented".into(),
            ));
        };
        let fingerprint: [u8; 32] = Sha256::digest(leaf.as_ref()).into();
        let (subject, client_auth) = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
            Ok((_, cert)) => (
                cert.subject().to_string(),
                // Absent means "any use" to TLS libraries; a coordinator's must say client.
                matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth),
            ),
            Err(_) => (String::from("unparsable"), false),
        };
        let pinned = self.pins.contains(&fingerprint);
        if pinned && client_auth {
            return Ok(());
        }
        let why = if pinned {
            "pinned, but without the clientAuth extended key usage"
        } else {
            "not the pinned coordinator certificate"
        };
        Err(NodeError::NotCoordinator(format!(
            "certificate sha256 {} ({}): {why}",
            hex(&fingerprint),
            subject.chars().take(200).collect::<String>()
        )))
    }

    /// Opens a ticket: the coordinator's signature, this trust, the issue time within the
    /// window, and a request id not seen before. The request comes back whenever its
    /// signature verified (so a refused stale or replayed request is recorded as what it
    /// was), and is empty otherwise (an unverified claim is not recorded as anyone's).
    pub(crate) fn open(&self, ticket: &[u8], now_ms: u64) -> (SiteRequest, Result<(), NodeError>) {
        let signed = match self.verifier.open(ticket) {
            Ok(signed) => signed,
            Err(ProtocolError::Malformed(reason)) => {
                return (
                    SiteRequest::default(),
                    Err(NodeError::BadRequest(format!(
                        "not a TrustQL site request: {reason}"
                    ))),
                );
            }
            Err(e) => return (SiteRequest::default(), Err(NodeError::Unvouched(e))),
        };
        let verdict = self.check(
            &signed.trust,
            signed.issued_unix_ms,
            &signed.request,
            now_ms,
        );
        (signed.request, verdict)
    }

    fn check(
        &self,
        trust: &str,
        issued_ms: u64,
        request: &SiteRequest,
        now_ms: u64,
    ) -> Result<(), NodeError> {
        if trust != self.trust {
            return Err(NodeError::OtherTrust);
        }
        if issued_ms > now_ms.saturating_add(self.ahead_ms) {
            return Err(NodeError::Early {
                ahead_secs: (issued_ms - now_ms) / 1000,
                allowed_secs: self.ahead_ms / 1000,
            });
        }
        let age = now_ms.saturating_sub(issued_ms);
        if age > self.window_ms {
            return Err(NodeError::Stale {
                age_secs: age / 1000,
                window_secs: self.window_ms / 1000,
            });
        }
        // Ids live only in memory: one issued before this node started may have been used.
        // With the bound on issue times ahead of the clock, a replay after a restart needs a
        // request signed for later than the restart, which the coordinator's clock would have
        // to be that far ahead to make.
        if issued_ms < self.started_ms {
            return Err(NodeError::BeforeStart);
        }
        // The set stays coherent whatever a panicking holder did: keep using it.
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        // A forgotten id cannot come back: its issue time is then outside the window.
        seen.retain(|_, leaves| *leaves > now_ms);
        if seen.contains_key(&request.request_id) {
            return Err(NodeError::Replayed);
        }
        if seen.len() >= MAX_REMEMBERED {
            return Err(NodeError::Busy);
        }
        seen.insert(
            request.request_id.clone(),
            issued_ms.saturating_add(self.window_ms),
        );
        Ok(())
    }
}

/// 64 hex digits, with or without colons, in either case.
fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| *b != b':' && !b.is_ascii_whitespace())
        .collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds since the Unix epoch by the node's clock.
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_as_openssl_prints_them() {
        let plain = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&plain), Some([0xab; 32]));
        assert_eq!(parse_fingerprint(&colons), Some([0xab; 32]));
        assert_eq!(parse_fingerprint("abcd"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }
}
