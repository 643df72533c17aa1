//! Zero-concentrated DP of the discrete Gaussian placements
//! (protocols/dp.md §4.3).
//!
//! A mechanism is `ρ`-zCDP if its Rényi divergence of every order `α > 1` is
//! at most `ρα`; `ρ` adds up over rounds. Per round, with `Δ₂` and `Δ₁` the
//! L2 and L1 bounds of a client's rounded vector and `σ` standard deviations
//! on the integer grid:
//!
//! - central and local: `ρ = Δ₂² / (2σ²)` — the discrete Gaussian is
//!   exactly as private as the continuous one in zCDP (Canonne, Kamath &
//!   Steinke 2020); for local this is the guarantee of each message alone;
//! - distributed, with `n` survivors each adding `N_Z(0, σ_l²)`: the sum of
//!   discrete Gaussians is close to one (Kairouz, Liu & Steinke 2021):
//!   with `σ = σ_l √n` and
//!   `τ = 10 Σ_{k=1}^{n-1} exp(-2π² σ_l² k/(k+1))`,
//!
//!   ```text
//!   ρ = ½ min( Δ₂²/σ² + 2τ Δ₁/σ + τ² m,  (Δ₂/σ + τ √m)² ).
//!   ```
//!
//! Neighbouring rounds differ in one client's update (replaced by zero)
//! while every participating client's noise share is present: the server
//! knows who took part (§1). The conversion to `(ε, δ)` is opendp's
//! `make_zCDP_to_approxDP` (the optimal conversion of CKS20, Prop. 12).

use opendp::combinators::ConcentratedMeasure;
use opendp::measures::ZeroConcentratedDivergence;

use crate::DpError;
use crate::mechanism::{NoiseConfig, Placement};

/// `ρ` of one round that `survivors` clients completed.
pub fn round_rho(config: &NoiseConfig, survivors: u32) -> Result<f64, DpError> {
    config.validate()?;
    if survivors < config.min_survivors {
        return Err(DpError::TooFewSurvivors {
            have: survivors,
            need: config.min_survivors,
        });
    }
    let d2 = config.l2_sensitivity();
    match config.placement {
        Placement::Central | Placement::Local => {
            let s = config.aggregate_sigma();
            Ok(d2 * d2 / (2.0 * s * s))
        }
        Placement::Distributed => {
            let sl = config.client_sigma().ok_or(DpError::Internal(
                "distributed placement without client noise",
            ))?;
            let n = f64::from(survivors);
            let s = sl * n.sqrt();
            let m = config.padded_dim() as f64;
            let l2 = d2 / s;
            let l1 = config.l1_sensitivity() / s;
            let e = -2.0 * std::f64::consts::PI.powi(2) * sl * sl;
            let tau = 10.0
                * (1..survivors)
                    .map(|k| (e * f64::from(k) / f64::from(k + 1)).exp())
                    .sum::<f64>();
            let a = l2 * l2 + 2.0 * tau * l1 + tau * tau * m;
            let b = (l2 + tau * m.sqrt()).powi(2);
            Ok(0.5 * a.min(b))
        }
    }
}

/// The smallest `ε` such that `ρ`-zCDP implies `(ε, δ)`-DP, through opendp.
pub fn epsilon(rho: f64, delta: f64) -> Result<f64, DpError> {
    if rho.is_nan() || rho < 0.0 {
        return Err(DpError::Internal("rho must be non-negative"));
    }
    crate::check_delta(delta)?;
    let profile =
        ZeroConcentratedDivergence::convert(rho).map_err(|e| DpError::Opendp(e.to_string()))?;
    profile
        .epsilon(delta)
        .map_err(|e| DpError::Opendp(e.to_string()))
}

/// The smallest noise multiplier (within relative `tolerance`) at which
/// `rounds` rounds of `config`, each completed by `survivors` clients, stay
/// within `(target_epsilon, delta)`. `config`'s own noise multiplier is
/// ignored. ε falls as the multiplier grows, so the bisection keeps its upper
/// end on the valid side and the result always reaches the target.
pub fn calibrate_noise_multiplier(
    config: &NoiseConfig,
    rounds: u64,
    survivors: u32,
    target_epsilon: f64,
    delta: f64,
    tolerance: f64,
) -> Result<f64, DpError> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(DpError::BadEpsilon(target_epsilon));
    }
    if rounds == 0 {
        return Err(DpError::NoSteps);
    }
    crate::check_delta(delta)?;
    crate::calibrate::smallest_reaching(target_epsilon, tolerance, |z| {
        let mut c = config.clone();
        c.noise_multiplier = z;
        epsilon(rounds as f64 * round_rho(&c, survivors)?, delta)
    })
}

