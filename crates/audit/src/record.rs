//! The record-level empirical audit (protocols/dp.md §8.5): a canary
//! record in one client's data, the client's real DP-SGD round
//! ([`LocalTraining::private_round`] with the task crate's exact grid
//! noise, [`GridNoise`]), and a test on what the adversary sees, bounded
//! with Clopper–Pearson intervals ([`crate::mechanism`]) and set beside the
//! ε the client's own accountant (PLD) claims for the round's steps.
//!
//! The federation is a tiny random llama (one layer, LoRA of rank 2 on the
//! query and value projections), one client with eight ordinary records
//! (counting sequences), and a canary record (random tokens). Each trial
//! runs one private round from the same global adapter, with the canary
//! in the client's data or not (add-or-remove-one, the unit of §8.1).
//! The adversary knows the global adapter, every other record, and the
//! canary; it scores a trial by what it sees projected on the canary's
//! gradient at the global adapter, `u` (unit length):
//!
//! - [`View::Steps`], white-box: every step's noised sum of clipped
//!   gradients (what the client's optimiser receives), `Σ_t ⟨r_t, u⟩ / C`;
//! - [`View::Adapter`]: only the client's update after the round, which
//!   secure aggregation adds into the global adapter (the other clients'
//!   updates being known to the adversary, as DP's threat model allows),
//!   `−⟨Δ, u⟩`: the adversary sees only what leaves the client.
//!
//! Broken clients show that the audit can fail: no noise (the accountant
//! still counting σ), no clipping (the canary's gradient is 20 times the
//! clip norm), and a wrong sampling rate (every record in every step,
//! while the accountant counts `q`).

use candle_core::Device;
use fedveil_fed::dp::sampler::uniform_unit;
use fedveil_fed::dp::{Accountant, SubsampledGaussian};
use fedveil_fed::trainer::RecordDp;
use fedveil_model::federated::{LocalTraining, RecordMechanism, RoundSettings};
use fedveil_model::{
    Adapter, AdapterTrainer, Example, Llama, LlamaConfig, LoraConfig, OptimConfig, PeftConfig,
};
use fedveil_task::record::{GridNoise, csprng};
use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::mechanism::Verdict;
use crate::{AuditError, Claim, Result};

/// What the adversary sees of the canary's client.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// Every step's noised sum (white-box).
    Steps,
    /// The client's update after the round (what secure aggregation sums).
    Adapter,
}

/// A DP-SGD client broken on purpose, to show that the audit catches it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordSabotage {
    /// Noise multiplier 10⁻⁴ while the accountant counts σ.
    NoNoise,
    /// The clip norm raised 1,000-fold (the noise's standard deviation
    /// kept): the canary's gradient, 20 times the clip norm, goes through.
    NoClip,
    /// Every record in every step while the accountant counts `q`.
    WrongRate,
}

impl RecordSabotage {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            RecordSabotage::NoNoise => "noise off",
            RecordSabotage::NoClip => "clipping off",
            RecordSabotage::WrongRate => "wrong sampling rate",
        }
    }
}

/// One record-level audit.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordAuditConfig {
    pub noise_multiplier: f64,
    /// The Poisson sampling rate the accountant counts (and an honest
    /// client samples at).
    pub sampling_rate: f64,
    /// Optimiser steps in the round.
    pub steps: u32,
    pub view: View,
    /// Trials with the canary, and as many without.
    pub trials: u32,
    pub delta: f64,
    /// The bound holds with probability `1 − alpha`.
    pub alpha: f64,
    pub broken: Option<RecordSabotage>,
}

/// What a record-level audit measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordAuditResult {
    pub noise_multiplier: f64,
    pub sampling_rate: f64,
    pub steps: u32,
    pub view: View,
    /// The client's records besides the canary.
    pub records: usize,
    /// The clip norm (a twentieth of the canary's gradient norm).
    pub clip: f64,
    /// The claim (the client's PLD accountant's ε for the round's steps)
    /// and the bound.
    #[serde(flatten)]
    pub verdict: Verdict,
    pub broken: Option<RecordSabotage>,
}

const VOCAB: u32 = 64;
const RECORDS: usize = 8;
const MAX_LEN: usize = 16;
/// The clip norm is the canary's gradient norm at the global adapter over
/// this: clipping binds, and with it off the canary stands out.
const CANARY_OVER_CLIP: f64 = 20.0;
const SETTINGS_LR: f64 = 1e-3;

