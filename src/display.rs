//! What a person watching a federation sees: logs (tracing), progress bars
//! (indicatif, only on a terminal) and the summary table at the end.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use fedveil_fed::metrics::{Event, RoundMetrics};
use fedveil_fed::secagg::Stage;
use fedveil_fed::server::Summary;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Writes log lines above the progress bars instead of through them.
#[derive(Clone)]
struct BarWriter(MultiProgress);

impl Write for BarWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().lock().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for BarWriter {
    type Writer = BarWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Sends logs to stderr, above `bars`. `FEDVEIL_LOG` (e.g. `debug`, or
/// `fedveil_fed=debug,info`) overrides `default`.
pub fn init_logging(default: &str, bars: &MultiProgress) {
    let filter = EnvFilter::try_from_env("FEDVEIL_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(BarWriter(bars.clone()))
        .try_init();
}

/// Progress bars on stderr; hidden when stderr is not a terminal.
pub fn bars(show: bool) -> MultiProgress {
    if show {
        MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
    } else {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    }
}

/// A bar for a preparation phase of `len` steps (distilling an emulator),
/// drawn with the run's bars; finish it with `finish_and_clear`.
pub fn phase(bars: &MultiProgress, len: u64, what: &str) -> ProgressBar {
    let style =
        ProgressStyle::with_template("{prefix:>8} [{bar:32}] {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    let bar = bars.add(ProgressBar::new(len).with_style(style));
    bar.set_prefix(what.to_string());
    bar
}

/// A task's long preparations drawn as bars: one per phase, added on its
/// first step and cleared after its last.
pub fn task_progress(bars: &MultiProgress) -> impl FnMut(fedveil_task::Progress<'_>) + '_ {
    let mut current: Option<(String, ProgressBar)> = None;
    move |p| {
        if current.as_ref().is_none_or(|(name, _)| name != p.phase) {
            if let Some((_, bar)) = current.take() {
                bar.finish_and_clear();
            }
            current = Some((p.phase.to_string(), phase(bars, p.total, p.phase)));
        }
        if let Some((_, bar)) = &current {
            bar.set_position(p.done);
            bar.set_message(p.message.to_string());
            if p.done >= p.total {
                bar.finish_and_clear();
                current = None;
            }
        }
    }
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::AdvertiseKeys => "local training",
        Stage::ShareKeys => "sharing keys",
        Stage::MaskedInput => "masked inputs",
        Stage::ConsistencyCheck => "consistency check",
        Stage::Unmasking => "unmasking",
    }
}

fn headline(m: &RoundMetrics) -> String {
    let mut s = match m.loss {
        Some(l) => format!("loss {l:.5}"),
        None => "no evaluation".into(),
    };
    if let Some(e) = m.epsilon {
        s.push_str(&format!(" · ε {e:.3}"));
    }
    s
}

/// Follows the server's events until they end, drawing progress, and
/// returns the completed rounds' metrics.
pub async fn follow(
    mut events: UnboundedReceiver<Event>,
    bars: MultiProgress,
    rounds: u64,
) -> Vec<RoundMetrics> {
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:32}] {pos}/{len} rounds · {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let overall = bars.add(ProgressBar::new(rounds).with_style(style));
    overall.set_prefix("fedveil");
    overall.set_message("starting");
    let spinner = bars.add(ProgressBar::new_spinner());
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(Duration::from_millis(120));
    let mut done = Vec::new();
    let mut cohort = 0usize;
    while let Some(e) = events.recv().await {
        match e {
            Event::Listening(addr) => {
                spinner.set_message(format!("listening on {addr}; evaluating the initial model"))
            }
            Event::InitialEvaluation(e) => {
                overall.set_message(format!("initial loss {:.5}", e.loss));
                spinner.set_message("waiting for clients");
            }
            Event::Resumed { round } => {
                overall.set_position(round);
                if round >= rounds {
                    tracing::warn!(
                        "the checkpoint already holds all {rounds} rounds: nothing to train. \
                         Raise federation.rounds to go on, or remove federation.checkpoint_dir \
                         to start a new federation"
                    );
                } else {
                    tracing::info!("resumed from the checkpoint after {round} rounds");
                }
            }
            Event::WaitingForClients { connected, needed } => {
                spinner.set_message(format!(
                    "waiting for clients: {connected}/{needed} connected"
                ));
            }
            Event::RoundStarted {
                round,
                attempt,
                cohort: c,
            } => {
                cohort = c.len();
                spinner.reset_elapsed();
                let again = if attempt > 0 {
                    format!(" (session {})", attempt + 1)
                } else {
                    String::new()
                };
                spinner.set_message(format!("round {round}{again}: {cohort} clients"));
            }
            Event::StageStarted { round, stage, .. } => {
                spinner.set_message(format!(
                    "round {round}: {} · {cohort} clients",
                    stage_name(stage)
                ));
            }
            Event::RoundCompleted(m) => {
                overall.set_position(m.round + 1);
                overall.set_message(headline(&m));
                done.push(*m);
            }
            Event::Finished { .. } => break,
            _ => {}
        }
    }
    spinner.finish_and_clear();
    overall.finish();
    done
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn row(m: &RoundMetrics) -> String {
    let loss = m.loss.map_or("-".into(), |l| format!("{l:.6}"));
    let eps = m.epsilon.map_or("-".into(), |e| format!("{e:.4}"));
    let total = m.stage_seconds.get("total").copied().unwrap_or(0.0);
    format!(
        "{:>6} {:>12} {:>9} {:>9} {:>8} {:>10.2} {:>10.2} {:>8.2}",
        m.round,
        loss,
        eps,
        format!("{}/{}", m.survivors, m.cohort),
        m.dropouts.len(),
        mib(m.bytes_sent),
        mib(m.bytes_received),
        total
    )
}

/// The table printed when a federation ends.
pub fn summary_table(rounds: &[RoundMetrics], summary: &Summary, metrics: Option<&Path>) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:>6} {:>12} {:>9} {:>9} {:>8} {:>10} {:>10} {:>8}\n",
        "round", "loss", "epsilon", "survived", "dropped", "sent MiB", "recv MiB", "seconds"
    ));
    const HEAD: usize = 10;
    const TAIL: usize = 20;
    if rounds.is_empty() {
        out.push_str(&format!("{:>6} (no round ran in this invocation)\n", "-"));
    } else if rounds.len() <= HEAD + TAIL + 1 {
        for m in rounds {
            out.push_str(&row(m));
            out.push('\n');
        }
    } else {
        for m in &rounds[..HEAD] {
            out.push_str(&row(m));
            out.push('\n');
        }
        out.push_str(&format!(
            "{:>6} ({} more rounds in the metrics file)\n",
            "…",
            rounds.len() - HEAD - TAIL
        ));
        for m in &rounds[rounds.len() - TAIL..] {
            out.push_str(&row(m));
            out.push('\n');
        }
    }
    out.push('\n');
    out.push_str(&format!(
        "rounds completed  {} ({})\n",
        summary.rounds, summary.reason
    ));
    match (&summary.initial_evaluation, &summary.evaluation) {
        (Some(before), Some(after)) => {
            out.push_str(&format!(
                "{:<17} {:>12} {:>12}\n",
                "evaluation", "before", "after"
            ));
            out.push_str(&format!(
                "{:<17} {:>12.6} {:>12.6}\n",
                "loss", before.loss, after.loss
            ));
            for (k, v) in &after.metrics {
                match before.metrics.get(k) {
                    Some(b) => out.push_str(&format!("{k:<17} {b:>12.6} {v:>12.6}\n")),
                    None => out.push_str(&format!("{k:<17} {:>12} {v:>12.6}\n", "-")),
                }
            }
        }
        (_, Some(ev)) => {
            out.push_str(&format!("final loss        {:.6}\n", ev.loss));
            for (k, v) in &ev.metrics {
                out.push_str(&format!("{k:<17} {v:.6}\n"));
            }
        }
        _ => {}
    }
    match (summary.epsilon, summary.delta) {
        (Some(e), Some(d)) if !summary.client_epsilon.is_empty() => {
            let least = summary
                .client_epsilon
                .values()
                .copied()
                .fold(f64::INFINITY, f64::min);
            out.push_str(&format!(
                "privacy spent     ε = {e:.4} at δ = {d:e} per record (the largest of {} \
                 clients' own accounts; the least {least:.4})\n",
                summary.client_epsilon.len()
            ))
        }
        (Some(e), Some(d)) => out.push_str(&format!("privacy spent     ε = {e:.4} at δ = {d:e}\n")),
        _ => out.push_str("privacy spent     no differential privacy configured\n"),
    }
    let (sent, received) = rounds
        .iter()
        .fold((0, 0), |(s, r), m| (s + m.bytes_sent, r + m.bytes_received));
    out.push_str(&format!(
        "server traffic    {:.2} MiB sent, {:.2} MiB received\n",
        mib(sent),
        mib(received)
    ));
    if let Some(rss) = summary.server_peak_rss_bytes {
        out.push_str(&format!("peak memory       {:.1} MiB\n", mib(rss)));
    }
    if let Some(p) = metrics {
        out.push_str(&format!("metrics           {}\n", p.display()));
    }
    out
}

/// The summary as JSON, for scripts (`--json`).
pub fn summary_json(summary: &Summary, extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({
        "rounds": summary.rounds,
        "reason": summary.reason,
        "loss": summary.evaluation.as_ref().map(|e| e.loss),
        "eval": summary.evaluation.as_ref().map(|e| e.metrics.clone()).unwrap_or_default(),
        "initial_loss": summary.initial_evaluation.as_ref().map(|e| e.loss),
        "initial_eval": summary
            .initial_evaluation
            .as_ref()
            .map(|e| e.metrics.clone())
            .unwrap_or_default(),
        "epsilon": summary.epsilon,
        "delta": summary.delta,
        "client_epsilon": summary.client_epsilon,
        "server_peak_rss_bytes": summary.server_peak_rss_bytes,
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    v
}
