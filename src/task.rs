//! From a config's `[task]` table (and `[offsite]`) to the trainer a
//! client runs and the evaluator the server runs, by the task's `kind`:
//! `synthetic` (federated linear regression with a known optimum) or `llm`
//! (adapter fine-tuning of a language model, [`crate::llm`]).

use std::path::Path;

use fedveil_fed::FedError;
use fedveil_fed::config::task_kind;
use fedveil_fed::local::TrainerFactory;
use fedveil_fed::synthetic::{SyntheticConfig, SyntheticEvaluator, SyntheticTrainer};
use fedveil_fed::trainer::{Evaluator, Trainer};
use indicatif::MultiProgress;

use crate::llm;

const KINDS: &str = "synthetic, llm";

fn unknown(kind: &str) -> FedError {
    FedError::Config {
        path: "task.kind".into(),
        reason: format!("unknown task \"{kind}\" (known: {KINDS})"),
    }
}

fn synthetic(
    task: &toml::Table,
    offsite: Option<&toml::Table>,
) -> Result<SyntheticConfig, FedError> {
    if llm::offsite_of(offsite, Path::new("."))?.is_some() {
        return Err(FedError::Config {
            path: "offsite.enabled".into(),
            reason: "offsite-tuning splits a language model; it needs task.kind = \"llm\"".into(),
        });
    }
    SyntheticConfig::from_table(task)
}

/// `fedveil server`'s evaluator for a population of `population` clients;
/// paths in the tables are relative to the config file `base`; long
/// preparations draw on `bars`. A server's
/// `[task]` must not name a shard: it holds no client's data.
pub fn evaluator(
    bars: &MultiProgress,
    task: &toml::Table,
    offsite: Option<&toml::Table>,
    population: u32,
    base: &Path,
) -> Result<Box<dyn Evaluator>, FedError> {
    match task_kind(task)? {
        "synthetic" => {
            let cfg = synthetic(task, offsite)?;
            if cfg.shard.is_some() {
                return Err(FedError::Config {
                    path: "task.shard".into(),
                    reason: "only a client's [task] names its shard; remove it here".into(),
                });
            }
            Ok(Box::new(SyntheticEvaluator::new(&cfg, population)?))
        }
        "llm" => llm::server_evaluator(bars, task, offsite, base),
        other => Err(unknown(other)),
    }
}

/// A client's trainer from its own `[task]`.
pub fn client_trainer(task: &toml::Table, base: &Path) -> Result<Box<dyn Trainer>, FedError> {
    match task_kind(task)? {
        "synthetic" => {
            let cfg = synthetic(task, None)?;
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
        "llm" => llm::client_trainer(task, base),
        other => Err(unknown(other)),
    }
}

/// The evaluator and trainers of an in-process federation of `clients`
/// clients: client `i` gets shard `i`.
pub fn local(
    bars: &MultiProgress,
    task: &toml::Table,
    offsite: Option<&toml::Table>,
    clients: u32,
    base: &Path,
) -> Result<(Box<dyn Evaluator>, TrainerFactory), FedError> {
    match task_kind(task)? {
        "synthetic" => {
            let cfg = synthetic(task, offsite)?;
            if cfg.shard.is_some() {
                return Err(FedError::Config {
                    path: "task.shard".into(),
                    reason: "'fedveil run' gives client i shard i; remove it".into(),
                });
            }
            let evaluator = Box::new(SyntheticEvaluator::new(&cfg, clients)?);
            let factory: TrainerFactory =
                Box::new(
                    move |i| Ok(Box::new(SyntheticTrainer::new(&cfg, i)?) as Box<dyn Trainer>),
                );
            Ok((evaluator, factory))
        }
        "llm" => llm::local(bars, task, offsite, clients, base),
        other => Err(unknown(other)),
    }
}
