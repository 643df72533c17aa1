//! `fedveil sweep FILE`: a grid of federations over the noise multiplier
//! (or a target ε), the number of clients and the number of rounds, each
//! run in this process from the same base run file; then utility against
//! the ε actually spent, as CSV, JSON, a Markdown table and an SVG plot,
//! with the points of other sweeps (`beside`) in the table and the plot.
//!
//! With `baselines`, each point also runs FS-LLM's Global baseline (one
//! party holding every client's records) and Local baseline (each client
//! alone), without a federation ([`fedveil_fed::one_party`]); with `seeds`,
//! every run is repeated per seed, and the table, the summary CSV and the
//! plot give the mean ± the standard deviation over the seeds.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args as ClapArgs;
use fedveil_fed::config::{DpSection, DpUnit, PlacementName, RunFile, relative_to};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::display;
use crate::run::{run_alone, run_local};

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
    /// Keep the runs a cut-short sweep finished (those whose run.toml is
    /// unchanged and whose point.json was written) and run the rest.
    #[arg(long)]
    resume: bool,
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
    /// What runs at each point: `"fed"` (the federation, the default),
    /// `"global"` (one party with every client's records) and `"local"`
    /// (each client alone, the mean over the clients).
    #[serde(default)]
    baselines: Vec<String>,
    /// `task.seed` values: every run is repeated with each (default: the
    /// base file's seed, once).
    #[serde(default)]
    seeds: Vec<u64>,
}

/// Who trains at one point: FS-LLM's comparison.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Baseline {
    /// One party holding every client's records, without a federation.
    Global,
    /// The federation.
    #[default]
    Fed,
    /// One client's records alone, without a federation.
    Local,
}

impl Baseline {
    fn parse(name: &str) -> anyhow::Result<Baseline> {
        Ok(match name {
            "global" => Baseline::Global,
            "fed" => Baseline::Fed,
            "local" => Baseline::Local,
            other => anyhow::bail!(
                "sweep.baselines: unknown baseline {other:?} (known: \"global\", \"fed\", \"local\")"
            ),
        })
    }

    fn label(self) -> &'static str {
        match self {
            Baseline::Global => "Global",
            Baseline::Fed => "Fed",
            Baseline::Local => "Local",
        }
    }
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
    /// Who trained (results written before sweeps had baselines: `fed`).
    #[serde(default)]
    baseline: Baseline,
    /// The run's `task.seed`, when the task has one.
    #[serde(default)]
    seed: Option<u64>,
    /// Local: which client trained alone.
    #[serde(default)]
    party: Option<u32>,
}

/// One run of the sweep.
#[derive(Copy, Clone, Debug)]
struct Spec {
    privacy: Privacy,
    clients: Option<u32>,
    rounds: Option<u64>,
    seed: Option<u64>,
    baseline: Baseline,
    /// Local: the client that trains alone.
    party: Option<u32>,
}

