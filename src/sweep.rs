//! `fedveil sweep FILE`: a grid of federations over the noise multiplier
//! (or a target ε), the number of clients and the number of rounds, each
//! run in this process from the same base run file; then utility against
//! the ε actually spent, as CSV, JSON, a Markdown table and an SVG plot.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args as ClapArgs;
use fedveil_fed::config::{DpSection, DpUnit, PlacementName, RunFile, relative_to};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::display;
use crate::run::run_local;

#[derive(ClapArgs)]
pub struct Args {
    /// The sweep's TOML file (see configs/sweep-gsm8k.toml).
    file: PathBuf,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Run nothing: redraw the table and the plot from the sweep's
    /// results.json.
    #[arg(long)]
    replot: bool,
}

/// A sweep file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    sweep: SweepSection,
}

/// `[sweep]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepSection {
    /// The `fedveil run` file every point starts from (relative to this
    /// file).
    base: PathBuf,
    /// Where the results go (relative to this file).
    out: PathBuf,
    /// Noise multipliers; 0 runs without differential privacy.
    #[serde(default)]
    noise_multiplier: Vec<f64>,
    /// Or target ε values (the noise is calibrated to spend each over the
    /// run); not together with `noise_multiplier`.
    #[serde(default)]
    target_epsilon: Vec<f64>,
    /// Client counts (default: the base file's).
    #[serde(default)]
    clients: Vec<u32>,
    /// Round counts (default: the base file's).
    #[serde(default)]
    rounds: Vec<u64>,
    /// The utility on the plot: `loss`, or an evaluation metric's name.
    #[serde(default = "default_metric")]
    metric: String,
    /// Overrides applied to every run, as `--set` takes them.
    #[serde(default)]
    set: Vec<String>,
}

fn default_metric() -> String {
    "loss".into()
}

/// How much noise one point has.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Privacy {
    None,
    NoiseMultiplier(f64),
    TargetEpsilon(f64),
}

impl Privacy {
    fn label(self) -> String {
        match self {
            Privacy::None => "no DP".into(),
            Privacy::NoiseMultiplier(z) => format!("z = {z}"),
            Privacy::TargetEpsilon(e) => format!("target ε = {e}"),
        }
    }
}

/// One point's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Point {
    privacy: Privacy,
    clients: u32,
    rounds: u64,
    /// ε spent (at `delta`); none without differential privacy.
    epsilon: Option<f64>,
    delta: Option<f64>,
    initial_loss: Option<f64>,
    loss: Option<f64>,
    eval: std::collections::BTreeMap<String, f64>,
    /// The plotted utility.
    utility: Option<f64>,
    clients_failed: usize,
    seconds: f64,
}

