//! `fedveil run`: a server and its clients in one process over loopback
//! QUIC (protocols/federation.md §6 describes its file).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args as ClapArgs;
use fedveil_fed::config::RunFile;
use fedveil_fed::in_process::{self, InProcessRun};
use fedveil_fed::metrics::{ClientEvent, Event};
use fedveil_fed::net::Limits;
use fedveil_fed::randomness::Randomness;
use fedveil_task::TaskConfig;
use tokio::sync::mpsc::unbounded_channel;

use crate::display;
use crate::federate::{Output, Overrides, print_summary, runtime_failure, start_afresh, tokio};

#[derive(ClapArgs)]
pub struct Args {
    /// The federation's TOML file (see configs/synthetic.toml).
    file: PathBuf,
    #[command(flatten)]
    overrides: Overrides,
    #[command(flatten)]
    output: Output,
    /// Start a new federation: remove the checkpoint and the metrics file
    /// a previous run left (without it, a run resumes from its checkpoint).
    #[arg(long)]
    fresh: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut file = RunFile::load_with(&args.file, &args.overrides.set)?;
    args.output.redirect_metrics(&mut file.federation);
    let bars = display::bars(!args.output.quiet);
    display::init_logging("warn", &bars);
    let done = run_local(file, &args.file, bars, args.fresh)?;
    print_summary(
        &done.rounds,
        &done.outcome.server,
        done.metrics.as_deref(),
        args.output.json,
        serde_json::json!({
            "clients": done.clients,
            "clients_failed": done.failed,
            "data": done.data,
        }),
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
    /// Which records trained and which evaluated
    /// ([`TaskConfig::provenance`]).
    pub data: serde_json::Value,
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
    let data = task.provenance();
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
            data,
        })
    })
}

/// Runs the one party of a `fedveil run` file without a federation
/// (FS-LLM's Global or Local baseline, [`fedveil_fed::one_party`]): the
/// file's clients are the population whose records `party` names.
pub fn run_alone(
    file: RunFile,
    base: &Path,
    party: fedveil_task::Party,
    bars: indicatif::MultiProgress,
) -> anyhow::Result<fedveil_fed::server::Summary> {
    let population = file.run.clients;
    if population == 0 {
        anyhow::bail!("run.clients: must be at least 1");
    }
    let plan = file.plan();
    let one = plan.resolve_one_party()?;
    let task = TaskConfig::parse(&file.task, file.offsite.as_ref(), base)?;
    let (mut evaluator, mut trainer) =
        task.one_party(population, party, &mut display::task_progress(&bars))?;
    let bar = bars.add(
        indicatif::ProgressBar::new(one.rounds).with_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>8} [{bar:32}] {pos}/{len} rounds · {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
    );
    bar.set_prefix(match party {
        fedveil_task::Party::Pooled => "global".to_string(),
        fedveil_task::Party::Client(i) => format!("local {i}"),
    });
    let mut on_round = |m: &fedveil_fed::metrics::RoundMetrics| {
        bar.set_message(format!("loss {:.4}", m.loss.unwrap_or(f64::NAN)));
        bar.inc(1);
    };
    let summary = fedveil_fed::one_party::run(fedveil_fed::one_party::OnePartyRun {
        plan: &one,
        trainer: trainer.as_mut(),
        evaluator: evaluator.as_mut(),
        randomness: Randomness::os(),
        metrics: plan.federation.metrics.clone(),
        on_round: Some(&mut on_round),
    })?;
    bar.finish_and_clear();
    Ok(summary)
}
