//! TOML configuration (protocols/federation.md §6).
//!
//! Three files: `fedveil run FILE` (a server and its clients in one
//! process), `fedveil server --config FILE` and `fedveil client --config
//! FILE`. The run and server files share the federation tables
//! (`[federation]`, `[training]`, `[optimizer]`, `[secagg]`, `[dp]`,
//! `[deadlines]`, `[task]`); every table rejects unknown keys, and
//! [`Plan::resolve`] rejects impossible combinations with the key that
//! causes them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedveil_dp::mechanism::{NoiseConfig, Placement};
use fedveil_secagg::StageDeadlines;
use serde::{Deserialize, Serialize};

use crate::FedError;
use crate::optimizer::{Hyper, OptimizerConfig};
use crate::trainer::TrainingConfig;

/// How many standard deviations of the aggregate's spread the ring keeps
/// as headroom when the granularity is chosen automatically (an overflow
/// probability below `2 m e^{-32}`).
pub const HEADROOM_SIGMAS: f64 = 8.0;

/// `[federation]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    /// Rounds to run in total (a restarted server counts completed ones).
    pub rounds: u64,
    /// A fixed cohort of this many connected clients each round.
    #[serde(default)]
    pub cohort_size: Option<u32>,
    /// Poisson sampling: each client of the population takes part with
    /// this probability.
    #[serde(default)]
    pub sampling_rate: Option<f64>,
    /// Wait until this many clients are connected before selecting a
    /// cohort (default: the cohort size, or `n_min` with Poisson sampling).
    #[serde(default)]
    pub min_clients: Option<u32>,
    /// How long to wait for `min_clients` before giving up, in seconds.
    #[serde(default = "defaults::wait_s")]
    pub wait_s: f64,
    /// Sessions to try per round before giving up (an aborted session
    /// reveals nothing and costs no privacy).
    #[serde(default = "defaults::attempts")]
    pub attempts: u32,
    /// Where the server keeps its checkpoint.
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Where the server appends one JSON line per round.
    #[serde(default)]
    pub metrics: Option<PathBuf>,
    /// `"secagg"` (the default), or `"unprotected"`: every client sends its
    /// raw update and the server averages them. No privacy at all; it exists
    /// as the baseline that measures what SecAgg+ and DP cost, and clients
    /// refuse it unless their policy allows it.
    #[serde(default)]
    pub aggregation: AggregationName,
}

/// How updates are combined.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggregationName {
    #[default]
    Secagg,
    Unprotected,
}

/// `[secagg]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecaggSection {
    /// Neighbours per client `k`; absent: the complete graph (classic SecAgg).
    #[serde(default)]
    pub degree: Option<u32>,
    /// Shamir threshold `t` (default: `⌊k/2⌋ + 1`, the smallest majority).
    #[serde(default)]
    pub threshold: Option<u32>,
    /// Ring width `b`.
    #[serde(default = "defaults::bits")]
    pub bits: u8,
    /// Without differential privacy: updates are clamped to `[-clamp,
    /// clamp]` per coordinate before encoding.
    #[serde(default = "defaults::clamp")]
    pub clamp: f32,
    /// Without differential privacy: the FedAvg weight (sample count) is
    /// capped at this.
    #[serde(default = "defaults::max_weight")]
    pub max_weight: u32,
}

impl Default for SecaggSection {
    fn default() -> Self {
        SecaggSection {
            degree: None,
            threshold: None,
            bits: defaults::bits(),
            clamp: defaults::clamp(),
            max_weight: defaults::max_weight(),
        }
    }
}

/// Where the noise goes, or nowhere.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementName {
    None,
    Central,
    Distributed,
    Local,
}

impl From<fedveil_dp::mechanism::Placement> for PlacementName {
    fn from(p: fedveil_dp::mechanism::Placement) -> Self {
        use fedveil_dp::mechanism::Placement;
        match p {
            Placement::Central => PlacementName::Central,
            Placement::Distributed => PlacementName::Distributed,
            Placement::Local => PlacementName::Local,
        }
    }
}

/// `[dp] unit`: what one neighbouring change is.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpUnit {
    /// A client's whole update (the noise placements, protocols/dp.md §3).
    #[default]
    Client,
    /// Each record of each client: DP-SGD on the clients, each its own
    /// accountant (protocols/dp.md §8).
    Record,
}

/// `[dp]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSection {
    /// What is protected: `"client"` (default) or `"record"`.
    #[serde(default)]
    pub unit: DpUnit,
    #[serde(default = "defaults::placement")]
    pub placement: PlacementName,
    /// L2 clip norm of a client's update.
    #[serde(default)]
    pub clip: Option<f64>,
    /// Aggregate noise standard deviation over the clip norm.
    #[serde(default)]
    pub noise_multiplier: Option<f64>,
    /// Or: calibrate the noise multiplier so that `rounds` rounds with
    /// `n_min` survivors spend exactly this ε.
    #[serde(default)]
    pub target_epsilon: Option<f64>,
    #[serde(default = "defaults::delta")]
    pub delta: f64,
    /// The server refuses to start a round that could take ε past this.
    #[serde(default)]
    pub epsilon_budget: Option<f64>,
    /// `n_min`: the fewest survivors whose sum may be released.
    #[serde(default)]
    pub min_survivors: Option<u32>,
    /// Granularity of the integer grid (default: the finest with
    /// [`HEADROOM_SIGMAS`] of headroom in the ring).
    #[serde(default)]
    pub granularity: Option<f64>,
    /// Conditional rounding's `β` (default `e^{-1/2}`).
    #[serde(default)]
    pub beta: Option<f64>,
    /// Record level: the probability that a step includes each record.
    #[serde(default)]
    pub sampling_rate: Option<f64>,
    /// Record level: the clients' accountant (default `"pld"`).
    #[serde(default)]
    pub accountant: Option<fedveil_dp::Accountant>,
}

impl Default for DpSection {
    fn default() -> Self {
        DpSection {
            placement: PlacementName::None,
            clip: None,
            noise_multiplier: None,
            target_epsilon: None,
            delta: defaults::delta(),
            epsilon_budget: None,
            min_survivors: None,
            granularity: None,
            beta: None,
            unit: DpUnit::Client,
            sampling_rate: None,
            accountant: None,
        }
    }
}

/// `[deadlines]`, in seconds. `train` covers receiving the model, local
/// training and advertising keys; a client that misses a deadline drops
/// out of the round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadlinesSection {
    #[serde(default = "defaults::train_s")]
    pub train: f64,
    #[serde(default = "defaults::stage_s")]
    pub share: f64,
    #[serde(default = "defaults::masked_s")]
    pub masked: f64,
    #[serde(default = "defaults::stage_s")]
    pub consistency: f64,
    #[serde(default = "defaults::stage_s")]
    pub unmask: f64,
}

impl Default for DeadlinesSection {
    fn default() -> Self {
        DeadlinesSection {
            train: defaults::train_s(),
            share: defaults::stage_s(),
            masked: defaults::masked_s(),
            consistency: defaults::stage_s(),
            unmask: defaults::stage_s(),
        }
    }
}