/// The run file of one point: the base file with the sweep's `--set`
/// overrides, then the point's clients, rounds and privacy set on the
/// typed file (written to `dir/run.toml` as it will run).
fn point_file(
    base: &Path,
    text: &str,
    section: &SweepSection,
    privacy: Privacy,
    clients: Option<u32>,
    rounds: Option<u64>,
    dir: &Path,
) -> anyhow::Result<RunFile> {
    let mut file = RunFile::parse_with(base, text, &section.set)?;
    if let Some(c) = clients {
        file.run.clients = c;
        if file.federation.cohort_size.is_some() {
            file.federation.cohort_size = Some(c);
        }
        if file.dp.min_survivors.is_some_and(|m| m > c) {
            file.dp.min_survivors = Some(c);
        }
    }
    if let Some(r) = rounds {
        file.federation.rounds = r;
    }
    match privacy {
        Privacy::None => file.dp = DpSection::default(),
        Privacy::NoiseMultiplier(z) | Privacy::TargetEpsilon(z) => {
            anyhow::ensure!(
                file.dp.placement != PlacementName::None || file.dp.unit == DpUnit::Record,
                "the base file needs a [dp] table with a placement (or unit = \"record\") and a \
                 clip to sweep noise"
            );
            let dp = &mut file.dp;
            dp.epsilon_budget = None;
            (dp.noise_multiplier, dp.target_epsilon) = match privacy {
                Privacy::TargetEpsilon(_) => (None, Some(z)),
                _ => (Some(z), None),
            };
        }
    }
    // Absolute: the file's own relative paths resolve against the base.
    let dir = std::path::absolute(dir).with_context(|| format!("{}", dir.display()))?;
    file.federation.checkpoint_dir = Some(dir.join("checkpoint"));
    file.federation.metrics = Some(dir.join("metrics.jsonl"));
    let text = toml::to_string(&file).context("writing the point's config")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::write_file(&dir.join("run.toml"), text.as_bytes())?;
    Ok(file)
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let sweep: SweepFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", args.file.display(), e.message().trim_end()))?;
    let s = sweep.sweep;
    let base = relative_to(&args.file, &s.base);
    let out = relative_to(&args.file, &s.out);
    if args.replot {
        let path = out.join("results.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        #[derive(Deserialize)]
        struct Results {
            metric: String,
            points: Vec<Point>,
        }
        let r: Results =
            serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
        write_results(&out, &r.metric, &r.points)?;
        print!("{}", markdown(&r.metric, &r.points));
        return Ok(ExitCode::SUCCESS);
    }
    let base_text =
        std::fs::read_to_string(&base).with_context(|| format!("reading {}", base.display()))?;
    let privacies: Vec<Privacy> = match (s.noise_multiplier.is_empty(), s.target_epsilon.is_empty())
    {
        (false, true) => s
            .noise_multiplier
            .iter()
            .map(|&z| {
                if z == 0.0 {
                    Privacy::None
                } else {
                    Privacy::NoiseMultiplier(z)
                }
            })
            .collect(),
        (true, false) => s
            .target_epsilon
            .iter()
            .map(|&e| Privacy::TargetEpsilon(e))
            .collect(),
        (true, true) => anyhow::bail!("sweep: give noise_multiplier or target_epsilon values"),
        (false, false) => {
            anyhow::bail!("sweep: noise_multiplier and target_epsilon exclude each other")
        }
    };
    for p in &privacies {
        if let Privacy::NoiseMultiplier(v) | Privacy::TargetEpsilon(v) = p
            && !(v.is_finite() && *v > 0.0)
        {
            anyhow::bail!("sweep: {} is not a positive number", p.label());
        }
    }
    let clients: Vec<Option<u32>> = if s.clients.is_empty() {
        vec![None]
    } else {
        s.clients.iter().copied().map(Some).collect()
    };
    let rounds: Vec<Option<u64>> = if s.rounds.is_empty() {
        vec![None]
    } else {
        s.rounds.iter().copied().map(Some).collect()
    };
    let mut grid = Vec::new();
    for &c in &clients {
        for &r in &rounds {
            for &p in &privacies {
                grid.push((p, c, r));
            }
        }
    }
    // Every point's file is checked before the first runs.
    let mut files = Vec::with_capacity(grid.len());
    for (i, &(p, c, r)) in grid.iter().enumerate() {
        let dir = out.join(format!("run-{i:02}"));
        let file = point_file(&base, &base_text, &s, p, c, r, &dir)
            .with_context(|| format!("point {i} ({})", p.label()))?;
        file.plan().resolve(file.run.clients, 1)?;
        files.push(file);
    }
    let bars = display::bars(!args.quiet);
    display::init_logging("warn", &bars);
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:32}] {pos}/{len} runs · {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let overall = bars.add(ProgressBar::new(grid.len() as u64).with_style(style));
    overall.set_prefix("sweep");
    let mut points = Vec::with_capacity(grid.len());
    for (&(p, _, _), file) in grid.iter().zip(files) {
        overall.set_message(format!(
            "{} · {} clients · {} rounds",
            p.label(),
            file.run.clients,
            file.federation.rounds
        ));
        let started = Instant::now();
        let (clients, rounds) = (file.run.clients, file.federation.rounds);
        let done = run_local(file, &base, bars.clone(), true)?;
        let server = &done.outcome.server;
        let utility = match s.metric.as_str() {
            "loss" => server.evaluation.as_ref().map(|e| e.loss),
            m => server
                .evaluation
                .as_ref()
                .and_then(|e| e.metrics.get(m).copied()),
        };
        points.push(Point {
            privacy: p,
            clients,
            rounds,
            epsilon: server.epsilon,
            delta: server.delta,
            initial_loss: server.initial_evaluation.as_ref().map(|e| e.loss),
            loss: server.evaluation.as_ref().map(|e| e.loss),
            eval: server
                .evaluation
                .as_ref()
                .map(|e| e.metrics.clone())
                .unwrap_or_default(),
            utility,
            clients_failed: done.failed,
            seconds: started.elapsed().as_secs_f64(),
        });
        overall.inc(1);
    }
    overall.finish_and_clear();
    write_results(&out, &s.metric, &points)?;
    print!("{}", markdown(&s.metric, &points));
    println!(
        "\nwrote {0}/results.csv, results.json, results.md and utility.svg",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn markdown(metric: &str, points: &[Point]) -> String {
    let mut out = format!(
        "| privacy | clients | rounds | ε spent | initial loss | final loss | {metric} | seconds |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for p in points {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
            p.privacy.label(),
            p.clients,
            p.rounds,
            p.epsilon
                .map_or_else(|| "∞ (no DP)".into(), |e| format!("{e:.2}")),
            fmt(p.initial_loss, 4),
            fmt(p.loss, 4),
            fmt(p.utility, 4),
            p.seconds
        ));
    }
    out
}

