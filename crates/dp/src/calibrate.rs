//! Calibration: the smallest noise multiplier whose ε is within a target
//! (protocols/dp.md §4.4). ε falls as the noise multiplier grows, so a
//! bisection that always keeps its upper end on the valid side returns a
//! multiplier that reaches the target, within `tolerance` (relative) of the
//! smallest one.

use crate::mechanism::NoiseConfig;
use crate::{Accountant, DpError, SubsampledGaussian, check_delta, zcdp};

/// The largest noise multiplier calibration will consider.
pub const MAX_NOISE_MULTIPLIER: f64 = 1e4;

/// The smallest noise multiplier (within relative `tolerance`) at which
/// `steps` rounds at sampling rate `q` stay within `(target_epsilon, delta)`.
pub fn noise_multiplier(
    target_epsilon: f64,
    delta: f64,
    q: f64,
    steps: u64,
    accountant: Accountant,
    tolerance: f64,
) -> Result<f64, DpError> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(DpError::BadEpsilon(target_epsilon));
    }
    check_delta(delta)?;
    smallest_reaching(target_epsilon, tolerance, |sigma| {
        SubsampledGaussian {
            noise_multiplier: sigma,
            sampling_rate: q,
            steps,
        }
        .epsilon(delta, accountant)
    })
}

/// The smallest noise multiplier (within relative `tolerance`) whose
/// `epsilon_at` is at most `target_epsilon`, for any `epsilon_at` that
/// falls as the multiplier grows: the bracket doubles until its upper end
/// reaches the target, then bisects with the upper end always valid.
pub fn smallest_reaching(
    target_epsilon: f64,
    tolerance: f64,
    epsilon_at: impl Fn(f64) -> Result<f64, DpError>,
) -> Result<f64, DpError> {
    let mut hi = 1.0;
    while epsilon_at(hi)? > target_epsilon {
        hi *= 2.0;
        if hi > MAX_NOISE_MULTIPLIER {
            return Err(DpError::Unreachable {
                epsilon: target_epsilon,
                max: MAX_NOISE_MULTIPLIER,
            });
        }
    }
    let mut lo = hi / 2.0;
    while lo > 1e-6 && epsilon_at(lo)? <= target_epsilon {
        hi = lo;
        lo /= 2.0;
    }
    while hi - lo > tolerance * hi {
        let mid = 0.5 * (lo + hi);
        if epsilon_at(mid)? <= target_epsilon {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// The mechanism `base` (protocols/dp.md §3) at noise multiplier `z`:
/// with `granularity` if one is configured, else the default one for a
/// cohort of at most `max_cohort` clients with `headroom_sigmas` of
/// headroom in the ring ([`NoiseConfig::default_granularity`]).
pub fn at_multiplier(
    base: &NoiseConfig,
    z: f64,
    granularity: Option<f64>,
    max_cohort: u32,
    headroom_sigmas: f64,
) -> Result<NoiseConfig, DpError> {
    let mut c = base.clone();
    c.noise_multiplier = z;
    c.granularity = match granularity {
        Some(g) => g,
        None => c.default_granularity(max_cohort, headroom_sigmas)?,
    };
    Ok(c)
}

/// The smallest noise multiplier (within relative `tolerance`) at which
/// `rounds` rounds of the mechanism `base`, each with at least
/// `survivors` survivors, stay within `(target_epsilon, delta)` by the
/// zCDP accountant (§4.3); the granularity follows the multiplier as in
/// [`at_multiplier`].
#[allow(clippy::too_many_arguments)]
pub fn mechanism_multiplier(
    base: &NoiseConfig,
    granularity: Option<f64>,
    max_cohort: u32,
    headroom_sigmas: f64,
    survivors: u32,
    rounds: u64,
    target_epsilon: f64,
    delta: f64,
    tolerance: f64,
) -> Result<f64, DpError> {
    smallest_reaching(target_epsilon, tolerance, |z| {
        let c = at_multiplier(base, z, granularity, max_cohort, headroom_sigmas)?;
        let rho = zcdp::round_rho(&c, survivors)?;
        zcdp::epsilon(rounds as f64 * rho, delta)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrated_noise_reaches_the_target_and_barely_so() {
        let sigma = noise_multiplier(2.0, 1e-5, 0.01, 1000, Accountant::Rdp, 1e-6).unwrap();
        let eps = |s: f64| {
            SubsampledGaussian {
                noise_multiplier: s,
                sampling_rate: 0.01,
                steps: 1000,
            }
            .epsilon(1e-5, Accountant::Rdp)
            .unwrap()
        };
        assert!(eps(sigma) <= 2.0);
        assert!(eps(sigma * (1.0 - 1e-5)) > 2.0 - 1e-3);
        assert!(matches!(
            noise_multiplier(-1.0, 1e-5, 0.01, 10, Accountant::Rdp, 1e-6),
            Err(DpError::BadEpsilon(_))
        ));
    }
}