mod defaults {
    use super::PlacementName;
    pub fn wait_s() -> f64 {
        120.0
    }
    pub fn attempts() -> u32 {
        3
    }
    pub fn bits() -> u8 {
        32
    }
    pub fn clamp() -> f32 {
        1.0
    }
    pub fn max_weight() -> u32 {
        1 << 12
    }
    pub fn placement() -> PlacementName {
        PlacementName::None
    }
    pub fn delta() -> f64 {
        1e-5
    }
    pub fn train_s() -> f64 {
        300.0
    }
    pub fn stage_s() -> f64 {
        30.0
    }
    pub fn masked_s() -> f64 {
        120.0
    }
    pub fn listen() -> String {
        "127.0.0.1:0".into()
    }
    pub fn reconnect_s() -> f64 {
        0.5
    }
    pub fn max_reconnect_s() -> f64 {
        10.0
    }
}

/// The tables a server needs to run a federation.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub federation: FederationSection,
    pub training: TrainingConfig,
    pub optimizer: OptimizerConfig,
    pub secagg: SecaggSection,
    pub dp: DpSection,
    pub deadlines: DeadlinesSection,
    pub task: toml::Table,
    /// `[offsite]`: offsite-tuning's split of the model, read by the task
    /// (the runtime only binds it into the checkpoint).
    pub offsite: Option<toml::Table>,
}

/// How the cohort is chosen.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum CohortRule {
    /// This many of the connected clients, uniformly at random.
    Fixed(u32),
    /// Every client of the population independently with probability `q`.
    Poisson(f64),
}

/// Differential privacy, resolved for a task of known dimension.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedDp {
    pub noise: NoiseConfig,
    pub delta: f64,
    pub budget: Option<f64>,
    /// Whether the noise multiplier was calibrated from a target ε.
    pub calibrated: bool,
}

/// Record-level DP-SGD, resolved (protocols/dp.md §8): the parameters the
/// server broadcasts ([`crate::trainer::RecordDp`]) and what each client
/// accounts with.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedRecordDp {
    pub mechanism: crate::trainer::RecordDp,
    pub delta: f64,
    pub accountant: fedveil_dp::Accountant,
    /// Each client's budget.
    pub budget: Option<f64>,
    /// Whether the noise multiplier was calibrated from a target ε.
    pub calibrated: bool,
    /// The ε a client that trains in every round spends.
    pub planned_epsilon: f64,
}

/// A validated plan of a run with one party ([`Plan::resolve_one_party`]).
#[derive(Clone, Debug, PartialEq)]
pub struct OnePartyPlan {
    pub rounds: u64,
    /// With the record-level DP mechanism set, when `[dp]` asks for it.
    pub training: TrainingConfig,
    pub optimizer: Hyper,
    pub record: Option<ResolvedRecordDp>,
}

/// A validated plan with every default and derived value filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub rounds: u64,
    pub population: u32,
    pub cohort: CohortRule,
    /// The largest cohort a round can have.
    pub max_cohort: u32,
    pub min_clients: u32,
    pub wait: Duration,
    pub attempts: u32,
    pub training: TrainingConfig,
    pub optimizer: Hyper,
    pub degree: Option<u32>,
    pub threshold: Option<u32>,
    pub bits: u8,
    pub clamp: f32,
    pub max_weight: u32,
    /// The survivor floor of every session (1 without DP).
    pub min_survivors: u32,
    pub dp: Option<ResolvedDp>,
    /// Record-level DP (then `dp` is `None`).
    pub record: Option<ResolvedRecordDp>,
    /// Deadline of the training-and-advertise stage.
    pub train_deadline: Duration,
    pub stage_deadlines: StageDeadlines,
    pub checkpoint_dir: Option<PathBuf>,
    pub metrics: Option<PathBuf>,
    /// Raw updates, no secure aggregation (the insecure baseline).
    pub unprotected: bool,
}

