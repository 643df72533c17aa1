//! `fedveil audit`: real attacks on the real protocol and mechanism code,
//! claim by claim (docs/audit.md). The attacks and their claims live in
//! crates/audit; this file parses the arguments and prints the report.

use std::path::PathBuf;
use std::process::ExitCode;

use fedveil_audit::mechanism::Sabotage;
use fedveil_audit::report::{self, Options};
use rand_core::{OsRng, RngCore};

use crate::federate::RuntimeFailure;

#[derive(clap::Args)]
pub struct Args {
    /// Print the report as JSON: one entry per claim, with `claim`,
    /// `attack`, `held` and `evidence`.
    #[arg(long)]
    json: bool,
    /// Also write the report as Markdown to this file.
    #[arg(long, value_name = "FILE.md")]
    report: Option<PathBuf>,
    /// Trials with the canary in the DP audits (and as many without; the
    /// record-level audit, a real private round per trial, runs at most
    /// 1,000).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(200..=1_000_000))]
    trials: u32,
    /// Sessions per input set in the transcript test.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(4..=10_000))]
    sessions: u64,
    /// Seed of the in-memory protocol sessions (default: drawn from the OS),
    /// to replay a report exactly. The DP audits always draw from the OS.
    #[arg(long)]
    seed: Option<u64>,
    /// Break the mechanisms under audit on purpose: `noise` (clients add
    /// none while the accountant counts it) or `clip` (updates, or each
    /// record's gradient in DP-SGD, unclipped).
    /// The audit must then fail; this never touches a real federation.
    #[arg(long = "break", value_enum, value_name = "WHAT")]
    broken: Option<BreakArg>,
    /// Run the protocol attacks over real QUIC on loopback, with the
    /// federation's server and clients, instead of the in-memory harness
    /// (the DP audits, which attack the mechanisms, are the same either way).
    #[arg(long)]
    quic: bool,
}

#[derive(Copy, Clone, Debug, clap::ValueEnum)]
enum BreakArg {
    Noise,
    Clip,
}

impl From<BreakArg> for Sabotage {
    fn from(b: BreakArg) -> Sabotage {
        match b {
            BreakArg::Noise => Sabotage::NoNoise,
            BreakArg::Clip => Sabotage::NoClip,
        }
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let options = Options {
        seed: args.seed.unwrap_or_else(|| OsRng.next_u64()),
        quic: args.quic,
        sessions: args.sessions as usize,
        trials: args.trials,
        sabotage: args.broken.map(Sabotage::from),
    };
    // An attack that cannot run at all is a failure of the run (exit 1),
    // not bad input.
    let report = report::run(&options).map_err(|e| RuntimeFailure(e.to_string()))?;
    // Printed first, so that an unwritable report file loses nothing.
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    if let Some(path) = &args.report {
        crate::write_file(path, report.markdown().as_bytes())
            .map_err(|e| RuntimeFailure(format!("the report: {e}")))?;
    }
    if report.failed > 0 {
        let failed: Vec<&str> = report
            .claims
            .iter()
            .filter(|c| !c.held)
            .map(|c| c.id.as_str())
            .collect();
        eprintln!(
            "error: {} of {} claims failed: {}",
            report.failed,
            report.claims.len(),
            failed.join(", ")
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
