//! The cell-key method (issue 16): a public perturbation table maps a cell's count and its
//! cell key to a small, unbiased adjustment.
//!
//! Every patient carries a fixed random record key; a cell's key is the sum of its patients'
//! record keys mod 1. The same set of patients always gets the same key, whatever the wording
//! of the query, so asking again averages nothing away; two cells that differ by one patient
//! get unrelated keys, so differencing yields noise. Keys are held as `u64` fractions of
//! 2⁶⁴: wrapping addition is addition mod 1, exactly and in any order, so keys pool across
//! partitions and trusts like counts.
//!
//! The table follows the ABS / Destatis construction: for each count `n` a distribution of
//! adjustments `d` in `[-min(n, D), D]` with mean 0 and variance `V` (or the largest the
//! support allows), and the adjustment is its quantile at the cell key. Zero stays zero: an
//! empty cell has no patients, so no key, and nothing to protect.

use thiserror::Error;

use crate::policy::CellKeyRules;

/// A record's or a cell's key: a fraction of 2⁶⁴ in [0, 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CellKey(pub u64);

/// The key of a cell holding both cells' records: addition mod 1.
impl std::ops::Add for CellKey {
    type Output = CellKey;

    fn add(self, other: CellKey) -> CellKey {
        CellKey(self.0.wrapping_add(other.0))
    }
}

impl std::iter::Sum for CellKey {
    fn sum<I: Iterator<Item = CellKey>>(keys: I) -> CellKey {
        keys.fold(CellKey::default(), |a, b| a + b)
    }
}

impl CellKey {
    /// A second key from this one, for a second draw that must not follow the first (a sum's
    /// adjustment beside its count's): SplitMix64's finaliser of the key and `stream`, so the
    /// same cell always gets the same one.
    pub fn derived(self, stream: u64) -> CellKey {
        let mut z = self.0 ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        CellKey(z ^ (z >> 31))
    }

    /// The key as a number in [0, 1).
    pub fn fraction(self) -> f64 {
        // 2⁻⁶⁴; rounding to f64 can give 1.0 only for keys within 2⁻⁵³ of 1, clamped below.
        (self.0 as f64 * (1.0 / 18_446_744_073_709_551_616.0)).min(1.0 - f64::EPSILON)
    }
}

/// Why a perturbation table cannot be built.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PTableError {
    /// The largest adjustment must be between 1 and [`MAX_PERTURBATION`].
    #[error("the cell-key method's largest adjustment must be between 1 and {MAX_PERTURBATION}")]
    MaxPerturbation,
    /// The variance must be positive and below the largest the support allows (D²).
    #[error(
        "the cell-key method's variance must be above 0 and below {0} (the largest adjustment squared)"
    )]
    Variance(f64),
    /// The magnitude step must be a fraction of the largest contribution.
    #[error("the cell-key method's magnitude scale must be above 0 and at most 1")]
    Scale,
}

/// Largest adjustment a table may use: beyond it counts stop being useful.
pub const MAX_PERTURBATION: u32 = 20;

/// A public perturbation table.
#[derive(Debug, Clone, PartialEq)]
pub struct PTable {
    max: u32,
    variance: f64,
    /// Row `n` (for counts `n < max`, and the last for every larger count): the adjustments
    /// from `-min(n, max)` up, and their cumulative probabilities.
    rows: Vec<Row>,
}

#[derive(Debug, Clone, PartialEq)]
struct Row {
    lowest: i64,
    cumulative: Vec<f64>,
}

