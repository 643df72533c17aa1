//! What the federation runtime asks of a learning task.
//!
//! A client's [`Trainer`] takes the global parameters and the round's
//! training configuration and returns a flat `f32` update (local minus
//! global) with its sample count. The server's [`Evaluator`] supplies the
//! initial parameters and scores the global parameters after each round.
//! The runtime never looks inside either; `fedveil-task`'s synthetic and
//! language-model tasks implement them.

use std::collections::BTreeMap;

use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A task failure, in the task's own words.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct TrainError(pub String);

/// The local-training hyper-parameters the server broadcasts each round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Optimiser steps per round on the client.
    #[serde(default = "defaults::local_steps")]
    pub local_steps: u32,
    /// Examples per step.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u32,
    /// The client optimiser's learning rate.
    #[serde(default = "defaults::learning_rate")]
    pub learning_rate: f32,
    /// FedProx: weight `μ` of the proximal term `μ/2 ‖w − w_global‖²`
    /// (0 turns it off).
    #[serde(default)]
    pub proximal_mu: f32,
    /// Record-level DP-SGD, set by the server from `[dp] unit = "record"`
    /// (a `[training]` table may not set it): a trainer that receives it
    /// must train with it, or refuse the round.
    #[serde(default)]
    pub record_dp: Option<RecordDp>,
}

/// Record-level DP-SGD's parameters (protocols/dp.md §8): every local step
/// includes each record with probability `sampling_rate`, clips each
/// record's gradient to L2 norm `clip`, and adds noise of standard
/// deviation `noise_multiplier · clip` to their sum.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordDp {
    pub clip: f64,
    pub noise_multiplier: f64,
    pub sampling_rate: f64,
}

mod defaults {
    pub fn local_steps() -> u32 {
        5
    }
    pub fn batch_size() -> u32 {
        16
    }
    pub fn learning_rate() -> f32 {
        0.05
    }
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            local_steps: defaults::local_steps(),
            batch_size: defaults::batch_size(),
            learning_rate: defaults::learning_rate(),
            proximal_mu: 0.0,
            record_dp: None,
        }
    }
}

impl TrainingConfig {
    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.local_steps == 0 || self.local_steps > 1_000_000 {
            return Err((
                "local_steps",
                format!("must be in 1..=1000000, got {}", self.local_steps),
            ));
        }
        if self.batch_size == 0 || self.batch_size > 1 << 20 {
            return Err((
                "batch_size",
                format!("must be in 1..=1048576, got {}", self.batch_size),
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err((
                "learning_rate",
                format!("must be positive, got {}", self.learning_rate),
            ));
        }
        if !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            return Err((
                "proximal_mu",
                format!("must be non-negative, got {}", self.proximal_mu),
            ));
        }
        if let Some(r) = &self.record_dp {
            let ok = r.clip.is_finite()
                && r.clip > 0.0
                && r.noise_multiplier.is_finite()
                && r.noise_multiplier > 0.0
                && r.sampling_rate > 0.0
                && r.sampling_rate <= 1.0;
            if !ok {
                return Err((
                    "record_dp",
                    format!(
                        "needs a positive clip and noise multiplier and a sampling rate in \
                         (0, 1], got {r:?}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A client's result of one round of local training. The update is what
/// secure aggregation protects: it is wiped on drop, and `Debug` shows only
/// its length.
#[derive(Clone, PartialEq)]
pub struct LocalUpdate {
    /// Local parameters minus the global parameters, flattened.
    pub delta: Vec<f32>,
    /// How many examples the client trained on (its FedAvg weight).
    pub samples: u64,
    /// The client's mean training loss over the round.
    pub loss: f64,
    /// With record-level DP: the DP-SGD steps the update took, which the
    /// client's accountant charges (`None` without it).
    pub record_steps: Option<RecordSteps>,
}

/// What a record-level DP-SGD round spent: `steps` Poisson-subsampled
/// Gaussian steps at rate `sampling_rate` and the round's noise multiplier.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordSteps {
    pub noise_multiplier: f64,
    pub sampling_rate: f64,
    pub steps: u64,
}

impl Drop for LocalUpdate {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.delta);
    }
}

impl std::fmt::Debug for LocalUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalUpdate")
            .field(
                "delta",
                &format_args!("[{} values, redacted]", self.delta.len()),
            )
            .field("samples", &self.samples)
            .field("loss", &self.loss)
            .field("record_steps", &self.record_steps)
            .finish()
    }
}

/// Local training on a client's own data.
pub trait Trainer: Send {
    /// The number of trained parameters.
    fn dim(&self) -> usize;

    /// Trains from `global` under `config` and returns the update.
    /// `rng` (a CSPRNG) supplies every random choice, such as batch order.
    fn train(
        &mut self,
        global: &[f32],
        config: &TrainingConfig,
        rng: &mut dyn RngCore,
    ) -> Result<LocalUpdate, TrainError>;

    /// Whether this trainer is built on the server's bundle (an
    /// offsite-tuning client receives its model that way) and cannot train
    /// before [`Trainer::install_bundle`].
    fn wants_bundle(&self) -> bool {
        false
    }

    /// Takes the server's bundle, already checked against its announced
    /// hash. Called again only with a different bundle.
    fn install_bundle(&mut self, _bundle: &[u8]) -> Result<(), TrainError> {
        Err(TrainError(
            "this task takes no bundle from the server".into(),
        ))
    }
}

/// The scores of one set of parameters. `loss` is the headline number;
/// `metrics` holds anything else the task measures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub loss: f64,
    pub metrics: BTreeMap<String, f64>,
}

/// The server's view of the task.
pub trait Evaluator: Send {
    /// The number of trained parameters.
    fn dim(&self) -> usize;

    /// The parameters of round 0.
    fn initial_params(&mut self) -> Result<Vec<f32>, TrainError>;

    /// Scores `params` on the server's evaluation data.
    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, TrainError>;

    /// Scores the model a run starts from and the one it ends with: what
    /// [`Evaluator::evaluate`] measures, and anything too slow to measure
    /// every round (a language model's generated answers, say).
    fn evaluate_final(&mut self, params: &[f32]) -> Result<Evaluation, TrainError> {
        self.evaluate(params)
    }

    /// What every client receives once before its first round, if the task
    /// has such a thing (offsite-tuning's emulator): the same bytes for
    /// every client, content-hashed and cached by clients (§3.4).
    fn client_bundle(&mut self) -> Result<Option<Vec<u8>>, TrainError> {
        Ok(None)
    }

    /// Writes the model of `completed` rounds out in the task's own format
    /// (a language model's adapter, in PEFT's layout) when the task's
    /// schedule asks for it; `last` marks the federation's final model.
    /// Called after every completed round's evaluation; returns where it
    /// wrote, if it did.
    fn save(
        &mut self,
        _params: &[f32],
        _completed: u64,
        _last: bool,
    ) -> Result<Option<std::path::PathBuf>, TrainError> {
        Ok(None)
    }
}