fn secs(path: &str, s: f64) -> Result<Duration, FedError> {
    if !(s.is_finite() && s > 0.0 && s <= 86_400.0 * 365.0) {
        return Err(FedError::config(
            path,
            format!("must be a positive number of seconds, got {s}"),
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

fn positive<T: PartialOrd + Default + std::fmt::Display>(path: &str, v: T) -> Result<T, FedError> {
    if v > T::default() {
        Ok(v)
    } else {
        Err(FedError::config(
            path,
            format!("must be at least 1, got {v}"),
        ))
    }
}

/// How `[dp]` gives the noise: exactly one of a multiplier and a target ε.
enum NoiseGiven {
    Multiplier(f64),
    Target(f64),
}

/// `[dp]`'s noise for `what` (named in the error when neither is given).
fn noise_given(p: &DpSection, what: &str) -> Result<NoiseGiven, FedError> {
    match (p.noise_multiplier, p.target_epsilon) {
        (Some(_), Some(_)) => Err(FedError::config(
            "dp.target_epsilon",
            "choose noise_multiplier or target_epsilon, not both",
        )),
        (None, None) => Err(FedError::config(
            "dp",
            format!("{what} needs noise_multiplier or target_epsilon"),
        )),
        (Some(z), None) => Ok(NoiseGiven::Multiplier(z)),
        (None, Some(eps)) => Ok(NoiseGiven::Target(eps)),
    }
}

/// Refuses the first `[dp]` key of `keys` that is set, saying `why`.
fn refuse_set(keys: &[(&str, bool)], why: &str) -> Result<(), FedError> {
    match keys.iter().find(|(_, set)| *set) {
        Some((key, _)) => Err(FedError::config(format!("dp.{key}"), why)),
        None => Ok(()),
    }
}

/// `dp.epsilon_budget`: positive, and not below a target ε.
fn check_budget(p: &DpSection) -> Result<(), FedError> {
    if let Some(b) = p.epsilon_budget {
        if !(b.is_finite() && b > 0.0) {
            return Err(FedError::config(
                "dp.epsilon_budget",
                format!("must be positive, got {b}"),
            ));
        }
        if let Some(t) = p.target_epsilon
            && t > b
        {
            return Err(FedError::config(
                "dp.epsilon_budget",
                format!("{b} is below dp.target_epsilon ({t}): the run could not finish"),
            ));
        }
    }
    Ok(())
}

impl Plan {
    /// Validates the plan for `population` clients and a task of `dim`
    /// parameters, filling in defaults and calibrating the noise.
    pub fn resolve(&self, population: u32, dim: usize) -> Result<Resolved, FedError> {
        let f = &self.federation;
        if f.rounds == 0 {
            return Err(FedError::config("federation.rounds", "must be at least 1"));
        }
        if population < 3 {
            return Err(FedError::config(
                "federation",
                format!(
                    "secure aggregation needs at least 3 clients, the population has {population}"
                ),
            ));
        }
        let (cohort, max_cohort) = match (f.cohort_size, f.sampling_rate) {
            (Some(_), Some(_)) => {
                return Err(FedError::config(
                    "federation.sampling_rate",
                    "choose cohort_size or sampling_rate, not both",
                ));
            }
            (Some(c), None) => {
                if c < 3 || c > population {
                    return Err(FedError::config(
                        "federation.cohort_size",
                        format!("must be in 3..={population} (the population), got {c}"),
                    ));
                }
                (CohortRule::Fixed(c), c)
            }
            (None, Some(q)) => {
                if !(q > 0.0 && q <= 1.0) {
                    return Err(FedError::config(
                        "federation.sampling_rate",
                        format!("must be in (0, 1], got {q}"),
                    ));
                }
                (CohortRule::Poisson(q), population)
            }
            (None, None) => (CohortRule::Fixed(population), population),
        };
        if f.attempts == 0 || f.attempts > 100 {
            return Err(FedError::config(
                "federation.attempts",
                format!("must be in 1..=100, got {}", f.attempts),
            ));
        }
        self.training
            .validate()
            .map_err(|(k, r)| FedError::config(format!("training.{k}"), r))?;
        let optimizer = self.optimizer.resolve()?;

        let s = &self.secagg;
        if !(2..=32).contains(&s.bits) {
            return Err(FedError::config(
                "secagg.bits",
                format!("must be in 2..=32, got {}", s.bits),
            ));
        }
        if let Some(k) = s.degree {
            if k < 2 {
                return Err(FedError::config(
                    "secagg.degree",
                    format!("must be at least 2, got {k}"),
                ));
            }
            if let CohortRule::Fixed(n) = cohort
                && !fedveil_secagg::params::degree_fits(k, n)
            {
                return Err(FedError::config(
                    "secagg.degree",
                    format!(
                        "an odd degree ({k}) needs an even cohort, got {n}; use {} or {}",
                        k - 1,
                        k + 1
                    ),
                ));
            }
        }
        let k_max = s.degree.unwrap_or(max_cohort - 1).min(max_cohort - 1);
        if let Some(t) = s.threshold {
            if t > k_max {
                return Err(FedError::config(
                    "secagg.threshold",
                    format!("threshold {t} exceeds the number of neighbours ({k_max})"),
                ));
            }
            if !fedveil_secagg::params::threshold_fits(t, k_max) {
                return Err(FedError::config(
                    "secagg.threshold",
                    format!(
                        "threshold {t} must be at least 2 and more than half the neighbours ({k_max}), \
                         or a malicious server could collect both kinds of a client's shares"
                    ),
                ));
            }
        }
        if !(s.clamp.is_finite() && s.clamp > 0.0) {
            return Err(FedError::config(
                "secagg.clamp",
                format!("must be positive, got {}", s.clamp),
            ));
        }
        if s.max_weight == 0 {
            return Err(FedError::config("secagg.max_weight", "must be at least 1"));
        }

        let d = &self.deadlines;
        let train_deadline = secs("deadlines.train", d.train)?;
        let stage_deadlines = StageDeadlines {
            advertise: train_deadline,
            share: secs("deadlines.share", d.share)?,
            masked: secs("deadlines.masked", d.masked)?,
            consistency: secs("deadlines.consistency", d.consistency)?,
            unmask: secs("deadlines.unmask", d.unmask)?,
        };

        if self.training.record_dp.is_some() {
            return Err(FedError::config(
                "training.record_dp",
                "is set by the server from [dp] unit = \"record\", not in [training]",
            ));
        }
        let record = self.resolve_record_dp()?;
        if f.aggregation == AggregationName::Unprotected && record.is_some() {
            return Err(FedError::config(
                "federation.aggregation",
                "record-level DP runs with secure aggregation, so that the server sees only \
                 the sum; use \"secagg\"",
            ));
        }
        let dp = if record.is_some() {
            None
        } else {
            self.resolve_dp(max_cohort, dim, s.bits)?
        };
        if f.aggregation == AggregationName::Unprotected && dp.is_some() {
            return Err(FedError::config(
                "federation.aggregation",
                "\"unprotected\" sends each raw update to the server, so it cannot carry \
                 distributed noise; remove the [dp] placement or use \"secagg\"",
            ));
        }
        let min_survivors = dp.as_ref().map_or(1, |d| d.noise.min_survivors);
        if let CohortRule::Fixed(n) = cohort
            && min_survivors > n
        {
            return Err(FedError::config(
                "dp.min_survivors",
                format!("{min_survivors} exceeds the cohort size {n}"),
            ));
        }
        let min_clients = f.min_clients.unwrap_or(match cohort {
            CohortRule::Fixed(n) => n,
            CohortRule::Poisson(_) => min_survivors.max(3),
        });
        if min_clients == 0 || min_clients > population {
            return Err(FedError::config(
                "federation.min_clients",
                format!("must be in 1..={population} (the population), got {min_clients}"),
            ));
        }
        if let CohortRule::Fixed(n) = cohort
            && min_clients < n
        {
            return Err(FedError::config(
                "federation.min_clients",
                format!(
                    "{min_clients} is below the cohort size {n}: the cohort could not be filled"
                ),
            ));
        }
        Ok(Resolved {
            rounds: f.rounds,
            population,
            cohort,
            max_cohort,
            min_clients,
            wait: secs("federation.wait_s", f.wait_s)?,
            attempts: f.attempts,
            training: TrainingConfig {
                record_dp: record.as_ref().map(|r| r.mechanism),
                ..self.training.clone()
            },
            optimizer,
            degree: s.degree,
            threshold: s.threshold,
            bits: s.bits,
            clamp: s.clamp,
            max_weight: s.max_weight,
            min_survivors,
            dp,
            record,
            train_deadline,
            stage_deadlines,
            checkpoint_dir: f.checkpoint_dir.clone(),
            metrics: f.metrics.clone(),
            unprotected: f.aggregation == AggregationName::Unprotected,
        })
    }

    /// The plan of a run with one party and no federation: FS-LLM's Global
    /// and Local baselines (`fedveil sweep`, [`crate::one_party`]). The
    /// rounds, the training, the server optimiser and record-level DP are
    /// this file's; there is nothing to aggregate, so `[secagg]`, the
    /// cohort and the deadlines play no part. Client-level DP is refused:
    /// it hides one client among many, and here there is one party.
    pub fn resolve_one_party(&self) -> Result<OnePartyPlan, FedError> {
        if self.federation.rounds == 0 {
            return Err(FedError::config("federation.rounds", "must be at least 1"));
        }
        self.training
            .validate()
            .map_err(|(k, r)| FedError::config(format!("training.{k}"), r))?;
        if self.training.record_dp.is_some() {
            return Err(FedError::config(
                "training.record_dp",
                "is set by the server from [dp] unit = \"record\", not in [training]",
            ));
        }
        let optimizer = self.optimizer.resolve()?;
        if self.dp.unit != DpUnit::Record && self.dp.placement != PlacementName::None {
            return Err(FedError::config(
                "dp.placement",
                "client-level DP hides one client among many, and a run with one party has \
                 none to hide among: use record-level DP (dp.unit = \"record\") or none",
            ));
        }
        let record = self.resolve_record_dp()?;
        if record.is_none() {
            self.refuse_noise_without_placement()?;
        }
        Ok(OnePartyPlan {
            rounds: self.federation.rounds,
            training: TrainingConfig {
                record_dp: record.as_ref().map(|r| r.mechanism),
                ..self.training.clone()
            },
            optimizer,
            record,
        })
    }

    /// `[dp]` with `unit = "record"`: the clip norm and sampling rate, the
    /// noise multiplier (given, or calibrated so that a client training in
    /// every round spends `target_epsilon`), δ, the accountant, the
    /// clients' budget. Keys of the client-level placements are refused.
    fn resolve_record_dp(&self) -> Result<Option<ResolvedRecordDp>, FedError> {
        let p = &self.dp;
        if p.unit != DpUnit::Record {
            refuse_set(
                &[
                    ("sampling_rate", p.sampling_rate.is_some()),
                    ("accountant", p.accountant.is_some()),
                ],
                "applies to record-level DP only (dp.unit = \"record\")",
            )?;
            return Ok(None);
        }
        refuse_set(
            &[
                ("placement", p.placement != PlacementName::None),
                ("min_survivors", p.min_survivors.is_some()),
                ("granularity", p.granularity.is_some()),
                ("beta", p.beta.is_some()),
            ],
            "applies to client-level DP only: record-level DP adds its noise to each \
                     client's training steps (protocols/dp.md §8)",
        )?;
        let need = |key: &str, v: Option<f64>| -> Result<f64, FedError> {
            match v {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                Some(x) => Err(FedError::config(
                    format!("dp.{key}"),
                    format!("must be positive and finite, got {x}"),
                )),
                None => Err(FedError::config(
                    format!("dp.{key}"),
                    "is required with dp.unit = \"record\"",
                )),
            }
        };
        let clip = need("clip", p.clip)?;
        let q = need("sampling_rate", p.sampling_rate)?;
        if q > 1.0 {
            return Err(FedError::config(
                "dp.sampling_rate",
                format!("must be in (0, 1], got {q}"),
            ));
        }
        fedveil_dp::check_delta(p.delta)
            .map_err(|e| FedError::config("dp.delta", e.to_string()))?;
        let accountant = p.accountant.unwrap_or(fedveil_dp::Accountant::Pld);
        let steps = self
            .federation
            .rounds
            .saturating_mul(u64::from(self.training.local_steps));
        let (sigma, calibrated) = match noise_given(p, "record-level DP")? {
            NoiseGiven::Multiplier(z) => (need("noise_multiplier", Some(z))?, false),
            NoiseGiven::Target(eps) => {
                let eps = need("target_epsilon", Some(eps))?;
                let z = fedveil_dp::calibrate::noise_multiplier(
                    eps, p.delta, q, steps, accountant, 1e-4,
                )
                .map_err(|e| FedError::config("dp.target_epsilon", e.to_string()))?;
                (z, true)
            }
        };
        let planned_epsilon = fedveil_dp::SubsampledGaussian {
            noise_multiplier: sigma,
            sampling_rate: q,
            steps,
        }
        .epsilon(p.delta, accountant)
        .map_err(|e| FedError::config("dp", e.to_string()))?;
        check_budget(p)?;
        // The grid mechanism's own range (protocols/dp.md §8.2).
        fedveil_dp::dpsgd::GridGaussian::new(clip, sigma)
            .map_err(|e| FedError::config("dp.noise_multiplier", e.to_string()))?;
        Ok(Some(ResolvedRecordDp {
            mechanism: crate::trainer::RecordDp {
                clip,
                noise_multiplier: sigma,
                sampling_rate: q,
            },
            delta: p.delta,
            accountant,
            budget: p.epsilon_budget,
            calibrated,
            planned_epsilon,
        }))
    }

    /// Without a placement (and client-level), no key of a noise may be
    /// set: a file that asks for noise never runs without it.
    fn refuse_noise_without_placement(&self) -> Result<(), FedError> {
        let p = &self.dp;
        refuse_set(
            &[
                ("clip", p.clip.is_some()),
                ("noise_multiplier", p.noise_multiplier.is_some()),
                ("target_epsilon", p.target_epsilon.is_some()),
                ("epsilon_budget", p.epsilon_budget.is_some()),
                ("min_survivors", p.min_survivors.is_some()),
                ("granularity", p.granularity.is_some()),
                ("beta", p.beta.is_some()),
            ],
            "needs a noise placement (dp.placement = \"central\", \"distributed\" or \"local\")",
        )
    }

    fn resolve_dp(
        &self,
        max_cohort: u32,
        dim: usize,
        bits: u8,
    ) -> Result<Option<ResolvedDp>, FedError> {
        let p = &self.dp;
        let placement = match p.placement {
            PlacementName::None => {
                self.refuse_noise_without_placement()?;
                return Ok(None);
            }
            PlacementName::Central => Placement::Central,
            PlacementName::Distributed => Placement::Distributed,
            PlacementName::Local => Placement::Local,
        };
        let clip = p
            .clip
            .ok_or_else(|| FedError::config("dp.clip", "is required with a noise placement"))?;
        let positive = |key: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => Err(FedError::config(
                format!("dp.{key}"),
                format!("must be positive and finite, got {x}"),
            )),
            _ => Ok(()),
        };
        positive("clip", Some(clip))?;
        positive("noise_multiplier", p.noise_multiplier)?;
        positive("target_epsilon", p.target_epsilon)?;
        positive("granularity", p.granularity)?;
        if let Some(b) = p.beta
            && !(b.is_finite() && (0.0..1.0).contains(&b))
        {
            return Err(FedError::config(
                "dp.beta",
                format!("must be in [0, 1), got {b}"),
            ));
        }
        let min_survivors = p.min_survivors.unwrap_or(match placement {
            // Distributed noise needs a floor; default to every client but a
            // tenth (rounded down), so a few may drop.
            Placement::Distributed => (max_cohort - max_cohort / 10).max(1),
            _ => 1,
        });
        if min_survivors == 0 || min_survivors > max_cohort {
            return Err(FedError::config(
                "dp.min_survivors",
                format!("must be in 1..={max_cohort} (the largest cohort), got {min_survivors}"),
            ));
        }
        fedveil_dp::check_delta(p.delta)
            .map_err(|e| FedError::config("dp.delta", e.to_string()))?;
        let base = NoiseConfig {
            placement,
            dim,
            clip,
            noise_multiplier: 1.0,
            granularity: 1.0,
            beta: p.beta.unwrap_or((-0.5f64).exp()),
            bits,
            min_survivors,
        };
        fn dp_err(key: &'static str) -> impl Fn(fedveil_dp::DpError) -> FedError {
            move |e| FedError::config(format!("dp.{key}"), e.to_string())
        }
        let rounds = self.federation.rounds;
        let (z, calibrated) = match noise_given(p, "a noise placement")? {
            NoiseGiven::Multiplier(z) => (z, false),
            NoiseGiven::Target(eps) => {
                let z = fedveil_dp::calibrate::mechanism_multiplier(
                    &base,
                    p.granularity,
                    max_cohort,
                    HEADROOM_SIGMAS,
                    min_survivors,
                    rounds,
                    eps,
                    p.delta,
                    1e-4,
                )
                .map_err(dp_err("target_epsilon"))?;
                (z, true)
            }
        };
        // The granularity: configured, or the finest that keeps the
        // largest cohort's sum inside the ring.
        let noise = fedveil_dp::calibrate::at_multiplier(
            &base,
            z,
            p.granularity,
            max_cohort,
            HEADROOM_SIGMAS,
        )
        .map_err(dp_err("granularity"))?;
        noise.validate().map_err(dp_err("noise_multiplier"))?;
        check_budget(p)?;
        Ok(Some(ResolvedDp {
            noise,
            delta: p.delta,
            budget: p.epsilon_budget,
            calibrated,
        }))
    }
}

/// `[run]`: a server and its clients in one process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Clients to start (the population).
    pub clients: u32,
    /// The server's socket (default: an ephemeral loopback port).
    #[serde(default = "defaults::listen")]
    pub listen: String,
}

/// A federation file: its role's section (`[run]` or `[server]`) and the
/// sections of a [`Plan`], declared once for both files.
macro_rules! federation_file {
    ($(#[$doc:meta])* $name:ident, $role:ident: $Role:ty) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            pub $role: $Role,
            pub federation: FederationSection,
            #[serde(default)]
            pub training: TrainingConfig,
            #[serde(default)]
            pub optimizer: OptimizerConfig,
            #[serde(default)]
            pub secagg: SecaggSection,
            #[serde(default)]
            pub dp: DpSection,
            #[serde(default)]
            pub deadlines: DeadlinesSection,
            pub task: toml::Table,
            /// `[offsite]`, read by the task (protocols/offsite-tuning.md).
            #[serde(default)]
            pub offsite: Option<toml::Table>,
        }

        impl $name {
            /// The tables the server runs the federation by.
            pub fn plan(&self) -> Plan {
                Plan {
                    federation: self.federation.clone(),
                    training: self.training.clone(),
                    optimizer: self.optimizer.clone(),
                    secagg: self.secagg.clone(),
                    dp: self.dp.clone(),
                    deadlines: self.deadlines.clone(),
                    task: self.task.clone(),
                    offsite: self.offsite.clone(),
                }
            }

            /// Resolves the plan's paths against the file's directory.
            fn resolve_plan_paths(&mut self, path: &Path) {
                let f = &mut self.federation;
                f.checkpoint_dir = f.checkpoint_dir.as_ref().map(|p| relative_to(path, p));
                f.metrics = f.metrics.as_ref().map(|p| relative_to(path, p));
            }
        }
    };
}

federation_file!(
    /// A `fedveil run` file.
    RunFile,
    run: RunSection
);

federation_file!(
    /// A `fedveil server` file.
    ServerFile,
    server: ServerSection
);

/// `[server]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// The UDP socket to listen on, e.g. `0.0.0.0:4433`.
    pub listen: String,
    /// The certificate and key from `fedveil keygen server`.
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// The allowed client keys, one `ed25519:…` per line; their order gives
    /// the client ids (the first line is client 1).
    pub allow_list: PathBuf,
    /// Seconds a client may take over its TLS handshake and proof of key.
    #[serde(default = "handshake_s")]
    pub handshake_timeout: f64,
    /// Seconds of silence after which a connection is closed.
    #[serde(default = "idle_s")]
    pub idle_timeout: f64,
    /// Connection attempts authenticated at once; more are refused until
    /// one ends.
    #[serde(default = "max_handshakes")]
    pub max_handshakes: usize,
    /// Rejected messages a client's connection may send before the server
    /// closes it.
    #[serde(default = "max_violations")]
    pub max_violations: u32,
}

fn max_handshakes() -> usize {
    fedveil_net::Limits::default().max_handshakes
}
fn max_violations() -> u32 {
    fedveil_net::Limits::default().max_violations
}
fn handshake_s() -> f64 {
    10.0
}
fn idle_s() -> f64 {
    60.0
}

/// `[client]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    /// The server's address, `host:port`.
    pub server: String,
    /// The name the server's certificate was made for (default: the host
    /// part of `server`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// The server certificate's fingerprint, `sha256:…`, as `fedveil keygen
    /// server` printed it.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Or a file holding it (`fedveil keygen server` writes
    /// `fingerprint.txt` next to the certificate).
    #[serde(default)]
    pub fingerprint_file: Option<PathBuf>,
    /// This client's identity from `fedveil keygen client`.
    pub identity: PathBuf,
    /// First delay before reconnecting, in seconds; it doubles up to
    /// `max_reconnect`.
    #[serde(default = "defaults::reconnect_s")]
    pub reconnect: f64,
    #[serde(default = "defaults::max_reconnect_s")]
    pub max_reconnect: f64,
    /// Give up after this many seconds without a connection (default: never).
    #[serde(default)]
    pub give_up_after: Option<f64>,
    /// Where bundles from the server (offsite-tuning's emulator) are
    /// cached by hash (default: `bundles/` in fedveil's cache directory).
    #[serde(default)]
    pub bundle_cache: Option<PathBuf>,
    /// The largest bundle accepted, in bytes (default 16 GiB).
    #[serde(default)]
    pub max_bundle_bytes: Option<u64>,
    /// Where this client keeps its own privacy ledger, one file per
    /// federation (default: `privacy-ledger/` beside the identity file).
    #[serde(default)]
    pub ledger_dir: Option<PathBuf>,
}

