//! One client's local training for a federated round: start from the
//! global adapter vector, take the round's optimiser steps on the client's
//! own examples, and return the update (local minus global) with the
//! client's sample count, which is what the federation aggregates.
//!
//! The federation runtime (`crates/fed`) calls this through its `Trainer`
//! trait; the glue lives in `crates/task`, since this crate does not depend
//! on the runtime. With record-level DP, [`LocalTraining::private_round`]
//! runs DP-SGD with the noise the caller supplies ([`RecordNoise`]).

use rand_core::RngCore;

use crate::model::Llama;
use crate::peft::{Adapter, PeftConfig};
use crate::train::{
    AdapterTrainer, Batch, EvalResult, Example, OptimConfig, batches_by_length, evaluate,
};
use crate::{ModelError, Result};

/// A round's local-training settings, as the server broadcasts them.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundSettings {
    /// Optimiser steps.
    pub local_steps: u32,
    /// Examples per micro-batch.
    pub batch_size: u32,
    pub learning_rate: f64,
    /// FedProx's `μ` (0: plain local training).
    pub proximal_mu: f64,
}

/// What a client's round produced.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundUpdate {
    /// Local adapter minus global adapter, flattened.
    pub delta: Vec<f32>,
    /// The client's number of training examples (its FedAvg weight).
    pub samples: u64,
    /// Mean loss per target token over the round's steps.
    pub loss: f64,
}

/// Record-level DP-SGD's mechanism (protocols/dp.md §8), supplied by the
/// caller: the task crate wraps `dp::dpsgd` (the Poisson sample, the
/// exact grid noise) and a CSPRNG. This crate computes per-example
/// gradients; it never draws the sample or the noise itself.
pub trait RecordMechanism {
    /// The probability that a step includes each record.
    fn sampling_rate(&self) -> f64;

    /// One step's Poisson sample of `records` records: the indices included.
    fn sample(&mut self, records: usize) -> Result<Vec<usize>>;

    /// Clips one example's gradient and adds it to the step's sum; returns
    /// its L2 norm before clipping.
    fn add_example(&mut self, gradient: &[f32]) -> Result<f64>;

    /// The step's sum with its noise, in gradient units; the next step
    /// starts from an empty sum.
    fn release(&mut self) -> Result<Vec<f64>>;
}

/// What a record-level DP-SGD round spent, for the client's accountant:
/// `steps` Poisson-subsampled Gaussian steps at rate `sampling_rate`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RecordSteps {
    pub sampling_rate: f64,
    pub steps: u64,
}

/// A client's adapter, optimiser settings and data.
#[derive(Debug)]
pub struct LocalTraining {
    trainer: AdapterTrainer,
    /// Everything but the learning rate, which each round sets.
    optim: OptimConfig,
    examples: Vec<Example>,
    max_len: usize,
    pad: u32,
}

impl LocalTraining {
    /// `examples` are the client's own, already tokenised; sequences are cut
    /// at `max_len`. The adapter's initial values do not matter: every round
    /// starts from the global vector.
    pub fn new(
        model: &Llama,
        peft: PeftConfig,
        optim: OptimConfig,
        examples: Vec<Example>,
        max_len: usize,
        rng: &mut dyn RngCore,
    ) -> Result<LocalTraining> {
        if examples.iter().all(|e| e.targets(max_len) == 0) {
            return Err(ModelError::Input(
                "no training example has a target token within max_len".into(),
            ));
        }
        let adapter = Adapter::new(peft, model, rng)?;
        let trainer = AdapterTrainer::new(model, adapter, optim.clone())?;
        let pad = model.config().eos_token_id.unwrap_or(0);
        Ok(LocalTraining {
            trainer,
            optim,
            examples,
            max_len,
            pad,
        })
    }

    /// The length of the vector the federation aggregates.
    pub fn dim(&self) -> usize {
        self.trainer.adapter().num_parameters()
    }

    /// Runs one round from `global`.
    pub fn round(
        &mut self,
        global: &[f32],
        settings: &RoundSettings,
        rng: &mut dyn RngCore,
    ) -> Result<RoundUpdate> {
        let usable = self.start_round(global, settings)?;
        let batch_size = settings.batch_size.max(1) as usize;
        let accum = self.optim.grad_accum.max(1);
        let mut queue: Vec<Vec<usize>> = Vec::new();
        let mut loss = 0.0;
        let mut tokens = 0usize;
        for _ in 0..settings.local_steps {
            let mut micro = Vec::with_capacity(accum);
            for _ in 0..accum {
                if queue.is_empty() {
                    queue = batches_by_length(&usable, batch_size, rng);
                }
                let Some(indices) = queue.pop() else {
                    return Err(ModelError::Input("no examples to train on".into()));
                };
                let refs: Vec<&Example> = indices.iter().map(|&i| &usable[i]).collect();
                micro.push(Batch::new(
                    &refs,
                    self.max_len,
                    self.pad,
                    self.trainer.model().device(),
                )?);
            }
            let stats = self.trainer.step(&micro, rng)?;
            loss += stats.loss * stats.tokens as f64;
            tokens += stats.tokens;
        }
        self.finish_round(global, usable.len(), loss, tokens)
    }

