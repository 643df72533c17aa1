//! From a config's `[task]` table to the trainer a client runs and the
//! evaluator the server runs. New tasks (the language-model trainer) plug in
//! here by their `kind`.

use fedveil_fed::FedError;
use fedveil_fed::config::task_kind;
use fedveil_fed::synthetic::{SyntheticConfig, SyntheticEvaluator, SyntheticTrainer};
use fedveil_fed::trainer::{Evaluator, Trainer};

const KINDS: &str = "synthetic";

fn unknown(kind: &str) -> FedError {
    FedError::Config {
        path: "task.kind".into(),
        reason: format!("unknown task \"{kind}\" (known: {KINDS})"),
    }
}

fn synthetic(task: &toml::Table) -> Result<SyntheticConfig, FedError> {
    SyntheticConfig::from_table(task)
}

/// The server's evaluator for a population of `population` clients. A
/// server's `[task]` must not name a shard: it holds no client's data.
pub fn evaluator(task: &toml::Table, population: u32) -> Result<Box<dyn Evaluator>, FedError> {
    match task_kind(task)? {
        "synthetic" => {
            let cfg = synthetic(task)?;
            if cfg.shard.is_some() {
                return Err(FedError::Config {
                    path: "task.shard".into(),
                    reason: "only a client's [task] names its shard; remove it here".into(),
                });
            }
            Ok(Box::new(SyntheticEvaluator::new(&cfg, population)?))
        }
        other => Err(unknown(other)),
    }
}

/// A client's trainer from its own `[task]`, which names its shard.
pub fn client_trainer(task: &toml::Table) -> Result<Box<dyn Trainer>, FedError> {
    match task_kind(task)? {
        "synthetic" => {
            let cfg = synthetic(task)?;
            let Some(shard) = cfg.shard else {
                return Err(FedError::Config {
                    path: "task.shard".into(),
                    reason: "is required on a client: which part of the synthetic data it \
                             holds (0-based)"
                        .into(),
                });
            };
            Ok(Box::new(SyntheticTrainer::new(&cfg, shard)?))
        }
        other => Err(unknown(other)),
    }
}

/// The trainers of an in-process federation: client `i` gets shard `i`.
pub fn local_trainers(task: &toml::Table) -> Result<fedveil_fed::local::TrainerFactory, FedError> {
    match task_kind(task)? {
        "synthetic" => {
            let cfg = synthetic(task)?;
            if cfg.shard.is_some() {
                return Err(FedError::Config {
                    path: "task.shard".into(),
                    reason: "'fedveil run' gives client i shard i; remove it".into(),
                });
            }
            Ok(Box::new(move |i| {
                Ok(Box::new(SyntheticTrainer::new(&cfg, i)?) as Box<dyn Trainer>)
            }))
        }
        other => Err(unknown(other)),
    }
}
