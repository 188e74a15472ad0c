//! Pairwise masks, the layout with its canary, and the coordinator's sum.

use std::collections::BTreeMap;

use hkdf::Hkdf;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use sha2::Sha256;

use crate::context::put_field;
use crate::{MIN_MEMBERS, MaskContext, PoolError, PoolPublicKey, PoolSecret};

/// The HKDF salt: a fixed domain string, so these seeds never coincide with another protocol's
/// use of the same keys.
pub const SALT: &[u8] = b"trustql-pool/1";

/// The mask of member `own_code` over `words` words: for every other member of `ctx`, the
/// ChaCha20 stream seeded from the pair's shared secret and the context, added if `own_code`
/// sorts before the peer's code and subtracted otherwise, so each pair's stream cancels in the
/// pooled sum.
///
/// `peers` must give exactly one pinned key for every other member. Prefer
/// [`Layout::masked_contribution`], which also sets the canary.
pub fn mask<S: AsRef<str>>(
    secret: &PoolSecret,
    own_code: &str,
    peers: &[(S, PoolPublicKey)],
    ctx: &MaskContext,
    words: usize,
) -> Result<Vec<u64>, PoolError> {
    if !ctx.contains(own_code) {
        return Err(PoolError::NotAMember {
            member: own_code.to_string(),
        });
    }
    let mut keys = BTreeMap::new();
    for (code, key) in peers {
        let code = code.as_ref();
        if code == own_code || !ctx.contains(code) {
            return Err(PoolError::UnknownPeer {
                member: code.to_string(),
            });
        }
        if keys.insert(code, key).is_some() {
            return Err(PoolError::DuplicatePeer {
                member: code.to_string(),
            });
        }
    }
    // Every key is checked before any stream is drawn, so a bad config costs no work.
    let mut pairs = Vec::with_capacity(keys.len());
    for member in ctx.members().iter().filter(|m| m.as_str() != own_code) {
        let key = keys
            .get(member.as_str())
            .ok_or_else(|| PoolError::MissingPeerKey {
                member: member.clone(),
            })?;
        pairs.push((member.as_str(), *key));
    }
    let context = ctx.to_bytes();
    let mut out = vec![0u64; words];
    for (member, key) in pairs {
        let shared = secret.agree(key);
        if !shared.was_contributory() {
            return Err(PoolError::LowOrderKey {
                member: member.to_string(),
            });
        }
        let (low, high) = if own_code < member {
            (own_code, member)
        } else {
            (member, own_code)
        };
        let mut info = context.clone();
        put_field(&mut info, low.as_bytes());
        put_field(&mut info, high.as_bytes());
        let mut seed = [0u8; 32];
        expand(shared.as_bytes(), &info, &mut seed)?;
        let mut stream = ChaCha20Rng::from_seed(seed);
        let add = own_code < member;
        for word in &mut out {
            let r = stream.next_u64();
            *word = if add {
                word.wrapping_add(r)
            } else {
                word.wrapping_sub(r)
            };
        }
    }
    Ok(out)
}

/// HKDF-SHA256 with [`SALT`]; `okm`'s length is the only way it can fail.
pub(crate) fn expand(ikm: &[u8], info: &[u8], okm: &mut [u8]) -> Result<(), PoolError> {
    Hkdf::<Sha256>::new(Some(SALT), ikm)
        .expand(info, okm)
        .map_err(|_| PoolError::Derive)
}

/// `values + mask` word by word, mod 2^64: what a member sends.
pub fn masked(values: &[u64], mask: &[u64]) -> Result<Vec<u64>, PoolError> {
    if values.len() != mask.len() {
        return Err(PoolError::LengthMismatch {
            expected: mask.len(),
            found: values.len(),
        });
    }
    Ok(values
        .iter()
        .zip(mask)
        .map(|(v, m)| v.wrapping_add(*m))
        .collect())
}