/// `[policy]`: what a client requires of every round before it takes part
/// (a malicious or misconfigured server cannot talk it out of these;
/// protocols/federation.md §4.4). A client file without `[policy]`, or
/// without some of its keys, gets the safe defaults: differential privacy
/// required, central noise refused, some noise required (z > 0). A client
/// accepts less only where its file says so in so many words
/// (`require_dp = false`, `refuse_placements = []`,
/// `min_noise_multiplier = 0`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Refuse rounds without differential privacy (default: true).
    #[serde(default = "policy::require_dp")]
    pub require_dp: bool,
    /// Refuse rounds whose noise multiplier is below this (default: any
    /// noise at all, z > 0).
    #[serde(default = "policy::min_noise_multiplier")]
    pub min_noise_multiplier: f64,
    /// Refuse rounds whose clip norm is above this.
    #[serde(default)]
    pub max_clip: Option<f64>,
    /// Refuse these placements (default: `["central"]`, never trusting the
    /// server with the noise).
    #[serde(default = "policy::refuse_placements")]
    pub refuse_placements: Vec<PlacementName>,
    /// Refuse sessions whose survivor floor is below this.
    #[serde(default)]
    pub min_survivors: u32,
    /// Take part in unprotected rounds (raw updates to the server; the
    /// baseline of the privacy-overhead benchmark). Off by default.
    #[serde(default)]
    pub allow_unprotected: bool,
    /// The δ at which this client computes ε (default 1e-5).
    #[serde(default = "policy::delta")]
    pub delta: f64,
    /// Refuse a round whose own privacy loss, computed by this client from
    /// everything the server sends (placement, noise multiplier, clip,
    /// granularity, β, bits, survivor floor, dimension), exceeds this ε.
    #[serde(default)]
    pub max_round_epsilon: Option<f64>,
    /// Refuse a round that would take this client's own ledger for the
    /// federation past this ε.
    #[serde(default)]
    pub epsilon_budget: Option<f64>,
    /// Refuse sessions in which this client has fewer SecAgg+ neighbours.
    #[serde(default)]
    pub min_degree: u32,
    /// Refuse sessions whose Shamir threshold is below this.
    #[serde(default)]
    pub min_threshold: u32,
    /// With record-level DP, the accountant this client composes its own
    /// steps with (default `"pld"`).
    #[serde(default = "policy::accountant")]
    pub accountant: fedveil_dp::Accountant,
}

