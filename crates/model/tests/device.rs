//! The path a GPU takes, checked on the device under test: the first CUDA
//! GPU in a build with the `cuda` feature (`scripts/gpu-check.sh` runs this
//! test binary on one; it fails without a GPU rather than pass on the CPU),
//! the CPU otherwise. Either way the model computes in bf16, as it does on
//! a GPU (`compute_dtype`), so the unfused attention with its masks as
//! tensors, the bf16 norms and activations and the f32 adapters cast on
//! the way in are what is checked; the reference is the same bf16 weights
//! computed in f32 on the CPU by the fused kernels.

mod common;

use candle_core::{DType, Device, Tensor};
use fedveil_model::model::Mode;
use fedveil_model::{
    Adapter, AdapterTrainer, Batch, Example, Llama, LlamaConfig, OptimConfig, PeftConfig,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// One device for the whole binary (a CUDA device made twice is two
/// devices to candle).
fn device_under_test() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            #[cfg(feature = "cuda")]
            {
                fedveil_model::cuda_device(0)
                    .expect("a `cuda` build's device tests run on a CUDA GPU")
            }
            #[cfg(not(feature = "cuda"))]
            {
                Device::Cpu
            }
        })
        .clone()
}

fn rng(seed: u8) -> ChaCha20Rng {
    ChaCha20Rng::from_seed([seed; 32])
}

/// The layer kinds of every family: Llama's, Qwen3's (q/k norms, narrow
/// heads), Llama's with biases, Mistral's window (overrun by the inputs),
/// Gemma-2's (GeGLU, `1 + w` sandwich norms, soft caps, alternating
/// windows) and Gemma-3's (q/k norms, a second rotary base).
fn kinds() -> Vec<(&'static str, LlamaConfig)> {
    let tiny = LlamaConfig::tiny(64);
    vec![
        ("llama", tiny.clone()),
        (
            "qwen3",
            LlamaConfig {
                qk_norm: true,
                head_dim: Some(16),
                ..tiny.clone()
            },
        ),
        (
            "bias",
            LlamaConfig {
                attention_bias: true,
                ..tiny.clone()
            },
        ),
        (
            "mistral",
            LlamaConfig {
                sliding_window: Some(5),
                ..tiny.clone()
            },
        ),
        ("gemma2", common::gemma(false)),
        ("gemma3", common::gemma(true)),
    ]
}

/// A random model of `config` whose weights are bf16 values: the same
/// model in f32 on the CPU (the reference) and in bf16 on the device.
fn pair(config: &LlamaConfig) -> (Llama, Llama) {
    let f32 = Llama::random(config.clone(), &Device::Cpu, &mut rng(1))
        .and_then(|m| m.to_dtype(DType::BF16))
        .and_then(|m| m.to_dtype(DType::F32))
        .unwrap();
    let device = f32.to_device(&device_under_test(), DType::BF16).unwrap();
    assert_eq!(device.dtype(), DType::BF16);
    assert!(device.device().same_device(&device_under_test()));
    (f32, device)
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .unwrap()
}