impl PTable {
    /// The table with largest adjustment `max` (D) and variance `variance` (V): counts below D
    /// get the largest variance at most V their support `[-n, D]` allows with mean 0.
    pub fn new(max: u32, variance: f64) -> Result<Self, PTableError> {
        if max == 0 || max > MAX_PERTURBATION {
            return Err(PTableError::MaxPerturbation);
        }
        let d = f64::from(max);
        if !(variance > 0.0 && variance < d * d) {
            return Err(PTableError::Variance(d * d));
        }
        let rows = (0..=max)
            .map(|n| {
                if n == 0 {
                    return Row {
                        lowest: 0,
                        cumulative: vec![1.0],
                    };
                }
                let lowest = -i64::from(n.min(max));
                let support: Vec<f64> = (lowest..=i64::from(max)).map(|x| x as f64).collect();
                // The two-point distribution on the ends has the largest variance, n·D; keep
                // strictly inside it so the exponential family below reaches the target.
                let target = variance.min(0.95 * f64::from(n) * d);
                let probabilities = mean_zero_with_variance(&support, target);
                let mut running = 0.0;
                let mut cumulative: Vec<f64> = probabilities
                    .iter()
                    .map(|p| {
                        running += p;
                        running
                    })
                    .collect();
                if let Some(last) = cumulative.last_mut() {
                    *last = 1.0;
                }
                Row { lowest, cumulative }
            })
            .collect();
        Ok(PTable {
            max,
            variance,
            rows,
        })
    }

    /// The largest adjustment (D).
    pub fn max(&self) -> u32 {
        self.max
    }

    /// The variance asked for (V).
    pub fn variance(&self) -> f64 {
        self.variance
    }

    fn row(&self, count: u64) -> &Row {
        let index = usize::try_from(count.min(u64::from(self.max))).unwrap_or(usize::MAX);
        &self.rows[index.min(self.rows.len() - 1)]
    }

    /// The adjustment for a cell of `count` records with key `key`.
    pub fn adjustment(&self, count: u64, key: CellKey) -> i64 {
        let row = self.row(count);
        let u = key.fraction();
        let step = row.cumulative.partition_point(|&c| c <= u);
        row.lowest + i64::try_from(step.min(row.cumulative.len() - 1)).unwrap_or(0)
    }

    /// The perturbed count: never negative, zero for zero.
    pub fn perturb(&self, count: u64, key: CellKey) -> u64 {
        let adjusted = i128::from(count) + i128::from(self.adjustment(count, key));
        u64::try_from(adjusted.max(0)).unwrap_or(u64::MAX)
    }

    /// The distribution of adjustments for `count`: (adjustment, probability).
    pub fn distribution(&self, count: u64) -> Vec<(i64, f64)> {
        let row = self.row(count);
        let mut before = 0.0;
        row.cumulative
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let p = c - before;
                before = c;
                (row.lowest + i as i64, p)
            })
            .collect()
    }
}

/// The approved policy's two tables, ready to perturb: counts, and sums by the ABS
/// magnitude method.
#[derive(Debug, Clone, PartialEq)]
pub struct CellKeyTables {
    /// Integer adjustments of counts.
    pub counts: PTable,
    /// Steps of a sum's adjustment (its full-support row: sums are not bounded below by a
    /// count).
    pub magnitudes: PTable,
    /// One step, as a fraction of the cell's largest contribution.
    pub scale: f64,
}

/// Stream of [`CellKey::derived`] for sums.
const SUM_STREAM: u64 = 1;

/// Stream of [`CellKey::derived`] for counts (with the count mixed in).
const COUNT_STREAM: u64 = 2 << 62;

/// A sum's key mixes in the sum on this grid, in units of the largest contribution.
const SUM_GRID: f64 = 1.0 / 1_048_576.0;

impl CellKeyTables {
    /// The tables the rules describe.
    pub fn new(rules: &CellKeyRules) -> Result<Self, PTableError> {
        let scale = rules.magnitudes.scale;
        if !(scale > 0.0 && scale <= 1.0) {
            return Err(PTableError::Scale);
        }
        Ok(CellKeyTables {
            counts: PTable::new(rules.counts.max_adjustment, rules.counts.variance)?,
            magnitudes: PTable::new(rules.magnitudes.max_adjustment, rules.magnitudes.variance)?,
            scale,
        })
    }

    /// A released count: `count` records whose patients' cell key is `key`. The table is
    /// read at a key derived from the cell's and the count itself: the same patients with the
    /// same count (however the query is worded, `COUNT(age)` beside `COUNT(*)` when no age is
    /// missing) get the same adjustment, and the same patients with one more row (a second
    /// tumour) an unrelated one, so the difference is not that row.
    pub fn count(&self, count: u64, key: CellKey) -> u64 {
        self.counts
            .perturb(count, key.derived(COUNT_STREAM ^ count))
    }

