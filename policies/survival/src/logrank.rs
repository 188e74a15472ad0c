//! The log-rank test between arms, from each arm's interval counts: at every interval end
//! with a death, the deaths expected in each arm if all arms shared one hazard, against those
//! seen; with k arms the statistic is χ² on k − 1 degrees of freedom (as `lifelines`'
//! `logrank_test` and `multivariate_logrank_test` compute it, ties counted together).

use crate::estimate::Counts;

/// The test's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogRank {
    /// The χ² statistic.
    pub chi_square: f64,
    /// Its degrees of freedom: the arms compared, less one.
    pub degrees_of_freedom: u64,
    /// The probability of a statistic at least as large under equal hazards.
    pub p_value: f64,
}

/// The test between `arms` (each one stratum's counts over the same grid); `None` with fewer
/// than two arms or no death to compare. Counts protection made inconsistent are read as the
/// curve reads them: no arm's deaths above its at-risk, at-risk never below zero.
pub fn logrank(arms: &[Counts]) -> Option<LogRank> {
    let arms: Vec<&Counts> = arms.iter().filter(|a| a.n > 0).collect();
    let k = arms.len();
    if k < 2 {
        return None;
    }
    let intervals = arms.iter().map(|a| a.events.len()).max().unwrap_or(0);
    let mut at_risk: Vec<u64> = arms.iter().map(|a| a.n).collect();
    let mut observed_less_expected = vec![0.0f64; k];
    let mut variance = vec![vec![0.0f64; k]; k];
    let mut any_death = false;
    for t in 0..intervals {
        let deaths: Vec<u64> = arms
            .iter()
            .zip(&at_risk)
            .map(|(a, &r)| a.events.get(t).copied().unwrap_or(0).min(r))
            .collect();
        let r: u64 = at_risk.iter().sum();
        let d: u64 = deaths.iter().sum();
        if d > 0 && r > 0 {
            any_death = true;
            let (rf, df) = (r as f64, d as f64);
            for j in 0..k {
                let share = at_risk[j] as f64 / rf;
                observed_less_expected[j] += deaths[j] as f64 - df * share;
                if r > 1 {
                    let spread = df * (rf - df) / (rf - 1.0);
                    for l in 0..k {
                        let other = at_risk[l] as f64 / rf;
                        let same = if j == l { 1.0 } else { 0.0 };
                        variance[j][l] += spread * share * (same - other);
                    }
                }
            }
        }
        for (j, a) in arms.iter().enumerate() {
            let left =
                a.events.get(t).copied().unwrap_or(0) + a.censored.get(t).copied().unwrap_or(0);
            at_risk[j] = at_risk[j].saturating_sub(left);
        }
    }
    if !any_death {
        return None;
    }
    // The k × k covariance has rank k − 1: the statistic uses all arms but the last.
    let z = &observed_less_expected[..k - 1];
    let v: Vec<Vec<f64>> = variance[..k - 1]
        .iter()
        .map(|row| row[..k - 1].to_vec())
        .collect();
    let solved = solve(v, z.to_vec())?;
    let chi_square = z
        .iter()
        .zip(&solved)
        .map(|(a, b)| a * b)
        .sum::<f64>()
        .max(0.0);
    let degrees_of_freedom = (k - 1) as u64;
    Some(LogRank {
        chi_square,
        degrees_of_freedom,
        p_value: chi_square_survival(chi_square, degrees_of_freedom as f64),
    })
}

/// `x` with `a x = b`, by Gaussian elimination with partial pivoting; `None` when `a` is
/// singular (an arm whose every patient left before the first death).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (top, below) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (i, row) in below.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[col + 1 + i] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let rest: f64 = (row + 1..n).map(|c| a[row][c] * x[c]).sum();
        x[row] = (b[row] - rest) / a[row][row];
    }
    Some(x)
}

/// P(χ²_df ≥ x): the regularized upper incomplete gamma Q(df/2, x/2).
pub fn chi_square_survival(x: f64, df: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    upper_gamma(df / 2.0, x / 2.0)
}

/// Q(a, x), by its series below a + 1 and its continued fraction above (Numerical Recipes,
/// §6.2), to about 1e-14.
fn upper_gamma(a: f64, x: f64) -> f64 {
    let log_prefix = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut term, mut sum, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..1000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-16 {
                break;
            }
        }
        (1.0 - sum * log_prefix.exp()).clamp(0.0, 1.0)
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let step = d * c;
            h *= step;
            if (step - 1.0).abs() < 1e-16 {
                break;
            }
        }
        (log_prefix.exp() * h).clamp(0.0, 1.0)
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 − x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = G[1..]
        .iter()
        .enumerate()
        .fold(G[0], |s, (i, g)| s + g / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_square_tail_at_known_points() {
        // The 5% critical values of χ² on 1, 2 and 5 degrees of freedom.
        for (x, df) in [(3.841_458_820_694_124, 1.0), (5.991_464_547_107_979, 2.0)] {
            assert!(
                (chi_square_survival(x, df) - 0.05).abs() < 1e-12,
                "{x} {df}"
            );
        }
        assert!((chi_square_survival(11.070_497_693_516_351, 5.0) - 0.05).abs() < 1e-12);
        // df 2: Q = exp(−x/2) exactly.
        assert!((chi_square_survival(1.3, 2.0) - (-0.65f64).exp()).abs() < 1e-14);
        assert_eq!(chi_square_survival(0.0, 1.0), 1.0);
        assert!(chi_square_survival(400.0, 1.0) < 1e-80);
    }

    #[test]
    fn two_arms_by_hand() {
        // Interval 1: arm A 10 at risk, 2 deaths; arm B 10 at risk, 0 deaths.
        // Interval 2: A 8 at risk, 1 death; B 10 at risk, 1 death.
        let a = Counts {
            n: 10,
            events: vec![2, 1],
            censored: vec![0, 0],
        };
        let b = Counts {
            n: 10,
            events: vec![0, 1],
            censored: vec![0, 0],
        };
        let t = logrank(&[a.clone(), b.clone()]).expect("two arms with deaths");
        let e1 = 2.0 * 10.0 / 20.0 + 2.0 * 8.0 / 18.0;
        let v = 2.0 * 0.5 * 0.5 * 18.0 / 19.0 + 2.0 * (8.0 / 18.0) * (10.0 / 18.0) * 16.0 / 17.0;
        let chi = (3.0 - e1) * (3.0 - e1) / v;
        assert!((t.chi_square - chi).abs() < 1e-12, "{} {chi}", t.chi_square);
        assert_eq!(t.degrees_of_freedom, 1);
        // The test is symmetric in its arms.
        let swapped = logrank(&[b, a.clone()]).expect("test");
        assert!((swapped.chi_square - t.chi_square).abs() < 1e-12);
        // One arm, or no deaths, is no test.
        assert_eq!(logrank(std::slice::from_ref(&a)), None);
        let quiet = Counts {
            n: 5,
            events: vec![0, 0],
            censored: vec![1, 0],
        };
        assert_eq!(logrank(&[quiet.clone(), quiet]), None);
    }

    #[test]
    fn identical_arms_differ_by_nothing() {
        let a = Counts {
            n: 50,
            events: vec![5, 4, 3],
            censored: vec![1, 2, 0],
        };
        let t = logrank(&[a.clone(), a.clone(), a]).expect("test");
        assert!(t.chi_square.abs() < 1e-12);
        assert_eq!(t.degrees_of_freedom, 2);
        assert!((t.p_value - 1.0).abs() < 1e-12);
    }
}
