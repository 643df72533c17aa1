//! Rényi DP of the Poisson-subsampled Gaussian mechanism (protocols/dp.md §4.1).
//!
//! For sampling rate `q` and noise multiplier `σ` (noise standard deviation
//! over L2 sensitivity), the RDP at order `α` is `ln(A_α) / (α - 1)` with
//! `A_α = E_{z ~ μ0}[(μ(z)/μ0(z))^α]`, `μ = (1-q) μ0 + q μ1` (Mironov, Talwar,
//! Zhang 2019). Integer orders sum a finite binomial series; fractional orders
//! split the integral at `z0 = σ² ln(1/q - 1) + 1/2` and sum two series of
//! error-function terms (§3.3 of that paper). Composition over `T` steps adds
//! the RDP. The conversion to `(ε, δ)` is Proposition 12 of Canonne, Kamath,
//! Steinke (2020):
//!
//! ```text
//! ε = min_α [ r(α) + ln(1 - 1/α) - ln(δ α) / (α - 1) ]
//! ```
//!
//! Orders, series and conversion follow Google's dp-accounting 0.6.0, against
//! which the fixtures in `tests/` check agreement to 1e-6 relative.

use crate::DpError;
use crate::special::{log_add, log_comb, log_erfc};

/// The default RDP orders: 1.1 to 10.9 in steps of 0.1, 11 to 63, and 128,
/// 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    let mut v: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    v.extend((11..64).map(f64::from));
    v.extend([128.0, 256.0, 512.0, 1024.0]);
    v
}

/// `ln A_α` for integer `α` and `0 < q < 1`.
fn log_a_int(q: f64, sigma: f64, alpha: u32) -> f64 {
    let log1mq = (-q).ln_1p();
    let lq = q.ln();
    let a = f64::from(alpha);
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let i = f64::from(i);
        let log_coef = log_comb(a, i) + i * lq + (a - i) * log1mq;
        log_a = log_add(log_a, log_coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    log_a
}

/// Iterations after which a fractional-order series is declared divergent.
const MAX_FRAC_STEPS: u32 = 1000;

/// `ln A_α` for fractional `α` and `0 < q < 1`; infinite if the series does
/// not settle (the order is then useless and skipped by the minimum).
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let lq = q.ln();
    let s2 = std::f64::consts::SQRT_2 * sigma;
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..MAX_FRAC_STEPS {
        let i = f64::from(i);
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * lq + j * log1mq;
        let log_t1 = log_coef + j * lq + i * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / s2);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / s2);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// RDP of one step of the Poisson-subsampled Gaussian at order `alpha`.
pub fn subsampled_gaussian(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if alpha.is_infinite() || sigma == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 && alpha <= f64::from(u32::MAX) {
        log_a_int(q, sigma, alpha as u32)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// The RDP curve of `steps` compositions at `orders`.
pub fn compose(q: f64, sigma: f64, steps: u64, orders: &[f64]) -> Vec<f64> {
    orders
        .iter()
        .map(|&a| steps as f64 * subsampled_gaussian(q, sigma, a))
        .collect()
}

/// The smallest `ε` the RDP curve gives at `delta`, and its order.
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64), DpError> {
    if delta.is_nan() || delta < 0.0 {
        return Err(DpError::BadDelta(delta));
    }
    if orders.len() != rdp.len() || orders.is_empty() {
        return Err(DpError::Internal("orders and RDP values differ in length"));
    }
    if delta == 0.0 {
        return Ok(if rdp.iter().all(|&r| r == 0.0) {
            (0.0, 0.0)
        } else {
            (f64::INFINITY, 0.0)
        });
    }
    let mut best = (f64::INFINITY, orders[0]);
    for (&a, &r) in orders.iter().zip(rdp) {
        if a < 1.0 {
            return Err(DpError::Internal("RDP order below 1"));
        }
        let eps = if r < 0.0 {
            0.0
        } else if delta * delta + (-r).exp_m1() > 0.0 {
            // δ >= sqrt(1 - exp(-KL)) already: ε = 0 suffices.
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// The smallest `δ` the RDP curve gives at `epsilon`, and its order.
pub fn delta(orders: &[f64], rdp: &[f64], epsilon: f64) -> Result<(f64, f64), DpError> {
    if epsilon.is_nan() || epsilon < 0.0 {
        return Err(DpError::BadEpsilon(epsilon));
    }
    if orders.len() != rdp.len() || orders.is_empty() {
        return Err(DpError::Internal("orders and RDP values differ in length"));
    }
    let mut best = (f64::INFINITY, orders[0]);
    for (&a, &r) in orders.iter().zip(rdp) {
        let mut log_delta = if r <= 0.0 {
            f64::NEG_INFINITY
        } else {
            0.5 * (-(-r).exp()).ln_1p()
        };
        if a > 1.01 {
            let bound = (a - 1.0) * (r - epsilon + (-1.0 / a).ln_1p()) - a.ln();
            log_delta = log_delta.min(bound);
        }
        if log_delta < best.0 {
            best = (log_delta, a);
        }
    }
    Ok((best.0.exp().min(1.0), best.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_participation_is_the_gaussian_rdp() {
        for a in [1.5, 2.0, 10.0, 64.0] {
            assert_eq!(subsampled_gaussian(1.0, 2.0, a), a / 8.0);
        }
        assert_eq!(subsampled_gaussian(0.0, 2.0, 3.0), 0.0);
        assert_eq!(subsampled_gaussian(0.5, 0.0, 3.0), f64::INFINITY);
    }

    #[test]
    fn integer_and_fractional_series_agree_at_integers() {
        // The fractional series is valid for every real order; at an integer
        // order it must reproduce the finite binomial sum.
        for (q, sigma) in [(0.01, 1.1), (0.1, 2.0), (0.5, 0.8)] {
            for a in [2u32, 3, 7, 20] {
                let int = log_a_int(q, sigma, a);
                let frac = log_a_frac(q, sigma, f64::from(a));
                assert!(
                    (int - frac).abs() < 1e-9 * int.abs().max(1.0),
                    "{q} {sigma} {a}: {int} {frac}"
                );
            }
        }
    }

    #[test]
    fn design_sanity_point() {
        // design.md §2: σ=1.1, q=0.01, T=1000, δ=1e-5 gives RDP ε ≈ 1.71.
        let orders = default_orders();
        let rdp = compose(0.01, 1.1, 1000, &orders);
        let (eps, _) = epsilon(&orders, &rdp, 1e-5).unwrap();
        assert!((eps - 1.71).abs() < 0.01, "{eps}");
        let (d, _) = delta(&orders, &rdp, eps).unwrap();
        assert!(d <= 1.0001e-5 && d > 0.5e-5, "{d}");
    }
}
