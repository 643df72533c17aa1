//! fedveil's tasks: what a client trains and what the server evaluates,
//! behind `fedveil-fed`'s [`Trainer`] and [`Evaluator`] traits.
//!
//! A config's `[task]` table (and `[offsite]`) is read once, into a
//! [`TaskConfig`]; from it come the server's evaluator
//! ([`TaskConfig::evaluator`]), a client's trainer
//! ([`TaskConfig::client_trainer`]) and the parts of an in-process
//! federation ([`TaskConfig::local`]). Two kinds exist:
//! - `synthetic` ([`synthetic`]): federated linear regression with a known
//!   optimum, which makes the runtime testable without a language model;
//! - `llm` ([`llm`]): adapter fine-tuning of a language model on
//!   instruction data, with offsite-tuning when `[offsite]` enables it.
//!
//! [`record`] supplies record-level DP-SGD's exact noise to the model
//! crate's private round.
//!
//! [`datasets`] names the built-in datasets (fetched once, pinned by
//! sha256) that `task.data` may name instead of a file.

use std::path::Path;

use fedveil_fed::FedError;
use fedveil_fed::in_process::TrainerFactory;
use fedveil_fed::trainer::{Evaluator, Trainer};

pub mod datasets;
pub mod llm;
pub mod record;
pub mod score;
pub mod synthetic;

pub use llm::{LlmTask, OffsiteSection};
pub use synthetic::{SyntheticConfig, SyntheticEvaluator, SyntheticTrainer};

/// Whose data the one party of a run without a federation holds
/// ([`TaskConfig::one_party`]): FS-LLM's Global and Local baselines.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Party {
    /// Every record the federation's clients hold, together (Global).
    Pooled,
    /// Client `i`'s records alone (Local).
    Client(u32),
}

/// The evaluator and the one trainer of a run without a federation.
pub type OneParty = (Box<dyn Evaluator>, Box<dyn Trainer>);

/// The task kinds, as `task.kind` names them.
pub const KINDS: &[&str] = &["synthetic", "llm"];

/// How far a long preparation (the emulator's distillation) has come:
/// `done` of `total` steps of `phase`, with a short message.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    pub phase: &'a str,
    pub done: u64,
    pub total: u64,
    pub message: &'a str,
}

