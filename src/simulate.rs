//! `fedveil simulate`: one full SecAgg+ round in memory.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use fedveil_fed::secagg::Stage;
use fedveil_fed::secagg::paramfinder::{self, AdversaryModel, ThreatModel};
use fedveil_fed::secagg::sim::{self, SimConfig, SimReport};
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, SeedableRng};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Number of clients.
    #[arg(long)]
    clients: u32,
    /// Length of each client's vector.
    #[arg(long)]
    dim: u32,
    /// Neighbours per client (SecAgg+). Without this or --complete, the
    /// parameter finder picks k and t for 5% corrupt and 5% dropped clients.
    #[arg(long, conflicts_with = "complete")]
    neighbors: Option<u32>,
    /// Use the complete graph (classic SecAgg).
    #[arg(long)]
    complete: bool,
    /// Shamir threshold t (default: the smallest t with 2t > k).
    #[arg(long)]
    threshold: Option<u32>,
    /// Ring width b: vectors are aggregated in Z_2^b.
    #[arg(long, default_value_t = 32)]
    bits: u8,
    /// Drop COUNT clients at STAGE (advertise, share, masked, consistency,
    /// unmask): they never send that stage's message. Repeatable.
    #[arg(long = "drop", value_name = "STAGE:COUNT", value_parser = parse_drop)]
    drops: Vec<(Stage, u32)>,
    /// Seed every random choice from S, for a reproducible run. Simulation
    /// only: without it, randomness comes from the operating system.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_drop(s: &str) -> Result<(Stage, u32), String> {
    let (stage, count) = s
        .split_once(':')
        .ok_or_else(|| format!("expected STAGE:COUNT, got '{s}'"))?;
    let stage = Stage::from_cli_name(stage).ok_or_else(|| {
        let names: Vec<&str> = Stage::ALL.iter().map(|s| s.cli_name()).collect();
        format!(
            "unknown stage '{stage}', expected one of {}",
            names.join(", ")
        )
    })?;
    let count = count
        .parse()
        .map_err(|_| format!("COUNT must be a non-negative integer, got '{count}'"))?;
    Ok((stage, count))
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if args.clients < 3 {
        bail!("--clients must be at least 3");
    }
    let mut config = SimConfig::new(args.clients, args.dim, None, args.bits);
    config.drops = args.drops.clone();
    config.threshold = args.threshold;
    if args.complete {
        config.degree = None;
    } else if let Some(k) = args.neighbors {
        config.degree = Some(k);
    } else {
        let threat = ThreatModel::new(0.05, 0.05, AdversaryModel::SemiHonest);
        let p = paramfinder::find(args.clients, &threat)
            .context("choosing the graph degree (pass --neighbors or --complete)")?;
        config.degree = Some(p.degree);
        config.threshold = config.threshold.or(Some(p.threshold));
    }
    let mut rng = match args.seed {
        Some(s) => ChaCha20Rng::seed_from_u64(s),
        None => ChaCha20Rng::from_rng(OsRng).context("reading the OS random number generator")?,
    };
    let report = sim::run(&config, &mut rng)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.correct {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn print_report(r: &SimReport) {
    let graph = if r.complete_graph {
        "complete graph (SecAgg)".to_string()
    } else {
        format!("{}-regular Harary graph (SecAgg+)", r.degree)
    };
    println!(
        "SecAgg+ round: {} clients, d = {}, {graph}, t = {}, b = {}",
        r.clients, r.dim, r.threshold, r.bits
    );
    println!();
    println!(
        "{:<12} {:>9} {:>13} {:>11} {:>9} {:>11} {:>11}",
        "stage", "wall", "clients sum", "client max", "server", "up", "down"
    );
    println!(
        "{:<12} {:>8.3}s {:>13} {:>11} {:>9} {:>11} {:>11}",
        "quantize", r.quantize_s, "", "", "", "", ""
    );
    for s in &r.stages {
        println!(
            "{:<12} {:>8.3}s {:>12.3}s {:>10.4}s {:>8.3}s {:>11} {:>11}",
            s.stage,
            s.wall_s,
            s.clients_total_s,
            s.client_max_s,
            s.server_s,
            human_bytes(s.up_bytes as f64),
            human_bytes(s.down_bytes as f64)
        );
    }
    println!(
        "{:<12} {:>8.3}s {:>13} {:>11} {:>8.3}s {:>11} {:>11}",
        "decode", r.decode_s, "", "", r.decode_s, "", ""
    );
    println!("{:<12} {:>8.3}s", "round", r.round_s);
    println!();
    let dropped: Vec<String> = r
        .dropped
        .iter()
        .map(|(s, n)| format!("{n} at {s}"))
        .collect();
    println!(
        "survivors:    {}/{}{}",
        r.survivors,
        r.clients,
        if dropped.is_empty() {
            String::new()
        } else {
            format!(" (dropped: {})", dropped.join(", "))
        }
    );
    println!(
        "client bytes: up {} mean, {} max; down {} mean, {} max",
        human_bytes(r.client_bytes.up_mean),
        human_bytes(r.client_bytes.up_max as f64),
        human_bytes(r.client_bytes.down_mean),
        human_bytes(r.client_bytes.down_max as f64)
    );
    println!(
        "server bytes: sent {}, received {}",
        human_bytes(r.server_sent_bytes as f64),
        human_bytes(r.server_received_bytes as f64)
    );
    if r.outcome == "ok" {
        println!(
            "exact ring sum over survivors: {}",
            if r.exact_sum { "yes" } else { "NO" }
        );
        println!(
            "max |decoded mean - plaintext mean| = {:.3e} (bound {:.3e})",
            r.max_abs_error, r.error_bound
        );
    } else {
        println!("server aborted: {}", r.outcome);
    }
    for e in r.client_errors.iter().take(10) {
        println!("client refused: {e}");
    }
    for e in r.server_rejections.iter().take(10) {
        println!("server rejected: {e}");
    }
    println!("total: {:.3} s", r.total_s);
    println!("result: {}", if r.correct { "CORRECT" } else { "WRONG" });
}
