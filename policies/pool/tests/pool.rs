//! Pooled masks: they cancel exactly, hide each member's vector, bind the whole context, and
//! fail loudly through the canary when a key or a member is wrong.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use trustql_pool::{
    FixedPoint, Layout, MIN_MEMBERS, MaskContext, PoolError, PoolPublicKey, PoolSecret,
    check_canary, decode_count, decode_fixed, encode_count, encode_fixed, mask, masked, unmask_sum,
};

/// A pool of `n` members with their secrets, under one context.
struct Pool {
    codes: Vec<String>,
    secrets: Vec<PoolSecret>,
    ctx: MaskContext,
}

fn secret(rng: &mut ChaCha8Rng) -> PoolSecret {
    let mut bytes = [0u8; 32];
    rng.fill_bytes(&mut bytes);
    PoolSecret::from_bytes(bytes).expect("random bytes are a usable secret")
}

fn context(codes: &[String]) -> MaskContext {
    MaskContext::new(
        "cancer-outcomes",
        "req-42",
        "plan-abc",
        codes.to_vec(),
        [7; 32],
        [9; 32],
    )
    .expect("a valid context")
}

fn pool(n: usize, seed: u64) -> Pool {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let codes: Vec<String> = (1..=n).map(|i| format!("TQ{i:02}")).collect();
    let secrets = (0..n).map(|_| secret(&mut rng)).collect();
    let ctx = context(&codes);
    Pool {
        codes,
        secrets,
        ctx,
    }
}

impl Pool {
    /// Every other member's pinned key, as member `i` holds them.
    fn peers(&self, i: usize) -> Vec<(String, PoolPublicKey)> {
        self.codes
            .iter()
            .zip(&self.secrets)
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (code, s))| (code.clone(), s.public_key()))
            .collect()
    }

    fn contribution(&self, layout: &Layout, i: usize, values: &[u64]) -> Vec<u64> {
        self.contribution_in(layout, i, values, &self.peers(i), &self.ctx)
    }

    fn contribution_in(
        &self,
        layout: &Layout,
        i: usize,
        values: &[u64],
        peers: &[(String, PoolPublicKey)],
        ctx: &MaskContext,
    ) -> Vec<u64> {
        layout
            .masked_contribution(values, &self.secrets[i], &self.codes[i], peers, ctx)
            .expect("a member's contribution")
    }

    fn mask_of(&self, i: usize, ctx: &MaskContext, words: usize) -> Vec<u64> {
        mask(&self.secrets[i], &self.codes[i], &self.peers(i), ctx, words).expect("a mask")
    }
}

fn random_values(rng: &mut ChaCha8Rng, cells: usize) -> Vec<u64> {
    (0..cells).map(|_| rng.next_u64()).collect()
}

fn wrapping_sum(rows: &[Vec<u64>]) -> Vec<u64> {
    let mut sum = vec![0u64; rows[0].len()];
    for row in rows {
        for (s, v) in sum.iter_mut().zip(row) {
            *s = s.wrapping_add(*v);
        }
    }
    sum
}

#[test]
fn masks_of_three_four_and_five_members_cancel_exactly() {
    for n in 3..=5 {
        let pool = pool(n, n as u64);
        let layout = Layout::new(257).expect("layout");
        let mut rng = ChaCha8Rng::seed_from_u64(100 + n as u64);
        let values: Vec<Vec<u64>> = (0..n).map(|_| random_values(&mut rng, 257)).collect();
        let vectors: Vec<Vec<u64>> = (0..n)
            .map(|i| pool.contribution(&layout, i, &values[i]))
            .collect();
        assert_eq!(
            layout.unmask(&vectors).expect("the pool unmasks"),
            wrapping_sum(&values),
            "{n} members"
        );
        // The bare masks sum to zero in every word, the canary included.
        let masks: Vec<Vec<u64>> = (0..n)
            .map(|i| pool.mask_of(i, &pool.ctx, layout.words()))
            .collect();
        assert!(wrapping_sum(&masks).iter().all(|w| *w == 0), "{n} members");
        let raw = unmask_sum(&vectors).expect("sum");
        assert_eq!(raw.len(), layout.words());
        assert_eq!(check_canary(&raw), Ok(()));
    }
}

