//! Federated linear regression on generated data, with a known optimum: the
//! task that makes the whole runtime testable without a language model.
//!
//! Client `s` of a population of `P` holds `n` examples `(x, y)` with
//! `x ~ N(μ_s, I)`, `y = x·w* + ε`, `ε ~ N(0, noise²)`. The shift
//! `μ_s ~ N(0, h² I / d)` makes the clients' data differ (heterogeneity
//! `h`); `w* ~ N(0, I / d)`. Everything is generated from the public task
//! seed, so the server can rebuild the pooled data set and compute the
//! federation's optimum exactly: the least-squares solution over all
//! clients' examples (every client has the same number of examples, so
//! sample-weighted and uniform averaging have the same optimum).
//!
//! The data are synthetic and public: they come from a seeded ChaCha20
//! stream, not from the OS. The randomness that protects privacy (noise,
//! masks, rounding) never does.

use std::collections::BTreeMap;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use fedveil_fed::trainer::{
    Evaluation, Evaluator, LocalUpdate, RecordDp, RecordSteps, TrainError, Trainer, TrainingConfig,
};

/// The `[task]` table of a synthetic federation (`kind = "synthetic"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Always `"synthetic"`.
    pub kind: String,
    /// Number of parameters `d`.
    #[serde(default = "defaults::dim")]
    pub dim: usize,
    /// Examples per client `n`.
    #[serde(default = "defaults::samples")]
    pub samples_per_client: u32,
    /// Label noise standard deviation.
    #[serde(default = "defaults::noise")]
    pub noise: f32,
    /// How far apart the clients' feature distributions are (`h`).
    #[serde(default = "defaults::heterogeneity")]
    pub heterogeneity: f32,
    /// The public seed of the data.
    #[serde(default)]
    pub seed: u64,
    /// On a client: whose data it holds (0-based). The server and `fedveil
    /// run` leave it out.
    #[serde(default)]
    pub shard: Option<u32>,
}

mod defaults {
    pub fn dim() -> usize {
        32
    }
    pub fn samples() -> u32 {
        64
    }
    pub fn noise() -> f32 {
        0.1
    }
    pub fn heterogeneity() -> f32 {
        0.5
    }
}

/// The largest `d` the synthetic task accepts.
pub const MAX_DIM: usize = 1 << 24;

impl SyntheticConfig {
    /// Parses and checks a `[task]` table.
    pub fn from_table(table: &toml::Table) -> Result<Self, fedveil_fed::FedError> {
        let cfg: SyntheticConfig =
            toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e: toml::de::Error| {
                    fedveil_fed::FedError::config("task", e.message().to_string())
                })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the ranges; the error names the key.
    pub fn validate(&self) -> Result<(), fedveil_fed::FedError> {
        let bad = |k: &str, r: String| Err(fedveil_fed::FedError::config(format!("task.{k}"), r));
        if self.kind != "synthetic" {
            return bad(
                "kind",
                format!("expected \"synthetic\", got \"{}\"", self.kind),
            );
        }
        if self.dim == 0 || self.dim > MAX_DIM {
            return bad("dim", format!("must be in 1..={MAX_DIM}, got {}", self.dim));
        }
        if self.samples_per_client == 0 || self.samples_per_client > 1 << 20 {
            return bad(
                "samples_per_client",
                format!("must be in 1..=1048576, got {}", self.samples_per_client),
            );
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return bad("noise", format!("must be non-negative, got {}", self.noise));
        }
        if !(self.heterogeneity.is_finite() && self.heterogeneity >= 0.0) {
            return bad(
                "heterogeneity",
                format!("must be non-negative, got {}", self.heterogeneity),
            );
        }
        Ok(())
    }
}