    /// A released sum: `sum`, whose largest contribution (in absolute value) is `largest`,
    /// over records whose cell key is `key`. The step is drawn from the magnitude table with a
    /// key derived from the cell's, so it does not follow the count's adjustment.
    ///
    /// The key is also derived from the sum itself, on a grid of 2⁻²⁰ of the largest
    /// contribution (far coarser than the last bits a different order of floating-point
    /// addition could change, so asking again gives the same sum): the same patients with one
    /// more row get an unrelated step, and the difference is not that row's value.
    pub fn sum(&self, sum: f64, largest: f64, key: CellKey) -> f64 {
        let largest = largest.abs();
        let grid = if largest > 0.0 {
            (sum / (largest * SUM_GRID)).round()
        } else {
            0.0
        };
        // Saturating: a sum beyond i64's range on that grid is one cell of it.
        let cell = grid as i64 as u64;
        let steps = self.magnitudes.adjustment(
            u64::from(self.magnitudes.max()),
            key.derived(SUM_STREAM).derived(cell),
        );
        sum + steps as f64 * self.scale * largest
    }

    /// Bias and variance of the count table's adjustment, for counts 1 to D + 1 (every larger
    /// count has D + 1's): what `policy check` shows.
    pub fn count_moments(&self) -> Vec<(u64, f64, f64)> {
        (1..=u64::from(self.counts.max()) + 1)
            .map(|n| {
                let row = self.counts.distribution(n);
                let mean: f64 = row.iter().map(|(d, p)| *d as f64 * p).sum();
                let var: f64 = row
                    .iter()
                    .map(|(d, p)| (*d as f64 - mean).powi(2) * p)
                    .sum();
                (n, mean, var)
            })
            .collect()
    }
}

/// Probabilities on `support` ∝ exp(a·x + b·x²) with mean 0 and variance `target`: the
/// maximum-entropy distribution with those moments, found by nested bisection (the mean grows
/// with `a`, and at mean 0 the variance grows with `b`).
/// Halvings of each search interval: 400 / 2⁶⁴ is below f64's resolution, and a table builds
/// in well under a millisecond, so a release builds its own.
const BISECTIONS: usize = 64;