/// Each of the 64 bits is set in about half the words: a binomial(cells, 1/2) count within 6σ.
fn assert_uniform(words: &[u64], what: &str) {
    let cells = words.len() as f64;
    let sigma = (cells / 4.0).sqrt();
    for bit in 0..64 {
        let set = words.iter().filter(|w| (*w >> bit) & 1 == 1).count() as f64;
        assert!(
            (set - cells / 2.0).abs() < 6.0 * sigma,
            "{what}: bit {bit} set in {set} of {cells} words"
        );
    }
}

#[test]
fn each_masked_vector_alone_looks_uniform_and_hides_its_values() {
    let pool = pool(4, 11);
    let cells = 20_000;
    let layout = Layout::new(cells).expect("layout");
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    // Small counts, many of them zero: the worst case for a weak mask.
    let values: Vec<Vec<u64>> = (0..4)
        .map(|_| (0..cells).map(|_| rng.next_u64() % 8).collect())
        .collect();
    let vectors: Vec<Vec<u64>> = (0..4)
        .map(|i| pool.contribution(&layout, i, &values[i]))
        .collect();
    for (i, vector) in vectors.iter().enumerate() {
        assert_uniform(vector, &format!("member {i}'s masked vector"));
        let same = vector
            .iter()
            .zip(&values[i])
            .filter(|(m, v)| m == v)
            .count();
        assert_eq!(same, 0, "member {i}: a masked word equals its value");
        assert_ne!(vector[cells], 0, "member {i}: the canary is masked too");
    }
    // What a coordinator with all but one vector holds is uniform too.
    assert_uniform(
        &wrapping_sum(&vectors[..3]),
        "the sum of three of four vectors",
    );
    assert_eq!(
        layout.unmask(&vectors).expect("unmask"),
        wrapping_sum(&values)
    );
}

#[test]
fn every_field_of_the_context_changes_the_mask_but_member_order_does_not() {
    let pool = pool(4, 21);
    let words = 32;
    let base = pool.mask_of(0, &pool.ctx, words);
    let with = |project: &str, request: &str, plan: &str, layout: u8, params: u8| {
        MaskContext::new(
            project,
            request,
            plan,
            pool.codes.clone(),
            [layout; 32],
            [params; 32],
        )
        .expect("context")
    };
    let changed = [
        ("project", with("other-project", "req-42", "plan-abc", 7, 9)),
        (
            "request id",
            with("cancer-outcomes", "req-43", "plan-abc", 7, 9),
        ),
        (
            "plan fingerprint",
            with("cancer-outcomes", "req-42", "plan-abd", 7, 9),
        ),
        (
            "layout hash",
            with("cancer-outcomes", "req-42", "plan-abc", 8, 9),
        ),
        (
            "parameters hash",
            with("cancer-outcomes", "req-42", "plan-abc", 7, 10),
        ),
    ];
    for (what, ctx) in &changed {
        assert_ne!(&pool.mask_of(0, ctx, words), &base, "{what}");
        assert_ne!(ctx.to_bytes(), pool.ctx.to_bytes(), "{what}");
    }

    // Another member set (TQ04 replaced by TQ05 holding the same key) changes TQ01's mask.
    let mut other_codes = pool.codes.clone();
    other_codes[3] = "TQ05".to_string();
    let other_set = context(&other_codes);
    let mut peers = pool.peers(0);
    peers[2].0 = "TQ05".to_string();
    let other = mask(&pool.secrets[0], "TQ01", &peers, &other_set, words).expect("mask");
    assert_ne!(other, base, "member set");

    // The same members in any order are the same context and the same mask.
    let mut shuffled = pool.codes.clone();
    shuffled.reverse();
    shuffled.swap(0, 2);
    let same = context(&shuffled);
    assert_eq!(same, pool.ctx);
    assert_eq!(same.members(), pool.codes.as_slice());
    assert_eq!(same.to_bytes(), pool.ctx.to_bytes());
    assert_eq!(pool.mask_of(0, &same, words), base);
    // So are the peers in any order.
    let mut reordered = pool.peers(0);
    reordered.reverse();
    assert_eq!(
        mask(&pool.secrets[0], "TQ01", &reordered, &pool.ctx, words).expect("mask"),
        base
    );
}