/// A standard normal from two uniform draws (Box–Muller).
fn normal(rng: &mut ChaCha20Rng) -> f64 {
    // u1 in (0, 1], u2 in [0, 1).
    let u1 = ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn stream(seed: u64, stream: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// The generating weights `w*`.
fn true_weights(cfg: &SyntheticConfig) -> Vec<f64> {
    let mut rng = stream(cfg.seed, 0);
    let s = 1.0 / (cfg.dim as f64).sqrt();
    (0..cfg.dim).map(|_| normal(&mut rng) * s).collect()
}

/// One client's examples: row-major features and targets.
#[derive(Clone, Debug)]
struct Shard {
    x: Vec<f32>,
    y: Vec<f32>,
}

fn shard(cfg: &SyntheticConfig, w: &[f64], client: u32) -> Shard {
    let d = cfg.dim;
    let n = cfg.samples_per_client as usize;
    let mut rng = stream(cfg.seed, 1 + u64::from(client));
    let h = f64::from(cfg.heterogeneity) / (d as f64).sqrt();
    let mu: Vec<f64> = (0..d).map(|_| normal(&mut rng) * h).collect();
    let mut x = Vec::with_capacity(n * d);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let mut t = 0.0;
        for (m, wj) in mu.iter().zip(w) {
            let v = m + normal(&mut rng);
            t += v * wj;
            x.push(v as f32);
        }
        y.push((t + f64::from(cfg.noise) * normal(&mut rng)) as f32);
    }
    Shard { x, y }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(p, q)| f64::from(*p) * f64::from(*q))
        .sum()
}

/// A client of the synthetic task.
#[derive(Debug)]
pub struct SyntheticTrainer {
    dim: usize,
    data: Shard,
}

impl SyntheticTrainer {
    /// The trainer holding client `shard`'s examples.
    pub fn new(cfg: &SyntheticConfig, shard_index: u32) -> Result<Self, fedveil_fed::FedError> {
        cfg.validate()?;
        let w = true_weights(cfg);
        Ok(SyntheticTrainer {
            dim: cfg.dim,
            data: shard(cfg, &w, shard_index),
        })
    }
}

impl SyntheticTrainer {
    /// One party holding the examples of every client of a population of
    /// `population` (FS-LLM's Global baseline).
    pub fn pooled(cfg: &SyntheticConfig, population: u32) -> Result<Self, fedveil_fed::FedError> {
        cfg.validate()?;
        if population == 0 {
            return Err(fedveil_fed::FedError::config(
                "task",
                "the population is empty",
            ));
        }
        let w = true_weights(cfg);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for c in 0..population {
            let s = shard(cfg, &w, c);
            x.extend_from_slice(&s.x);
            y.extend_from_slice(&s.y);
        }
        Ok(SyntheticTrainer {
            dim: cfg.dim,
            data: Shard { x, y },
        })
    }
}

impl Trainer for SyntheticTrainer {
    fn dim(&self) -> usize {
        self.dim
    }

    /// Mini-batch SGD on `½ mean (x·w − y)²` plus the proximal term.
    fn train(
        &mut self,
        global: &[f32],
        config: &TrainingConfig,
        rng: &mut dyn RngCore,
    ) -> Result<LocalUpdate, TrainError> {
        let d = self.dim;
        if global.len() != d {
            return Err(TrainError(format!(
                "the global model has {} parameters, this task {d}",
                global.len()
            )));
        }
        if let Some(dp) = &config.record_dp {
            return self.train_private(global, config, dp, rng);
        }
        let n = self.data.y.len();
        let b = config.batch_size as usize;
        let lr = config.learning_rate;
        let mu = config.proximal_mu;
        let mut w = global.to_vec();
        let mut grad = vec![0f32; d];
        let mut loss_sum = 0.0;
        for _ in 0..config.local_steps {
            grad.iter_mut().for_each(|g| *g = 0.0);
            let mut batch_loss = 0.0;
            for _ in 0..b {
                let i = (rng.next_u64() % n as u64) as usize;
                let xi = &self.data.x[i * d..(i + 1) * d];
                let r = dot(xi, &w) - f64::from(self.data.y[i]);
                batch_loss += 0.5 * r * r;
                let r = r as f32;
                grad.iter_mut().zip(xi).for_each(|(g, x)| *g += r * x);
            }
            loss_sum += batch_loss / b as f64;
            let inv = 1.0 / b as f32;
            for ((wj, g), gj) in w.iter_mut().zip(&grad).zip(global) {
                *wj -= lr * (g * inv + mu * (*wj - gj));
            }
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(TrainError(format!(
                "parameter {i} diverged; lower the learning rate"
            )));
        }
        Ok(LocalUpdate {
            delta: w.iter().zip(global).map(|(a, g)| a - g).collect(),
            samples: n as u64,
            loss: loss_sum / f64::from(config.local_steps),
            record_steps: None,
        })
    }
}

