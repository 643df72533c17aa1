//! One client's local training for a federated round: start from the
//! global adapter vector, take the round's optimiser steps on the client's
//! own examples, and return the update (local minus global) with the
//! client's sample count, which is what the federation aggregates.
//!
//! The federation runtime (`crates/fed`) calls this through its `Trainer`
//! trait; the glue lives in the `fedveil` binary, since this crate does not
//! depend on the runtime.

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
        let usable: Vec<Example> = self
            .examples
            .iter()
            .filter(|e| e.targets(self.max_len) > 0)
            .cloned()
            .collect();
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
        let local = self.trainer.adapter().to_vec()?;
        let delta = local.iter().zip(global).map(|(l, g)| l - g).collect();
        Ok(RoundUpdate {
            delta,
            samples: usable.len() as u64,
            loss: if tokens == 0 {
                0.0
            } else {
                loss / tokens as f64
            },
        })
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