#[test]
fn the_context_encoding_is_unambiguous() {
    let members: Vec<String> = ["TQ01", "TQ02", "TQ03"].map(String::from).to_vec();
    let a = MaskContext::new("ab", "c", "p", members.clone(), [0; 32], [0; 32]).expect("a");
    let b = MaskContext::new("a", "bc", "p", members.clone(), [0; 32], [0; 32]).expect("b");
    assert_ne!(a.to_bytes(), b.to_bytes());
    let joined: Vec<String> = ["TQ01", "TQ02TQ03", ""].map(String::from).to_vec();
    let c = MaskContext::new("ab", "c", "p", joined, [0; 32], [0; 32]).expect("c");
    assert_ne!(a.to_bytes(), c.to_bytes());
    assert_eq!(a.project(), "ab");
    assert_eq!(a.request_id(), "c");
    assert_eq!(a.plan_fingerprint(), "p");
    assert_eq!(a.layout_hash(), &[0; 32]);
    assert_eq!(a.parameters_hash(), &[0; 32]);
    assert!(a.contains("TQ02") && !a.contains("TQ04"));
}

#[test]
fn a_wrong_pinned_key_fails_the_canary() {
    let pool = pool(4, 31);
    let layout = Layout::new(16).expect("layout");
    let values = vec![3u64; 16];
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let impostor = secret(&mut rng);
    let vectors: Vec<Vec<u64>> = (0..4)
        .map(|i| {
            if i == 0 {
                // TQ01 pinned a fresh key for TQ03 instead of TQ03's own.
                let mut peers = pool.peers(0);
                peers[1].1 = impostor.public_key();
                pool.contribution_in(&layout, 0, &values, &peers, &pool.ctx)
            } else {
                pool.contribution(&layout, i, &values)
            }
        })
        .collect();
    assert_eq!(layout.unmask(&vectors), Err(PoolError::Canary));
    assert_eq!(
        check_canary(&unmask_sum(&vectors).expect("sum")),
        Err(PoolError::Canary)
    );
}

#[test]
fn a_missing_member_fails_the_canary() {
    for n in [4, 5] {
        let pool = pool(n, 40 + n as u64);
        let layout = Layout::new(8).expect("layout");
        let vectors: Vec<Vec<u64>> = (0..n)
            .map(|i| pool.contribution(&layout, i, &[1; 8]))
            .collect();
        for missing in 0..n {
            let mut partial = vectors.clone();
            partial.remove(missing);
            assert_eq!(
                layout.unmask(&partial),
                Err(PoolError::Canary),
                "{n}/{missing}"
            );
        }
    }
}

#[test]
fn members_that_disagree_on_the_parameters_fail_the_canary() {
    let pool = pool(3, 51);
    let layout = Layout::new(4).expect("layout");
    let lax = MaskContext::new(
        "cancer-outcomes",
        "req-42",
        "plan-abc",
        pool.codes.clone(),
        [7; 32],
        [0; 32],
    )
    .expect("context");
    let vectors = vec![
        pool.contribution(&layout, 0, &[1; 4]),
        pool.contribution_in(&layout, 1, &[1; 4], &pool.peers(1), &lax),
        pool.contribution(&layout, 2, &[1; 4]),
    ];
    assert_eq!(layout.unmask(&vectors), Err(PoolError::Canary));
}

#[test]
fn counts_pool_as_twos_complement() {
    let pool = pool(3, 61);
    let layout = Layout::new(2).expect("layout");
    let counts = [[5i64, -2], [0, -7], [12, 4]];
    let vectors: Vec<Vec<u64>> = (0..3)
        .map(|i| {
            let words: Vec<u64> = counts[i].iter().map(|c| encode_count(*c)).collect();
            pool.contribution(&layout, i, &words)
        })
        .collect();
    let sum = layout.unmask(&vectors).expect("unmask");
    assert_eq!(decode_count(sum[0]), 17);
    assert_eq!(decode_count(sum[1]), -5);
}