/// The run file of one run: the base file with the sweep's `--set`
/// overrides, then the run's clients, rounds, seed and privacy set on the
/// typed file (written to `dir/run.toml` as it will run). Global takes as
/// many training steps per round as the federation's cohort of `m` does
/// together, each of a client's batch (with record-level DP: the same
/// expected batch, its sampling rate divided by the `n` clients whose
/// records it holds): it sees as many records per round as the federation.
fn point_file(
    base: &Path,
    text: &str,
    section: &SweepSection,
    spec: &Spec,
    dir: &Path,
) -> anyhow::Result<RunFile> {
    let Spec {
        privacy,
        clients,
        rounds,
        seed,
        baseline,
        ..
    } = *spec;
    let mut file = RunFile::parse_with(base, text, &section.set)?;
    if let Some(seed) = seed {
        let seed = i64::try_from(seed).context("sweep.seeds: a seed is too large")?;
        file.task.insert("seed".into(), toml::Value::Integer(seed));
    }
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
    if baseline == Baseline::Global {
        let n = file.run.clients;
        let cohort = match (file.federation.cohort_size, file.federation.sampling_rate) {
            (Some(c), _) => c,
            (None, Some(q)) => ((q * f64::from(n)).round() as u32).max(1),
            (None, None) => n,
        };
        file.training.local_steps = file
            .training
            .local_steps
            .checked_mul(cohort)
            .context("training.local_steps times the cohort size overflows")?;
        // n clients' records pooled: a client's expected batch, and each
        // record sampled as often per round as in the federation (where
        // its client is in the cohort with probability m / n).
        if privacy != Privacy::None
            && file.dp.unit == DpUnit::Record
            && let Some(q) = file.dp.sampling_rate.as_mut()
        {
            *q /= f64::from(n);
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

/// A finished run's point, kept in its directory beside its run.toml.
const POINT_FILE: &str = "point.json";

/// The point a finished run left in `dir`, if its run.toml was `before`
/// and is still the same (the run would run as it did) and the point is
/// this run's (the same baseline, client, seed, privacy, clients and
/// rounds); its utility is taken afresh for `metric`.
fn finished(
    dir: &Path,
    before: Option<&str>,
    spec: &Spec,
    file: &RunFile,
    metric: &str,
) -> Option<Point> {
    let now = std::fs::read_to_string(dir.join("run.toml")).ok()?;
    if before? != now {
        return None;
    }
    let mut p: Point =
        serde_json::from_str(&std::fs::read_to_string(dir.join(POINT_FILE)).ok()?).ok()?;
    let seed = task_seed(file);
    let same = (p.baseline, p.party, p.seed, p.privacy, p.clients, p.rounds)
        == (
            spec.baseline,
            spec.party,
            seed,
            spec.privacy,
            file.run.clients,
            file.federation.rounds,
        );
    if !same {
        return None;
    }
    p.utility = utility_of(metric, p.loss, &p.eval);
    Some(p)
}

/// A run file's `task.seed`, when the task has one.
fn task_seed(file: &RunFile) -> Option<u64> {
    file.task
        .get("seed")
        .and_then(|v| v.as_integer())
        .map(|s| s as u64)
}

/// The plotted utility: the loss, or an evaluation metric.
fn utility_of(
    metric: &str,
    loss: Option<f64>,
    eval: &std::collections::BTreeMap<String, f64>,
) -> Option<f64> {
    match metric {
        "loss" => loss,
        m => eval.get(m).copied(),
    }
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
    for (i, p) in privacies.iter().enumerate() {
        anyhow::ensure!(
            !privacies[..i].contains(p),
            "sweep: {} is named twice",
            p.label()
        );
    }
    for (key, values) in [
        (
            "clients",
            s.clients.iter().map(|&c| u64::from(c)).collect::<Vec<_>>(),
        ),
        ("rounds", s.rounds.clone()),
    ] {
        for (i, v) in values.iter().enumerate() {
            anyhow::ensure!(!values[..i].contains(v), "sweep.{key}: {v} is named twice");
        }
    }
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
    let mut baselines = Vec::new();
    for b in &s.baselines {
        let b = Baseline::parse(b)?;
        anyhow::ensure!(
            !baselines.contains(&b),
            "sweep.baselines: {b:?} is named twice"
        );
        baselines.push(b);
    }
    if baselines.is_empty() {
        baselines.push(Baseline::Fed);
    }
    baselines.sort();
    let seeds: Vec<Option<u64>> = if s.seeds.is_empty() {
        vec![None]
    } else {
        let mut seen = std::collections::BTreeSet::new();
        for seed in &s.seeds {
            anyhow::ensure!(seen.insert(seed), "sweep.seeds: {seed} is named twice");
        }
        s.seeds.iter().copied().map(Some).collect()
    };
    let mut grid = Vec::new();
    // Seeds outermost: a sweep cut short has whole seeds done.
    for &seed in &seeds {
        for &clients in &clients {
            for &rounds in &rounds {
                for &privacy in &privacies {
                    for &baseline in &baselines {
                        let spec = Spec {
                            privacy,
                            clients,
                            rounds,
                            seed,
                            baseline,
                            party: None,
                        };
                        if baseline != Baseline::Local {
                            grid.push(spec);
                            continue;
                        }
                        // One run per client: the base file's count unless
                        // the sweep sets it.
                        let n = match clients {
                            Some(c) => c,
                            None => RunFile::parse_with(&base, &base_text, &s.set)?.run.clients,
                        };
                        for i in 0..n {
                            grid.push(Spec {
                                party: Some(i),
                                ..spec
                            });
                        }
                    }
                }
            }
        }
    }
    // Every run's file is checked before the first runs.
    let mut files = Vec::with_capacity(grid.len());
    for (i, spec) in grid.iter().enumerate() {
        let dir = out.join(format!("run-{i:02}"));
        let what = || {
            format!(
                "run {i} ({}, {})",
                spec.baseline.label(),
                spec.privacy.label()
            )
        };
        let before = std::fs::read_to_string(dir.join("run.toml")).ok();
        // A fresh sweep forgets what an earlier one in this place ran.
        if !args.resume {
            let _ = std::fs::remove_file(dir.join(POINT_FILE));
        }
        let file = point_file(&base, &base_text, &s, spec, &dir).with_context(what)?;
        let done = if args.resume {
            finished(&dir, before.as_deref(), spec, &file, &s.metric)
        } else {
            None
        };
        if spec.baseline == Baseline::Fed {
            file.plan()
                .resolve(file.run.clients, 1)
                .with_context(what)?;
        } else {
            file.plan().resolve_one_party().with_context(what)?;
        }
        files.push((file, done, dir));
    }
    let bars = display::bars(!args.quiet);
    display::init_logging("warn", &bars);
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:32}] {pos}/{len} runs · {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let overall = bars.add(ProgressBar::new(grid.len() as u64).with_style(style));
    overall.set_prefix("sweep");
    let mut points = Vec::with_capacity(grid.len());
    let kept = files.iter().filter(|f| f.1.is_some()).count();
    if args.resume {
        eprintln!("resuming: {kept} of {} runs finished before", grid.len());
    }
    for (spec, (file, done, dir)) in grid.iter().zip(files) {
        if let Some(point) = done {
            points.push(point);
            overall.inc(1);
            continue;
        }
        let p = spec.privacy;
        let who = match spec.party {
            Some(i) => format!("Local (client {i})"),
            None => spec.baseline.label().to_string(),
        };
        overall.set_message(format!(
            "{who} · {} · {} clients · {} rounds{}",
            p.label(),
            file.run.clients,
            file.federation.rounds,
            spec.seed
                .map(|s| format!(" · seed {s}"))
                .unwrap_or_default()
        ));
        let started = Instant::now();
        let (clients, rounds) = (file.run.clients, file.federation.rounds);
        let unit = (p != Privacy::None).then_some(file.dp.unit);
        let seed = task_seed(&file);
        let (server, failed) = match (spec.baseline, spec.party) {
            (Baseline::Fed, _) => {
                let done = run_local(file, &base, bars.clone(), true)?;
                (done.outcome.server, done.failed)
            }
            (_, party) => {
                // A fresh start, as the federation's runs have.
                if let Some(m) = &file.federation.metrics {
                    let _ = std::fs::remove_file(m);
                }
                let party = party.map_or(fedveil_task::Party::Pooled, fedveil_task::Party::Client);
                (run_alone(file, &base, party, bars.clone())?, 0)
            }
        };
        let utility = server
            .evaluation
            .as_ref()
            .and_then(|e| utility_of(&s.metric, Some(e.loss), &e.metrics));
        let point = Point {
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
            clients_failed: failed,
            seconds: started.elapsed().as_secs_f64(),
            baseline: spec.baseline,
            seed,
            party: spec.party,
        };
        crate::write_file(
            &dir.join(POINT_FILE),
            serde_json::to_string_pretty(&point)?.as_bytes(),
        )?;
        points.push(point);
        overall.inc(1);
        // What is done so far, should the sweep be cut short (the plot
        // waits for a run with the metric).
        if let Err(e) = write_results(&out, &s.metric, &points, &beside)
            && points.iter().any(|p| p.utility.is_some())
        {
            return Err(e);
        }
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

/// One cell of FS-LLM's comparison: the runs of one baseline at one
/// privacy level, clients and rounds, over the seeds; Local's runs are
/// first averaged over the clients of each seed.
#[derive(Clone, Debug, Serialize)]
struct Summary {
    baseline: Baseline,
    unit: Option<DpUnit>,
    privacy: Privacy,
    clients: u32,
    rounds: u64,
    /// The mean ε spent; none without differential privacy.
    epsilon: Option<f64>,
    initial_loss: Option<f64>,
    /// The utility's mean over the seeds.
    mean: Option<f64>,
    /// Its sample standard deviation over the seeds (none with one seed).
    std: Option<f64>,
    /// Seeds with a utility.
    seeds: usize,
    /// Runs in all.
    runs: usize,
    /// From a sweep beside this one (the plot draws it apart).
    #[serde(skip)]
    beside: bool,
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The sample standard deviation (n − 1); none below two values.
fn std_dev(v: &[f64]) -> Option<f64> {
    let m = mean(v)?;
    (v.len() > 1)
        .then(|| (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
}

/// The points grouped by (baseline, unit, privacy, clients, rounds), in
/// the order they first appear.
fn summarize(points: &[Point]) -> Vec<Summary> {
    let mut groups: Vec<(Summary, Vec<&Point>)> = Vec::new();
    for p in points {
        let key = |s: &Summary| {
            (s.baseline, s.unit, s.privacy, s.clients, s.rounds)
                == (p.baseline, p.unit, p.privacy, p.clients, p.rounds)
        };
        match groups.iter_mut().find(|(s, _)| key(s)) {
            Some((_, members)) => members.push(p),
            None => groups.push((
                Summary {
                    baseline: p.baseline,
                    unit: p.unit,
                    privacy: p.privacy,
                    clients: p.clients,
                    rounds: p.rounds,
                    epsilon: None,
                    initial_loss: None,
                    mean: None,
                    std: None,
                    seeds: 0,
                    runs: 0,
                    beside: false,
                },
                vec![p],
            )),
        }
    }
    groups
        .into_iter()
        .map(|(mut s, members)| {
            let mut by_seed: Vec<(Option<u64>, Vec<f64>)> = Vec::new();
            for p in &members {
                let Some(u) = p.utility else { continue };
                match by_seed.iter_mut().find(|(seed, _)| *seed == p.seed) {
                    Some((_, v)) => v.push(u),
                    None => by_seed.push((p.seed, vec![u])),
                }
            }
            let per_seed: Vec<f64> = by_seed.iter().filter_map(|(_, v)| mean(v)).collect();
            let eps: Vec<f64> = members.iter().filter_map(|p| p.epsilon).collect();
            let initial: Vec<f64> = members.iter().filter_map(|p| p.initial_loss).collect();
            s.epsilon = mean(&eps);
            s.initial_loss = mean(&initial);
            s.mean = mean(&per_seed);
            s.std = std_dev(&per_seed);
            s.seeds = per_seed.len();
            s.runs = members.len();
            s
        })
        .collect()
}

/// Whether the table shows the comparison (baselines or several seeds)
/// before the runs.
fn compares(points: &[Point]) -> bool {
    points.iter().any(|p| p.baseline != Baseline::Fed)
        || summarize(points).iter().any(|s| s.runs > 1)
}

fn epsilon_cell(e: Option<f64>) -> String {
    e.map_or_else(|| "∞ (no DP)".into(), |e| format!("{e:.2}"))
}

/// The table: with baselines or seeds, first the mean ± standard deviation
/// of each baseline at each point; then every run. This sweep's rows come
/// first, then those of the sweeps beside it (marked so).
fn markdown(metric: &str, points: &[Point], beside: &[Point]) -> String {
    let compare = compares(points) || compares(beside);
    let mut out = String::new();
    if compare {
        out.push_str(&format!(
            "| baseline | unit | privacy | clients | rounds | ε spent | initial loss | {metric} (mean ± std) | seeds |\n\
             |---|---|---|---|---|---|---|---|---|\n"
        ));
        let marked = summarize(points)
            .into_iter()
            .map(|s| (s, ""))
            .chain(summarize(beside).into_iter().map(|s| (s, " (beside)")));
        for (s, mark) in marked {
            let value = match (s.mean, s.std) {
                (Some(m), Some(d)) => format!("{m:.4} ± {d:.4}"),
                (m, _) => fmt(m, 4),
            };
            out.push_str(&format!(
                "| {}{mark} | {} | {} | {} | {} | {} | {} | {value} | {} |\n",
                s.baseline.label(),
                unit_label(s.unit),
                s.privacy.label(),
                s.clients,
                s.rounds,
                epsilon_cell(s.epsilon),
                fmt(s.initial_loss, 4),
                s.seeds
            ));
        }
        out.push_str("\nEvery run:\n\n| baseline | seed ");
    }
    out.push_str(&format!(
        "| unit | privacy | clients | rounds | ε spent | initial loss | final loss | {metric} | seconds |\n"
    ));
    out.push_str(if compare { "|---|---" } else { "" });
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let marked = points
        .iter()
        .map(|p| (p, ""))
        .chain(beside.iter().map(|p| (p, " (beside)")));
    for (p, mark) in marked {
        let mut unit = format!("{}{mark}", unit_label(p.unit));
        if compare {
            let who = match p.party {
                Some(i) => format!("Local (client {i})"),
                None => p.baseline.label().to_string(),
            };
            out.push_str(&format!(
                "| {who}{mark} | {} ",
                p.seed.map_or_else(|| "-".into(), |s| s.to_string())
            ));
            unit = unit_label(p.unit).to_string();
        }
        out.push_str(&format!(
            "| {unit} | {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
            p.privacy.label(),
            p.clients,
            p.rounds,
            epsilon_cell(p.epsilon),
            fmt(p.initial_loss, 4),
            fmt(p.loss, 4),
            fmt(p.utility, 4),
            p.seconds
        ));
    }
    out
}

/// The privacy's noise multiplier and target ε columns.
fn privacy_columns(p: Privacy) -> (String, String) {
    match p {
        Privacy::None => (String::new(), String::new()),
        Privacy::NoiseMultiplier(z) => (z.to_string(), String::new()),
        Privacy::TargetEpsilon(e) => (String::new(), e.to_string()),
    }
}

/// `results.csv` and `results.json` hold this sweep's runs (the JSON also
/// its summary), `summary.csv` the mean ± standard deviation of each
/// baseline at each point; `results.md` and `utility.svg` also show the
/// sweeps `beside` it.
fn write_results(
    out: &Path,
    metric: &str,
    points: &[Point],
    beside: &[Point],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let o = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut csv = format!(
        "privacy,noise_multiplier,target_epsilon,clients,rounds,epsilon,delta,initial_loss,loss,{metric},clients_failed,seconds,unit,baseline,seed,party\n"
    );
    for p in points {
        let (z, t) = privacy_columns(p.privacy);
        csv.push_str(&format!(
            "{},{z},{t},{},{},{},{},{},{},{},{},{:.3},{},{},{},{}\n",
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
            unit_label(p.unit),
            p.baseline.label().to_lowercase(),
            p.seed.map(|s| s.to_string()).unwrap_or_default(),
            p.party.map(|s| s.to_string()).unwrap_or_default(),
        ));
    }
    crate::write_file(&out.join("results.csv"), csv.as_bytes())?;
    let summary = summarize(points);
    let mut sum_csv = format!(
        "baseline,unit,privacy,noise_multiplier,target_epsilon,clients,rounds,epsilon,initial_loss,{metric}_mean,{metric}_std,seeds,runs\n"
    );
    for s in &summary {
        let (z, t) = privacy_columns(s.privacy);
        sum_csv.push_str(&format!(
            "{},{},{},{z},{t},{},{},{},{},{},{},{},{}\n",
            s.baseline.label().to_lowercase(),
            unit_label(s.unit),
            s.privacy.label(),
            s.clients,
            s.rounds,
            o(s.epsilon),
            o(s.initial_loss),
            o(s.mean),
            o(s.std),
            s.seeds,
            s.runs
        ));
    }
    crate::write_file(&out.join("summary.csv"), sum_csv.as_bytes())?;
    let json = serde_json::json!({ "metric": metric, "points": points, "summary": summary });
    crate::write_file(
        &out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    crate::write_file(
        &out.join("results.md"),
        markdown(metric, points, beside).as_bytes(),
    )?;
    plot(&out.join("utility.svg"), metric, points, beside)
}

/// Utility against ε (log scale), one line per (baseline, unit, clients,
/// rounds) through the mean over the seeds, with error bars of ± one
/// standard deviation; runs without differential privacy are dashed
/// horizontal lines at their mean. A loss far above the starting model's
/// (a run that diverged) would squash every other point into a line: it is
/// drawn as a marker at the top edge with its value written beside it.
fn plot(path: &Path, metric: &str, own: &[Point], beside: &[Point]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    // Each sweep's points summarised apart: a point beside is never
    // averaged with one of this sweep's.
    let mut summary = summarize(own);
    summary.extend(
        summarize(beside)
            .into_iter()
            .map(|s| Summary { beside: true, ..s }),
    );
    let points: Vec<Point> = own.iter().chain(beside).cloned().collect();
    let all_y: Vec<f64> = summary.iter().filter_map(|s| s.mean).collect();
    if all_y.is_empty() {
        anyhow::bail!("no run produced the metric {metric:?} to plot");
    }
    let named = summary.iter().any(|s| s.baseline != Baseline::Fed);
    let start = points
        .iter()
        .filter_map(|p| p.initial_loss)
        .fold(f64::NEG_INFINITY, f64::max);
    let off_chart = |y: f64| metric == "loss" && start.is_finite() && y > 1.5 * start;
    let spread = |s: &Summary| s.std.unwrap_or(0.0);
    let (mut lo, mut hi) = summary
        .iter()
        .filter_map(|s| Some((s.mean?, spread(s))))
        .filter(|&(y, _)| !off_chart(y))
        .flat_map(|(y, d)| [y - d, y + d])
        .chain(points.iter().filter_map(|p| p.initial_loss))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.1).max(1e-3);
    lo -= pad;
    hi += pad;
    // Room at the top for the markers of points off the chart.
    let top = if all_y.iter().any(|&y| off_chart(y)) {
        hi + (hi - lo) * 0.08
    } else {
        hi
    };
    // Room above the data for the legend (upper right), so that it never
    // hides a point: a row of about 19 pixels per line of it, of a plotting
    // area about 400 pixels high.
    let mut private: Vec<_> = summary
        .iter()
        .filter(|s| s.epsilon.is_some())
        .map(|s| {
            (
                s.beside,
                s.baseline,
                unit_label(s.unit),
                s.clients,
                s.rounds,
            )
        })
        .collect();
    private.sort();
    private.dedup();
    let entries = private.len() + summary.iter().filter(|s| s.epsilon.is_none()).count() + 1;
    let share = ((entries * 19 + 16) as f64 / 400.0).min(0.6);
    let chart_top = top + (top - lo) * share / (1.0 - share);
    let eps: Vec<f64> = summary.iter().filter_map(|s| s.epsilon).collect();
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
        .build_cartesian_2d((emin..emax).log_scale(), lo..chart_top)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("ε spent (δ = 1e-5, log scale; per client or per record, as the unit says)")
        .y_desc(if named || summary.iter().any(|s| s.runs > 1) {
            format!("{metric} (mean ± std over seeds)")
        } else {
            metric.to_string()
        })
        .draw()
        .map_err(draw)?;
    type Key = (bool, Baseline, Option<DpUnit>, u32, u64);
    let key = |s: &Summary| -> Key { (s.beside, s.baseline, s.unit, s.clients, s.rounds) };
    let mut series: Vec<Key> = summary
        .iter()
        .filter(|s| s.epsilon.is_some())
        .map(key)
        .collect();
    series.sort_by_key(|&(o, b, u, c, r)| (o, b, unit_label(u), c, r));
    series.dedup();
    let prefix = |b: Baseline| {
        if named {
            format!("{}: ", b.label())
        } else {
            String::new()
        }
    };
    for (i, &k) in series.iter().enumerate() {
        let (from_beside, baseline, unit, c, r) = k;
        let mark = if from_beside { " (beside)" } else { "" };
        let colour = Palette99::pick(i).to_rgba();
        let mut line: Vec<(f64, f64, f64)> = summary
            .iter()
            .filter(|s| key(s) == k)
            .filter_map(|s| Some((s.epsilon?, s.mean?, spread(s))))
            .map(|(x, y, d)| {
                if off_chart(y) {
                    (x, top, 0.0)
                } else {
                    (x, y, d)
                }
            })
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        let label = match unit {
            Some(u) => format!(
                "{}{}-level DP, {c} clients, {r} rounds{mark}",
                prefix(baseline),
                unit_label(Some(u))
            ),
            None => format!("{}{c} clients, {r} rounds{mark}", prefix(baseline)),
        };
        chart
            .draw_series(LineSeries::new(
                line.iter().map(|&(x, y, _)| (x, y)),
                colour.stroke_width(2),
            ))
            .map_err(draw)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart
            .draw_series(
                line.iter()
                    .map(|&(x, y, _)| Circle::new((x, y), 4, colour.filled())),
            )
            .map_err(draw)?;
        chart
            .draw_series(line.iter().filter(|&&(_, _, d)| d > 0.0).map(|&(x, y, d)| {
                ErrorBar::new_vertical(x, y - d, y, y + d, colour.stroke_width(1), 8)
            }))
            .map_err(draw)?;
    }
    // The values of the points off the chart, beside their markers.
    for s in summary.iter().filter(|s| s.epsilon.is_some()) {
        if let (Some(x), Some(y)) = (s.epsilon, s.mean)
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
    let plain: Vec<&Summary> = summary.iter().filter(|s| s.epsilon.is_none()).collect();
    for (i, s) in plain.iter().enumerate() {
        let Some(y) = s.mean else { continue };
        let grey = RGBColor(90, 90, 90).mix(0.9 - 0.3 * (i % 2) as f64);
        let value = match s.std {
            Some(d) => format!("{y:.4} ± {d:.4}"),
            None => format!("{y:.4}"),
        };
        chart
            .draw_series(DashedLineSeries::new(
                vec![(emin, y), (emax, y)],
                6,
                4,
                grey.stroke_width(1),
            ))
            .map_err(draw)?
            .label(format!(
                "{}no DP, {} clients, {} rounds{}: {value}",
                prefix(s.baseline),
                s.clients,
                s.rounds,
                if s.beside { " (beside)" } else { "" }
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
            baseline: Baseline::Fed,
            seed: None,
            party: None,
        }
    }

    /// Every shipped sweep file reads (unknown keys are refused), names
    /// known baselines, and its base run file and `beside` files exist.
    #[test]
    fn the_shipped_sweep_files_read_and_name_what_exists() {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&configs).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !(name.starts_with("sweep-") && name.ends_with(".toml")) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let file: SweepFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let s = file.sweep;
            assert!(relative_to(&path, &s.base).exists(), "{name}: base");
            for b in &s.beside {
                assert!(relative_to(&path, b).exists(), "{name}: {}", b.display());
            }
            for b in &s.baselines {
                Baseline::parse(b).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            seen += 1;
        }
        assert!(seen >= 3, "{seen} sweep files");
    }

    /// Local's runs are averaged over the clients of each seed first; the
    /// spread is the sample standard deviation over the seeds.
    #[test]
    fn the_summary_averages_local_clients_per_seed_then_takes_mean_and_std_over_seeds() {
        let mut points = Vec::new();
        for (seed, fed, local) in [(1, 1.0, [2.0, 4.0]), (2, 3.0, [4.0, 6.0])] {
            let mut p = point(Some(DpUnit::Record), Some(4.0), fed);
            p.seed = Some(seed);
            points.push(p.clone());
            for (i, &l) in local.iter().enumerate() {
                let mut q = p.clone();
                (q.baseline, q.party, q.utility) = (Baseline::Local, Some(i as u32), Some(l));
                points.push(q);
            }
        }
        let s = summarize(&points);
        assert_eq!(s.len(), 2);
        let fed = s.iter().find(|s| s.baseline == Baseline::Fed).unwrap();
        assert_eq!((fed.mean, fed.seeds, fed.runs), (Some(2.0), 2, 2));
        assert!((fed.std.unwrap() - 2f64.sqrt()).abs() < 1e-12);
        // Local: seed 1 averages 3, seed 2 averages 5.
        let local = s.iter().find(|s| s.baseline == Baseline::Local).unwrap();
        assert_eq!((local.mean, local.seeds, local.runs), (Some(4.0), 2, 4));
        assert!((local.std.unwrap() - 2f64.sqrt()).abs() < 1e-12);
        let table = markdown("loss", &points, &[]);
        assert!(
            table.contains(
                "| Local | record | target ε = 4 | 3 | 3 | 4.00 | 1.4732 | 4.0000 ± 1.4142 | 2 |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| Local (client 1) | 2 | record |"),
            "{table}"
        );
        assert!(!table.contains("||"), "{table}");
        // One seed: no spread.
        let one = summarize(&points[..3]);
        assert_eq!(one[0].std, None);
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
        plot(&path, "loss", &points, &[]).unwrap();
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
