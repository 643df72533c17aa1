//! `fedveil sweep FILE`: a grid of federations over the noise multiplier
//! (or a target ε), the number of clients and the number of rounds, each
//! run in this process from the same base run file; then utility against
//! the ε actually spent, as CSV, JSON, a Markdown table and an SVG plot,
//! with the points of other sweeps (`beside`) in the table and the plot.

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
    /// run; `inf` runs without differential privacy); not together with
    /// `noise_multiplier`.
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
    /// Other sweeps' `results.json` (relative to this file), whose points
    /// the table and the plot show beside this sweep's (they are not run).
    #[serde(default)]
    beside: Vec<PathBuf>,
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

fn unit_label(unit: Option<DpUnit>) -> &'static str {
    match unit {
        None => "none",
        Some(DpUnit::Client) => "client",
        Some(DpUnit::Record) => "record",
    }
}

/// A sweep's `results.json`.
#[derive(Deserialize)]
struct Results {
    metric: String,
    points: Vec<Point>,
}

fn read_results(path: &Path) -> anyhow::Result<Results> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
}

/// One point's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Point {
    privacy: Privacy,
    /// What one neighbouring change is; none without differential privacy
    /// (and in results written before sweeps recorded it).
    #[serde(default)]
    unit: Option<DpUnit>,
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
    // Each point writes its own adapters, if the base file saves them.
    if file.task.contains_key("save_adapter") {
        file.task.insert(
            "save_adapter".into(),
            toml::Value::String(dir.join("adapter").display().to_string()),
        );
    }
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
    let mut beside = Vec::new();
    for b in &s.beside {
        let path = relative_to(&args.file, b);
        let r = read_results(&path)?;
        anyhow::ensure!(
            r.metric == s.metric,
            "{} measured {:?}, this sweep {:?}: they cannot share a plot",
            path.display(),
            r.metric,
            s.metric
        );
        beside.extend(r.points);
    }
    if args.replot {
        let r = read_results(&out.join("results.json"))?;
        write_results(&out, &r.metric, &r.points, &beside)?;
        print!("{}", markdown(&r.metric, &r.points, &beside));
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
            .map(|&e| {
                if e == f64::INFINITY {
                    Privacy::None
                } else {
                    Privacy::TargetEpsilon(e)
                }
            })
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
        let unit = (p != Privacy::None).then_some(file.dp.unit);
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
            unit,
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
    write_results(&out, &s.metric, &points, &beside)?;
    print!("{}", markdown(&s.metric, &points, &beside));
    println!(
        "\nwrote {0}/results.csv, results.json, results.md and utility.svg",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// The table: this sweep's points, then those of the sweeps beside it
/// (marked so).
fn markdown(metric: &str, points: &[Point], beside: &[Point]) -> String {
    let mut out = format!(
        "| unit | privacy | clients | rounds | ε spent | initial loss | final loss | {metric} | seconds |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    let marked = points
        .iter()
        .map(|p| (p, ""))
        .chain(beside.iter().map(|p| (p, " (beside)")));
    for (p, mark) in marked {
        out.push_str(&format!(
            "| {}{mark} | {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
            unit_label(p.unit),
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

/// `results.csv` and `results.json` hold this sweep's points;
/// `results.md` and `utility.svg` also show those `beside` it.
fn write_results(
    out: &Path,
    metric: &str,
    points: &[Point],
    beside: &[Point],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut csv = format!(
        "privacy,noise_multiplier,target_epsilon,clients,rounds,epsilon,delta,initial_loss,loss,{metric},clients_failed,seconds,unit\n"
    );
    for p in points {
        let (z, t) = match p.privacy {
            Privacy::None => (String::new(), String::new()),
            Privacy::NoiseMultiplier(z) => (z.to_string(), String::new()),
            Privacy::TargetEpsilon(e) => (String::new(), e.to_string()),
        };
        let o = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        csv.push_str(&format!(
            "{},{z},{t},{},{},{},{},{},{},{},{},{:.3},{}\n",
            p.privacy.label(),
            p.clients,
            p.rounds,
            o(p.epsilon),
            o(p.delta),
            o(p.initial_loss),
            o(p.loss),
            o(p.utility),
            p.clients_failed,
            p.seconds,
            unit_label(p.unit)
        ));
    }
    crate::write_file(&out.join("results.csv"), csv.as_bytes())?;
    let json = serde_json::json!({ "metric": metric, "points": points });
    crate::write_file(
        &out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    crate::write_file(
        &out.join("results.md"),
        markdown(metric, points, beside).as_bytes(),
    )?;
    let all: Vec<Point> = points.iter().chain(beside).cloned().collect();
    plot(&out.join("utility.svg"), metric, &all)
}

/// Utility against ε (log scale), one line per (unit, clients, rounds);
/// runs without differential privacy are dashed horizontal lines. A loss
/// far above the starting model's (a run that diverged) would squash every
/// other point into a line: it is drawn as a marker at the top edge with
/// its value written beside it.
fn plot(path: &Path, metric: &str, points: &[Point]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let all_y: Vec<f64> = points.iter().filter_map(|p| p.utility).collect();
    if all_y.is_empty() {
        anyhow::bail!("no run produced the metric {metric:?} to plot");
    }
    let start = points
        .iter()
        .filter_map(|p| p.initial_loss)
        .fold(f64::NEG_INFINITY, f64::max);
    let off_chart = |y: f64| metric == "loss" && start.is_finite() && y > 1.5 * start;
    let (mut lo, mut hi) = all_y
        .iter()
        .copied()
        .chain(points.iter().filter_map(|p| p.initial_loss))
        .filter(|&y| !off_chart(y))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
    let pad = ((hi - lo) * 0.1).max(1e-3);
    lo -= pad;
    hi += pad;
    // Room at the top for the markers of points off the chart.
    let top = if all_y.iter().any(|&y| off_chart(y)) {
        hi + (hi - lo) * 0.08
    } else {
        hi
    };
    let eps: Vec<f64> = points.iter().filter_map(|p| p.epsilon).collect();
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
        .build_cartesian_2d((emin..emax).log_scale(), lo..top)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("ε spent (δ = 1e-5, log scale; per client or per record, as the unit says)")
        .y_desc(metric)
        .draw()
        .map_err(draw)?;
    let mut series: Vec<(Option<DpUnit>, u32, u64)> = points
        .iter()
        .filter(|p| p.epsilon.is_some())
        .map(|p| (p.unit, p.clients, p.rounds))
        .collect();
    series.sort_by_key(|&(u, c, r)| (unit_label(u), c, r));
    series.dedup();
    for (i, &(unit, c, r)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let mut line: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| (p.unit, p.clients, p.rounds) == (unit, c, r))
            .filter_map(|p| Some((p.epsilon?, p.utility?)))
            .map(|(x, y)| (x, if off_chart(y) { top } else { y }))
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        let label = match unit {
            Some(u) => format!("{}-level DP, {c} clients, {r} rounds", unit_label(Some(u))),
            None => format!("{c} clients, {r} rounds"),
        };
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
    }
    // The values of the points off the chart, beside their markers.
    for p in points.iter().filter(|p| p.epsilon.is_some()) {
        if let (Some(x), Some(y)) = (p.epsilon, p.utility)
            && off_chart(y)
        {
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{y:.2} ↑"),
                    (x * 1.15, top),
                    ("sans-serif", 14),
                )))
                .map_err(draw)?;
        }
    }
    // Runs without differential privacy: one dashed line each, grey.
    let plain: Vec<&Point> = points.iter().filter(|p| p.epsilon.is_none()).collect();
    for (i, p) in plain.iter().enumerate() {
        let Some(y) = p.utility else { continue };
        let grey = RGBColor(90, 90, 90).mix(0.9 - 0.3 * (i % 2) as f64);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(emin, y), (emax, y)],
                6,
                4,
                grey.stroke_width(1),
            ))
            .map_err(draw)?
            .label(format!(
                "no DP, {} clients, {} rounds: {y:.4}",
                p.clients, p.rounds
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
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
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(unit: Option<DpUnit>, epsilon: Option<f64>, loss: f64) -> Point {
        Point {
            privacy: match epsilon {
                None => Privacy::None,
                Some(e) => Privacy::TargetEpsilon(e),
            },
            unit,
            clients: 3,
            rounds: 3,
            epsilon,
            delta: epsilon.map(|_| 1e-5),
            initial_loss: Some(1.4732),
            loss: Some(loss),
            eval: Default::default(),
            utility: Some(loss),
            clients_failed: 0,
            seconds: 1.0,
        }
    }

    /// Both units on one plot, each its own line; a diverged run is a
    /// marker at the top with its value, and the axis stays on the rest.
    #[test]
    fn the_plot_draws_each_unit_and_marks_a_diverged_run_off_the_chart() {
        let dir = std::env::temp_dir().join(format!("fedveil-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("u.svg");
        let points = [
            point(None, None, 1.4469),
            point(Some(DpUnit::Record), Some(1.0), 1.4729),
            point(Some(DpUnit::Record), Some(8.0), 1.4726),
            point(Some(DpUnit::Client), Some(231.0), 1.4574),
            point(Some(DpUnit::Client), Some(9.0), 10.8256),
        ];
        plot(&path, "loss", &points).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.contains("record-level DP, 3 clients, 3 rounds"),
            "{svg}"
        );
        assert!(
            svg.contains("client-level DP, 3 clients, 3 rounds"),
            "{svg}"
        );
        assert!(svg.contains("10.83 ↑"), "{svg}");
        // The y axis is labelled within the bulk of the points, never at 10.
        assert!(!svg.contains(">10.0<") && !svg.contains(">10<"), "{svg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