/// The audited federation: the model, the global adapter, the records.
struct Setup {
    model: Llama,
    peft: PeftConfig,
    global: Vec<f32>,
    records: Vec<Example>,
    canary: Example,
    /// The canary's gradient at `global`, unit length.
    direction: Vec<f64>,
    clip: f64,
}

fn setup(rng: &mut dyn RngCore) -> Result<Setup> {
    let config = LlamaConfig {
        num_hidden_layers: 1,
        ..LlamaConfig::tiny(VOCAB as usize)
    };
    let model = Llama::random(config, &Device::Cpu, rng)?;
    let peft = PeftConfig::Lora(LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        layers_to_transform: None,
    });
    // A global adapter some rounds in: every coordinate away from zero
    // (at LoRA's initialisation `B = 0` and `A`'s gradient vanishes).
    let global: Vec<f32> = LocalTraining::initial_params(&model, peft.clone(), rng)?
        .into_iter()
        .map(|v| v + (0.05 * (uniform_unit(rng) - 0.5)) as f32)
        .collect();
    let records: Vec<Example> = (0..RECORDS)
        .map(|_| {
            let start = rng.next_u32() % VOCAB;
            Example {
                ids: (0..10).map(|i| (start + i) % VOCAB).collect(),
                prompt_len: 2,
            }
        })
        .collect();
    let canary = Example {
        ids: (0..10).map(|_| rng.next_u32() % VOCAB).collect(),
        prompt_len: 2,
    };
    let adapter = Adapter::new(peft.clone(), &model, rng)?;
    let trainer = AdapterTrainer::new(&model, adapter, OptimConfig::default())?;
    trainer.adapter().set_from_slice(&global)?;
    let per = trainer.per_example_gradients(&[&canary], MAX_LEN, 0, rng)?;
    let gradient: Vec<f64> = per.row(0).iter().map(|&g| f64::from(g)).collect();
    let norm = gradient.iter().map(|g| g * g).sum::<f64>().sqrt();
    if !(norm > 0.0 && norm.is_finite()) {
        return Err(AuditError::BadAudit(format!(
            "the canary's gradient has norm {norm}"
        )));
    }
    Ok(Setup {
        model,
        peft,
        global,
        records,
        canary,
        direction: gradient.iter().map(|g| g / norm).collect(),
        clip: norm / CANARY_OVER_CLIP,
    })
}

/// The client's mechanism as the adversary watches it: the real
/// [`GridNoise`] (or a broken one), each release projected on the canary's
/// direction.
struct Watched<'a, R: RngCore + CryptoRng> {
    inner: GridNoise<R>,
    /// The rate reported to the optimiser (the accountant's; an honest
    /// client's `inner` samples at it, the wrong-rate sabotage at 1).
    claimed_rate: f64,
    direction: &'a [f64],
    /// `Σ_t ⟨r_t, u⟩`.
    projection: f64,
}

impl<R: RngCore + CryptoRng> RecordMechanism for Watched<'_, R> {
    fn sampling_rate(&self) -> f64 {
        self.claimed_rate
    }

    fn sample(&mut self, records: usize) -> fedveil_model::Result<Vec<usize>> {
        self.inner.sample(records)
    }

    fn add_example(&mut self, gradient: &[f32]) -> fedveil_model::Result<f64> {
        self.inner.add_example(gradient)
    }

    fn release(&mut self) -> fedveil_model::Result<Vec<f64>> {
        let r = self.inner.release()?;
        self.projection += r
            .iter()
            .zip(self.direction)
            .map(|(a, b)| a * b)
            .sum::<f64>();
        Ok(r)
    }
}

