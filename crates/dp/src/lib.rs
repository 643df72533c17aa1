//! Differential privacy for fedveil (protocols/dp.md).
//!
//! - [`rdp`] and [`pld`]: accountants for the Poisson-subsampled Gaussian,
//!   the mechanism of DP-FedAvg with client sampling;
//! - [`calibrate`]: the smallest noise multiplier that reaches a target ε;
//! - [`sampler`]: exact discrete Gaussian sampling in integer arithmetic;
//! - [`clip`], [`rotation`], [`mechanism`]: clipping (fixed and adaptive),
//!   the randomized Hadamard rotation, and the central, distributed and
//!   local discrete Gaussian placements;
//! - [`zcdp`]: their zCDP, composed over rounds and converted through opendp;
//! - [`dpsgd`]: record-level DP-SGD's exact noise: clipped per-example
//!   gradients rounded onto a grid, summed exactly, discrete Gaussian noise.
//!
//! Every figure is computed through code that tests compare with an
//! independent reference (Google's dp-accounting 0.6.0, exact formulas);
//! no constant is typed in by hand.

#![forbid(unsafe_code)]
#![deny(missing_debug_implementations)]

pub mod calibrate;
pub mod clip;
pub mod dpsgd;
pub mod mechanism;
pub mod pld;
pub mod rdp;
pub mod rotation;
pub mod sampler;
pub mod special;
pub mod zcdp;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A privacy computation that cannot be done, and why.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum DpError {
    #[error("noise multiplier must be positive and finite, got {0}")]
    BadNoiseMultiplier(f64),
    #[error("sampling rate must be in (0, 1], got {0}")]
    BadSamplingRate(f64),
    #[error("delta must be in (0, 1), got {0}")]
    BadDelta(f64),
    #[error("epsilon must be positive and finite, got {0}")]
    BadEpsilon(f64),
    #[error("steps must be at least 1")]
    NoSteps,
    #[error(
        "the privacy loss grid would need {points:.0} points; use the RDP accountant, fewer \
         steps or more noise"
    )]
    TooFine { points: f64 },
    #[error("no noise multiplier up to {max} reaches epsilon {epsilon}")]
    Unreachable { epsilon: f64, max: f64 },
    #[error("the update dimension must be in 1..=2^28, got {0}")]
    BadDimension(usize),
    #[error("expected a vector of {expected} elements, got {got}")]
    LengthMismatch { expected: usize, got: usize },
    #[error("update coordinate {index} is not finite")]
    NotFinite { index: usize },
    #[error("the clip norm must be positive and finite, got {0}")]
    BadClip(f64),
    #[error("the target quantile must be in (0, 1), got {0}")]
    BadQuantile(f64),
    #[error(
        "count noise multiplier {count_noise_multiplier} is too small for noise multiplier \
         {noise_multiplier}: adaptive clipping needs twice the count noise to exceed it"
    )]
    CountNoiseTooSmall {
        noise_multiplier: f64,
        count_noise_multiplier: f64,
    },
    #[error("the granularity must be positive and finite, got {0}")]
    BadGranularity(f64),
    #[error("granularity {0} makes the noise too large to sample on the integer grid; coarsen it")]
    GranularityTooFine(f64),
    #[error("beta must be in [0, 1), got {0}")]
    BadBeta(f64),
    #[error("the ring must have 2 to 32 bits, got {0}")]
    BadBits(u8),
    #[error("the minimum number of survivors must be at least 1")]
    BadMinSurvivors,
    #[error("conditional rounding failed {tries} times; beta is too small for this vector")]
    RoundingFailed { tries: u32 },
    #[error(
        "only {have} clients survived, fewer than the {need} the noise was calibrated for: the \
         round must not be released"
    )]
    TooFewSurvivors { have: u32, need: u32 },
    #[error("opendp: {0}")]
    Opendp(String),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Which accountant turns a mechanism into `(ε, δ)`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accountant {
    /// Rényi DP with the improved conversion: fast, slightly loose.
    Rdp,
    /// Privacy loss distributions: tighter, slower.
    Pld,
}

impl Accountant {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Accountant::Rdp => "rdp",
            Accountant::Pld => "pld",
        }
    }
}

/// `steps` rounds of the Gaussian mechanism with noise multiplier
/// `noise_multiplier` on a Poisson sample of rate `sampling_rate`, under
/// add-or-remove-one adjacency.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubsampledGaussian {
    pub noise_multiplier: f64,
    pub sampling_rate: f64,
    pub steps: u64,
}

impl SubsampledGaussian {
    /// Checks the parameters, naming the first that is out of range.
    pub fn validate(&self) -> Result<(), DpError> {
        if !(self.noise_multiplier > 0.0 && self.noise_multiplier.is_finite()) {
            return Err(DpError::BadNoiseMultiplier(self.noise_multiplier));
        }
        if !(self.sampling_rate > 0.0 && self.sampling_rate <= 1.0) {
            return Err(DpError::BadSamplingRate(self.sampling_rate));
        }
        if self.steps == 0 {
            return Err(DpError::NoSteps);
        }
        Ok(())
    }

    /// The RDP curve of the whole run at the default orders.
    fn rdp_curve(&self) -> (Vec<f64>, Vec<f64>) {
        let orders = rdp::default_orders();
        let curve = rdp::compose(
            self.sampling_rate,
            self.noise_multiplier,
            self.steps,
            &orders,
        );
        (orders, curve)
    }

    /// `ε` at `delta`.
    pub fn epsilon(&self, delta: f64, accountant: Accountant) -> Result<f64, DpError> {
        self.validate()?;
        check_delta(delta)?;
        match accountant {
            Accountant::Rdp => {
                let (orders, curve) = self.rdp_curve();
                Ok(rdp::epsilon(&orders, &curve, delta)?.0)
            }
            Accountant::Pld => pld::epsilon(
                self.noise_multiplier,
                self.sampling_rate,
                self.steps,
                delta,
                pld::DEFAULT_DISCRETIZATION,
            ),
        }
    }

    /// `δ` at `epsilon`.
    pub fn delta(&self, epsilon: f64, accountant: Accountant) -> Result<f64, DpError> {
        self.validate()?;
        if !(epsilon >= 0.0 && epsilon.is_finite()) {
            return Err(DpError::BadEpsilon(epsilon));
        }
        match accountant {
            Accountant::Rdp => {
                let (orders, curve) = self.rdp_curve();
                Ok(rdp::delta(&orders, &curve, epsilon)?.0)
            }
            Accountant::Pld => pld::delta(
                self.noise_multiplier,
                self.sampling_rate,
                self.steps,
                epsilon,
                pld::DEFAULT_DISCRETIZATION,
            ),
        }
    }
}

/// `δ` must be in (0, 1).
pub fn check_delta(delta: f64) -> Result<(), DpError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(DpError::BadDelta(delta))
    }
}