impl SyntheticTrainer {
    /// Record-level DP-SGD (protocols/dp.md §8) on the same loss: each step
    /// Poisson-samples the records, clips each record's gradient
    /// `(x·w − y) x`, adds the exact grid noise to their sum, divides by the
    /// expected sample and takes the SGD step (with the proximal term,
    /// which looks at no record).
    fn train_private(
        &self,
        global: &[f32],
        config: &TrainingConfig,
        dp: &RecordDp,
        rng: &mut dyn RngCore,
    ) -> Result<LocalUpdate, TrainError> {
        let d = self.dim;
        let n = self.data.y.len();
        let err = |e: fedveil_fed::dp::DpError| TrainError(e.to_string());
        let mut mechanism =
            crate::record::GridNoise::new(d, dp, crate::record::csprng(rng)).map_err(err)?;
        let expected = dp.sampling_rate * n as f64;
        let (lr, mu) = (config.learning_rate, config.proximal_mu);
        let mut w = global.to_vec();
        let mut grad = vec![0f32; d];
        let mut loss_sum = 0.0;
        let mut losses = 0usize;
        for _ in 0..config.local_steps {
            for i in mechanism.sample_records(n).map_err(err)? {
                let xi = &self.data.x[i * d..(i + 1) * d];
                let r = dot(xi, &w) - f64::from(self.data.y[i]);
                loss_sum += 0.5 * r * r;
                losses += 1;
                grad.iter_mut().zip(xi).for_each(|(g, x)| *g = r as f32 * x);
                mechanism.add(&grad).map_err(err)?;
            }
            let noised = mechanism.release_sum().map_err(err)?;
            for ((wj, g), gj) in w.iter_mut().zip(&noised).zip(global) {
                *wj -= lr * ((g / expected) as f32 + mu * (*wj - gj));
            }
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(TrainError(format!(
                "parameter {i} diverged; lower the learning rate"
            )));
        }
        grad.iter_mut().for_each(|g| *g = 0.0);
        Ok(LocalUpdate {
            delta: w.iter().zip(global).map(|(a, g)| a - g).collect(),
            samples: n as u64,
            loss: if losses == 0 {
                0.0
            } else {
                loss_sum / losses as f64
            },
            record_steps: Some(RecordSteps {
                noise_multiplier: dp.noise_multiplier,
                sampling_rate: dp.sampling_rate,
                steps: u64::from(config.local_steps),
            }),
        })
    }
}

/// The largest pooled system the evaluator solves exactly (`P n d²` flops).
const EXACT_OPTIMUM_BUDGET: f64 = 4e9;
/// The most examples the evaluator scores.
const EVAL_ROWS: usize = 20_000;
/// The most feature values it keeps (64 MiB), whatever the dimension.
const EVAL_VALUES: usize = 1 << 24;

/// The server's side of the synthetic task.
#[derive(Debug)]
pub struct SyntheticEvaluator {
    dim: usize,
    eval: Vec<Shard>,
    /// The pooled least-squares solution, or `w*` when that is too costly.
    optimum: Vec<f64>,
    exact: bool,
}

