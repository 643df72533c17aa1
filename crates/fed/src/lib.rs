//! Federated rounds over QUIC (protocols/federation.md).
//!
//! A [`server::Server`] selects a cohort each round, broadcasts the global
//! parameters with a hash that commits to them, lets the clients train
//! locally (a [`trainer::Trainer`]), has them privatise their updates
//! ([`encoding`]: clipping and discrete Gaussian noise from `fedveil-dp`)
//! and aggregates them with SecAgg+ (`fedveil-secagg`), so that it learns
//! only the sum. It then applies a server optimiser ([`optimizer`]),
//! evaluates, records the privacy spent ([`ledger`]) and checkpoints
//! atomically ([`checkpoint`]); a restarted server resumes from the last
//! completed round. [`client::run`] is the client's side and [`in_process`]
//! runs a server and many clients in one process over loopback sockets.
//!
//! Module map:
//! - [`config`]: TOML configuration and its validation;
//! - [`wire`]: the federation messages and the model-hash commitment (§3);
//! - [`trainer`]: the `Trainer` and `Evaluator` traits;
//! - [`encoding`]: turning updates into ring vectors and sums back into means;
//! - [`optimizer`]: FedAvg, FedAdam and FedYogi;
//! - [`ledger`]: the privacy ledger and budget;
//! - [`checkpoint`]: atomic checkpoints;
//! - [`metrics`]: per-round metrics (JSONL);
//! - [`randomness`]: where every random choice comes from;
//! - [`server`], [`client`], [`in_process`]: the runtimes;
//! - [`one_party`]: training in one place, the Global and Local baselines;
//! - [`adversary`]: the hooks `fedveil audit` plays a malicious server through.

#![forbid(unsafe_code)]
#![deny(missing_debug_implementations)]

pub mod adversary;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod encoding;
pub mod in_process;
pub mod ledger;
pub mod metrics;
pub mod one_party;
pub mod optimizer;
pub mod randomness;
pub mod server;
pub mod trainer;
pub mod wire;

mod connection;

pub use fedveil_dp as dp;
pub use fedveil_net as net;
pub use fedveil_secagg as secagg;

use thiserror::Error;

/// A federation failure, naming what went wrong and where.
#[derive(Debug, Error)]
pub enum FedError {
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error("transport: {0}")]
    Net(#[from] fedveil_net::NetError),
    #[error("differential privacy: {0}")]
    Dp(#[from] fedveil_dp::DpError),
    #[error("secure aggregation parameters: {0}")]
    Params(#[from] fedveil_secagg::ParamsError),
    #[error("encoding: {0}")]
    Codec(#[from] fedveil_secagg::codec::CodecError),
    #[error("training: {0}")]
    Train(#[from] trainer::TrainError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the privacy budget is spent: {0}")]
    BudgetExhausted(String),
    #[error("{0}")]
    Stopped(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl FedError {
    pub fn config(path: impl Into<String>, reason: impl Into<String>) -> Self {
        FedError::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn file(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        FedError::File {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}
