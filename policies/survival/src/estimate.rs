//! The Kaplan–Meier estimate from interval counts, with Greenwood's variance and log-log
//! (exponential Greenwood) 95% intervals, as `lifelines` computes them.

/// The 97.5% point of the standard normal.
const Z_975: f64 = 1.959_963_984_540_054;

/// One stratum's counts over a grid: rows counted, and per interval events and censorings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows counted (past the horizon too: they stay at risk throughout).
    pub n: u64,
    /// Events per interval.
    pub events: Vec<u64>,
    /// Censorings per interval.
    pub censored: Vec<u64>,
}

/// One interval of a curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// At risk at the interval's start.
    pub at_risk: u64,
    /// Events in it.
    pub events: u64,
    /// Censorings in it.
    pub censored: u64,
    /// Survival at its end.
    pub survival: f64,
    /// The 95% interval's lower end.
    pub lower_95: f64,
    /// Its upper end.
    pub upper_95: f64,
}

/// The curve, one step per interval. Counts that protection made inconsistent (more events
/// than at risk) are read as far as they go: at risk never below zero, survival never below 0.
pub fn curve(counts: &Counts) -> Vec<Step> {
    let mut at_risk = counts.n;
    let mut survival = 1.0f64;
    let mut greenwood = 0.0f64;
    let mut steps = Vec::with_capacity(counts.events.len());
    for (k, &events) in counts.events.iter().enumerate() {
        let censored = counts.censored.get(k).copied().unwrap_or(0);
        let d = events.min(at_risk);
        if at_risk > 0 && d > 0 {
            let (r, d) = (at_risk as f64, d as f64);
            survival *= 1.0 - d / r;
            greenwood += if r > d {
                d / (r * (r - d))
            } else {
                f64::INFINITY
            };
        }
        let (lower_95, upper_95) = bounds(survival, greenwood);
        steps.push(Step {
            at_risk,
            events,
            censored,
            survival,
            lower_95,
            upper_95,
        });
        at_risk = at_risk.saturating_sub(events.saturating_add(censored));
    }
    steps
}

/// Survival at the end of the last interval, with its 95% interval.
pub fn survival(counts: &Counts) -> Step {
    curve(counts).last().copied().unwrap_or(Step {
        at_risk: counts.n,
        events: 0,
        censored: 0,
        survival: 1.0,
        lower_95: 1.0,
        upper_95: 1.0,
    })
}

/// The log-log interval: exp(−exp(log(−log S) ∓ z·√V / log S)) with V Greenwood's sum; 1 while
/// no one has died, 0 once survival is 0 (where `lifelines` leaves it undefined).
fn bounds(survival: f64, greenwood: f64) -> (f64, f64) {
    if survival >= 1.0 {
        return (1.0, 1.0);
    }
    if survival <= 0.0 || !greenwood.is_finite() {
        return (0.0, 0.0);
    }
    let v = survival.ln();
    let spread = Z_975 * greenwood.sqrt() / v;
    let at = |s: f64| (-((-v).ln() + s).exp()).exp();
    (at(-spread), at(spread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaplan_meier_by_hand() {
        // 10 at risk; interval 1: 2 deaths, 1 censored; interval 2: 1 death; 6 past the end.
        let c = Counts {
            n: 10,
            events: vec![2, 1],
            censored: vec![1, 0],
        };
        let steps = curve(&c);
        assert_eq!(steps[0].at_risk, 10);
        assert_eq!(steps[1].at_risk, 7);
        assert!((steps[0].survival - 0.8).abs() < 1e-12);
        assert!((steps[1].survival - 0.8 * 6.0 / 7.0).abs() < 1e-12);
        // Greenwood: S² Σ d / (r (r − d)); the log-log interval holds S.
        for s in &steps {
            assert!(s.lower_95 < s.survival && s.survival < s.upper_95);
            assert!(s.lower_95 > 0.0 && s.upper_95 < 1.0);
        }
        let v: f64 = 0.8f64.ln();
        let g: f64 = 2.0 / (10.0 * 8.0);
        let lower = (-((-v).ln() - Z_975 * g.sqrt() / v).exp()).exp();
        assert!((steps[0].lower_95 - lower).abs() < 1e-12);
    }

    #[test]
    fn inconsistent_counts_stay_in_range() {
        let c = Counts {
            n: 3,
            events: vec![5, 2],
            censored: vec![0, 0],
        };
        let steps = curve(&c);
        assert_eq!(steps[0].survival, 0.0);
        assert_eq!(steps[1].at_risk, 0);
        assert_eq!(steps[1].survival, 0.0);
        assert_eq!((steps[1].lower_95, steps[1].upper_95), (0.0, 0.0));
        let none = survival(&Counts::default());
        assert_eq!(none.survival, 1.0);
    }
}
