//! Record-level DP-SGD end to end on one client (protocols/dp.md §8): the
//! model crate's private round with dp's exact grid noise learns a task a
//! tiny random llama can learn, at an ε the PLD accountant puts below 8,
//! and more noise learns less.

use candle_core::Device;
use fedveil_fed::dp::{Accountant, SubsampledGaussian};
use fedveil_fed::trainer::RecordDp;
use fedveil_model::federated::{LocalTraining, RoundSettings};
use fedveil_model::train::evaluate;
use fedveil_model::{Example, Llama, LlamaConfig, LoraConfig, OptimConfig, PeftConfig};
use fedveil_task::record::GridNoise;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

const VOCAB: u32 = 64;

fn rng(seed: u8) -> ChaCha20Rng {
    ChaCha20Rng::from_seed([seed; 32])
}

/// Counting sequences from a random start: token t+1 follows token t.
fn records(n: usize, seed: u8) -> Vec<Example> {
    let mut r = rng(seed);
    (0..n)
        .map(|_| {
            let start = r.next_u32() % VOCAB;
            Example {
                ids: (0..12).map(|i| (start + i) % VOCAB).collect(),
                prompt_len: 2,
            }
        })
        .collect()
}

fn training(model: &Llama, train: Vec<Example>) -> LocalTraining {
    let peft = PeftConfig::Lora(LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        layers_to_transform: None,
    });
    LocalTraining::new(model, peft, OptimConfig::default(), train, 32, &mut rng(3)).unwrap()
}

const RECORDS: usize = 1024;
/// 128 records expected per step.
const SAMPLING_RATE: f64 = 1.0 / 8.0;

const SETTINGS: RoundSettings = RoundSettings {
    local_steps: 40,
    batch_size: 128,
    learning_rate: 0.01,
    proximal_mu: 0.0,
};

/// The held-out loss after one round of 40 steps from `global`, with
/// record-level noise multiplier `sigma` (none when `None`).
fn held_out_loss_after(model: &Llama, global: &[f32], sigma: Option<f64>) -> (f64, Option<f64>) {
    let mut local = training(model, records(RECORDS, 1));
    let held_out = records(32, 2);
    let (update, epsilon) = match sigma {
        None => (local.round(global, &SETTINGS, &mut rng(4)).unwrap(), None),
        Some(sigma) => {
            let dp = RecordDp {
                clip: 1.0,
                noise_multiplier: sigma,
                sampling_rate: SAMPLING_RATE,
            };
            let mut noise = GridNoise::new(local.dim(), &dp, rng(5)).unwrap();
            let (update, steps) = local
                .private_round(global, &SETTINGS, &mut noise, &mut rng(4))
                .unwrap();
            assert_eq!(steps.steps, 40);
            assert_eq!(steps.sampling_rate, SAMPLING_RATE);
            let epsilon = SubsampledGaussian {
                noise_multiplier: sigma,
                sampling_rate: steps.sampling_rate,
                steps: steps.steps,
            }
            .epsilon(1e-5, Accountant::Pld)
            .unwrap();
            (update, Some(epsilon))
        }
    };
    let trained: Vec<f32> = global
        .iter()
        .zip(&update.delta)
        .map(|(g, d)| g + d)
        .collect();
    (
        local.evaluate(&trained, &held_out, 16).unwrap().loss,
        epsilon,
    )
}

#[test]
fn dp_sgd_learns_at_a_small_epsilon_and_more_noise_learns_less() {
    let model =
        Llama::random(LlamaConfig::tiny(VOCAB as usize), &Device::Cpu, &mut rng(1)).unwrap();
    let global = LocalTraining::initial_params(
        &model,
        PeftConfig::Lora(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["all-linear".into()],
            layers_to_transform: None,
        }),
        &mut rng(6),
    )
    .unwrap();
    let before = evaluate(&model, None, &records(32, 2), 16, 32)
        .unwrap()
        .loss;
    let (plain, _) = held_out_loss_after(&model, &global, None);
    let (private, epsilon) = held_out_loss_after(&model, &global, Some(1.2));
    let (noisy, _) = held_out_loss_after(&model, &global, Some(8.0));
    let epsilon = epsilon.unwrap();
    eprintln!(
        "held-out loss: {before:.4} before, {plain:.4} without DP, {private:.4} with σ = 1.2 \
         (ε = {epsilon:.2} at δ = 1e-5), {noisy:.4} with σ = 8"
    );
    assert!(epsilon < 8.0, "ε = {epsilon}");
    assert!(plain < before, "{plain} against {before}");
    // Private training keeps at least half of what training without DP
    // learned, and eight times the noise keeps less.
    assert!(
        before - private >= 0.5 * (before - plain),
        "with DP {private}, without {plain}, before {before}"
    );
    assert!(
        noisy > private,
        "σ = 8 gave {noisy}, σ = 1.2 gave {private}"
    );
}
