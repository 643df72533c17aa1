//! Gradient checkpointing (`OptimConfig::gradient_checkpointing`): the
//! backward pass that recomputes each layer from its input gives the
//! gradients of the ordinary one, for every PEFT method, on Llama's, Qwen3's
//! and biased layers, and over a quantised base.

mod common;

use candle_core::{Device, Tensor};
use fedveil_model::{
    Adapter, AdapterTrainer, Batch, Example, Llama, LlamaConfig, LoraConfig, OptimConfig,
    PeftConfig, QuantFormat,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn rng(seed: u8) -> ChaCha20Rng {
    ChaCha20Rng::from_seed([seed; 32])
}

/// Every method, without dropout: checkpointing draws each layer's
/// dropout masks from a generator of its own, so only dropout-free passes
/// can be compared value for value.
fn methods() -> Vec<PeftConfig> {
    common::methods(0.0)
}

fn batch() -> Batch {
    let examples: Vec<Example> = (0..3u32)
        .map(|e| Example {
            ids: (0..10 + e as usize)
                .map(|i| (e * 17 + i as u32 * 5) % 64)
                .collect(),
            prompt_len: 3,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    Batch::new(&refs, 64, 0, &Device::Cpu).unwrap()
}

fn gradients(model: &Llama, peft: &PeftConfig, checkpointing: bool) -> Vec<(String, Tensor)> {
    let adapter = Adapter::new(peft.clone(), model, &mut rng(2)).unwrap();
    common::set_lora_b(&adapter);
    let optim = OptimConfig {
        gradient_checkpointing: checkpointing,
        ..OptimConfig::default()
    };
    let trainer = AdapterTrainer::new(model, adapter, optim).unwrap();
    trainer
        .parameter_gradients(&batch(), &mut rng(3))
        .unwrap()
        .into_iter()
        .map(|(n, g)| {
            let g = g.unwrap_or_else(|| panic!("no gradient reached {n}"));
            (n, g)
        })
        .collect()
}

#[test]
fn checkpointed_gradients_equal_the_ordinary_ones_for_every_method_and_layer_kind() {
    let kinds = [
        LlamaConfig::tiny(64),
        LlamaConfig {
            qk_norm: true,
            head_dim: Some(16),
            ..LlamaConfig::tiny(64)
        },
        LlamaConfig {
            attention_bias: true,
            tie_word_embeddings: false,
            ..LlamaConfig::tiny(64)
        },
    ];
    for (k, config) in kinds.iter().enumerate() {
        let f32_model = Llama::random(config.clone(), &Device::Cpu, &mut rng(1)).unwrap();
        let quantised = f32_model.quantize(QuantFormat::Q8_0).unwrap();
        for model in [&f32_model, &quantised] {
            for peft in methods() {
                let plain = gradients(model, &peft, false);
                let checkpointed = gradients(model, &peft, true);
                assert_eq!(plain.len(), checkpointed.len());
                for ((n, a), (m, b)) in plain.iter().zip(&checkpointed) {
                    assert_eq!(n, m);
                    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
                    let scale = a.iter().fold(0f32, |s, x| s.max(x.abs()));
                    let diff = a
                        .iter()
                        .zip(&b)
                        .fold(0f32, |s, (x, y)| s.max((x - y).abs()));
                    assert!(
                        scale > 0.0 && diff <= 1e-5 * scale,
                        "kind {k}, {}: {n} differs by {diff} of {scale}",
                        peft.method()
                    );
                }
            }
        }
    }
}

#[test]
fn a_checkpointed_step_learns_with_dropout() {
    let model = Llama::random(LlamaConfig::tiny(64), &Device::Cpu, &mut rng(1)).unwrap();
    let adapter = Adapter::new(
        PeftConfig::Lora(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            target_modules: vec!["all-linear".into()],
            layers_to_transform: None,
        }),
        &model,
        &mut rng(2),
    )
    .unwrap();
    let optim = OptimConfig {
        learning_rate: 1e-2,
        gradient_checkpointing: true,
        ..OptimConfig::default()
    };
    let mut trainer = AdapterTrainer::new(&model, adapter, optim).unwrap();
    let batch = batch();
    let losses: Vec<f64> = (0..20)
        .map(|_| {
            trainer
                .step(std::slice::from_ref(&batch), &mut rng(4))
                .unwrap()
                .loss
        })
        .collect();
    assert!(losses[19] < 0.9 * losses[0], "{losses:?}");
}

#[test]
fn per_example_gradients_with_checkpointing_equal_the_batched_ones() {
    let model = Llama::random(LlamaConfig::tiny(64), &Device::Cpu, &mut rng(1)).unwrap();
    let examples: Vec<Example> = (0..4u32)
        .map(|e| Example {
            ids: (0..8 + e as usize)
                .map(|i| (e * 13 + i as u32 * 3) % 64)
                .collect(),
            prompt_len: 2,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let rows = |checkpointing: bool| {
        let adapter = Adapter::new(common::methods(0.0)[0].clone(), &model, &mut rng(2)).unwrap();
        common::set_lora_b(&adapter);
        let optim = OptimConfig {
            gradient_checkpointing: checkpointing,
            ..OptimConfig::default()
        };
        let trainer = AdapterTrainer::new(&model, adapter, optim).unwrap();
        let g = trainer
            .per_example_gradients(&refs, 32, 0, &mut rng(3))
            .unwrap();
        (0..g.len()).map(|i| g.row(i).to_vec()).collect::<Vec<_>>()
    };
    let (batched, checkpointed) = (rows(false), rows(true));
    assert_eq!(batched.len(), 4);
    for (a, b) in batched.iter().zip(&checkpointed) {
        let scale = a.iter().fold(0f32, |s, x| s.max(x.abs()));
        let diff = a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
        assert!(scale > 0.0 && diff <= 1e-5 * scale, "{diff} of {scale}");
    }
}