mod policy {
    use super::PlacementName;
    pub fn require_dp() -> bool {
        true
    }
    pub fn min_noise_multiplier() -> f64 {
        f64::MIN_POSITIVE
    }
    pub fn refuse_placements() -> Vec<PlacementName> {
        vec![PlacementName::Central]
    }
    pub fn delta() -> f64 {
        1e-5
    }
    pub fn accountant() -> fedveil_dp::Accountant {
        fedveil_dp::Accountant::Pld
    }
}

impl Default for Policy {
    /// The safe defaults of a client file without `[policy]`.
    fn default() -> Self {
        Policy {
            require_dp: policy::require_dp(),
            min_noise_multiplier: policy::min_noise_multiplier(),
            max_clip: None,
            refuse_placements: policy::refuse_placements(),
            min_survivors: 0,
            allow_unprotected: false,
            delta: policy::delta(),
            max_round_epsilon: None,
            epsilon_budget: None,
            min_degree: 0,
            min_threshold: 0,
            accountant: policy::accountant(),
        }
    }
}

impl Policy {
    /// A policy that takes part in whatever protected round the server
    /// asks for, with or without differential privacy: for a client whose
    /// server is run by the same operator from the same file (tests, the
    /// audit's honest parties). Unprotected rounds are still refused.
    pub fn trusting() -> Policy {
        Policy {
            require_dp: false,
            min_noise_multiplier: 0.0,
            refuse_placements: Vec::new(),
            ..Policy::default()
        }
    }

