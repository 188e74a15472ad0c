//! The public grid of time intervals a survival aggregate counts over.

/// Days between the default grid's interval ends.
pub const DEFAULT_INTERVAL_DAYS: i64 = 30;
/// Days the default curve runs to (5 years).
pub const DEFAULT_HORIZON_DAYS: i64 = 1825;
/// The most intervals one curve may have: its states are two vectors this long per group.
pub const MAX_INTERVALS: i64 = 2000;

/// Why a grid cannot be made from a call's arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GridError {
    /// The interval or horizon is zero or negative.
    #[error("the interval and the horizon must be positive numbers of days")]
    NotPositive,
    /// An interval, horizon or day count that is not a constant integer.
    #[error(
        "the interval, horizon and days of a survival aggregate must be constant whole numbers of days"
    )]
    NotConstant,
    /// Too few or too many arguments.
    #[error(
        "km_curve takes (start_date, end_date, event [, interval_days [, horizon_days]]), survival_at (start_date, end_date, event, days [, interval_days]) and logrank (start_date, end_date, event, arm [, interval_days [, horizon_days]])"
    )]
    Arguments,
    /// More intervals than [`MAX_INTERVALS`].
    #[error(
        "a curve may have at most {MAX_INTERVALS} intervals; widen the interval or shorten the horizon"
    )]
    TooMany,
}

/// Equal intervals of `span / parts` days, `intervals` of them. Widths are kept as a fraction
/// so `survival_at(…, 365)` can end its last interval exactly at day 365.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    span: i64,
    parts: i64,
    intervals: usize,
}

impl Grid {
    /// `km_curve`'s grid: intervals of `interval` days up to (and covering) `horizon`.
    pub fn curve(interval: i64, horizon: i64) -> Result<Self, GridError> {
        if interval <= 0 || horizon <= 0 {
            return Err(GridError::NotPositive);
        }
        // Rounded up without `horizon + interval - 1`, which overflows on a huge horizon.
        let intervals = horizon / interval + i64::from(horizon % interval != 0);
        if intervals > MAX_INTERVALS {
            return Err(GridError::TooMany);
        }
        Ok(Grid {
            span: interval,
            parts: 1,
            intervals: intervals as usize,
        })
    }

    /// `survival_at`'s grid: as many equal intervals of at least `interval` days as fit in
    /// `days` (at least one), so the last ends at `days` itself.
    pub fn at(days: i64, interval: i64) -> Result<Self, GridError> {
        if interval <= 0 || days <= 0 {
            return Err(GridError::NotPositive);
        }
        let parts = (days / interval).max(1);
        if parts > MAX_INTERVALS {
            return Err(GridError::TooMany);
        }
        Ok(Grid {
            span: days,
            parts,
            intervals: parts as usize,
        })
    }

    /// The number of intervals.
    pub fn intervals(&self) -> usize {
        self.intervals
    }

    /// The width of an interval in days.
    pub fn width_days(&self) -> f64 {
        self.span as f64 / self.parts as f64
    }

    /// The interval (from 0) a duration in days falls in, `None` past the last one.
    pub fn bin(&self, duration: i64) -> Option<usize> {
        if duration <= 0 {
            return Some(0);
        }
        // ceil(duration / width) − 1, in integers: width = span / parts.
        let k = (i128::from(duration) * i128::from(self.parts)).div_euclid(i128::from(self.span))
            + i128::from(
                (i128::from(duration) * i128::from(self.parts)) % i128::from(self.span) != 0,
            )
            - 1;
        usize::try_from(k).ok().filter(|&k| k < self.intervals)
    }

    /// Where interval `k` (from 0) ends, in days.
    pub fn end(&self, k: usize) -> f64 {
        (k as f64 + 1.0) * self.width_days()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_closed_at_their_end() {
        let g = Grid::curve(30, 1825).expect("test");
        assert_eq!(g.intervals(), 61);
        assert_eq!(g.bin(-4), Some(0));
        assert_eq!(g.bin(0), Some(0));
        assert_eq!(g.bin(1), Some(0));
        assert_eq!(g.bin(30), Some(0));
        assert_eq!(g.bin(31), Some(1));
        assert_eq!(g.bin(1830), Some(60));
        assert_eq!(g.bin(1831), None);
        assert_eq!(g.end(60), 1830.0);
    }

    #[test]
    fn a_horizon_grid_ends_at_the_horizon() {
        let g = Grid::at(365, 30).expect("test");
        assert_eq!(g.intervals(), 12);
        assert!((g.end(11) - 365.0).abs() < 1e-9);
        assert_eq!(g.bin(365), Some(11));
        assert_eq!(g.bin(366), None);
        // 365/12 = 30.42: day 30 is in the first interval, day 31 in the second.
        assert_eq!(g.bin(30), Some(0));
        assert_eq!(g.bin(31), Some(1));
        assert_eq!(Grid::at(10, 30).expect("test").intervals(), 1);
        assert_eq!(Grid::curve(0, 10), Err(GridError::NotPositive));
        assert_eq!(Grid::curve(1, 100_000), Err(GridError::TooMany));
        assert_eq!(Grid::curve(30, i64::MAX), Err(GridError::TooMany));
        assert_eq!(
            Grid::curve(i64::MAX, i64::MAX).map(|g| g.intervals()),
            Ok(1)
        );
        assert_eq!(Grid::at(i64::MAX, 1), Err(GridError::TooMany));
        // Durations anywhere in i64 fall in a bin or past the end, never overflow.
        let g = Grid::at(i64::MAX, i64::MAX / 2).expect("two parts");
        assert_eq!(g.bin(i64::MAX), Some(1));
        assert_eq!(Grid::curve(30, 60).expect("grid").bin(i64::MAX), None);
    }
}