/// Hears [`Progress`]; a caller that shows nothing passes `&mut |_| {}`.
pub type OnProgress<'a> = &'a mut dyn FnMut(Progress<'_>);

/// `[task]` and `[offsite]`, read and checked once.
#[derive(Clone, Debug)]
pub enum TaskConfig {
    Synthetic(SyntheticConfig),
    Llm {
        task: Box<LlmTask>,
        /// `[offsite]` when it is enabled.
        offsite: Option<OffsiteSection>,
    },
}

/// The `kind` of a `[task]` table.
pub fn task_kind(task: &toml::Table) -> Result<&str, FedError> {
    match task.get("kind") {
        Some(toml::Value::String(s)) => Ok(s),
        Some(_) => Err(FedError::config("task.kind", "must be a string")),
        None => Err(FedError::config(
            "task.kind",
            "is required (e.g. kind = \"synthetic\")",
        )),
    }
}

impl TaskConfig {
    /// Reads `[task]` and `[offsite]`; paths in them are relative to the
    /// config file `base`. An unknown kind or key is refused by name.
    pub fn parse(
        task: &toml::Table,
        offsite: Option<&toml::Table>,
        base: &Path,
    ) -> Result<TaskConfig, FedError> {
        match task_kind(task)? {
            "synthetic" => {
                if llm::offsite_of(offsite, base)?.is_some() {
                    return Err(FedError::config(
                        "offsite.enabled",
                        "offsite-tuning splits a language model; it needs task.kind = \"llm\"",
                    ));
                }
                Ok(TaskConfig::Synthetic(SyntheticConfig::from_table(task)?))
            }
            "llm" => Ok(TaskConfig::Llm {
                task: Box::new(LlmTask::from_table(task, base)?),
                offsite: llm::offsite_of(offsite, base)?,
            }),
            other => Err(FedError::config(
                "task.kind",
                format!("unknown task \"{other}\" (known: {})", KINDS.join(", ")),
            )),
        }
    }

    /// Which records train and which evaluate, for a run's record: each
    /// source of `data` and `eval_data` with its provenance
    /// ([`datasets::provenance`]) and the rules that pick the records.
    pub fn provenance(&self) -> serde_json::Value {
        match self {
            TaskConfig::Synthetic(cfg) => serde_json::json!({
                "synthetic": format!("linear regression, dimension {}", cfg.dim),
            }),
            TaskConfig::Llm { task, .. } => {
                let sources = |paths: &[std::path::PathBuf]| -> Vec<serde_json::Value> {
                    paths.iter().map(|p| datasets::provenance(p)).collect()
                };
                let held_out = if task.eval_data.is_empty() {
                    format!(
                        "the last {} of each data source's records (after max_records); \
                         the first {} of those, taken from each source in turn",
                        task.eval_fraction, task.eval_examples
                    )
                } else {
                    format!(
                        "the first {} eval_data records, taken from each source in turn",
                        task.eval_examples
                    )
                };
                serde_json::json!({
                    "train": sources(&task.data),
                    "eval": if task.eval_data.is_empty() { sources(&task.data) } else { sources(&task.eval_data) },
                    "trained": match (task.max_records, task.eval_data.is_empty()) {
                        (0, true) => "every record of each data source, less the held-out ones".to_string(),
                        (0, false) => "every record of each data source".to_string(),
                        (n, true) => format!("the first {n} records of each data source, less the held-out ones"),
                        (n, false) => format!("the first {n} records of each data source"),
                    },
                    "evaluated": held_out,
                    "split": task.split.as_ref().map_or("iid".to_string(), |s| s.name()),
                    "template": task.template,
                    "seed": task.seed,
                })
            }
        }
    }

    /// The task's kind, as `task.kind` names it.
    pub fn kind(&self) -> &'static str {
        match self {
            TaskConfig::Synthetic(_) => "synthetic",
            TaskConfig::Llm { .. } => "llm",
        }
    }

    /// `fedveil server`'s evaluator for a population of `population`
    /// clients. A server's `[task]` must not name a shard or hold a
    /// client's data.
    pub fn evaluator(
        &self,
        population: u32,
        progress: OnProgress<'_>,
    ) -> Result<Box<dyn Evaluator>, FedError> {
        match self {
            TaskConfig::Synthetic(cfg) => {
                if cfg.shard.is_some() {
                    return Err(FedError::config(
                        "task.shard",
                        "only a client's [task] names its shard; remove it here",
                    ));
                }
                Ok(Box::new(SyntheticEvaluator::new(cfg, population)?))
            }
            TaskConfig::Llm { task, offsite } => {
                llm::server_evaluator(task, offsite.clone(), progress)
            }
        }
    }

    /// A client's trainer from its own `[task]`.
    pub fn client_trainer(&self) -> Result<Box<dyn Trainer>, FedError> {
        match self {
            TaskConfig::Synthetic(cfg) => {
                let Some(shard) = cfg.shard else {
                    return Err(FedError::config(
                        "task.shard",
                        "is required on a client: which part of the synthetic data it \
                         holds (0-based)",
                    ));
                };
                Ok(Box::new(SyntheticTrainer::new(cfg, shard)?))
            }
            TaskConfig::Llm { task, .. } => llm::client_trainer(task),
        }
    }

    /// The evaluator and the one trainer of a run without a federation
    /// ([`fedveil_fed::one_party`]) set beside a federation of `population`
    /// clients: the trainer holds what `party` says, from the same split
    /// the federation deals out, and the evaluator is the federation's
    /// (the same held-out records).
    pub fn one_party(
        &self,
        population: u32,
        party: Party,
        progress: OnProgress<'_>,
    ) -> Result<OneParty, FedError> {
        if let Party::Client(i) = party
            && i >= population
        {
            return Err(FedError::config(
                "run.clients",
                format!("client {i} is not among the {population} clients"),
            ));
        }
        match self {
            TaskConfig::Synthetic(cfg) => {
                if cfg.shard.is_some() {
                    return Err(FedError::config(
                        "task.shard",
                        "a run without a federation chooses the party's data; remove it",
                    ));
                }
                let evaluator = Box::new(SyntheticEvaluator::new(cfg, population)?);
                let trainer = match party {
                    Party::Pooled => SyntheticTrainer::pooled(cfg, population)?,
                    Party::Client(i) => SyntheticTrainer::new(cfg, i)?,
                };
                Ok((evaluator, Box::new(trainer)))
            }
            TaskConfig::Llm { task, offsite } => {
                llm::one_party(task, offsite.clone(), population, party, progress)
            }
        }
    }

    /// The evaluator and trainers of an in-process federation of `clients`
    /// clients: client `i` gets shard `i`.
    pub fn in_process(
        &self,
        clients: u32,
        progress: OnProgress<'_>,
    ) -> Result<(Box<dyn Evaluator>, TrainerFactory), FedError> {
        match self {
            TaskConfig::Synthetic(cfg) => {
                if cfg.shard.is_some() {
                    return Err(FedError::config(
                        "task.shard",
                        "'fedveil run' gives client i shard i; remove it",
                    ));
                }
                let evaluator = Box::new(SyntheticEvaluator::new(cfg, clients)?);
                let cfg = cfg.clone();
                let factory: TrainerFactory = Box::new(move |i| {
                    Ok(Box::new(SyntheticTrainer::new(&cfg, i)?) as Box<dyn Trainer>)
                });
                Ok((evaluator, factory))
            }
            TaskConfig::Llm { task, offsite } => {
                llm::in_process(task, offsite.clone(), clients, progress)
            }
        }
    }
}