    /// The policy `fedveil run` gives its own clients: exactly what the run
    /// file asks of its server, so that a server built from a different
    /// file (or a bug that weakens it) is refused. Each round may cost at
    /// most one round of the file's noise at its survivor floor, at its δ.
    /// The budget is left to the server the same file starts, which charges
    /// each session with its actual survivors (a client's own account
    /// charges the floor, so it would stop earlier than the file says).
    pub fn for_run(r: &Resolved) -> Policy {
        let mut p = Policy {
            allow_unprotected: r.unprotected,
            min_survivors: r.min_survivors,
            min_threshold: r.threshold.unwrap_or(0),
            ..Policy::trusting()
        };
        if let Some(dp) = &r.dp {
            let n = &dp.noise;
            p.require_dp = true;
            p.min_noise_multiplier = n.noise_multiplier;
            p.max_clip = Some(n.clip);
            p.refuse_placements = [
                PlacementName::Central,
                PlacementName::Distributed,
                PlacementName::Local,
            ]
            .into_iter()
            .filter(|q| *q != PlacementName::from(n.placement))
            .collect();
            p.delta = dp.delta;
            // One round of the run's own noise at its survivor floor.
            p.max_round_epsilon = fedveil_dp::zcdp::round_rho(n, n.min_survivors)
                .and_then(|rho| fedveil_dp::zcdp::epsilon(rho, dp.delta))
                .ok()
                .map(|e| e * (1.0 + 1e-9));
        }
        if let Some(rec) = &r.record {
            p.require_dp = true;
            p.min_noise_multiplier = rec.mechanism.noise_multiplier;
            p.max_clip = Some(rec.mechanism.clip);
            p.delta = rec.delta;
            p.accountant = rec.accountant;
            // Each client is its own accountant: the file's budget is theirs.
            p.epsilon_budget = rec.budget;
        }
        p
    }

    /// Checks the policy's own values.
    pub fn validate(&self) -> Result<(), FedError> {
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(FedError::config(
                "policy.delta",
                format!("must be in (0, 1), got {}", self.delta),
            ));
        }
        for (key, v) in [
            ("policy.max_round_epsilon", self.max_round_epsilon),
            ("policy.epsilon_budget", self.epsilon_budget),
        ] {
            if let Some(e) = v
                && (e.is_nan() || e <= 0.0)
            {
                return Err(FedError::config(key, format!("must be positive, got {e}")));
            }
        }
        if !(self.min_noise_multiplier >= 0.0 && self.min_noise_multiplier.is_finite()) {
            return Err(FedError::config(
                "policy.min_noise_multiplier",
                format!(
                    "must be a non-negative number, got {}",
                    self.min_noise_multiplier
                ),
            ));
        }
        Ok(())
    }
}

/// A `fedveil client` file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub client: ClientSection,
    #[serde(default)]
    pub policy: Policy,
    pub task: toml::Table,
}

fn read(path: &Path) -> Result<String, FedError> {
    std::fs::read_to_string(path).map_err(|e| FedError::file(path, e))
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, FedError> {
    toml::from_str(text).map_err(|e| FedError::Config {
        path: path.display().to_string(),
        reason: e.to_string().trim_end().to_string(),
    })
}

/// Parses `text`, then applies `overrides` (`section.key=VALUE`, as given
/// to `--set`) before the file's types see it, so that an override is
/// checked exactly like a line of the file.
fn parse_with<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
    overrides: &[String],
) -> Result<T, FedError> {
    if overrides.is_empty() {
        return parse(path, text);
    }
    let mut table: toml::Table = parse(path, text)?;
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| FedError::Config {
            path: format!("{} (with --set)", path.display()),
            reason: e.message().trim_end().to_string(),
        })
}

/// Sets `a.b.c=VALUE` in `table`. VALUE is read as a TOML value (`3`,
/// `0.5`, `true`, `"text"`, `[1, 2]`) and otherwise taken as a string.
pub fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), FedError> {
    let bad = |why: &str| FedError::config(format!("--set {spec}"), why.to_string());
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| bad("expected section.key=VALUE"))?;
    let parts: Vec<&str> = key.trim().split('.').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad("the key has an empty part"));
    }
    let value = value.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.into()),
    };
    let (last, parents) = parts.split_last().ok_or_else(|| bad("no key"))?;
    let mut at = table;
    for p in parents {
        let next = at
            .entry((*p).to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = match next {
            toml::Value::Table(t) => t,
            _ => return Err(bad(&format!("'{p}' is not a table"))),
        };
    }
    at.insert((*last).to_string(), value);
    Ok(())
}

