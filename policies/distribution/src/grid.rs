//! The public grid of value bins a column's percentiles are read from, and the estimate.

/// The most bins one column's grid may have: its state is a vector this long per group.
pub const MAX_BINS: usize = 10_000;

/// Why a grid cannot be made from a column's bounds and bin width.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GridError {
    /// Bounds that are not finite with lower < upper, or a width that is not positive.
    #[error("a histogram needs finite bounds with lower < upper and a positive bin width")]
    Invalid,
    /// More bins than [`MAX_BINS`].
    #[error("a histogram may have at most {MAX_BINS} bins; widen its bins")]
    TooMany,
}

/// Bins of `width` from `lower`: bin b holds values in [lower + b·width, lower + (b+1)·width),
/// and values outside [lower, upper] count at the nearest bound. `upper` itself falls in the
/// last bin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BinGrid {
    lower: f64,
    upper: f64,
    width: f64,
    /// The column holds whole numbers, so a bin's rows are spread over the whole numbers in it.
    whole: bool,
    bins: usize,
}

impl BinGrid {
    /// The grid of a column with these public bounds and bin width.
    pub fn new(lower: f64, upper: f64, width: f64, whole: bool) -> Result<Self, GridError> {
        if !(lower.is_finite()
            && upper.is_finite()
            && lower < upper
            && width.is_finite()
            && width > 0.0)
        {
            return Err(GridError::Invalid);
        }
        let span = ((upper - lower) / width).floor();
        if !span.is_finite() || span >= MAX_BINS as f64 {
            return Err(GridError::TooMany);
        }
        // Within MAX_BINS, checked above.
        let bins = span as usize + 1;
        Ok(BinGrid {
            lower,
            upper,
            width,
            whole,
            bins,
        })
    }

    /// How many bins.
    pub fn bins(&self) -> usize {
        self.bins
    }

    /// The bin width.
    pub fn width(&self) -> f64 {
        self.width
    }

    /// The bounds `[lower, upper]`.
    pub fn bounds(&self) -> [f64; 2] {
        [self.lower, self.upper]
    }

    /// The bin of `x` (clamped to the bounds); `None` for NaN, which is not counted.
    pub fn bin(&self, x: f64) -> Option<usize> {
        if x.is_nan() {
            return None;
        }
        let x = x.clamp(self.lower, self.upper);
        let b = ((x - self.lower) / self.width).floor();
        // Non-negative and finite after the clamp.
        Some((b as usize).min(self.bins - 1))
    }

    /// The `j`-th (from 0) of `count` rows of bin `b`, spread evenly over the bin.
    fn spread(&self, b: usize, j: u64, count: u64) -> f64 {
        let start = self.lower + b as f64 * self.width;
        let position = (j as f64 + 0.5) / count as f64;
        if self.whole {
            let first = start.ceil();
            let last = ((start + self.width).ceil() - 1.0).min(self.upper.floor());
            first + (last - first).max(0.0) * position
        } else {
            let end = (start + self.width).min(self.upper);
            start + (end - start).max(0.0) * position
        }
    }

    /// The `i`-th (from 0) smallest row of the histogram `counts`.
    fn order_statistic(&self, counts: &[u64], i: u64) -> Option<f64> {
        let mut before = 0u64;
        for (b, &c) in counts.iter().enumerate() {
            if i < before.saturating_add(c) {
                return Some(self.spread(b, i - before, c));
            }
            before = before.saturating_add(c);
        }
        None
    }

    /// The `p`-th percentile (0 ≤ p ≤ 1) of the histogram `counts`, interpolated between order
    /// statistics as `percentile_cont` does; `None` for an empty histogram or a `counts` that
    /// is not this grid's.
    pub fn percentile(&self, counts: &[u64], p: f64) -> Option<f64> {
        if counts.len() != self.bins || !(0.0..=1.0).contains(&p) {
            return None;
        }
        let n: u64 = counts.iter().fold(0u64, |a, &c| a.saturating_add(c));
        if n == 0 {
            return None;
        }
        let h = p * (n - 1) as f64;
        let (below, above) = (h.floor(), h.ceil());
        let low = self.order_statistic(counts, below as u64)?;
        let high = self.order_statistic(counts, above as u64)?;
        Some(low + (h - below) * (high - low))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `percentile_cont` over the values themselves.
    fn exact(values: &[f64], p: f64) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let h = p * (v.len() - 1) as f64;
        let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
        v[lo] + (h - h.floor()) * (v[hi] - v[lo])
    }

    fn histogram(grid: &BinGrid, values: &[f64]) -> Vec<u64> {
        let mut counts = vec![0; grid.bins()];
        for &v in values {
            if let Some(b) = grid.bin(v) {
                counts[b] += 1;
            }
        }
        counts
    }

    #[test]
    fn whole_numbers_in_unit_bins_are_exact() {
        let grid = BinGrid::new(2.0, 10.0, 1.0, true).expect("grid");
        assert_eq!(grid.bins(), 9);
        let values = [6.0, 7.0, 7.0, 9.0, 3.0, 10.0, 6.0, 8.0];
        let counts = histogram(&grid, &values);
        for p in [0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 1.0] {
            let got = grid.percentile(&counts, p).expect("percentile");
            assert!((got - exact(&values, p)).abs() < 1e-12, "p={p}: {got}");
        }
    }

    #[test]
    fn wider_bins_stay_within_one_bin() {
        let grid = BinGrid::new(0.0, 110.0, 5.0, true).expect("grid");
        let values: Vec<f64> = (0..997).map(|i| ((i * 37) % 101) as f64).collect();
        let counts = histogram(&grid, &values);
        for p in [0.05, 0.5, 0.95] {
            let got = grid.percentile(&counts, p).expect("percentile");
            assert!((got - exact(&values, p)).abs() <= 5.0, "p={p}: {got}");
        }
        let grid = BinGrid::new(30.0, 200.0, 5.0, false).expect("grid");
        let values: Vec<f64> = (0..500)
            .map(|i| 30.0 + (i as f64 * 0.731) % 170.0)
            .collect();
        let counts = histogram(&grid, &values);
        let got = grid.percentile(&counts, 0.5).expect("percentile");
        assert!((got - exact(&values, 0.5)).abs() <= 5.0, "{got}");
    }

    #[test]
    fn values_outside_count_at_the_bounds() {
        let grid = BinGrid::new(0.0, 10.0, 5.0, false).expect("grid");
        assert_eq!(grid.bins(), 3);
        assert_eq!(grid.bin(-4.0), Some(0));
        assert_eq!(grid.bin(10.0), Some(2));
        assert_eq!(grid.bin(1e300), Some(2));
        assert_eq!(grid.bin(f64::NAN), None);
        // A clamped row at the upper bound reads as the bound itself.
        assert_eq!(grid.percentile(&[0, 0, 4], 0.5), Some(10.0));
        assert_eq!(grid.percentile(&[0, 0, 0], 0.5), None);
        assert_eq!(grid.percentile(&[1, 0], 0.5), None, "not this grid's");
    }

    #[test]
    fn bad_grids_are_errors() {
        assert_eq!(BinGrid::new(1.0, 1.0, 1.0, false), Err(GridError::Invalid));
        assert_eq!(BinGrid::new(0.0, 1.0, 0.0, false), Err(GridError::Invalid));
        assert_eq!(
            BinGrid::new(0.0, f64::MAX, 1e-300, false),
            Err(GridError::TooMany)
        );
        assert_eq!(
            BinGrid::new(0.0, 1.0, f64::NAN, false),
            Err(GridError::Invalid)
        );
    }
}
