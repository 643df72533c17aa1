//! The `fedveil` command line. It only parses arguments and prints; the work
//! happens in the workspace crates.

mod audit;
mod client;
mod data;
mod display;
mod federate;
mod keygen;
mod model;
mod privacy;
mod quickstart;
mod run;
mod server;
mod simulate;
mod sweep;
mod tuning;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc, keeping what it frees (tuning.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fedveil",
    version,
    about = "Privacy-preserving federated fine-tuning of language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The first run: three clients fine-tune SmolLM2-135M-Instruct on
    /// GSM8K with offsite-tuning, LoRA, SecAgg+ and distributed DP, over
    /// loopback QUIC; prints loss and exact match before and after.
    Quickstart(quickstart::Args),
    /// Run one SecAgg+ round in memory on random inputs and check the result.
    Simulate(simulate::Args),
    /// Privacy accounting: epsilon for a noise level, or noise for an epsilon.
    Privacy(privacy::Args),
    /// Make a server certificate or a client identity.
    Keygen(keygen::Args),
    /// Run a federation's server (protocols/federation.md).
    Server(server::Args),
    /// Run a federation client: connect, train on local data, take part in
    /// secure aggregation, until the server ends the federation.
    Client(client::Args),
    /// Run a server and its clients in one process over loopback QUIC.
    Run(run::Args),
    /// Language models: check that one loads and works.
    Model(model::Args),
    /// Datasets: prepare one as JSONL records, or split one among clients.
    Data(data::Args),
    /// Attack the protocol and the privacy mechanism, claim by claim, and
    /// report what held (docs/audit.md); exit status 1 if any claim failed.
    Audit(audit::Args),
    /// Run a grid of federations (noise, clients, rounds) and plot utility
    /// against the ε spent.
    Sweep(sweep::Args),
}

/// Writes a file whole or not at all, through the workspace's one atomic
/// write (a fresh temporary file, flushed, renamed, the directory flushed).
pub(crate) fn write_file(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use fedveil_fed::net::files::{Access, write_atomically};
    write_atomically(path, bytes, Access::Default)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

fn main() -> ExitCode {
    tuning::tune();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quickstart(args) => quickstart::run(&args),
        Command::Simulate(args) => simulate::run(&args),
        Command::Privacy(args) => privacy::run(&args),
        Command::Keygen(args) => keygen::run(&args),
        Command::Server(args) => server::run(&args),
        Command::Client(args) => client::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Model(args) => model::run(&args),
        Command::Data(args) => data::run(&args),
        Command::Sweep(args) => sweep::run(&args),
        Command::Audit(args) => audit::run(&args),
    };
    // 0: done; 1: the work ran and failed; 2: bad input, nothing ran.
    match result {
        Ok(code) => code,
        Err(e) if e.is::<federate::RuntimeFailure>() => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