/// The privacy spent by the rounds run so far.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ZcdpLedger {
    /// Total `ρ`.
    pub rho: f64,
    /// Rounds recorded.
    pub rounds: u64,
}

impl ZcdpLedger {
    /// Records a round that `survivors` clients completed.
    pub fn record(&mut self, config: &NoiseConfig, survivors: u32) -> Result<f64, DpError> {
        let rho = round_rho(config, survivors)?;
        self.rho += rho;
        self.rounds += 1;
        Ok(rho)
    }

    /// `ε` at `delta` for everything recorded.
    pub fn epsilon(&self, delta: f64) -> Result<f64, DpError> {
        epsilon(self.rho, delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(placement: Placement) -> NoiseConfig {
        NoiseConfig {
            placement,
            dim: 1000,
            clip: 1.0,
            noise_multiplier: 1.0,
            granularity: 1e-3,
            beta: (-0.5f64).exp(),
            bits: 32,
            min_survivors: 20,
        }
    }

    #[test]
    fn distributed_tends_to_central_and_more_survivors_help() {
        let central = round_rho(&cfg(Placement::Central), 20).unwrap();
        let at_min = round_rho(&cfg(Placement::Distributed), 20).unwrap();
        let more = round_rho(&cfg(Placement::Distributed), 40).unwrap();
        // σ_l = 1000/√20 ≈ 224 on the grid: τ is negligible.
        assert!(
            (at_min - central).abs() < 1e-9 * central,
            "{at_min} vs {central}"
        );
        assert!((more - central / 2.0).abs() < 1e-9 * central);
        assert_eq!(
            round_rho(&cfg(Placement::Distributed), 19),
            Err(DpError::TooFewSurvivors { have: 19, need: 20 })
        );
        // With coarse granularity each share is tiny, τ matters and ρ grows.
        let mut coarse = cfg(Placement::Distributed);
        coarse.granularity = 2.0;
        coarse.min_survivors = 1000;
        let rho_coarse = round_rho(&coarse, 1000).unwrap();
        let mut as_central = coarse.clone();
        as_central.placement = Placement::Central;
        assert!(rho_coarse > round_rho(&as_central, 1000).unwrap());
    }

    #[test]
    fn calibration_reaches_the_target_over_all_rounds() {
        let c = cfg(Placement::Distributed);
        let z = calibrate_noise_multiplier(&c, 50, 25, 3.0, 1e-5, 1e-6).unwrap();
        let eps_at = |z: f64| {
            let mut c = c.clone();
            c.noise_multiplier = z;
            epsilon(50.0 * round_rho(&c, 25).unwrap(), 1e-5).unwrap()
        };
        assert!(eps_at(z) <= 3.0);
        assert!(eps_at(z * (1.0 - 1e-4)) > 3.0);
        // More survivors than n_min need less noise for the same target.
        assert!(calibrate_noise_multiplier(&c, 50, 100, 3.0, 1e-5, 1e-6).unwrap() < z);
        assert!(calibrate_noise_multiplier(&c, 0, 25, 3.0, 1e-5, 1e-6).is_err());
    }

    #[test]
    fn conversion_matches_the_gaussian_mechanism_and_composes() {
        // ρ = 1/(2σ²) for a unit-sensitivity Gaussian: ε at δ = 1e-5 for σ = 1
        // is 4.4... by the CKS20 conversion; it is below ρ + 2√(ρ ln 1/δ).
        let rho = 0.5;
        let eps = epsilon(rho, 1e-5).unwrap();
        let simple = rho + 2.0 * (rho * (1e5f64).ln()).sqrt();
        assert!(eps < simple && eps > simple - 0.6, "{eps} vs {simple}");
        let mut l = ZcdpLedger::default();
        l.record(&cfg(Placement::Central), 20).unwrap();
        l.record(&cfg(Placement::Central), 20).unwrap();
        assert_eq!(l.rounds, 2);
        assert!((l.rho - 2.0 * round_rho(&cfg(Placement::Central), 20).unwrap()).abs() < 1e-12);
        assert!(l.epsilon(1e-5).unwrap() > epsilon(l.rho / 2.0, 1e-5).unwrap());
    }
}