impl SyntheticEvaluator {
    /// The evaluator for a population of `population` clients.
    pub fn new(cfg: &SyntheticConfig, population: u32) -> Result<Self, fedveil_fed::FedError> {
        cfg.validate()?;
        if population == 0 {
            return Err(fedveil_fed::FedError::config(
                "task",
                "the population is empty",
            ));
        }
        let d = cfg.dim;
        let n = cfg.samples_per_client as usize;
        let w = true_weights(cfg);
        let cost = f64::from(population) * n as f64 * (d * d) as f64;
        let exact = d <= 1024 && cost <= EXACT_OPTIMUM_BUDGET;
        let mut eval = Vec::new();
        let mut rows = 0;
        let max_rows = (EVAL_VALUES / d).clamp(1, EVAL_ROWS);
        let mut gram = if exact { vec![0f64; d * d] } else { Vec::new() };
        let mut rhs = vec![0f64; if exact { d } else { 0 }];
        for c in 0..population {
            if !exact && rows >= max_rows {
                break;
            }
            let s = shard(cfg, &w, c);
            if exact {
                for (i, yi) in s.y.iter().enumerate() {
                    let xi = &s.x[i * d..(i + 1) * d];
                    for (a, xa) in xi.iter().enumerate() {
                        let xa = f64::from(*xa);
                        rhs[a] += xa * f64::from(*yi);
                        let row = &mut gram[a * d..(a + 1) * d];
                        for (g, xb) in row.iter_mut().zip(xi) {
                            *g += xa * f64::from(*xb);
                        }
                    }
                }
            }
            if rows < max_rows {
                let mut s = s;
                let keep = s.y.len().min(max_rows - rows);
                s.y.truncate(keep);
                s.x.truncate(keep * d);
                s.x.shrink_to_fit();
                rows += keep;
                eval.push(s);
            }
        }
        let optimum = if exact {
            cholesky_solve(&mut gram, &rhs, d).unwrap_or(w)
        } else {
            w
        };
        Ok(SyntheticEvaluator {
            dim: d,
            eval,
            optimum,
            exact,
        })
    }

    /// The optimum the distance is measured to.
    pub fn optimum(&self) -> &[f64] {
        &self.optimum
    }

    /// The mean loss `½ (x·w − y)²` over the evaluation examples.
    pub fn loss(&self, w: &[f32]) -> f64 {
        let d = self.dim;
        let (mut sum, mut count) = (0.0, 0usize);
        for s in &self.eval {
            for (i, y) in s.y.iter().enumerate() {
                let r = dot(&s.x[i * d..(i + 1) * d], w) - f64::from(*y);
                sum += 0.5 * r * r;
                count += 1;
            }
        }
        sum / count.max(1) as f64
    }

