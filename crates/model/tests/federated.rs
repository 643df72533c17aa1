//! Federated rounds of adapter training on a tiny random llama: clients
//! train from the global vector on their own data, the updates are averaged
//! by sample count (FedAvg), and the global adapter improves on everyone's
//! data; FedProx's proximal term holds a client's update closer to the
//! global vector.

use candle_core::Device;
use fedveil_model::federated::{LocalTraining, RoundSettings};
use fedveil_model::{Example, Llama, LlamaConfig, LoraConfig, OptimConfig, PeftConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

fn peft() -> PeftConfig {
    PeftConfig::Lora(LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        layers_to_transform: None,
    })
}

/// Client `c` holds sequences that all share its own completion pattern.
fn client_data(c: u32, n: usize) -> Vec<Example> {
    let mut rng = ChaCha20Rng::from_seed([c as u8 + 20; 32]);
    let pattern: Vec<u32> = (0..6).map(|i| (c * 11 + i * 7) % 64).collect();
    (0..n)
        .map(|_| {
            let mut ids: Vec<u32> = (0..3).map(|_| rng.next_u32() % 64).collect();
            ids.extend(&pattern);
            Example { ids, prompt_len: 3 }
        })
        .collect()
}

#[test]
fn fedavg_over_local_lora_rounds_lowers_everyones_loss() {
    let model = Llama::random(
        LlamaConfig::tiny(64),
        &Device::Cpu,
        &mut ChaCha20Rng::from_seed([1; 32]),
    )
    .unwrap();
    let mut rng = ChaCha20Rng::from_seed([2; 32]);
    let optim = OptimConfig {
        max_grad_norm: Some(1.0),
        ..OptimConfig::default()
    };
    let data: Vec<Vec<Example>> = (0..3).map(|c| client_data(c, 4 + c as usize)).collect();
    let mut clients: Vec<LocalTraining> = data
        .iter()
        .map(|d| {
            LocalTraining::new(&model, peft(), optim.clone(), d.clone(), 32, &mut rng).unwrap()
        })
        .collect();
    let mut global = LocalTraining::initial_params(&model, peft(), &mut rng).unwrap();
    assert_eq!(global.len(), clients[0].dim());
    let all: Vec<Example> = data.concat();
    let before = clients[0].evaluate(&global, &all, 8).unwrap().loss;
    let settings = RoundSettings {
        local_steps: 5,
        batch_size: 4,
        learning_rate: 1e-2,
        proximal_mu: 0.0,
    };
    for _ in 0..6 {
        let updates: Vec<_> = clients
            .iter_mut()
            .map(|c| c.round(&global, &settings, &mut rng).unwrap())
            .collect();
        let total: u64 = updates.iter().map(|u| u.samples).sum();
        assert_eq!(total, 4 + 5 + 6);
        for (i, g) in global.iter_mut().enumerate() {
            *g += updates
                .iter()
                .map(|u| u.delta[i] * u.samples as f32 / total as f32)
                .sum::<f32>();
        }
    }
    let after = clients[0].evaluate(&global, &all, 8).unwrap().loss;
    assert!(after < 0.6 * before, "global loss {before:.3} → {after:.3}");

    // FedProx: a strong proximal term keeps the local update smaller.
    let norm = |d: &[f32]| d.iter().map(|v| v * v).sum::<f32>().sqrt();
    let plain = clients[1]
        .round(&global, &settings, &mut ChaCha20Rng::from_seed([9; 32]))
        .unwrap();
    let prox = clients[1]
        .round(
            &global,
            &RoundSettings {
                proximal_mu: 50.0,
                ..settings.clone()
            },
            &mut ChaCha20Rng::from_seed([9; 32]),
        )
        .unwrap();
    assert!(
        norm(&prox.delta) < norm(&plain.delta),
        "{} against {}",
        norm(&prox.delta),
        norm(&plain.delta)
    );

    // A vector of the wrong length or with a NaN is refused.
    assert!(clients[0].round(&global[1..], &settings, &mut rng).is_err());
    let mut bad = global.clone();
    bad[0] = f32::NAN;
    assert!(clients[0].round(&bad, &settings, &mut rng).is_err());
}
