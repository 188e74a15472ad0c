//! A member's X25519 key pair: the secret the node keeps, the public key every peer pins.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};

use crate::PoolError;

/// A member's static X25519 secret. It is wiped from memory when dropped, and its `Debug`
/// shows only the public key.
pub struct PoolSecret(StaticSecret);

impl PoolSecret {
    /// The secret made from 32 bytes the caller generated (from the OS's CSPRNG) or read from
    /// the node's key file. The caller should wipe its copy of the bytes.
    ///
    /// 32 zero bytes are refused ([`PoolError::WeakSecret`]): they are what an unwritten or
    /// truncated file gives, and a scalar anyone can guess would expose this member's masks.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<PoolSecret, PoolError> {
        if bytes == [0; 32] {
            return Err(PoolError::WeakSecret);
        }
        Ok(PoolSecret(StaticSecret::from(bytes)))
    }

    /// The public key to pin in every peer's config.
    pub fn public_key(&self) -> PoolPublicKey {
        PoolPublicKey(PublicKey::from(&self.0).to_bytes())
    }

    pub(crate) fn agree(&self, peer: &PoolPublicKey) -> SharedSecret {
        self.0.diffie_hellman(&PublicKey::from(peer.0))
    }
}

impl fmt::Debug for PoolSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolSecret")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// A member's X25519 public key, as pinned in its peers' configs.
///
/// Written as 44 base64 characters (its [`Display`](fmt::Display), the form WireGuard users
/// know) or 64 hex digits; [`FromStr`] reads either.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolPublicKey([u8; 32]);

impl PoolPublicKey {
    /// The key of these 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> PoolPublicKey {
        PoolPublicKey(bytes)
    }

    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The key as 44 base64 characters (standard alphabet, padded).
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl FromStr for PoolPublicKey {
    type Err = PoolError;

    fn from_str(text: &str) -> Result<PoolPublicKey, PoolError> {
        let text = text.trim();
        let mut bytes = [0u8; 32];
        // 64 characters cannot be base64 of 32 bytes (that is 44), so the length decides.
        if text.len() == 64 {
            hex::decode_to_slice(text, &mut bytes).map_err(|_| PoolError::InvalidPublicKey)?;
        } else {
            let decoded = STANDARD
                .decode(text)
                .map_err(|_| PoolError::InvalidPublicKey)?;
            bytes = decoded
                .try_into()
                .map_err(|_| PoolError::InvalidPublicKey)?;
        }
        Ok(PoolPublicKey(bytes))
    }
}

impl fmt::Display for PoolPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PoolPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PoolPublicKey({})", self.to_base64())
    }
}