    /// Checks `global`, loads it, resets the optimiser for the round, and
    /// returns the examples to train on.
    fn start_round(&mut self, global: &[f32], settings: &RoundSettings) -> Result<Vec<Example>> {
        if global.len() != self.dim() {
            return Err(ModelError::Input(format!(
                "the global vector has {} values, the adapter {}",
                global.len(),
                self.dim()
            )));
        }
        if global.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::Input(
                "the global vector has a non-finite value".into(),
            ));
        }
        let optim = OptimConfig {
            learning_rate: settings.learning_rate,
            total_steps: if self.optim.total_steps == 0 {
                0
            } else {
                settings.local_steps as usize
            },
            ..self.optim.clone()
        };
        self.trainer.reset(optim)?;
        self.trainer.adapter().set_from_slice(global)?;
        self.trainer.set_proximal(settings.proximal_mu, global)?;
        Ok(self
            .examples
            .iter()
            .filter(|e| e.targets(self.max_len) > 0)
            .cloned()
            .collect())
    }

    /// The round's update: local minus global, with the mean loss (`loss`
    /// summed over `count` units).
    fn finish_round(
        &self,
        global: &[f32],
        samples: usize,
        loss: f64,
        count: usize,
    ) -> Result<RoundUpdate> {
        let local = self.trainer.adapter().to_vec()?;
        let delta = local.iter().zip(global).map(|(l, g)| l - g).collect();
        Ok(RoundUpdate {
            delta,
            samples: samples as u64,
            loss: if count == 0 { 0.0 } else { loss / count as f64 },
        })
    }

    /// How many of the client's examples have a target token within
    /// `max_len`: the records DP-SGD samples from.
    pub fn records(&self) -> usize {
        self.examples
            .iter()
            .filter(|e| e.targets(self.max_len) > 0)
            .count()
    }

    /// Runs one round from `global` with record-level DP-SGD (protocols/dp.md
    /// §8): each optimiser step takes `mechanism`'s Poisson sample of the
    /// records, computes each sampled record's gradient in micro-batches of
    /// `batch_size`, has `mechanism` clip, sum and noise them (one noise
    /// draw per step, whatever the micro-batches), divides by the expected
    /// number of records per step, and takes the optimiser step with it.
    /// `rng` draws only LoRA's dropout. Returns the update and the steps to
    /// account for.
    pub fn private_round(
        &mut self,
        global: &[f32],
        settings: &RoundSettings,
        mechanism: &mut dyn RecordMechanism,
        rng: &mut dyn RngCore,
    ) -> Result<(RoundUpdate, RecordSteps)> {
        let q = mechanism.sampling_rate();
        if !(q > 0.0 && q <= 1.0) {
            return Err(ModelError::Config(format!(
                "the record sampling rate must be in (0, 1], got {q}"
            )));
        }
        if self.optim.grad_accum > 1 {
            return Err(ModelError::Config(format!(
                "grad_accum = {}: with record-level DP a step's Poisson sample is split into \
                 micro-batches of batch_size by itself (one noise draw per step); set \
                 grad_accum = 1",
                self.optim.grad_accum
            )));
        }
        let usable = self.start_round(global, settings)?;
        let expected = q * usable.len() as f64;
        let batch_size = settings.batch_size.max(1) as usize;
        let mut loss = 0.0;
        let mut losses = 0usize;
        for _ in 0..settings.local_steps {
            let mut sample: Vec<&Example> = mechanism
                .sample(usable.len())?
                .into_iter()
                .map(|i| &usable[i])
                .collect();
            // Similar lengths together: less padding. The order is not
            // released (the noise covers the sum).
            sample.sort_by_key(|e| e.ids.len());
            for chunk in sample.chunks(batch_size) {
                let per = self
                    .trainer
                    .per_example_gradients(chunk, self.max_len, self.pad, rng)?;
                for i in 0..per.len() {
                    mechanism.add_example(per.row(i))?;
                }
                loss += per.loss * per.len() as f64;
                losses += per.len();
            }
            // An empty sample still takes a (noise-only) step: skipping it
            // would reveal the sample's size.
            let sum = mechanism.release()?;
            let gradient: Vec<f32> = sum.iter().map(|v| (v / expected) as f32).collect();
            self.trainer.apply_gradient(&gradient)?;
        }
        let update = self.finish_round(global, usable.len(), loss, losses)?;
        Ok((
            update,
            RecordSteps {
                sampling_rate: q,
                steps: u64::from(settings.local_steps),
            },
        ))
    }

    /// The loss of the adapter `params` on `examples`.
    pub fn evaluate(
        &self,
        params: &[f32],
        examples: &[Example],
        batch_size: usize,
    ) -> Result<EvalResult> {
        self.trainer.adapter().set_from_slice(params)?;
        evaluate(
            self.trainer.model(),
            Some(self.trainer.adapter()),
            examples,
            batch_size,
            self.max_len,
        )
    }

    /// A freshly initialised adapter's vector: the federation's round-0
    /// parameters (the server draws them once and broadcasts them).
    pub fn initial_params(
        model: &Llama,
        peft: PeftConfig,
        rng: &mut dyn RngCore,
    ) -> Result<Vec<f32>> {
        Adapter::new(peft, model, rng)?.to_vec()
    }
}
