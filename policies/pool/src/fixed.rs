//! Values as words of Z_2^64: counts in two's complement, bounded sums in fixed point.

use crate::PoolError;

/// The most fraction bits fixed point takes (2^62 is the largest power of two below 2^63).
pub const MAX_SCALE_BITS: u32 = 62;

/// A count (or any signed integer state, such as a noisy count) as a word: two's complement,
/// so sums wrap exactly as i64 sums do.
pub fn encode_count(n: i64) -> u64 {
    n as u64
}

/// A pooled count word read back as the i64 it encodes.
pub fn decode_count(word: u64) -> i64 {
    word as i64
}

/// Fixed point for SUM of a bounded column: each value is clamped to `[lower, upper]` and
/// rounded to the nearest multiple of 2^-scale_bits, then stored as a two's-complement word.
///
/// **Range.** The pooled sum is exact, mod 2^64 read as i64, while
/// `max_rows × ceil(max(|lower|, |upper|) × 2^scale_bits) < 2^63`, where `max_rows` is the most
/// rows all members together can contribute to one cell; [`FixedPoint::new`] refuses settings
/// that could break this ([`PoolError::FixedPointOverflow`]). For example, ages in [0, 120] at
/// 16 fraction bits fit about 1.17 × 10^12 rows. Each row is off by at most 2^-(scale_bits+1)
/// from rounding (beyond clamping); [`FixedPoint::decode`] is exact while the sum word, read as
/// i64, is at most 2^53 in magnitude, and otherwise rounds to f64's 53 bits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    lower: f64,
    upper: f64,
    scale_bits: u32,
    max_rows: u64,
}

impl FixedPoint {
    /// Fixed point over `[lower, upper]` with `scale_bits` fraction bits, for sums of at most
    /// `max_rows` rows (0 is taken as 1).
    pub fn new(
        lower: f64,
        upper: f64,
        scale_bits: u32,
        max_rows: u64,
    ) -> Result<FixedPoint, PoolError> {
        if !lower.is_finite() || !upper.is_finite() || lower > upper {
            return Err(PoolError::InvalidBounds);
        }
        if scale_bits > MAX_SCALE_BITS {
            return Err(PoolError::ScaleBits {
                scale_bits,
                max: MAX_SCALE_BITS,
            });
        }
        let overflow = PoolError::FixedPointOverflow {
            max_rows,
            scale_bits,
        };
        // Scaling by a power of two is exact, so this is the largest |word| one row can give,
        // before rounding up.
        let per_row = lower.abs().max(upper.abs()) * scale(scale_bits);
        if !per_row.is_finite() || per_row >= TWO_TO_63 {
            return Err(overflow);
        }
        let per_row = per_row.ceil() as u128;
        let rows = u128::from(max_rows.max(1));
        if rows * per_row > i64::MAX as u128 {
            return Err(overflow);
        }
        Ok(FixedPoint {
            lower,
            upper,
            scale_bits,
            max_rows,
        })
    }

    /// The lower bound.
    pub fn lower(&self) -> f64 {
        self.lower
    }

    /// The upper bound.
    pub fn upper(&self) -> f64 {
        self.upper
    }

    /// The fraction bits.
    pub fn scale_bits(&self) -> u32 {
        self.scale_bits
    }

    /// The declared maximum rows.
    pub fn max_rows(&self) -> u64 {
        self.max_rows
    }

    /// The step of the grid, 2^-scale_bits.
    pub fn resolution(&self) -> f64 {
        1.0 / scale(self.scale_bits)
    }

    /// One value as a word: clamped to the bounds, rounded to the grid. NaN is refused rather
    /// than given a value; SQL NULLs are the caller's to leave out.
    pub fn encode(&self, x: f64) -> Result<u64, PoolError> {
        if x.is_nan() {
            return Err(PoolError::NotANumber);
        }
        let word = (x.clamp(self.lower, self.upper) * scale(self.scale_bits)).round();
        // `new` bounded |word| below 2^63, so the cast is exact.
        Ok(encode_count(word as i64))
    }

    /// A pooled sum word (of at most `max_rows` rows) back to the sum it encodes.
    pub fn decode(&self, sum: u64) -> f64 {
        decode_count(sum) as f64 / scale(self.scale_bits)
    }
}

/// One value in fixed point (see [`FixedPoint`]), checking only that a single row fits; pooled
/// sums should use [`FixedPoint::new`] with their maximum rows.
pub fn encode_fixed(x: f64, lower: f64, upper: f64, scale_bits: u32) -> Result<u64, PoolError> {
    FixedPoint::new(lower, upper, scale_bits, 1)?.encode(x)
}

/// A pooled fixed-point sum word back to the sum: read as i64, divided by 2^scale_bits.
pub fn decode_fixed(sum_word: u64, scale_bits: u32) -> Result<f64, PoolError> {
    if scale_bits > MAX_SCALE_BITS {
        return Err(PoolError::ScaleBits {
            scale_bits,
            max: MAX_SCALE_BITS,
        });
    }
    Ok(decode_count(sum_word) as f64 / scale(scale_bits))
}

/// 2^63, exactly.
const TWO_TO_63: f64 = 9_223_372_036_854_775_808.0;

/// 2^scale_bits, exactly (a power of two below 2^63 is an f64).
fn scale(scale_bits: u32) -> f64 {
    (1u64 << scale_bits.min(MAX_SCALE_BITS)) as f64
}
