//! Helpers shared by the model crate's integration tests (each test file
//! uses some of them).
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use fedveil_model::{Activation, LayerType, LlamaConfig};
use fedveil_model::{
    Adapter, FullConfig, LoraConfig, PTuningConfig, PeftConfig, PrefixConfig, PromptConfig,
};

/// One configuration of every PEFT method (LoRA on every projection with
/// `lora_dropout`, prefix-tuning without and with a projection, prompt-
/// and P-tuning, and offsite-tuning's whole-layer adapter).
pub fn methods(lora_dropout: f32) -> Vec<PeftConfig> {
    vec![
        PeftConfig::Lora(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: lora_dropout,
            target_modules: vec!["all-linear".into()],
            layers_to_transform: None,
        }),
        PeftConfig::Prefix(PrefixConfig {
            num_virtual_tokens: 4,
            projection: None,
        }),
        PeftConfig::Prefix(PrefixConfig {
            num_virtual_tokens: 4,
            projection: Some(16),
        }),
        PeftConfig::Prompt(PromptConfig {
            num_virtual_tokens: 4,
        }),
        PeftConfig::PTuning(PTuningConfig {
            num_virtual_tokens: 4,
            encoder_hidden_size: 16,
        }),
        // Offsite-tuning's adapter: whole layers, the final norm and the
        // (tied) embeddings trainable.
        PeftConfig::Full(FullConfig {
            layers: vec![1],
            norm: true,
            embeddings: true,
        }),
    ]
}

/// Moves every LoRA B off zero (where it starts, which zeroes A's
/// gradient) to the same fixed values each time, so that two adapters
/// built alike stay alike.
pub fn set_lora_b(adapter: &Adapter) {
    for (name, var) in adapter.params() {
        if name.ends_with("lora_B.weight") {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 110.0)
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

/// Rewrites the layers' q/k/v and gate/up projections (Llama's names) as
/// Phi-3's fused `qkv_proj` (rows q, k, v) and `gate_up_proj` (gate first).
pub fn fuse_phi3(t: &mut HashMap<String, Tensor>, layers: usize) {
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (fused, parts) in [
            (
                "self_attn.qkv_proj",
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].as_slice(),
            ),
            (
                "mlp.gate_up_proj",
                ["mlp.gate_proj", "mlp.up_proj"].as_slice(),
            ),
        ] {
            let parts: Vec<Tensor> = parts
                .iter()
                .map(|n| t.remove(&format!("{p}.{n}.weight")).unwrap())
                .collect();
            t.insert(
                format!("{p}.{fused}.weight"),
                Tensor::cat(&parts, 0).unwrap(),
            );
        }
    }
}

/// A tiny Gemma-2 or (`three`) Gemma-3: soft caps on Gemma-2, q/k norms and
/// a second rotary base on Gemma-3, and a window of 6 on the first layer.
pub fn gemma(three: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_act: Activation::GeluTanh,
        norm_unit_offset: true,
        sandwich_norms: true,
        embed_scale: true,
        qk_norm: three,
        head_dim: Some(16),
        query_pre_attn_scalar: Some(16.0),
        attn_logit_softcapping: if three { None } else { Some(5.0) },
        final_logit_softcapping: if three { None } else { Some(10.0) },
        rope_local_base_freq: if three { Some(1e4) } else { None },
        sliding_window: Some(6),
        layer_types: Some(vec![LayerType::Sliding, LayerType::Full]),
        ..LlamaConfig::tiny(64)
    }
}

/// A fresh `peft` adapter (seeded 4) on `model` trained for `steps + 1`
/// steps on `examples` (one batch of them, dropout seeded 5; AdamW at
/// 3e-2, clipped at 1): the first step's loss, the last's, and the trainer.
pub fn train_steps(
    model: &fedveil_model::Llama,
    peft: &PeftConfig,
    examples: &[&fedveil_model::Example],
    steps: usize,
) -> (f64, f64, fedveil_model::AdapterTrainer) {
    use rand_core::SeedableRng;
    let adapter = Adapter::new(
        peft.clone(),
        model,
        &mut rand_chacha::ChaCha20Rng::from_seed([4; 32]),
    )
    .unwrap();
    let optim = fedveil_model::OptimConfig {
        learning_rate: 3e-2,
        max_grad_norm: Some(1.0),
        ..fedveil_model::OptimConfig::default()
    };
    let mut trainer = fedveil_model::AdapterTrainer::new(model, adapter, optim).unwrap();
    let mut r = rand_chacha::ChaCha20Rng::from_seed([5; 32]);
    let batch = || fedveil_model::Batch::new(examples, 64, 0, model.device()).unwrap();
    let first = trainer.step(&[batch()], &mut r).unwrap().loss;
    let mut last = first;
    for _ in 0..steps {
        last = trainer.step(&[batch()], &mut r).unwrap().loss;
    }
    (first, last, trainer)
}
