//! Site requests the coordinator vouches for: an Ed25519 signature over the exact bytes of the
//! request, the trust it is addressed to and when it was issued.
//!
//! The ticket is JSON `{"key", "body", "signature"}`: `body` is the JSON text of a
//! [`SignedRequest`] exactly as signed, so nothing is re-serialised before it is checked (no
//! canonical form to get wrong). A node checks the signature with the keys its config names,
//! then the trust, the issue time and the request id (freshness and replay are the node's, it
//! has the clock).

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use serde::{Deserialize, Serialize};

use crate::SiteRequest;

/// Prefixed to the body before signing, so a site-request signature is never valid for any
/// other message the same key might sign.
const CONTEXT: &[u8] = b"trustql site request v1\n";

/// DER of an Ed25519 SubjectPublicKeyInfo before its 32 key bytes (RFC 8410).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a ticket is not a site request the coordinator vouched for, or a key is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not JSON of any TrustQL site request.
    #[error("not a TrustQL site request: {0}")]
    Malformed(String),
    /// A bare site request, with no coordinator signature.
    #[error("the site request is not signed by the coordinator")]
    Unsigned,
    /// Signed by a key this node was not configured with.
    #[error("the site request is signed by a key this trust does not know")]
    UnknownKey,
    /// The signature does not match the request (altered, or forged).
    #[error("the site request's signature does not verify")]
    BadSignature,
    /// A signing or verifying key could not be read.
    #[error("the request-signing key is unusable: {0}")]
    Key(String),
    /// The request could not be encoded.
    #[error("the site request could not be encoded")]
    Encode,
}

/// What the coordinator signs: the request, the trust it is for and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRequest {
    /// The trust the request is addressed to, so it cannot be replayed at another trust.
    pub trust: String,
    /// When the coordinator signed it, in milliseconds since the Unix epoch.
    pub issued_unix_ms: u64,
    /// The request itself.
    pub request: SiteRequest,
}

/// The ticket on the wire.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    /// The signer's Ed25519 public key (hex), so a node can hold an old and a new key.
    key: String,
    /// The JSON text of a [`SignedRequest`], exactly as signed.
    body: String,
    /// Ed25519 signature (hex) over [`CONTEXT`] then `body`.
    signature: String,
}

/// An Ed25519 public key that may vouch for site requests.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyingKey([u8; 32]);

impl VerifyingKey {
    /// Reads a PEM `PUBLIC KEY` (SubjectPublicKeyInfo, as `openssl pkey -pubout` writes it).
    pub fn from_pem(pem: &[u8]) -> Result<Self, ProtocolError> {
        let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem)
            .map_err(|e| ProtocolError::Key(format!("not a PEM public key: {e}")))?;
        let der = spki.as_ref();
        match der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            Some(key) => key
                .try_into()
                .map(VerifyingKey)
                .map_err(|_| ProtocolError::Key("not an Ed25519 public key".into())),
            None => Err(ProtocolError::Key("not an Ed25519 public key".into())),
        }
    }

    /// The key in hex (how it is named in a ticket and in logs).
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({})", self.to_hex())
    }
}

/// The coordinator's key for vouching for site requests.
pub struct RequestSigner {
    pair: Ed25519KeyPair,
}

impl RequestSigner {
    /// Reads a PEM `PRIVATE KEY` (PKCS#8 Ed25519, as `openssl genpkey -algorithm ed25519` or
    /// the development certificates write it).
    pub fn from_pem(pem: &[u8]) -> Result<Self, ProtocolError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
            .map_err(|e| ProtocolError::Key(format!("not a PEM PKCS#8 private key: {e}")))?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    /// Takes a PKCS#8 Ed25519 key (DER).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, ProtocolError> {
        // `maybe_unchecked` takes PKCS#8 v1 (OpenSSL) as well as v2 (ring, rcgen).
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| ProtocolError::Key(format!("not an Ed25519 key: {e}")))?;
        Ok(RequestSigner { pair })
    }

    /// The key nodes verify with.
    pub fn verifying_key(&self) -> VerifyingKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(key)
    }

    /// The ticket for `signed`: its JSON, signed.
    pub fn sign(&self, signed: &SignedRequest) -> Result<Vec<u8>, ProtocolError> {
        let body = serde_json::to_string(signed).map_err(|_| ProtocolError::Encode)?;
        let signature = self.pair.sign(&message(&body));
        let envelope = Envelope {
            key: self.verifying_key().to_hex(),
            body,
            signature: hex(signature.as_ref()),
        };
        serde_json::to_vec(&envelope).map_err(|_| ProtocolError::Encode)
    }
}