/// Audits `config`: `config.trials` private rounds with the canary and as
/// many without, alternately, each from the same global adapter, all draws
/// from `rng` (through a ChaCha20 generator keyed from it, as clients do).
pub fn audit_records(
    config: &RecordAuditConfig,
    rng: &mut dyn RngCore,
) -> Result<RecordAuditResult> {
    if config.trials < 100 || config.steps == 0 {
        return Err(AuditError::BadAudit(format!(
            "a record-level audit needs at least 100 trials and one step, got {} and {}",
            config.trials, config.steps
        )));
    }
    if !(config.alpha > 0.0 && config.alpha < 1.0) {
        return Err(AuditError::BadAudit(format!(
            "alpha must be in (0, 1), got {}",
            config.alpha
        )));
    }
    let claimed = SubsampledGaussian {
        noise_multiplier: config.noise_multiplier,
        sampling_rate: config.sampling_rate,
        steps: u64::from(config.steps),
    }
    .epsilon(config.delta, Accountant::Pld)?;
    let s = setup(rng)?;
    // What the client runs: the configured mechanism, or a broken one.
    let mut run = RecordDp {
        clip: s.clip,
        noise_multiplier: config.noise_multiplier,
        sampling_rate: config.sampling_rate,
    };
    match config.broken {
        Some(RecordSabotage::NoNoise) => run.noise_multiplier = 1e-4,
        Some(RecordSabotage::NoClip) => {
            run.clip *= 1000.0;
            run.noise_multiplier /= 1000.0;
        }
        Some(RecordSabotage::WrongRate) => run.sampling_rate = 1.0,
        None => {}
    }
    let optim = OptimConfig {
        learning_rate: SETTINGS_LR,
        ..OptimConfig::default()
    };
    let with: Vec<Example> = s.records.iter().chain([&s.canary]).cloned().collect();
    let mut clients = [
        LocalTraining::new(&s.model, s.peft.clone(), optim.clone(), with, MAX_LEN, rng)?,
        LocalTraining::new(
            &s.model,
            s.peft.clone(),
            optim,
            s.records.clone(),
            MAX_LEN,
            rng,
        )?,
    ];
    let settings = RoundSettings {
        local_steps: config.steps,
        batch_size: 16,
        learning_rate: SETTINGS_LR,
        proximal_mu: 0.0,
    };
    let mut mechanism = Watched {
        inner: GridNoise::new(s.global.len(), &run, csprng(rng))?,
        claimed_rate: config.sampling_rate,
        direction: &s.direction,
        projection: 0.0,
    };
    let mut dropout: ChaCha20Rng = csprng(rng);
    let (mut present, mut absent) = (Vec::new(), Vec::new());
    for trial in 0..2 * config.trials {
        let canary = trial % 2 == 0;
        mechanism.projection = 0.0;
        let client = &mut clients[usize::from(!canary)];
        let (update, _) =
            client.private_round(&s.global, &settings, &mut mechanism, &mut dropout)?;
        let score = match config.view {
            View::Steps => mechanism.projection / s.clip,
            View::Adapter => -update
                .delta
                .iter()
                .zip(&s.direction)
                .map(|(&d, u)| f64::from(d) * u)
                .sum::<f64>(),
        };
        if canary {
            present.push(score);
        } else {
            absent.push(score);
        }
    }
    Ok(RecordAuditResult {
        noise_multiplier: config.noise_multiplier,
        sampling_rate: config.sampling_rate,
        steps: config.steps,
        view: config.view,
        records: RECORDS,
        clip: s.clip,
        verdict: Verdict::of(&present, &absent, claimed, config.delta, config.alpha)?,
        broken: config.broken,
    })
}

/// The honest record-level audits of `fedveil audit`: noise multiplier,
/// sampling rate, steps, view.
pub const RECORD_LEVELS: [(f64, f64, u32, View); 5] = [
    (0.5, 1.0, 1, View::Steps),
    (1.0, 1.0, 1, View::Steps),
    (2.0, 1.0, 1, View::Steps),
    (1.0, 0.0625, 8, View::Steps),
    (1.0, 1.0, 1, View::Adapter),
];

/// The claim id of an honest level.
fn level_id(sigma: f64, q: f64, steps: u32, view: View) -> String {
    match (view, q == 1.0 && steps == 1) {
        (View::Steps, true) => format!("dp.record_noise_{sigma}"),
        (View::Steps, false) => format!("dp.record_sampled_{sigma}"),
        (View::Adapter, _) => format!("dp.record_adapter_{sigma}"),
    }
}