fn mean_zero_with_variance(support: &[f64], target: f64) -> Vec<f64> {
    let weights = |a: f64, b: f64| -> Vec<f64> {
        let exponents: Vec<f64> = support.iter().map(|&x| a * x + b * x * x).collect();
        let top = exponents.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let raw: Vec<f64> = exponents.iter().map(|e| (e - top).exp()).collect();
        let total: f64 = raw.iter().sum();
        raw.iter().map(|w| w / total).collect()
    };
    let moment =
        |p: &[f64], k: i32| -> f64 { p.iter().zip(support).map(|(p, x)| p * x.powi(k)).sum() };
    let centred = |b: f64| -> Vec<f64> {
        let (mut lo, mut hi) = (-200.0, 200.0);
        for _ in 0..BISECTIONS {
            let mid = 0.5 * (lo + hi);
            if moment(&weights(mid, b), 1) > 0.0 {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        weights(0.5 * (lo + hi), b)
    };
    let (mut lo, mut hi) = (-50.0, 50.0);
    for _ in 0..BISECTIONS {
        let mid = 0.5 * (lo + hi);
        if moment(&centred(mid), 2) > target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    centred(0.5 * (lo + hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PTable {
        PTable::new(5, 3.0).expect("table")
    }

    /// Keys spread evenly over [0, 1), as many patients' random keys are.
    fn grid(n: u64) -> impl Iterator<Item = CellKey> {
        let step = u64::MAX / n;
        (0..n).map(move |i| CellKey(i * step + step / 2))
    }

    #[test]
    fn every_row_is_a_distribution_with_mean_zero_and_the_variance_asked_or_the_most_it_allows() {
        let t = table();
        for count in 0..12u64 {
            let row = t.distribution(count);
            let total: f64 = row.iter().map(|(_, p)| p).sum();
            let mean: f64 = row.iter().map(|(d, p)| *d as f64 * p).sum();
            let var: f64 = row.iter().map(|(d, p)| (*d as f64).powi(2) * p).sum();
            assert!((total - 1.0).abs() < 1e-9, "{count}: {total}");
            assert!(mean.abs() < 1e-6, "{count}: mean {mean}");
            assert!(row.iter().all(|&(d, p)| p >= 0.0 && count as i64 + d >= 0));
            let want = if count == 0 {
                0.0
            } else {
                3.0f64.min(0.95 * count as f64 * 5.0)
            };
            assert!(
                (var - want).abs() < 1e-4,
                "{count}: variance {var}, want {want}"
            );
        }
    }

    #[test]
    fn perturbed_counts_are_unbiased_never_negative_and_zero_stays_zero() {
        let t = table();
        for count in 0..40u64 {
            let n = 100_000;
            let sum: u64 = grid(n).map(|k| t.perturb(count, k)).sum();
            let mean = sum as f64 / n as f64;
            assert!((mean - count as f64).abs() < 1e-3, "{count}: mean {mean}");
            assert!(grid(1000).all(|k| t.perturb(count, k) <= count + 5));
        }
        assert!(grid(1000).all(|k| t.perturb(0, k) == 0));
        assert_eq!(t.perturb(u64::MAX, CellKey(u64::MAX)), u64::MAX);
    }

    #[test]
    fn the_same_records_get_the_same_adjustment_in_any_order() {
        let t = table();
        let records: Vec<CellKey> = grid(37).map(|k| CellKey(k.0.rotate_left(17))).collect();
        let forward: CellKey = records.iter().copied().sum();
        let backward: CellKey = records.iter().rev().copied().sum();
        assert_eq!(forward, backward);
        // Split over two trusts (or partitions) and pooled.
        let (a, b) = records.split_at(11);
        assert_eq!(
            a.iter().copied().sum::<CellKey>() + b.iter().copied().sum::<CellKey>(),
            forward
        );
        assert_eq!(t.perturb(37, forward), t.perturb(37, backward));
    }

    #[test]
    fn cells_one_record_apart_get_unrelated_adjustments() {
        // Differencing: the adjustment of a cell and of the same cell plus one record are
        // uncorrelated over random keys, so the difference of two released counts is noise.
        let t = table();
        let n = 20_000u64;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let pairs: Vec<(f64, f64)> = (0..n)
            .map(|_| {
                let cell = CellKey(next());
                let one_more = cell + CellKey(next());
                (
                    t.adjustment(20, cell) as f64,
                    t.adjustment(21, one_more) as f64,
                )
            })
            .collect();
        let mean = |f: &dyn Fn(&(f64, f64)) -> f64| pairs.iter().map(f).sum::<f64>() / n as f64;
        let (mx, my) = (mean(&|p| p.0), mean(&|p| p.1));
        let cov = mean(&|p| (p.0 - mx) * (p.1 - my));
        let (vx, vy) = (mean(&|p| (p.0 - mx).powi(2)), mean(&|p| (p.1 - my).powi(2)));
        let correlation = cov / (vx * vy).sqrt();
        assert!(correlation.abs() < 0.05, "correlation {correlation}");
        // And the released difference is not the true difference of one most of the time.
        let exact = pairs
            .iter()
            .filter(|(a, b)| (21.0 + b) - (20.0 + a) == 1.0)
            .count();
        assert!(
            (exact as f64) < 0.4 * n as f64,
            "{exact} of {n} differences exact"
        );
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(PTable::new(0, 1.0), Err(PTableError::MaxPerturbation));
        assert_eq!(PTable::new(21, 1.0), Err(PTableError::MaxPerturbation));
        assert_eq!(PTable::new(2, 4.0), Err(PTableError::Variance(4.0)));
        assert_eq!(PTable::new(2, 0.0), Err(PTableError::Variance(4.0)));
        assert!(matches!(
            PTable::new(2, f64::NAN),
            Err(PTableError::Variance(_))
        ));
    }
}