#[test]
fn fixed_point_round_trips_within_the_grid_and_clamps() {
    let scale_bits = 16;
    let half_step = 0.5 / f64::from(1u32 << scale_bits);
    let fp = FixedPoint::new(0.0, 120.0, scale_bits, 1_000_000).expect("fixed point");
    assert_eq!(fp.resolution(), 2f64.powi(-16));
    assert_eq!(
        (fp.lower(), fp.upper(), fp.scale_bits(), fp.max_rows()),
        (0.0, 120.0, 16, 1_000_000)
    );
    let mut rng = ChaCha8Rng::seed_from_u64(71);
    let xs: Vec<f64> = (0..3_000)
        .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 160.0 - 20.0)
        .collect();
    for x in &xs {
        let word = fp.encode(*x).expect("encode");
        assert!(
            (fp.decode(word) - x.clamp(0.0, 120.0)).abs() <= half_step,
            "{x}"
        );
        assert_eq!(
            word,
            encode_fixed(*x, 0.0, 120.0, scale_bits).expect("encode")
        );
    }
    assert_eq!(fp.decode(fp.encode(-5.0).expect("encode")), 0.0);
    assert_eq!(fp.decode(fp.encode(1e300).expect("encode")), 120.0);
    assert_eq!(fp.decode(fp.encode(f64::INFINITY).expect("encode")), 120.0);
    assert_eq!(
        fp.decode(fp.encode(f64::NEG_INFINITY).expect("encode")),
        0.0
    );

    // Pooled over three members, the sum is within half a step per row of the clamped sum.
    let pool = pool(3, 72);
    let layout = Layout::new(1).expect("layout");
    let vectors: Vec<Vec<u64>> = xs
        .chunks(1_000)
        .enumerate()
        .map(|(i, chunk)| {
            let word = chunk
                .iter()
                .map(|x| fp.encode(*x).expect("encode"))
                .fold(0u64, u64::wrapping_add);
            pool.contribution(&layout, i, &[word])
        })
        .collect();
    let pooled = fp.decode(layout.unmask(&vectors).expect("unmask")[0]);
    let exact: f64 = xs.iter().map(|x| x.clamp(0.0, 120.0)).sum();
    assert!((pooled - exact).abs() <= xs.len() as f64 * half_step + 1e-9);

    // Negative bounds: the wrapped sum reads back negative.
    let signed = FixedPoint::new(-10.0, 10.0, 8, 100).expect("fixed point");
    let sum = [-9.5, -10.0, 3.25]
        .iter()
        .map(|x| signed.encode(*x).expect("encode"))
        .fold(0u64, u64::wrapping_add);
    assert_eq!(signed.decode(sum), -16.25);
    assert_eq!(decode_fixed(sum, 8), Ok(-16.25));
}

#[test]
fn fixed_point_refuses_rows_that_could_overflow() {
    // One row of 1 at no fraction bits is one unit: i64::MAX rows fit, one more does not.
    assert!(FixedPoint::new(0.0, 1.0, 0, i64::MAX as u64).is_ok());
    assert_eq!(
        FixedPoint::new(0.0, 1.0, 0, i64::MAX as u64 + 1),
        Err(PoolError::FixedPointOverflow {
            max_rows: i64::MAX as u64 + 1,
            scale_bits: 0
        })
    );
    // 1e6 × 2^40 per row ≈ 1.1e18: eight rows overflow.
    assert!(FixedPoint::new(-1e6, 1e6, 40, 8).is_ok());
    assert!(matches!(
        FixedPoint::new(-1e6, 1e6, 40, 9),
        Err(PoolError::FixedPointOverflow { max_rows: 9, .. })
    ));
    // A single row that cannot fit, and bounds whose scaling is infinite.
    assert!(matches!(
        encode_fixed(1.0, 0.0, 4.0, 62),
        Err(PoolError::FixedPointOverflow { .. })
    ));
    assert!(matches!(
        FixedPoint::new(0.0, f64::MAX, 62, 1),
        Err(PoolError::FixedPointOverflow { .. })
    ));
}

