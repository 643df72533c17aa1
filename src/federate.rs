//! What `fedveil server`, `fedveil client` and `fedveil run` share: the
//! `--set` overrides, how a failure of the run is told from bad input,
//! the async runtime, `--fresh` and the summary.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use fedveil_fed::FedError;
use fedveil_fed::config::FederationSection;
use fedveil_fed::server::Summary;

use crate::display;

/// A failure while the federation ran (exit status 1), as opposed to a
/// configuration or usage error found before it started (exit status 2).
#[derive(Debug)]
pub struct RuntimeFailure(pub String);

impl std::fmt::Display for RuntimeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RuntimeFailure {}

pub(crate) fn runtime_failure(e: FedError) -> anyhow::Error {
    match e {
        // Found while starting: the configuration's fault.
        FedError::Config { .. } | FedError::File { .. } | FedError::Params(_) => e.into(),
        other => RuntimeFailure(other.to_string()).into(),
    }
}

pub(crate) fn tokio() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `--set KEY=VALUE`, shared by the commands that read a config file.
#[derive(Args)]
pub struct Overrides {
    /// Override a config value, e.g. `--set federation.rounds=50` or
    /// `--set task.shard=3` (repeatable; checked like the file's own lines).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// How a federation's server reports: shared by `fedveil server` and
/// `fedveil run`.
#[derive(Args)]
pub struct Output {
    /// Append one JSON line per round here (overrides federation.metrics).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress bars (logs only).
    #[arg(long)]
    pub quiet: bool,
}

impl Output {
    /// `--metrics` in place of the file's `federation.metrics`.
    pub fn redirect_metrics(&self, federation: &mut FederationSection) {
        if let Some(m) = &self.metrics {
            federation.metrics = Some(m.clone());
        }
    }
}

/// Removes what a previous run left, for `--fresh`.
pub(crate) fn start_afresh(plan: &fedveil_fed::config::Plan) -> anyhow::Result<()> {
    let ck = plan
        .federation
        .checkpoint_dir
        .as_deref()
        .map(fedveil_fed::checkpoint::path_in);
    for p in ck.iter().chain(plan.federation.metrics.iter()) {
        match std::fs::remove_file(p) {
            Ok(()) => tracing::info!("removed {}", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("--fresh: removing {}", p.display())),
        }
    }
    Ok(())
}

pub(crate) fn print_summary(
    rounds: &[fedveil_fed::metrics::RoundMetrics],
    summary: &Summary,
    metrics: Option<&Path>,
    json: bool,
    extra: serde_json::Value,
) {
    if json {
        println!("{}", display::summary_json(summary, extra));
    } else {
        print!("{}", display::summary_table(rounds, summary, metrics));
    }
}