/// Resolves a path in a config file against the file's directory.
/// `..` steps are folded lexically where the path allows it
/// (`configs/../runs` becomes `runs`).
pub fn relative_to(file: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let joined = file.parent().unwrap_or(Path::new(".")).join(p);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir
                if matches!(
                    out.components().next_back(),
                    Some(std::path::Component::Normal(_))
                ) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

impl RunFile {
    pub fn load(path: &Path) -> Result<Self, FedError> {
        Self::load_with(path, &[])
    }

    /// Loads the file with `--set` overrides applied.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self, FedError> {
        Self::parse_with(path, &read(path)?, overrides)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, FedError> {
        Self::parse_with(path, text, &[])
    }

    pub fn parse_with(path: &Path, text: &str, overrides: &[String]) -> Result<Self, FedError> {
        let mut f: RunFile = parse_with(path, text, overrides)?;
        f.resolve_plan_paths(path);
        Ok(f)
    }

    /// The server's socket.
    pub fn listen(&self) -> Result<SocketAddr, FedError> {
        self.run
            .listen
            .parse()
            .map_err(|e| FedError::config("run.listen", format!("'{}': {e}", self.run.listen)))
    }
}

impl ServerFile {
    pub fn load(path: &Path) -> Result<Self, FedError> {
        Self::load_with(path, &[])
    }

    /// Loads the file with `--set` overrides applied.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self, FedError> {
        let mut f: ServerFile = parse_with(path, &read(path)?, overrides)?;
        let s = &mut f.server;
        s.certificate = relative_to(path, &s.certificate);
        s.key = relative_to(path, &s.key);
        s.allow_list = relative_to(path, &s.allow_list);
        f.resolve_plan_paths(path);
        Ok(f)
    }

    pub fn listen(&self) -> Result<SocketAddr, FedError> {
        self.server.listen.parse().map_err(|e| {
            FedError::config("server.listen", format!("'{}': {e}", self.server.listen))
        })
    }

    /// The transport limits.
    pub fn limits(&self) -> Result<fedveil_net::Limits, FedError> {
        Ok(fedveil_net::Limits {
            handshake_timeout: secs("server.handshake_timeout", self.server.handshake_timeout)?,
            idle_timeout: secs("server.idle_timeout", self.server.idle_timeout)?,
            max_handshakes: positive("server.max_handshakes", self.server.max_handshakes)?,
            max_violations: positive("server.max_violations", self.server.max_violations)?,
            ..fedveil_net::Limits::default()
        })
    }
}

impl ClientFile {
    pub fn load(path: &Path) -> Result<Self, FedError> {
        Self::load_with(path, &[])
    }

    /// Loads the file with `--set` overrides applied.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self, FedError> {
        let mut f: ClientFile = parse_with(path, &read(path)?, overrides)?;
        f.client.identity = relative_to(path, &f.client.identity);
        f.client.bundle_cache = f.client.bundle_cache.map(|p| relative_to(path, &p));
        f.client.ledger_dir = f.client.ledger_dir.map(|p| relative_to(path, &p));
        f.policy.validate()?;
        f.client.fingerprint_file = f.client.fingerprint_file.map(|p| relative_to(path, &p));
        match (&f.client.fingerprint, &f.client.fingerprint_file) {
            (Some(_), Some(_)) => {
                return Err(FedError::config(
                    "client.fingerprint",
                    "give either fingerprint or fingerprint_file, not both",
                ));
            }
            (None, None) => {
                return Err(FedError::config(
                    "client.fingerprint",
                    "is required: the server certificate's sha256:… fingerprint (or \
                     fingerprint_file, a file holding it)",
                ));
            }
            _ => {}
        }
        secs("client.reconnect", f.client.reconnect)?;
        secs("client.max_reconnect", f.client.max_reconnect)?;
        if let Some(g) = f.client.give_up_after {
            secs("client.give_up_after", g)?;
        }
        Ok(f)
    }
}

