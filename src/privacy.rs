//! `fedveil privacy`: ε for a noise multiplier, or the noise multiplier for
//! an ε, for the Poisson-subsampled Gaussian (protocols/dp.md §4).

use std::process::ExitCode;

use anyhow::bail;
use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use fedveil_fed::dp::{Accountant, DpError, SubsampledGaussian, calibrate};
use serde_json::json;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The ε spent by T rounds at noise multiplier S and sampling rate Q.
    Epsilon(EpsilonArgs),
    /// The smallest noise multiplier whose ε stays within a target.
    Calibrate(CalibrateArgs),
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Kind {
    /// Rényi DP: fast, slightly loose.
    Rdp,
    /// Privacy loss distributions: tighter.
    Pld,
}

impl From<Kind> for Accountant {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Rdp => Accountant::Rdp,
            Kind::Pld => Accountant::Pld,
        }
    }
}

#[derive(ClapArgs, Debug)]
struct EpsilonArgs {
    /// Noise standard deviation over the L2 clipping norm.
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    noise_multiplier: f64,
    /// Poisson sampling rate of clients per round, in (0, 1].
    #[arg(long, value_name = "Q", allow_negative_numbers = true)]
    sampling_rate: f64,
    /// Number of rounds.
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    steps: u64,
    /// Target δ, in (0, 1).
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    delta: f64,
    #[arg(long, value_enum, default_value_t = Kind::Pld)]
    accountant: Kind,
    /// Print a JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(ClapArgs, Debug)]
struct CalibrateArgs {
    /// Target ε.
    #[arg(long, value_name = "E", allow_negative_numbers = true)]
    epsilon: f64,
    /// Target δ, in (0, 1).
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    delta: f64,
    /// Poisson sampling rate of clients per round, in (0, 1].
    #[arg(long, value_name = "Q", allow_negative_numbers = true)]
    sampling_rate: f64,
    /// Number of rounds.
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    steps: u64,
    #[arg(long, value_enum, default_value_t = Kind::Pld)]
    accountant: Kind,
    /// Print a JSON object.
    #[arg(long)]
    json: bool,
}

/// Names the flag behind a parameter error.
fn explain(e: DpError) -> anyhow::Error {
    match e {
        DpError::BadNoiseMultiplier(s) => {
            anyhow::anyhow!("--noise-multiplier must be positive and finite, got {s}")
        }
        DpError::BadSamplingRate(q) => {
            anyhow::anyhow!("--sampling-rate must be in (0, 1], got {q}")
        }
        DpError::BadDelta(d) => anyhow::anyhow!("--delta must be in (0, 1), got {d}"),
        DpError::BadEpsilon(e) => anyhow::anyhow!("--epsilon must be positive and finite, got {e}"),
        DpError::NoSteps => anyhow::anyhow!("--steps must be at least 1"),
        other => other.into(),
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        Command::Epsilon(a) => {
            let accountant = Accountant::from(a.accountant);
            let epsilon = epsilon(
                a.noise_multiplier,
                a.sampling_rate,
                a.steps,
                a.delta,
                accountant,
            )?;
            let mut out = schedule(a.delta, a.sampling_rate, a.steps, accountant);
            out.insert("epsilon".into(), json!(epsilon));
            out.insert("noise_multiplier".into(), json!(a.noise_multiplier));
            if a.json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "epsilon = {epsilon:.6} at delta = {} ({} accountant; noise multiplier {}, \
                     sampling rate {}, {} steps)",
                    a.delta,
                    accountant.name(),
                    a.noise_multiplier,
                    a.sampling_rate,
                    a.steps
                );
            }
        }
        Command::Calibrate(a) => {
            if !(a.sampling_rate > 0.0 && a.sampling_rate <= 1.0) {
                return Err(explain(DpError::BadSamplingRate(a.sampling_rate)));
            }
            if a.steps == 0 {
                bail!("--steps must be at least 1");
            }
            let accountant = Accountant::from(a.accountant);
            let sigma = calibrate::noise_multiplier(
                a.epsilon,
                a.delta,
                a.sampling_rate,
                a.steps,
                accountant,
                1e-6,
            )
            .map_err(explain)?;
            let achieved = epsilon(sigma, a.sampling_rate, a.steps, a.delta, accountant)?;
            let mut out = schedule(a.delta, a.sampling_rate, a.steps, accountant);
            out.insert("noise_multiplier".into(), json!(sigma));
            out.insert("epsilon".into(), json!(achieved));
            out.insert("target_epsilon".into(), json!(a.epsilon));
            if a.json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "noise multiplier = {sigma:.6} (epsilon {achieved:.6} <= {} at delta = {}; {} \
                     accountant; sampling rate {}, {} steps)",
                    a.epsilon,
                    a.delta,
                    accountant.name(),
                    a.sampling_rate,
                    a.steps
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The ε of `steps` Poisson-subsampled Gaussian steps.
fn epsilon(
    noise_multiplier: f64,
    sampling_rate: f64,
    steps: u64,
    delta: f64,
    accountant: Accountant,
) -> anyhow::Result<f64> {
    SubsampledGaussian {
        noise_multiplier,
        sampling_rate,
        steps,
    }
    .epsilon(delta, accountant)
    .map_err(explain)
}

/// The JSON keys both commands print about the schedule.
fn schedule(
    delta: f64,
    sampling_rate: f64,
    steps: u64,
    accountant: Accountant,
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    out.insert("delta".into(), json!(delta));
    out.insert("sampling_rate".into(), json!(sampling_rate));
    out.insert("steps".into(), json!(steps));
    out.insert("accountant".into(), json!(accountant.name()));
    out
}