#[test]
fn public_keys_read_and_write_hex_and_base64() {
    let mut rng = ChaCha8Rng::seed_from_u64(81);
    let key = secret(&mut rng).public_key();
    let b64 = key.to_base64();
    assert_eq!(b64.len(), 44);
    assert_eq!(key.to_string(), b64);
    assert_eq!(key.to_hex().len(), 64);
    assert_eq!(b64.parse::<PoolPublicKey>(), Ok(key));
    assert_eq!(key.to_hex().parse::<PoolPublicKey>(), Ok(key));
    assert_eq!(
        key.to_hex().to_uppercase().parse::<PoolPublicKey>(),
        Ok(key)
    );
    assert_eq!(format!("  {b64}\n").parse::<PoolPublicKey>(), Ok(key));
    assert_eq!(PoolPublicKey::from_bytes(*key.as_bytes()), key);
    assert!(format!("{key:?}").contains(&b64));
    for bad in [
        "",
        "not a key",
        &key.to_hex()[..62],
        &"zz".repeat(32),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==", // 31 bytes
        &format!("{b64}AAAA"),
    ] {
        assert_eq!(
            bad.parse::<PoolPublicKey>(),
            Err(PoolError::InvalidPublicKey),
            "{bad:?}"
        );
    }
}

#[test]
fn a_secrets_debug_shows_only_its_public_key() {
    let bytes = [0x5au8; 32];
    let secret = PoolSecret::from_bytes(bytes).expect("secret");
    let shown = format!("{secret:?} {secret:#?}");
    let public = secret.public_key().to_base64();
    assert!(shown.contains(&public));
    let rest = shown.replace(&public, "");
    assert!(!rest.to_lowercase().contains("5a5a"));
    assert!(
        !rest.contains("90"),
        "0x5a in decimal, as an array would print"
    );
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    assert!(!rest.contains(&b64[..8]));
}