/// The largest difference between `a` and `b` over the largest magnitude
/// in `a`.
fn relative(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn examples(vocab: u32) -> Vec<Example> {
    let mut r = rng(9);
    (0..3)
        .map(|i| Example {
            ids: (0..12 + 2 * i).map(|_| r.next_u32() % vocab).collect(),
            prompt_len: 2,
        })
        .collect()
}

#[test]
fn bf16_logits_on_the_device_agree_with_f32_on_the_cpu_for_every_layer_kind() {
    let ids = [[3u32, 17, 5, 9, 33, 2, 61, 40, 8, 12, 27]];
    for (name, config) in kinds() {
        let (reference, model) = pair(&config);
        let want = reference
            .forward(&Tensor::new(&ids, &Device::Cpu).unwrap(), None, Mode::Eval)
            .unwrap();
        let got = model
            .forward(
                &Tensor::new(&ids, model.device()).unwrap(),
                None,
                Mode::Eval,
            )
            .unwrap();
        assert!(got.device().same_device(&device_under_test()));
        let diff = relative(&to_vec(&want), &to_vec(&got));
        // bf16 keeps 8 bits of mantissa; 2.7e-2 is the most seen against
        // transformers' f32 (tests/hf_interop.rs).
        eprintln!(
            "{name}: bf16 logits on {:?} within {diff:.2e} of scale",
            device_under_test()
        );
        assert!(
            diff < 5e-2,
            "{name}: bf16 on the device differs by {diff:.2e} of scale"
        );
    }
}

/// Every adapter tensor of every PEFT method gets a gradient on the device
/// that points where the CPU's f32 one does (cosine ≥ 0.99) and has its
/// size (within 5 %).
#[test]
fn adapter_gradients_on_the_device_agree_with_f32_on_the_cpu() {
    let examples = examples(64);
    let refs: Vec<&Example> = examples.iter().collect();
    let (mut worst_cosine, mut worst_norm) = (1f64, 0f64);
    for (name, config) in kinds() {
        let (reference, model) = pair(&config);
        for peft in common::methods(0.0) {
            let grads = |m: &Llama| {
                let adapter = Adapter::new(peft.clone(), m, &mut rng(2)).unwrap();
                if let PeftConfig::Lora(_) = peft {
                    // B starts at zero, which zeroes A's gradient.
                    for (n, var) in adapter.params() {
                        if n.ends_with("lora_B.weight") {
                            let v: Vec<f32> = (0..var.elem_count())
                                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 110.0)
                                .collect();
                            var.set(&Tensor::from_vec(v, var.shape(), var.device()).unwrap())
                                .unwrap();
                        }
                    }
                }
                assert!(
                    adapter
                        .params()
                        .iter()
                        .all(|(_, v)| v.dtype() == DType::F32)
                );
                let trainer = AdapterTrainer::new(m, adapter, OptimConfig::default()).unwrap();
                let batch = Batch::new(&refs, 64, 0, m.device()).unwrap();
                trainer.parameter_gradients(&batch, &mut rng(3)).unwrap()
            };
            let (want, got) = (grads(&reference), grads(&model));
            assert_eq!(want.len(), got.len());
            for ((n, w), (_, g)) in want.iter().zip(&got) {
                let what = format!("{name}, {}: {n}", peft.method());
                let w = to_vec(
                    w.as_ref()
                        .unwrap_or_else(|| panic!("{what}: none on the CPU")),
                );
                let g = to_vec(
                    g.as_ref()
                        .unwrap_or_else(|| panic!("{what}: none on the device")),
                );
                let dot: f64 = w.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum();
                let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let (nw, ng) = (norm(&w), norm(&g));
                assert!(
                    nw > 0.0 && ng.is_finite() && ng > 0.0,
                    "{what}: norms {nw}, {ng}"
                );
                let cosine = dot / (nw * ng);
                assert!(cosine >= 0.99, "{what}: cosine {cosine:.4}");
                assert!(
                    (ng / nw - 1.0).abs() <= 0.05,
                    "{what}: norm {ng:.4e} against {nw:.4e}"
                );
                worst_cosine = worst_cosine.min(cosine);
                worst_norm = worst_norm.max((ng / nw - 1.0).abs());
            }
        }
    }
    eprintln!(
        "adapter gradients on {:?}: cosine ≥ {worst_cosine:.5}, norms within {:.2} %",
        device_under_test(),
        100.0 * worst_norm
    );
}

/// Every PEFT method's loss falls over a few steps on the device, its
/// parameters staying f32 there.
#[test]
fn every_peft_method_trains_on_the_device() {
    let examples = examples(64);
    let refs: Vec<&Example> = examples.iter().collect();
    let (_, model) = pair(&LlamaConfig::tiny(64));
    for peft in common::methods(0.1) {
        let (first, last, trainer) = common::train_steps(&model, &peft, &refs, 30);
        eprintln!("{}: {first:.3} → {last:.3}", peft.method());
        assert!(
            last.is_finite() && last < 0.9 * first,
            "{}: {first} → {last}",
            peft.method()
        );
        for (n, v) in trainer.adapter().params() {
            assert_eq!(v.dtype(), DType::F32, "{n}");
            assert!(v.device().same_device(&device_under_test()), "{n}");
        }
    }
}

/// A GPU's gather does not check its indices, so the model does: a token
/// id outside the vocabulary is an error on the device, never a read of
/// whatever lies past the table.
#[test]
fn a_token_id_outside_the_vocabulary_is_refused_on_the_device() {
    let (_, model) = pair(&LlamaConfig::tiny(64));
    for bad in [64u32, 1 << 20] {
        let ids = Tensor::new(&[[3u32, bad, 5]], model.device()).unwrap();
        let err = model
            .forward(&ids, None, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("token id {bad} is outside")), "{err}");
    }
    let ids = Tensor::new(&[[3u32, 63, 5]], model.device()).unwrap();
    assert!(model.forward(&ids, None, Mode::Eval).is_ok());
}