/// `fedveil audit`'s record-level claims: each of [`RECORD_LEVELS`] (the
/// client sabotaged throughout when `sabotage` is set, which must then
/// fail where the claim is within the ceiling), and each sabotage caught.
/// `trials` is capped at 1,000 each way (a private round costs far more
/// than the client-level mechanism's). The randomness comes from the OS.
pub fn claims(trials: u32, sabotage: Option<RecordSabotage>) -> Result<Vec<Claim>> {
    let trials = trials.min(1000);
    let audit = |sigma: f64, q: f64, steps: u32, view: View, broken| {
        let config = RecordAuditConfig {
            noise_multiplier: sigma,
            sampling_rate: q,
            steps,
            view,
            trials,
            delta: 1e-5,
            alpha: 0.05,
            broken,
        };
        audit_records(&config, &mut rand_core::OsRng)
    };
    let mut claims = Vec::new();
    for (sigma, q, steps, view) in RECORD_LEVELS {
        let r = audit(sigma, q, steps, view, sabotage)?;
        let mechanism = match sabotage {
            None => String::new(),
            Some(b) => format!(" (with the client deliberately broken: {})", b.name()),
        };
        claims.push(claim(
            level_id(sigma, q, steps, view),
            format!(
                "A record in a DP-SGD client's data, at noise multiplier {sigma}, sampling rate \
                 {q} and {steps} step(s), costs at most the ε the client's accountant \
                 claims{mechanism}."
            ),
            attack(view, q, steps),
            &r,
            r.verdict.held(),
        )?);
    }
    for (b, sigma, q, steps) in [
        (RecordSabotage::NoNoise, 2.0, 1.0, 1),
        (RecordSabotage::NoClip, 2.0, 1.0, 1),
        (RecordSabotage::WrongRate, 1.0, 0.0625, 8),
    ] {
        let r = audit(sigma, q, steps, View::Steps, Some(b))?;
        claims.push(claim(
            format!("dp.record_catches_{}", b.name().replace(' ', "_")),
            format!(
                "The record-level audit catches a DP-SGD client with {} (noise multiplier \
                 {sigma}, sampling rate {q}, {steps} step(s)).",
                b.name()
            ),
            format!(
                "The same attack on a client with {}: {}",
                b.name(),
                attack(View::Steps, q, steps)
            ),
            &r,
            !r.verdict.held(),
        )?);
    }
    Ok(claims)
}

fn attack(view: View, q: f64, steps: u32) -> String {
    let sees = match view {
        View::Steps => "every noised step's projection on the canary's gradient (white-box)",
        View::Adapter => {
            "the client's update after the round (what secure aggregation adds to the global \
             adapter), projected on the canary's gradient"
        }
    };
    format!(
        "One client of a tiny llama (LoRA) holds {RECORDS} records and, alternately, a canary \
         record; it runs its real private round ({steps} step(s), Poisson rate {q}, exact grid \
         noise, clip a twentieth of the canary's gradient). The adversary knows the global \
         adapter and every other record and thresholds {sees} (threshold chosen on half the \
         trials, rates measured on the other half, Clopper–Pearson bounds)."
    )
}

fn claim(
    id: String,
    text: String,
    attack: String,
    r: &RecordAuditResult,
    held: bool,
) -> Result<Claim> {
    let evidence = r.verdict.evidence("the client's claimed ε (PLD)");
    Claim::new(id, "dp.md §8.5", text, attack, held, evidence, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    fn config(broken: Option<RecordSabotage>, q: f64, steps: u32) -> RecordAuditConfig {
        RecordAuditConfig {
            noise_multiplier: if q == 1.0 { 2.0 } else { 1.0 },
            sampling_rate: q,
            steps,
            view: View::Steps,
            trials: 400,
            delta: 1e-5,
            alpha: 0.05,
            broken,
        }
    }

    #[test]
    fn an_honest_client_holds_and_each_broken_one_is_caught() {
        let mut rng = ChaCha20Rng::from_seed([9; 32]);
        let honest = audit_records(&config(None, 1.0, 1), &mut rng).unwrap();
        assert!(honest.verdict.held(), "{honest:?}");
        // The attack sees the canary: one step at σ = 2 is a Gaussian
        // shift of half a standard deviation.
        assert!(
            honest.verdict.rates().0 > honest.verdict.rates().1,
            "{honest:?}"
        );
        for (b, q, steps) in [
            (RecordSabotage::NoNoise, 1.0, 1),
            (RecordSabotage::NoClip, 1.0, 1),
            (RecordSabotage::WrongRate, 0.0625, 8),
        ] {
            let r = audit_records(&config(Some(b), q, steps), &mut rng).unwrap();
            assert!(!r.verdict.held(), "{b:?} not caught: {r:?}");
        }
        let sampled = audit_records(&config(None, 0.0625, 8), &mut rng).unwrap();
        assert!(sampled.verdict.held(), "{sampled:?}");
    }

    #[test]
    fn too_small_an_audit_is_refused() {
        let mut c = config(None, 1.0, 1);
        c.trials = 10;
        let e = audit_records(&c, &mut ChaCha20Rng::from_seed([1; 32])).unwrap_err();
        assert!(e.to_string().contains("100 trials"), "{e}");
    }
}