fn write_results(out: &Path, metric: &str, points: &[Point]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut csv = format!(
        "privacy,noise_multiplier,target_epsilon,clients,rounds,epsilon,delta,initial_loss,loss,{metric},clients_failed,seconds\n"
    );
    for p in points {
        let (z, t) = match p.privacy {
            Privacy::None => (String::new(), String::new()),
            Privacy::NoiseMultiplier(z) => (z.to_string(), String::new()),
            Privacy::TargetEpsilon(e) => (String::new(), e.to_string()),
        };
        let o = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        csv.push_str(&format!(
            "{},{z},{t},{},{},{},{},{},{},{},{},{:.3}\n",
            p.privacy.label(),
            p.clients,
            p.rounds,
            o(p.epsilon),
            o(p.delta),
            o(p.initial_loss),
            o(p.loss),
            o(p.utility),
            p.clients_failed,
            p.seconds
        ));
    }
    crate::write_file(&out.join("results.csv"), csv.as_bytes())?;
    let json = serde_json::json!({ "metric": metric, "points": points });
    crate::write_file(
        &out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    crate::write_file(&out.join("results.md"), markdown(metric, points).as_bytes())?;
    plot(&out.join("utility.svg"), metric, points)
}

/// Utility against ε (log scale), one line per (clients, rounds); runs
/// without differential privacy are dashed horizontal lines.
fn plot(path: &Path, metric: &str, points: &[Point]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let dp: Vec<&Point> = points
        .iter()
        .filter(|p| p.epsilon.is_some() && p.utility.is_some())
        .collect();
    let all_y: Vec<f64> = points.iter().filter_map(|p| p.utility).collect();
    if all_y.is_empty() {
        anyhow::bail!("no run produced the metric {metric:?} to plot");
    }
    let (mut lo, mut hi) = all_y
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| {
            (a.min(y), b.max(y))
        });
    let pad = ((hi - lo) * 0.1).max(1e-3);
    lo -= pad;
    hi += pad;
    let eps: Vec<f64> = dp.iter().filter_map(|p| p.epsilon).collect();
    let (emin, emax) = if eps.is_empty() {
        (0.1, 10.0)
    } else {
        let a = eps.iter().copied().fold(f64::INFINITY, f64::min);
        let b = eps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (a / 2.0, b * 2.0)
    };
    let root = SVGBackend::new(path, (800, 520)).into_drawing_area();
    let draw = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{metric} against the ε spent"), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((emin..emax).log_scale(), lo..hi)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("ε spent (δ = 1e-5, log scale)")
        .y_desc(metric)
        .draw()
        .map_err(draw)?;
    let mut series: Vec<(u32, u64)> = points.iter().map(|p| (p.clients, p.rounds)).collect();
    series.sort();
    series.dedup();
    for (i, &(c, r)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let mut line: Vec<(f64, f64)> = dp
            .iter()
            .filter(|p| (p.clients, p.rounds) == (c, r))
            .filter_map(|p| Some((p.epsilon?, p.utility?)))
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        let label = format!("{c} clients, {r} rounds");
        chart
            .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))
            .map_err(draw)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart
            .draw_series(
                line.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, colour.filled())),
            )
            .map_err(draw)?;
        for p in points
            .iter()
            .filter(|p| (p.clients, p.rounds) == (c, r) && p.epsilon.is_none())
        {
            let Some(y) = p.utility else { continue };
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(emin, y), (emax, y)],
                    6,
                    4,
                    colour.stroke_width(1),
                ))
                .map_err(draw)?
                .label(format!("{c} clients, {r} rounds, no DP"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        }
    }
    // The held-out loss of the model every run starts from.
    let starts: Vec<f64> = points.iter().filter_map(|p| p.initial_loss).collect();
    if metric == "loss"
        && let Some(&y) = starts.first()
        && starts.iter().all(|&s| (s - y).abs() < 1e-9)
    {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(emin, y), (emax, y)],
                2,
                4,
                BLACK.mix(0.5).stroke_width(1),
            ))
            .map_err(draw)?
            .label("before fine-tuning")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}