#[test]
fn every_error_is_reached() {
    let pool = pool(4, 91);
    let words = 4;
    let codes = |list: &[&str]| list.iter().map(|c| c.to_string()).collect::<Vec<_>>();

    assert_eq!(
        PoolSecret::from_bytes([0; 32]).err(),
        Some(PoolError::WeakSecret)
    );
    assert_eq!(
        MaskContext::new("p", "r", "f", codes(&["TQ02", "TQ01"]), [0; 32], [0; 32]),
        Err(PoolError::TooFewMembers {
            count: 2,
            min: MIN_MEMBERS
        })
    );
    assert_eq!(
        MaskContext::new(
            "p",
            "r",
            "f",
            codes(&["TQ02", "TQ01", "TQ03", "TQ02"]),
            [0; 32],
            [0; 32]
        ),
        Err(PoolError::DuplicateMember {
            member: "TQ02".into()
        })
    );
    // A duplicate does not count towards the minimum.
    assert!(matches!(
        MaskContext::new("p", "r", "f", codes(&["A", "B", "A"]), [0; 32], [0; 32]),
        Err(PoolError::DuplicateMember { .. })
    ));

    let peers = pool.peers(0);
    let own = &pool.secrets[0];
    assert_eq!(
        mask(own, "TQ09", &peers, &pool.ctx, words),
        Err(PoolError::NotAMember {
            member: "TQ09".into()
        })
    );
    let mut stranger = peers.clone();
    stranger.push(("TQ09".into(), own.public_key()));
    assert_eq!(
        mask(own, "TQ01", &stranger, &pool.ctx, words),
        Err(PoolError::UnknownPeer {
            member: "TQ09".into()
        })
    );
    let mut itself = peers.clone();
    itself.push(("TQ01".into(), own.public_key()));
    assert_eq!(
        mask(own, "TQ01", &itself, &pool.ctx, words),
        Err(PoolError::UnknownPeer {
            member: "TQ01".into()
        })
    );
    let mut twice = peers.clone();
    twice.push(peers[1].clone());
    assert_eq!(
        mask(own, "TQ01", &twice, &pool.ctx, words),
        Err(PoolError::DuplicatePeer {
            member: "TQ03".into()
        })
    );
    assert_eq!(
        mask(own, "TQ01", &peers[..2], &pool.ctx, words),
        Err(PoolError::MissingPeerKey {
            member: "TQ04".into()
        })
    );
    // u = 0 and u = 1 are low-order points: any clamped scalar takes them to the identity.
    for low in [[0u8; 32], {
        let mut one = [0u8; 32];
        one[0] = 1;
        one
    }] {
        let mut weak = peers.clone();
        weak[2].1 = PoolPublicKey::from_bytes(low);
        assert_eq!(
            mask(own, "TQ01", &weak, &pool.ctx, words),
            Err(PoolError::LowOrderKey {
                member: "TQ04".into()
            })
        );
    }

    assert_eq!(
        Layout::new(usize::MAX),
        Err(PoolError::TooManyCells { cells: usize::MAX })
    );
    let layout = Layout::new(3).expect("layout");
    assert_eq!(layout.cells(), 3);
    assert_eq!(layout.words(), 4);
    assert_eq!(
        layout.vector(&[1, 2]),
        Err(PoolError::LengthMismatch {
            expected: 3,
            found: 2
        })
    );
    assert_eq!(layout.vector(&[1, 2, 3]), Ok(vec![1, 2, 3, 0]));
    assert_eq!(
        masked(&[1, 2], &[1, 2, 3]),
        Err(PoolError::LengthMismatch {
            expected: 3,
            found: 2
        })
    );
    assert_eq!(masked(&[1, 2], &[u64::MAX, 3]), Ok(vec![0, 5]));
    assert_eq!(
        unmask_sum(&[vec![1, 2], vec![3, 4], vec![5]]),
        Err(PoolError::LengthMismatch {
            expected: 2,
            found: 1
        })
    );
    assert_eq!(
        unmask_sum(&[vec![1, 2], vec![3, 4]]),
        Err(PoolError::TooFewMembers {
            count: 2,
            min: MIN_MEMBERS
        })
    );
    assert_eq!(
        layout.unmask(&[vec![0; 3], vec![0; 3], vec![0; 3]]),
        Err(PoolError::LengthMismatch {
            expected: 4,
            found: 3
        })
    );
    assert_eq!(check_canary(&[]), Err(PoolError::Canary));
    assert_eq!(check_canary(&[5, 1]), Err(PoolError::Canary));
    assert_eq!(check_canary(&[5, 0]), Ok(()));

    for (lower, upper) in [
        (f64::NAN, 1.0),
        (0.0, f64::INFINITY),
        (f64::NEG_INFINITY, 0.0),
        (2.0, 1.0),
    ] {
        assert_eq!(
            FixedPoint::new(lower, upper, 8, 10),
            Err(PoolError::InvalidBounds),
            "[{lower}, {upper}]"
        );
    }
    assert_eq!(
        FixedPoint::new(0.0, 1.0, 63, 1),
        Err(PoolError::ScaleBits {
            scale_bits: 63,
            max: 62
        })
    );
    assert!(matches!(
        decode_fixed(0, 63),
        Err(PoolError::ScaleBits { .. })
    ));
    assert_eq!(
        encode_fixed(f64::NAN, 0.0, 1.0, 8),
        Err(PoolError::NotANumber)
    );
    // FixedPointOverflow, InvalidPublicKey, Canary and Derive: the tests above and the unit
    // test in src/mask.rs.
}

/// Pins the derivation, so a change to the encoding, the salt or the stream (which would
/// split a federation running two versions) fails here. The words were checked against an
/// independent implementation (Python `cryptography` 48: X25519, HKDF-SHA256, and the RFC 8439
/// ChaCha20 keystream at nonce 0 read as little-endian u64s).
#[test]
fn masks_match_the_pinned_derivation() {
    let secrets: Vec<PoolSecret> = (1u8..=3)
        .map(|b| PoolSecret::from_bytes([b; 32]).expect("secret"))
        .collect();
    assert_eq!(
        secrets[0].public_key().to_hex(),
        "a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209"
    );
    let codes: Vec<String> = ["TQ01", "TQ02", "TQ03"].map(String::from).to_vec();
    let ctx = MaskContext::new("kat", "r1", "f1", codes.clone(), [1; 32], [2; 32]).expect("ctx");
    let peers: Vec<(String, PoolPublicKey)> = (1..3)
        .map(|j| (codes[j].clone(), secrets[j].public_key()))
        .collect();
    assert_eq!(
        mask(&secrets[0], "TQ01", &peers, &ctx, 3).expect("mask"),
        vec![
            9_131_753_563_190_596_976,
            13_627_369_084_480_229_823,
            717_556_511_218_901_606
        ]
    );
}
