//! This node's pool key pair and the pinned public keys of its pools' other members.

use std::path::Path;
use std::str::FromStr;

use trustql_pool::{PoolPublicKey, PoolSecret};

use crate::config::PoolConfig;
use crate::error::NodeError;
use crate::secret_file;

/// The secret this node masks its pooled answers with, and the peers' public keys.
pub struct PoolKeys {
    secret: PoolSecret,
    peers: Vec<(String, PoolPublicKey)>,
}

impl std::fmt::Debug for PoolKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "PoolKeys({} peers)", self.peers.len())
    }
}

impl PoolKeys {
    /// The secret in `path` (made at first start) and the peers `config` pins.
    pub fn load_or_create(path: &Path, config: &PoolConfig) -> Result<Self, NodeError> {
        let bytes = secret_file::load_or_create(
            path,
            "pool secret",
            "its public key is pinned by the pool's other members",
        )?;
        Self::new(bytes, config)
    }

    /// A key pair from `bytes`, with the peers `config` pins.
    pub fn new(bytes: [u8; 32], config: &PoolConfig) -> Result<Self, NodeError> {
        let secret = PoolSecret::from_bytes(bytes)
            .map_err(|e| NodeError::Config(format!("the pool secret: {e}")))?;
        let peers = config
            .peers
            .iter()
            .map(|(code, key)| {
                PoolPublicKey::from_str(key)
                    .map(|k| (code.clone(), k))
                    .map_err(|e| NodeError::Config(format!("[pool] peers.{code}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(PoolKeys { secret, peers })
    }

    /// The public key the other members pin.
    pub fn public_key(&self) -> PoolPublicKey {
        self.secret.public_key()
    }

    /// The secret.
    pub(crate) fn secret(&self) -> &PoolSecret {
        &self.secret
    }

    /// The pinned keys of `members` other than `own`, or which member has none.
    pub(crate) fn peers_in(
        &self,
        own: &str,
        members: &[String],
    ) -> Result<Vec<(String, PoolPublicKey)>, NodeError> {
        members
            .iter()
            .filter(|m| m.as_str() != own)
            .map(|m| {
                self.peers
                    .iter()
                    .find(|(code, _)| code == m)
                    .cloned()
                    .ok_or_else(|| {
                        NodeError::Pool(format!(
                            "no public key pinned for pool member {m} in this node's [pool] peers"
                        ))
                    })
            })
            .collect()
    }
}

/// The public key of the pool secret in `path`, made if there is none: what `trustql pool key`
/// prints.
pub fn pool_public_key(path: &Path) -> Result<PoolPublicKey, NodeError> {
    Ok(PoolKeys::load_or_create(path, &PoolConfig::default())?.public_key())
}
