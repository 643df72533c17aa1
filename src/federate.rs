//! `fedveil server`, `fedveil client` and `fedveil run`
//! (protocols/federation.md §6 describes the files).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fedveil_fed::FedError;
use fedveil_fed::client::{self, ClientSetup};
use fedveil_fed::config::{ClientFile, RunFile, ServerFile};
use fedveil_fed::in_process::{self, InProcessRun};
use fedveil_fed::metrics::{ClientEvent, Event};
use fedveil_fed::net::{ClientIdentity, Fingerprint, Limits, ServerIdentity, load_allow_list};
use fedveil_fed::randomness::Randomness;
use fedveil_fed::server::{Server, ServerSetup, Summary};
use fedveil_task::TaskConfig;
use tokio::sync::mpsc::unbounded_channel;

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

fn runtime_failure(e: FedError) -> anyhow::Error {
    match e {
        // Found while starting: the configuration's fault.
        FedError::Config { .. } | FedError::File { .. } | FedError::Params(_) => e.into(),
        other => RuntimeFailure(other.to_string()).into(),
    }
}

fn tokio() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[derive(Args)]
pub struct ServerArgs {
    /// The server's TOML file (see configs/server.toml).
    #[arg(long)]
    config: PathBuf,
    /// Override a config value, e.g. `--set federation.rounds=50` or
    /// `--set task.shard=3` (repeatable; checked like the file's own lines).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Append one JSON line per round here (overrides federation.metrics).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// No progress bars (logs only).
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
pub struct ClientArgs {
    /// The client's TOML file (see configs/client.toml).
    #[arg(long)]
    config: PathBuf,
    /// This client's identity file (overrides client.identity; relative to
    /// the current directory).
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Override a config value, e.g. `--set federation.rounds=50` or
    /// `--set task.shard=3` (repeatable; checked like the file's own lines).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
pub struct RunArgs {
    /// The federation's TOML file (see configs/synthetic.toml).
    file: PathBuf,
    /// Override a config value, e.g. `--set federation.rounds=50` or
    /// `--set task.shard=3` (repeatable; checked like the file's own lines).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Append one JSON line per round here (overrides federation.metrics).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// No progress bars (logs only).
    #[arg(long)]
    quiet: bool,
    /// Start a new federation: remove the checkpoint and the metrics file
    /// a previous run left (without it, a run resumes from its checkpoint).
    #[arg(long)]
    fresh: bool,
}

/// Removes what a previous run left, for `--fresh`.
fn start_afresh(plan: &fedveil_fed::config::Plan) -> anyhow::Result<()> {
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

fn print_summary(
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

pub fn server(args: &ServerArgs) -> anyhow::Result<ExitCode> {
    let mut file = ServerFile::load_with(&args.config, &args.set)?;
    if let Some(m) = &args.metrics {
        file.federation.metrics = Some(m.clone());
    }
    let bars = display::bars(!args.quiet);
    display::init_logging("info", &bars);
    let listen = file.listen()?;
    let limits = file.limits()?;
    let identity = ServerIdentity::load(&file.server.certificate, &file.server.key)?;
    let allow = load_allow_list(&file.server.allow_list)?;
    let population = u32::try_from(allow.len()).context("the allow-list is too long")?;
    let plan = file.plan();
    plan.resolve(population, 1)?;
    let task = TaskConfig::parse(&file.task, file.offsite.as_ref(), &args.config)?;
    let evaluator = task.evaluator(population, &mut display::task_progress(&bars))?;
    let rounds = plan.federation.rounds;
    let metrics = plan.federation.metrics.clone();
    let fingerprint = identity.fingerprint();
    let rt = tokio()?;
    rt.block_on(async move {
        let (tx, rx) = unbounded_channel();
        let server = Server::bind(ServerSetup {
            plan,
            identity,
            allow,
            listen,
            limits,
            evaluator,
            randomness: Randomness::os(),
            events: Some(tx),
            hooks: Default::default(),
        })
        .map_err(runtime_failure)?;
        tracing::info!(
            "serving {population} allowed clients on {}; clients pin {fingerprint}",
            server.local_addr()
        );
        let display = tokio::spawn(display::follow(rx, bars, rounds));
        let result = server.run().await;
        let done = display.await.unwrap_or_default();
        let summary = result.map_err(runtime_failure)?;
        print_summary(
            &done,
            &summary,
            metrics.as_deref(),
            args.json,
            serde_json::json!({}),
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// The host part of `host:port` (the name the certificate is checked for).
fn host_of(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

async fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("client.server: cannot resolve '{server}' (host:port)"))?;
    addrs
        .next()
        .with_context(|| format!("client.server: '{server}' resolves to no address"))
}

pub fn client(args: &ClientArgs) -> anyhow::Result<ExitCode> {
    let file = ClientFile::load_with(&args.config, &args.set)?;
    let bars = display::bars(false);
    display::init_logging("info", &bars);
    let identity_path = args.identity.as_ref().unwrap_or(&file.client.identity);
    let identity = ClientIdentity::load(identity_path)?;
    // The client's own privacy ledger: beside its identity unless the file
    // names a directory.
    let ledger_dir = file.client.ledger_dir.clone().unwrap_or_else(|| {
        identity_path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("privacy-ledger")
    });
    let pin: Fingerprint = file.pin()?;
    let trainer = TaskConfig::parse(&file.task, None, &args.config)?.client_trainer()?;
    let bundle_cache = match &file.client.bundle_cache {
        Some(dir) => Some(dir.clone()),
        None => fedveil_model::fetch::cache_dir()
            .ok()
            .map(|d| d.join("bundles")),
    };
    let max_bundle_bytes = file
        .client
        .max_bundle_bytes
        .unwrap_or(fedveil_fed::client::MAX_BUNDLE_BYTES);
    let name = file
        .client
        .server_name
        .clone()
        .unwrap_or_else(|| host_of(&file.client.server).to_string());
    let rt = tokio()?;
    rt.block_on(async move {
        let server = resolve(&file.client.server).await?;
        tracing::info!(key = %identity.public(), "connecting to {server} ({name})");
        let summary = client::run(ClientSetup {
            server,
            server_name: name,
            pin,
            identity,
            limits: Limits::default(),
            trainer,
            policy: file.policy.clone(),
            randomness: Randomness::os(),
            reconnect: Duration::from_secs_f64(file.client.reconnect),
            max_reconnect: Duration::from_secs_f64(file.client.max_reconnect),
            give_up_after: file.client.give_up_after.map(Duration::from_secs_f64),
            events: None,
            endpoint: None,
            faults: Vec::new(),
            bundle_cache,
            max_bundle_bytes,
            hooks: Default::default(),
            ledger_dir: Some(ledger_dir),
        })
        .await
        .map_err(runtime_failure)?;
        let who = summary
            .client
            .map_or_else(|| "this client".to_string(), |c| format!("client {c}"));
        println!(
            "the federation ended after {} rounds ({}); {who} took part to the end in {} of them",
            summary.rounds, summary.reason, summary.rounds_served
        );
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let mut file = RunFile::load_with(&args.file, &args.set)?;
    if let Some(m) = &args.metrics {
        file.federation.metrics = Some(m.clone());
    }
    let bars = display::bars(!args.quiet);
    display::init_logging("warn", &bars);
    let done = run_local(file, &args.file, bars, args.fresh)?;
    print_summary(
        &done.rounds,
        &done.outcome.server,
        done.metrics.as_deref(),
        args.json,
        serde_json::json!({ "clients": done.clients, "clients_failed": done.failed }),
    );
    Ok(ExitCode::SUCCESS)
}

/// What an in-process federation did.
pub struct LocalDone {
    pub outcome: in_process::InProcessResult,
    /// The completed rounds' metrics.
    pub rounds: Vec<fedveil_fed::metrics::RoundMetrics>,
    pub clients: u32,
    /// Clients that did not finish.
    pub failed: usize,
    /// Bundle bytes fetched over the network, all clients together.
    pub bundle_bytes: u64,
    pub metrics: Option<PathBuf>,
}

/// Runs the federation of a `fedveil run` file in this process; `base` is
/// the file's path (what relative paths in it are relative to).
pub fn run_local(
    file: RunFile,
    base: &Path,
    bars: indicatif::MultiProgress,
    fresh: bool,
) -> anyhow::Result<LocalDone> {
    let listen = file.listen()?;
    let clients = file.run.clients;
    if clients == 0 {
        anyhow::bail!("run.clients: must be at least 1");
    }
    let plan = file.plan();
    // The plan's own rules first: the task may take minutes to build (a
    // model to fetch, an emulator to distil).
    plan.resolve(clients, 1)?;
    let task = TaskConfig::parse(&file.task, file.offsite.as_ref(), base)?;
    let (evaluator, trainers) = task.in_process(clients, &mut display::task_progress(&bars))?;
    // Every check that needs no socket, before any is opened.
    plan.resolve(clients, evaluator.dim())?;
    if fresh {
        start_afresh(&plan)?;
    }
    let rounds = plan.federation.rounds;
    let metrics = plan.federation.metrics.clone();
    let rt = tokio()?;
    rt.block_on(async move {
        let (tx, rx) = unbounded_channel::<Event>();
        let (ctx, mut crx) = unbounded_channel::<ClientEvent>();
        let display = tokio::spawn(display::follow(rx, bars, rounds));
        let bundles = tokio::spawn(async move {
            let mut bytes = 0u64;
            while let Some(e) = crx.recv().await {
                if let ClientEvent::Bundle { fetched, .. } = e {
                    bytes += fetched;
                }
            }
            bytes
        });
        let outcome = in_process::run(InProcessRun {
            plan,
            clients,
            listen,
            limits: Limits::default(),
            randomness: Randomness::os(),
            trainers,
            evaluator,
            events: Some(tx),
            client_events: Some(ctx),
        })
        .await;
        let done = display.await.unwrap_or_default();
        let bundle_bytes = bundles.await.unwrap_or_default();
        let outcome = outcome.map_err(runtime_failure)?;
        let mut failed = std::collections::BTreeMap::<String, usize>::new();
        for c in &outcome.clients {
            if let Err(e) = c {
                *failed.entry(e.to_string()).or_default() += 1;
            }
        }
        for (why, count) in &failed {
            tracing::warn!("{count} client(s) did not finish: {why}");
        }
        Ok(LocalDone {
            outcome,
            rounds: done,
            clients,
            failed: failed.values().sum(),
            bundle_bytes,
            metrics,
        })
    })
}
