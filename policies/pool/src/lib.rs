//! Pool-then-protect (issue 17): the trusts of a pool add their states under pairwise masks, so
//! the coordinator sees only the pooled total and protection is applied once, to that total.
//!
//! Each member `i` holds an X25519 key pair ([`PoolSecret`], [`PoolPublicKey`]) and pins every
//! other member's public key. For each peer `j` it derives a seed with HKDF-SHA256 from the
//! shared secret and the [`MaskContext`] (project, request id, plan fingerprint, sorted member
//! list, layout hash, pooled protection parameters' hash, and the pair), expands it with
//! ChaCha20 and adds the stream if its code sorts before `j`'s, subtracts it otherwise. Every
//! pair's stream appears once with each sign, so the masks cancel in the sum mod 2^64, while any
//! one masked vector, and any sum of fewer than all of them, is uniformly random to whoever
//! lacks a member's secret.
//!
//! A [`Layout`] appends a canary cell that every member sets to 0: a wrong pinned key, a missing
//! member or members that disagree on the context leave it non-zero, and [`Layout::unmask`]
//! then fails with [`PoolError::Canary`] instead of releasing garbage.
//!
//! Values are words of Z_2^64: counts as two's complement ([`encode_count`]), bounded sums in
//! fixed point ([`FixedPoint`]).
//!
//! This crate is pure: it reads no key file and draws no randomness; the node supplies the
//! secret's bytes.
//!
//! ```
//! use trustql_pool::{Layout, MaskContext, PoolSecret};
//!
//! let codes = ["TQ01", "TQ02", "TQ03"];
//! let secrets: Vec<PoolSecret> = (1u8..=3)
//!     .map(|b| PoolSecret::from_bytes([b; 32]))
//!     .collect::<Result<_, _>>()?;
//! let ctx = MaskContext::new(
//!     "proj",
//!     "req-1",
//!     "plan",
//!     codes.iter().map(|c| c.to_string()).collect(),
//!     [1; 32],
//!     [2; 32],
//! )?;
//! let layout = Layout::new(2)?;
//! let mut vectors = Vec::new();
//! for (i, own) in codes.iter().enumerate() {
//!     let peers: Vec<(&str, _)> = codes
//!         .iter()
//!         .zip(&secrets)
//!         .filter(|(c, _)| *c != own)
//!         .map(|(c, s)| (*c, s.public_key()))
//!         .collect();
//!     let values = [10 + i as u64, 1];
//!     vectors.push(layout.masked_contribution(&values, &secrets[i], own, &peers, &ctx)?);
//! }
//! assert_eq!(layout.unmask(&vectors)?, vec![33, 3]);
//! # Ok::<(), trustql_pool::PoolError>(())
//! ```

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

mod context;
mod fixed;
mod keys;
mod mask;

pub use context::{MIN_MEMBERS, MaskContext};
pub use fixed::{
    FixedPoint, MAX_SCALE_BITS, decode_count, decode_fixed, encode_count, encode_fixed,
};
pub use keys::{PoolPublicKey, PoolSecret};
pub use mask::{Layout, SALT, check_canary, mask, masked, unmask_sum};

/// Errors of pooled masking and encoding.
///
/// Messages name members, counts and settings, never a cell's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Public key text that is not 32 bytes in hex or base64.
    #[error("a pool public key must be 32 bytes written as 64 hex digits or 44 base64 characters")]
    InvalidPublicKey,
    /// A secret of 32 zero bytes: an unwritten or truncated key file, not a key.
    #[error(
        "the pool secret is all zeros (an unwritten or truncated key file?); generate a new one"
    )]
    WeakSecret,
    /// Fewer members (or masked vectors) than a pool needs.
    #[error("a pool needs at least {min} members; {count} given")]
    TooFewMembers {
        /// How many were given.
        count: usize,
        /// The minimum, [`MIN_MEMBERS`].
        min: usize,
    },
    /// A member listed twice in the context.
    #[error("pool member {member} is listed twice")]
    DuplicateMember {
        /// The member's code.
        member: String,
    },
    /// The masking member is not in the context's member list.
    #[error("{member} is not a member of this pool")]
    NotAMember {
        /// The member's code.
        member: String,
    },
    /// A peer key for a code that is not another member of the pool.
    #[error("peer {member} is not another member of this pool")]
    UnknownPeer {
        /// The peer's code.
        member: String,
    },
    /// A peer given twice.
    #[error("peer {member} is given twice")]
    DuplicatePeer {
        /// The peer's code.
        member: String,
    },
    /// A member of the pool without a pinned public key.
    #[error("no pinned public key for pool member {member}")]
    MissingPeerKey {
        /// The member's code.
        member: String,
    },
    /// A peer key whose shared secret is all zeros (a low-order point): anyone could compute
    /// that pair's mask.
    #[error(
        "the pinned public key of {member} is a low-order point (all-zero shared secret); \
         it is not a usable key"
    )]
    LowOrderKey {
        /// The peer's code.
        member: String,
    },
    /// HKDF refused the output length (cannot happen for the 32-byte seeds this crate derives).
    #[error("deriving a pairwise mask seed failed")]
    Derive,
    /// A layout too large to hold its canary.
    #[error("a pooled layout of {cells} cells leaves no room for the canary")]
    TooManyCells {
        /// The cells asked for.
        cells: usize,
    },
    /// Vectors (values, masks, members' contributions) of different lengths.
    #[error("a vector of {found} words where {expected} were expected")]
    LengthMismatch {
        /// The expected number of words.
        expected: usize,
        /// The number found.
        found: usize,
    },
    /// The pooled canary is not zero: the masks did not cancel.
    #[error(
        "the pooled canary is not zero: a member used a wrong pinned key, a member's vector is \
         missing, or the members disagree on the pool's context or parameters; nothing is \
         released"
    )]
    Canary,
    /// Fixed-point bounds that are not finite or not ordered.
    #[error("fixed-point bounds must be finite, with lower <= upper")]
    InvalidBounds,
    /// More fraction bits than fixed point takes.
    #[error("fixed point takes at most {max} fraction bits; {scale_bits} asked")]
    ScaleBits {
        /// The fraction bits asked for.
        scale_bits: u32,
        /// The most allowed, [`MAX_SCALE_BITS`].
        max: u32,
    },
    /// The declared maximum rows at these bounds could overflow the 64-bit sum.
    #[error(
        "{max_rows} rows at these bounds with {scale_bits} fraction bits could overflow the \
         64-bit pooled sum (rows x max|bound| x 2^scale_bits must stay below 2^63)"
    )]
    FixedPointOverflow {
        /// The declared maximum rows.
        max_rows: u64,
        /// The fraction bits.
        scale_bits: u32,
    },
    /// A NaN given to fixed point.
    #[error("a NaN cannot be encoded in fixed point")]
    NotANumber,
}