impl ClientFile {
    /// The fingerprint the client pins.
    pub fn pin(&self) -> Result<fedveil_net::Fingerprint, FedError> {
        let (text, place) = match (&self.client.fingerprint, &self.client.fingerprint_file) {
            (Some(f), _) => (f.clone(), "client.fingerprint".to_string()),
            (None, Some(p)) => (
                std::fs::read_to_string(p).map_err(|e| FedError::file(p, e))?,
                format!("client.fingerprint_file ({})", p.display()),
            ),
            (None, None) => return Err(FedError::config("client.fingerprint", "is required")),
        };
        text.trim()
            .parse()
            .map_err(|e: fedveil_net::NetError| FedError::config(place, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> Result<RunFile, FedError> {
        RunFile::parse(Path::new("test.toml"), text)
    }

    const BASE: &str = r#"
[run]
clients = 10
[federation]
rounds = 3
[task]
kind = "synthetic"
"#;

    fn resolve(extra: &str) -> Result<Resolved, FedError> {
        let f = run(&format!("{BASE}{extra}"))?;
        f.plan().resolve(f.run.clients, 100)
    }

    /// One party (§6.2): record-level DP calibrated over its own steps;
    /// client-level DP, or noise keys without a placement, refused by key.
    #[test]
    fn a_run_with_one_party_takes_record_level_dp_only() {
        let one = |extra: &str| run(&format!("{BASE}{extra}"))?.plan().resolve_one_party();
        let plain = one("").unwrap();
        assert_eq!((plain.rounds, plain.record.is_none()), (3, true));
        let r = one(
            "[dp]\nunit = \"record\"\nclip = 1.0\nsampling_rate = 0.01\n\
             target_epsilon = 2.0\naccountant = \"rdp\"\n",
        )
        .unwrap();
        let record = r.record.unwrap();
        assert!(record.calibrated);
        assert!(record.planned_epsilon <= 2.0 && record.planned_epsilon > 1.9);
        assert_eq!(r.training.record_dp, Some(record.mechanism));
        let e =
            one("[dp]\nplacement = \"central\"\nclip = 1.0\nnoise_multiplier = 1.0\n").unwrap_err();
        assert!(e.to_string().starts_with("dp.placement"), "{e}");
        let e = one("[dp]\nclip = 1.0\nnoise_multiplier = 1.0\n").unwrap_err();
        assert!(e.to_string().starts_with("dp.clip"), "{e}");
    }

    #[test]
    fn the_base_resolves_to_classic_secagg_without_noise() {
        let r = resolve("").unwrap();
        assert_eq!(r.cohort, CohortRule::Fixed(10));
        assert_eq!((r.degree, r.threshold, r.min_survivors), (None, None, 1));
        assert!(r.dp.is_none());
    }

    #[test]
    fn paths_are_resolved_against_the_file_and_folded() {
        let f = Path::new("configs/run.toml");
        assert_eq!(relative_to(f, Path::new("../runs/x")), Path::new("runs/x"));
        assert_eq!(
            relative_to(f, Path::new("./k/a.key")),
            Path::new("configs/k/a.key")
        );
        assert_eq!(relative_to(f, Path::new("..")), Path::new("."));
        assert_eq!(
            relative_to(Path::new("a.toml"), Path::new("../up")),
            Path::new("../up")
        );
        assert_eq!(relative_to(f, Path::new("/abs/p")), Path::new("/abs/p"));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_place() {
        let e = run(&format!("{BASE}[secagg]\nneighbours = 4\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `neighbours`") && e.contains("line"),
            "{e}"
        );
        let e = run(&format!("{BASE}[extra]\n")).unwrap_err().to_string();
        assert!(e.contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn record_level_dp_resolves_to_the_broadcast_mechanism_and_refuses_client_level_keys() {
        let r = resolve(
            "[training]\nlocal_steps = 4\n[dp]\nunit = \"record\"\nclip = 0.5\n\
             sampling_rate = 0.1\ntarget_epsilon = 3.0\n",
        )
        .unwrap();
        assert!(r.dp.is_none());
        let rec = r.record.as_ref().unwrap();
        let m = r.training.record_dp.unwrap();
        assert_eq!(m, rec.mechanism);
        assert_eq!((m.clip, m.sampling_rate), (0.5, 0.1));
        assert!(rec.calibrated);
        assert_eq!(rec.accountant, fedveil_dp::Accountant::Pld);
        // Calibrated for 3 rounds of 4 steps: it spends the target, no more.
        let spent = fedveil_dp::SubsampledGaussian {
            noise_multiplier: m.noise_multiplier,
            sampling_rate: 0.1,
            steps: 12,
        }
        .epsilon(1e-5, fedveil_dp::Accountant::Pld)
        .unwrap();
        assert!(spent <= 3.0 && spent > 2.99, "{spent}");
        assert_eq!(rec.planned_epsilon, spent);
        assert_eq!(Policy::for_run(&r).min_noise_multiplier, m.noise_multiplier);

        let record = "[dp]\nunit = \"record\"\nclip = 1.0\nsampling_rate = 0.1\n";
        let cases = [
            (format!("{record}noise_multiplier = 1.0\nplacement = \"local\"\n"), "dp.placement"),
            (format!("{record}noise_multiplier = 1.0\nmin_survivors = 3\n"), "dp.min_survivors"),
            (format!("{record}noise_multiplier = 1.0\ngranularity = 0.1\n"), "dp.granularity"),
            (record.to_string(), "noise_multiplier or target_epsilon"),
            (
                "[dp]\nunit = \"record\"\nclip = 1.0\nnoise_multiplier = 1.0\n".into(),
                "dp.sampling_rate",
            ),
            (
                "[dp]\nunit = \"record\"\nsampling_rate = 1.5\nclip = 1.0\nnoise_multiplier = 1.0\n"
                    .into(),
                "dp.sampling_rate",
            ),
            (
                "[dp]\nplacement = \"local\"\nclip = 1.0\nnoise_multiplier = 1.0\nsampling_rate = 0.1\n"
                    .into(),
                "dp.sampling_rate",
            ),
            (
                format!("{record}noise_multiplier = 1.0\n[federation.x]\n"),
                "unknown field",
            ),
            (
                "[training.record_dp]\nclip = 1.0\nnoise_multiplier = 1.0\nsampling_rate = 0.5\n"
                    .into(),
                "training.record_dp",
            ),
        ];
        for (extra, want) in cases {
            let e = match resolve(&extra) {
                Ok(r) => panic!("{extra:?} resolved to {r:?}"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let f = run(&format!("{BASE}{record}noise_multiplier = 1.0\n")).unwrap();
        let mut p = f.plan();
        p.federation.aggregation = AggregationName::Unprotected;
        let e = p.resolve(10, 5).unwrap_err().to_string();
        assert!(e.contains("federation.aggregation"), "{e}");
    }

    #[test]
    fn impossible_combinations_name_the_key() {
        let cases = [
            ("[secagg]\ndegree = 4\nthreshold = 5\n", "secagg.threshold"),
            ("[secagg]\ndegree = 6\nthreshold = 3\n", "more than half"),
            ("[secagg]\ndegree = 3\n[federation.x]\n", "unknown field"),
            ("[dp]\nclip = 1.0\n", "dp.clip"),
            (
                "[dp]\nplacement = \"distributed\"\nclip = 1.0\n",
                "noise_multiplier or target_epsilon",
            ),
            (
                "[dp]\nplacement = \"local\"\nclip = 1.0\nnoise_multiplier = 1.0\ntarget_epsilon = 2.0\n",
                "not both",
            ),
            (
                "[dp]\nplacement = \"distributed\"\nclip = 1.0\nnoise_multiplier = 1.0\nmin_survivors = 11\n",
                "dp.min_survivors",
            ),
            (
                "[dp]\nplacement = \"central\"\nclip = 1.0\ntarget_epsilon = 5.0\nepsilon_budget = 2.0\n",
                "dp.epsilon_budget",
            ),
            ("[deadlines]\nshare = 0\n", "deadlines.share"),
            (
                "[optimizer]\nkind = \"fedavg\"\ntau = 0.1\n",
                "optimizer.tau",
            ),
            (
                "[training]\nlearning_rate = -1.0\n",
                "training.learning_rate",
            ),
        ];
        for (extra, want) in cases {
            let e = match resolve(extra) {
                Ok(r) => panic!("{extra:?} resolved to {r:?}"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let f = run(BASE).unwrap();
        let mut p = f.plan();
        p.federation.cohort_size = Some(4);
        p.federation.sampling_rate = Some(0.5);
        assert!(
            p.resolve(10, 5)
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
        p.federation.sampling_rate = None;
        p.federation.cohort_size = Some(11);
        assert!(
            p.resolve(10, 5)
                .unwrap_err()
                .to_string()
                .contains("federation.cohort_size")
        );
        p.federation.cohort_size = Some(5);
        p.secagg.degree = Some(3);
        assert!(
            p.resolve(10, 5)
                .unwrap_err()
                .to_string()
                .contains("even cohort")
        );
    }

    #[test]
    fn a_target_epsilon_is_met_by_the_calibrated_noise() {
        let r = resolve(
            "[dp]\nplacement = \"distributed\"\nclip = 0.5\ntarget_epsilon = 4.0\ndelta = 1e-6\nmin_survivors = 8\n",
        )
        .unwrap();
        let dp = r.dp.unwrap();
        assert!(dp.calibrated);
        assert_eq!(dp.noise.min_survivors, 8);
        let rho = fedveil_dp::zcdp::round_rho(&dp.noise, 8).unwrap();
        let eps = fedveil_dp::zcdp::epsilon(3.0 * rho, 1e-6).unwrap();
        assert!(eps <= 4.0 && eps > 3.99, "{eps}");
        // The ring holds the largest cohort's sum with the promised headroom.
        assert!(dp.noise.overflow_probability(10) < 1e-9);
    }
}