    /// `‖w − w_opt‖ / ‖w_opt‖`.
    pub fn distance(&self, w: &[f32]) -> f64 {
        let num: f64 = w
            .iter()
            .zip(&self.optimum)
            .map(|(a, b)| (f64::from(*a) - b).powi(2))
            .sum();
        let den: f64 = self.optimum.iter().map(|b| b * b).sum();
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// Solves `A x = b` for symmetric positive definite `A` (overwritten).
fn cholesky_solve(a: &mut [f64], b: &[f64], d: usize) -> Option<Vec<f64>> {
    for j in 0..d {
        let mut s = a[j * d + j];
        for k in 0..j {
            s -= a[j * d + k] * a[j * d + k];
        }
        if s <= 0.0 || !s.is_finite() {
            return None;
        }
        let l = s.sqrt();
        a[j * d + j] = l;
        for i in j + 1..d {
            let mut t = a[i * d + j];
            for k in 0..j {
                t -= a[i * d + k] * a[j * d + k];
            }
            a[i * d + j] = t / l;
        }
    }
    let mut y = b.to_vec();
    for i in 0..d {
        for k in 0..i {
            y[i] -= a[i * d + k] * y[k];
        }
        y[i] /= a[i * d + i];
    }
    for i in (0..d).rev() {
        for k in i + 1..d {
            y[i] -= a[k * d + i] * y[k];
        }
        y[i] /= a[i * d + i];
    }
    Some(y)
}

impl Evaluator for SyntheticEvaluator {
    fn dim(&self) -> usize {
        self.dim
    }

    fn initial_params(&mut self) -> Result<Vec<f32>, TrainError> {
        Ok(vec![0.0; self.dim])
    }

    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, TrainError> {
        if params.len() != self.dim {
            return Err(TrainError(format!(
                "{} parameters, the task has {}",
                params.len(),
                self.dim
            )));
        }
        let mut metrics = BTreeMap::new();
        metrics.insert("distance_to_optimum".to_string(), self.distance(params));
        metrics.insert(
            "optimum_is_exact".to_string(),
            if self.exact { 1.0 } else { 0.0 },
        );
        Ok(Evaluation {
            loss: self.loss(params),
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SyntheticConfig {
        SyntheticConfig {
            kind: "synthetic".into(),
            dim: 8,
            samples_per_client: 40,
            noise: 0.2,
            heterogeneity: 1.0,
            seed: 5,
            shard: None,
        }
    }

    #[test]
    fn the_optimum_has_zero_pooled_gradient_and_beats_the_generating_weights() {
        let c = cfg();
        let e = SyntheticEvaluator::new(&c, 6).unwrap();
        assert!(e.exact);
        let opt: Vec<f32> = e.optimum().iter().map(|v| *v as f32).collect();
        let w: Vec<f32> = true_weights(&c).iter().map(|v| *v as f32).collect();
        assert!(e.loss(&opt) < e.loss(&w));
        // The pooled gradient vanishes at the optimum (in f64).
        let wstar = true_weights(&c);
        let mut g = vec![0f64; c.dim];
        for s in 0..6 {
            let sh = shard(&c, &wstar, s);
            for i in 0..sh.y.len() {
                let xi = &sh.x[i * c.dim..(i + 1) * c.dim];
                let r: f64 = xi
                    .iter()
                    .zip(e.optimum())
                    .map(|(x, o)| f64::from(*x) * o)
                    .sum::<f64>()
                    - f64::from(sh.y[i]);
                g.iter_mut()
                    .zip(xi)
                    .for_each(|(gj, x)| *gj += r * f64::from(*x));
            }
        }
        assert!(g.iter().all(|v| v.abs() < 1e-6), "{g:?}");
        assert!(e.distance(&opt) < 1e-6);
    }

    #[test]
    fn local_training_descends_and_is_reproducible() {
        let c = cfg();
        let mut t = SyntheticTrainer::new(&c, 2).unwrap();
        let e = SyntheticEvaluator::new(&c, 6).unwrap();
        let global = vec![0f32; c.dim];
        let tc = TrainingConfig {
            local_steps: 50,
            ..TrainingConfig::default()
        };
        let u = t
            .train(&global, &tc, &mut ChaCha20Rng::seed_from_u64(1))
            .unwrap();
        let again = t
            .train(&global, &tc, &mut ChaCha20Rng::seed_from_u64(1))
            .unwrap();
        assert_eq!(u, again);
        assert_eq!(u.samples, 40);
        assert!(e.loss(&u.delta) < e.loss(&global));
        // A strong proximal term keeps the update small.
        let prox = TrainingConfig {
            proximal_mu: 10.0,
            learning_rate: 0.01,
            ..tc
        };
        let p = t
            .train(&global, &prox, &mut ChaCha20Rng::seed_from_u64(1))
            .unwrap();
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!(norm(&p.delta) < 0.5 * norm(&u.delta));
    }

    #[test]
    fn bad_tables_name_the_key() {
        let t: toml::Table = toml::from_str("kind = \"synthetic\"\ndim = 0").unwrap();
        let e = SyntheticConfig::from_table(&t).unwrap_err().to_string();
        assert!(e.contains("task.dim"), "{e}");
        let t: toml::Table = toml::from_str("kind = \"synthetic\"\ndims = 3").unwrap();
        let e = SyntheticConfig::from_table(&t).unwrap_err().to_string();
        assert!(e.contains("unknown field `dims`"), "{e}");
    }
}