/// The coordinator's sum of every member's masked vector, word by word mod 2^64. It needs at
/// least [`MIN_MEMBERS`] vectors of one length; check the canary before using the result
/// ([`Layout::unmask`] does both).
pub fn unmask_sum(vectors: &[Vec<u64>]) -> Result<Vec<u64>, PoolError> {
    if vectors.len() < MIN_MEMBERS {
        return Err(PoolError::TooFewMembers {
            count: vectors.len(),
            min: MIN_MEMBERS,
        });
    }
    let words = vectors[0].len();
    let mut sum = vec![0u64; words];
    for vector in vectors {
        if vector.len() != words {
            return Err(PoolError::LengthMismatch {
                expected: words,
                found: vector.len(),
            });
        }
        for (s, v) in sum.iter_mut().zip(vector) {
            *s = s.wrapping_add(*v);
        }
    }
    Ok(sum)
}

/// Fails with [`PoolError::Canary`] unless the last word of a pooled sum (the canary) is 0.
///
/// Each member's canary is 0 before masking, so a non-zero pooled canary means some pair's
/// streams did not cancel; that happens by chance with probability 2^-64.
pub fn check_canary(sum: &[u64]) -> Result<(), PoolError> {
    match sum.last() {
        Some(0) => Ok(()),
        _ => Err(PoolError::Canary),
    }
}

/// A pooled vector's shape: `cells` value cells, then the canary, so no caller can leave it
/// out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    cells: usize,
}

impl Layout {
    /// A layout of `cells` value cells (and the canary after them).
    pub fn new(cells: usize) -> Result<Layout, PoolError> {
        if cells.checked_add(1).is_none() {
            return Err(PoolError::TooManyCells { cells });
        }
        Ok(Layout { cells })
    }

    /// The value cells.
    pub fn cells(&self) -> usize {
        self.cells
    }

    /// The words of every vector: the cells and the canary.
    pub fn words(&self) -> usize {
        self.cells + 1
    }

    /// `values` (one word per cell) with the canary, 0, appended.
    pub fn vector(&self, values: &[u64]) -> Result<Vec<u64>, PoolError> {
        if values.len() != self.cells {
            return Err(PoolError::LengthMismatch {
                expected: self.cells,
                found: values.len(),
            });
        }
        let mut out = Vec::with_capacity(self.words());
        out.extend_from_slice(values);
        out.push(0);
        Ok(out)
    }

    /// What member `own_code` sends: its `values` and the canary under its [`mask`].
    pub fn masked_contribution<S: AsRef<str>>(
        &self,
        values: &[u64],
        secret: &PoolSecret,
        own_code: &str,
        peers: &[(S, PoolPublicKey)],
        ctx: &MaskContext,
    ) -> Result<Vec<u64>, PoolError> {
        let vector = self.vector(values)?;
        let mask = mask(secret, own_code, peers, ctx, self.words())?;
        masked(&vector, &mask)
    }

    /// The pooled values from every member's masked vector: their sum, once the canary is
    /// checked, without the canary.
    pub fn unmask(&self, vectors: &[Vec<u64>]) -> Result<Vec<u64>, PoolError> {
        let mut sum = unmask_sum(vectors)?;
        if sum.len() != self.words() {
            return Err(PoolError::LengthMismatch {
                expected: self.words(),
                found: sum.len(),
            });
        }
        check_canary(&sum)?;
        sum.truncate(self.cells);
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hkdf_length_errors_are_classified() {
        // HKDF-SHA256 gives at most 255 × 32 bytes; the seeds are 32, so only this reaches it.
        let mut okm = vec![0u8; 255 * 32 + 1];
        assert_eq!(expand(&[7; 32], b"info", &mut okm), Err(PoolError::Derive));
        let mut seed = [0u8; 32];
        assert_eq!(expand(&[7; 32], b"info", &mut seed), Ok(()));
    }
}