impl std::fmt::Debug for RequestSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestSigner({})", self.verifying_key().to_hex())
    }
}

/// The keys a node takes site requests from.
#[derive(Debug, Clone)]
pub struct RequestVerifier {
    keys: Vec<VerifyingKey>,
}

impl RequestVerifier {
    /// A verifier accepting signatures by any of `keys`.
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        RequestVerifier { keys }
    }

    /// Opens a ticket: the signature must verify under a known key before anything in the
    /// body is read.
    pub fn open(&self, ticket: &[u8]) -> Result<SignedRequest, ProtocolError> {
        let envelope: Envelope = match serde_json::from_slice(ticket) {
            Ok(envelope) => envelope,
            // Say plainly when a bare request arrives: that is the old, unsigned protocol.
            Err(_) if SiteRequest::from_ticket(ticket).is_ok() => {
                return Err(ProtocolError::Unsigned);
            }
            Err(e) => return Err(ProtocolError::Malformed(e.to_string())),
        };
        let key = unhex(&envelope.key)
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .map(VerifyingKey)
            .filter(|k| self.keys.contains(k))
            .ok_or(ProtocolError::UnknownKey)?;
        let signature = unhex(&envelope.signature).ok_or(ProtocolError::BadSignature)?;
        UnparsedPublicKey::new(&ED25519, key.0)
            .verify(&message(&envelope.body), &signature)
            .map_err(|_| ProtocolError::BadSignature)?;
        serde_json::from_str(&envelope.body).map_err(|e| ProtocolError::Malformed(e.to_string()))
    }
}

fn message(body: &str) -> Vec<u8> {
    let mut message = CONTEXT.to_vec();
    message.extend_from_slice(body.as_bytes());
    message
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> RequestSigner {
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng).expect("generate");
        RequestSigner::from_pkcs8_der(der.as_ref()).expect("key")
    }

    fn signed() -> SignedRequest {
        SignedRequest {
            trust: "TQ01".into(),
            issued_unix_ms: 1_000,
            request: SiteRequest {
                request_id: "r1".into(),
                researcher: "alice".into(),
                project: "p1".into(),
                sql: "SELECT COUNT(*) FROM t".into(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_signed_request_opens_with_its_key_only() {
        let ours = signer();
        let ticket = ours.sign(&signed()).expect("sign");
        let key = ours.verifying_key();
        let opened = RequestVerifier::new(vec![key])
            .open(&ticket)
            .expect("opens");
        assert_eq!(opened, signed());
        let other = signer().verifying_key();
        assert_eq!(
            RequestVerifier::new(vec![other]).open(&ticket),
            Err(ProtocolError::UnknownKey)
        );
    }

    #[test]
    fn an_altered_or_bare_request_is_refused_by_kind() {
        let signer = signer();
        let verifier = RequestVerifier::new(vec![signer.verifying_key()]);
        let ticket = String::from_utf8(signer.sign(&signed()).expect("sign")).expect("utf8");
        let altered = ticket.replace("alice", "mallory");
        assert_ne!(altered, ticket);
        assert_eq!(
            verifier.open(altered.as_bytes()),
            Err(ProtocolError::BadSignature)
        );
        let bare = signed().request.to_ticket().expect("ticket");
        assert_eq!(verifier.open(&bare), Err(ProtocolError::Unsigned));
        assert!(matches!(
            verifier.open(b"{not json"),
            Err(ProtocolError::Malformed(_))
        ));
    }
}
