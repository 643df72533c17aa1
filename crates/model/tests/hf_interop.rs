//! fedveil's decoder against transformers', on a tiny random model of each
//! family and configuration fedveil loads: Llama-3.1's rotary scaling with
//! an explicit `head_dim` (Llama-3.2), linear rotary scaling with Llama's
//! `attention_bias` (q, k, v and o), Mistral with a sliding window, Qwen2
//! with its q/k/v bias, Qwen3 with its q/k norms, Phi-3 with its fused
//! `qkv_proj` and `gate_up_proj`, Gemma-2 (GeGLU, `1 + w` norms around
//! attention and the MLP, scaled embeddings, both soft caps, its own
//! attention scale, a sliding layer whose window the input overruns) and
//! Gemma-3 (q/k norms, linear rotary scaling on the full layers, another
//! rotary base on the sliding ones), and Gemma-3's multimodal checkpoint
//! read for its language model.
//! Each model is written as a Hugging Face directory and loaded back by
//! fedveil's own loader.
//!
//! `logits_match_transformers` runs transformers itself. It is ignored by
//! default: it needs a Python with torch and transformers,
//!
//!     FEDVEIL_HF_PYTHON=/path/to/venv/bin/python \
//!         cargo test --release -p fedveil-model --test hf_interop -- --ignored
//!
//! It also reads back the config.json that transformers writes for each
//! model (transformers 5's `rope_parameters` and `layer_types`), and with
//! `FEDVEIL_HF_WRITE_FIXTURE=1` it rewrites
//! `tests/fixtures/hf_logits.json`, the logits transformers computed, which
//! `logits_match_the_transformers_fixture` checks on every run without
//! Python. The models are drawn from fixed seeds, so the fixture stays
//! valid until `Llama::random` or `tiny` change the weights they draw.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use fedveil_model::load::{Loaded, load_hf_dir, save_hf_dir};
use fedveil_model::model::{Linear, Mode};
use fedveil_model::{Activation, LayerType, Llama, LlamaConfig, RopeScaling};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// The tokens every case runs: 24 positions, so that the rotary scaling's
/// long and short wavelengths both show.
const IDS: [u32; 24] = [
    72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 44, 32, 49, 50, 51, 32, 256, 200, 17, 3,
    99, 150, 250,
];

/// Logits agree within this fraction of their largest magnitude.
const TOLERANCE: f32 = 1e-4;

struct Case {
    name: &'static str,
    model_type: &'static str,
    config: LlamaConfig,
    /// A bias on the output projection too (Llama's `attention_bias`).
    o_bias: bool,
    /// Every test builds its model from this seed.
    seed: u8,
}

fn cases() -> Vec<Case> {
    let vocab = fedveil_model::tiny::EOS as usize + 1;
    let base = LlamaConfig {
        tie_word_embeddings: false,
        ..LlamaConfig::tiny(vocab)
    };
    vec![
        Case {
            name: "llama3_rope_head_dim",
            model_type: "llama",
            config: LlamaConfig {
                head_dim: Some(16),
                rope_scaling: Some(RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 64,
                }),
                ..base.clone()
            },
            o_bias: false,
            seed: 1,
        },
        Case {
            name: "llama_linear_rope_attention_bias",
            model_type: "llama",
            config: LlamaConfig {
                attention_bias: true,
                tie_word_embeddings: true,
                rope_scaling: Some(RopeScaling::Linear { factor: 4.0 }),
                rope_theta: 500_000.0,
                ..base.clone()
            },
            o_bias: true,
            seed: 2,
        },
        Case {
            name: "mistral_sliding_window",
            model_type: "mistral",
            config: LlamaConfig {
                // Shorter than the input: the window hides keys.
                sliding_window: Some(16),
                rms_norm_eps: 1e-6,
                ..base.clone()
            },
            o_bias: false,
            seed: 3,
        },
        Case {
            name: "qwen2",
            model_type: "qwen2",
            config: LlamaConfig {
                attention_bias: true,
                rope_theta: 1_000_000.0,
                rms_norm_eps: 1e-6,
                ..base.clone()
            },
            o_bias: false,
            seed: 4,
        },
        Case {
            name: "qwen3",
            model_type: "qwen3",
            config: LlamaConfig {
                qk_norm: true,
                head_dim: Some(16),
                rope_theta: 1_000_000.0,
                rms_norm_eps: 1e-6,
                ..base.clone()
            },
            o_bias: false,
            seed: 6,
        },
        Case {
            name: "phi3",
            model_type: "phi3",
            config: base.clone(),
            o_bias: false,
            seed: 5,
        },
        Case {
            name: "gemma2",
            model_type: "gemma2",
            config: LlamaConfig {
                tie_word_embeddings: true,
                head_dim: Some(16),
                rms_norm_eps: 1e-6,
                ..gemma(&base)
            },
            o_bias: false,
            seed: 7,
        },
        Case {
            name: "gemma3",
            model_type: "gemma3_text",
            config: LlamaConfig {
                qk_norm: true,
                head_dim: Some(16),
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                rope_local_base_freq: Some(10_000.0),
                rope_scaling: Some(RopeScaling::Linear { factor: 4.0 }),
                query_pre_attn_scalar: Some(20.0),
                attn_logit_softcapping: None,
                final_logit_softcapping: None,
                ..gemma(&base)
            },
            o_bias: false,
            seed: 8,
        },
    ]
}

/// Gemma-2's conventions on `base`: small soft caps and window, so that
/// each shows in the logits of the test's 24 tokens.
fn gemma(base: &LlamaConfig) -> LlamaConfig {
    LlamaConfig {
        hidden_act: Activation::GeluTanh,
        norm_unit_offset: true,
        sandwich_norms: true,
        embed_scale: true,
        query_pre_attn_scalar: Some(24.0),
        attn_logit_softcapping: Some(2.0),
        final_logit_softcapping: Some(3.0),
        sliding_window: Some(8),
        layer_types: Some(vec![LayerType::Sliding, LayerType::Full]),
        ..base.clone()
    }
}

/// The case's model: random weights, norms away from one and every bias
/// away from zero, so that each part shows in the logits.
fn build(case: &Case) -> Llama {
    let mut rng = ChaCha20Rng::from_seed([case.seed; 32]);
    let model = Llama::random(case.config.clone(), &Device::Cpu, &mut rng).unwrap();
    let mut draw = |n: usize, around: f32| -> Tensor {
        let values: Vec<f32> = (0..n)
            .map(|_| around + (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 0.4)
            .collect();
        Tensor::from_vec(values, n, &Device::Cpu).unwrap()
    };
    let mut weights = model.weights().clone();
    let h = case.config.hidden_size;
    // Gemma's norms multiply by `1 + w`.
    let one = if case.config.norm_unit_offset {
        0.0
    } else {
        1.0
    };
    for layer in &mut weights.layers {
        layer.input_norm = draw(h, one);
        layer.post_norm = draw(h, one);
        if let Some((q, k)) = &mut layer.qk_norm {
            let hd = case.config.head_dim();
            *q = draw(hd, one);
            *k = draw(hd, one);
        }
        if let Some((a, m)) = &mut layer.sandwich_norms {
            *a = draw(h, one);
            *m = draw(h, one);
        }
        for l in [&mut layer.q, &mut layer.k, &mut layer.v] {
            if l.bias.is_some() {
                let n = l.weight.dims2().unwrap().0;
                *l = Linear::new(l.weight.clone(), Some(draw(n, 0.0)));
            }
        }
        if case.o_bias {
            layer.o = Linear::new(layer.o.weight.clone(), Some(draw(h, 0.0)));
        }
    }
    weights.norm = draw(h, one);
    Llama::new(case.config.clone(), weights).unwrap()
}

/// Writes the case as a Hugging Face directory and loads it back with
/// fedveil's loader (which must read the config to the same one).
fn write_and_load(case: &Case) -> (PathBuf, Llama) {
    let model = build(case);
    let mut bytes = [0u8; 8];
    rand_core::OsRng.fill_bytes(&mut bytes);
    let dir = std::env::temp_dir().join(format!(
        "fedveil-hf-interop-{}-{}",
        case.name,
        hex::encode(bytes)
    ));
    let loaded = Loaded {
        model,
        tokenizer: fedveil_model::tiny::byte_tokenizer().unwrap(),
        source: case.name.into(),
    };
    save_hf_dir(&loaded, &dir).unwrap();
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["model_type"] = case.model_type.into();
    config["architectures"] = serde_json::json!([match case.model_type {
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "phi3" => "Phi3ForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        "gemma3_text" => "Gemma3ForCausalLM",
        _ => "LlamaForCausalLM",
    }]);
    if case.model_type == "phi3" {
        // transformers' Phi-3 default pad id (32000) is past this
        // vocabulary.
        config["pad_token_id"] = serde_json::Value::Null;
        fuse_phi3(
            &dir.join("model.safetensors"),
            case.config.num_hidden_layers,
        );
    }
    std::fs::write(&path, config.to_string()).unwrap();
    let back = load_hf_dir(&dir, &Device::Cpu).unwrap().model;
    assert_eq!(back.config(), &case.config, "{}", case.name);
    (dir, back)
}

/// Rewrites the safetensors file with Phi-3's fused projections.
fn fuse_phi3(path: &std::path::Path, layers: usize) {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    common::fuse_phi3(&mut t, layers);
    candle_core::safetensors::save(&t, path).unwrap();
}

fn fedveil_logits(model: &Llama) -> Vec<f32> {
    let ids = Tensor::new(&[IDS], &Device::Cpu).unwrap();
    model
        .forward(&ids, None, Mode::Eval)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest difference as a fraction of the reference's largest
/// magnitude.
fn relative_difference(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

#[test]
#[ignore = "needs FEDVEIL_HF_PYTHON: a Python with torch and transformers"]
fn logits_match_transformers() {
    let python = std::env::var("FEDVEIL_HF_PYTHON").expect("set FEDVEIL_HF_PYTHON");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hf_logits.py");
    let mut fixture = BTreeMap::new();
    for case in cases() {
        let (dir, model) = write_and_load(&case);
        let out = dir.join("logits.json");
        let ids = serde_json::to_string(&[IDS]).unwrap();
        let rewritten = dir.join("rewritten");
        let status = std::process::Command::new(&python)
            .arg(script)
            .arg(&dir)
            .arg(&ids)
            .arg(&out)
            .arg(&rewritten)
            .status()
            .unwrap();
        assert!(status.success(), "{}: {script} failed", case.name);
        let logits: Vec<Vec<Vec<f32>>> =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let reference: Vec<f32> = logits.into_iter().flatten().flatten().collect();
        let diff = relative_difference(&fedveil_logits(&model), &reference);
        eprintln!(
            "{}: largest difference {diff:.2e} of the logits' scale",
            case.name
        );
        assert!(diff <= TOLERANCE, "{}: {diff}", case.name);
        // The config as this transformers version writes it reads back to
        // the same one.
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(rewritten.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            LlamaConfig::from_hf_json(&json).unwrap(),
            case.config,
            "{}: {json}",
            case.name
        );
        fixture.insert(case.name, reference);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    if std::env::var_os("FEDVEIL_HF_WRITE_FIXTURE").is_some() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf_logits.json");
        std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
        std::fs::write(path, serde_json::to_string(&fixture).unwrap()).unwrap();
    }
}

#[test]
fn logits_match_the_transformers_fixture() {
    let fixture: BTreeMap<String, Vec<f32>> =
        serde_json::from_str(include_str!("fixtures/hf_logits.json")).unwrap();
    let cases = cases();
    assert_eq!(fixture.len(), cases.len());
    for case in cases {
        let (dir, model) = write_and_load(&case);
        let diff = relative_difference(&fedveil_logits(&model), &fixture[case.name]);
        assert!(
            diff <= TOLERANCE,
            "{}: logits differ from transformers' by {diff} of their scale",
            case.name
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Each Gemma setting shows in the logits the fixture holds: switching any
/// one off moves them by far more than the tolerance, so the agreement
/// above covers every one of them.
#[test]
fn every_gemma_setting_moves_the_logits() {
    for case in cases().into_iter().filter(|c| c.config.sandwich_norms) {
        let model = build(&case);
        let reference = fedveil_logits(&model);
        let c = &case.config;
        let mut variants: Vec<(&str, LlamaConfig)> = vec![
            (
                "no sliding window",
                LlamaConfig {
                    layer_types: None,
                    sliding_window: None,
                    ..c.clone()
                },
            ),
            (
                "no embedding scale",
                LlamaConfig {
                    embed_scale: false,
                    ..c.clone()
                },
            ),
            (
                "SwiGLU",
                LlamaConfig {
                    hidden_act: Activation::Silu,
                    ..c.clone()
                },
            ),
            (
                "head_dim's scale",
                LlamaConfig {
                    query_pre_attn_scalar: None,
                    ..c.clone()
                },
            ),
        ];
        if c.attn_logit_softcapping.is_some() {
            variants.push((
                "no attention cap",
                LlamaConfig {
                    attn_logit_softcapping: None,
                    ..c.clone()
                },
            ));
        }
        if c.final_logit_softcapping.is_some() {
            variants.push((
                "no logit cap",
                LlamaConfig {
                    final_logit_softcapping: None,
                    ..c.clone()
                },
            ));
        }
        if c.rope_local_base_freq.is_some() {
            variants.push((
                "one rotary base",
                LlamaConfig {
                    rope_local_base_freq: None,
                    ..c.clone()
                },
            ));
        }
        for (what, config) in variants {
            let Ok(other) = Llama::new(config, model.weights().clone()) else {
                panic!("{}: {what} does not build", case.name);
            };
            let diff = relative_difference(&fedveil_logits(&other), &reference);
            assert!(
                diff > 100.0 * TOLERANCE,
                "{}: {what} moves the logits by {diff}",
                case.name
            );
        }
        // The `1 + w` norms: the same weights read as Llama's.
        let plain = LlamaConfig {
            norm_unit_offset: false,
            sandwich_norms: false,
            ..c.clone()
        };
        let mut weights = model.weights().clone();
        for l in &mut weights.layers {
            l.sandwich_norms = None;
        }
        let other = Llama::new(plain, weights).unwrap();
        let diff = relative_difference(&fedveil_logits(&other), &reference);
        assert!(
            diff > 100.0 * TOLERANCE,
            "{}: the norms move the logits by {diff}",
            case.name
        );
    }
}

/// In bf16 the model takes the unfused path (masks as tensors, softmax
/// from primitives): it agrees with transformers' f32 logits within
/// bf16's precision, and the sliding window shows beyond it.
#[test]
fn bf16_agrees_with_the_fixture_within_its_precision() {
    let fixture: BTreeMap<String, Vec<f32>> =
        serde_json::from_str(include_str!("fixtures/hf_logits.json")).unwrap();
    for case in cases() {
        let model = build(&case).to_dtype(DType::BF16).unwrap();
        let diff = relative_difference(&fedveil_logits(&model), &fixture[case.name]);
        let unwindowed = LlamaConfig {
            layer_types: None,
            sliding_window: None,
            ..case.config.clone()
        };
        let other = Llama::new(unwindowed, model.weights().clone()).unwrap();
        let window_diff = relative_difference(&fedveil_logits(&other), &fixture[case.name]);
        eprintln!(
            "{}: bf16 {diff:.2e}, without the window {window_diff:.2e}",
            case.name
        );
        // bf16 keeps 8 bits of mantissa: 2.7e-2 at most was seen here.
        assert!(diff <= 5e-2, "{}: bf16 differs by {diff}", case.name);
        if case.config.sliding_window.is_some() {
            assert!(
                window_diff > 0.2,
                "{}: the window shows by {window_diff}",
                case.name
            );
        }
    }
}

/// Generation's cache meets the sliding window as the full pass does: token
/// by token, each position's logits equal the whole sequence's, in f32
/// (the fused kernels) and in bf16 (the masks).
#[test]
fn the_cache_slides_the_window_as_the_full_pass_does() {
    for case in cases()
        .into_iter()
        .filter(|c| c.config.sliding_window.is_some())
    {
        for dtype in [DType::F32, DType::BF16] {
            let model = build(&case).to_dtype(dtype).unwrap();
            let full = fedveil_logits(&model);
            let vocab = case.config.vocab_size;
            let mut cache = fedveil_model::KvCache::new();
            for (i, id) in IDS.iter().enumerate() {
                let ids = Tensor::new(&[[*id]], &Device::Cpu).unwrap();
                let step: Vec<f32> = model
                    .forward_cached(&ids, None, &mut cache)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want = &full[i * vocab..(i + 1) * vocab];
                let diff = relative_difference(&step, want);
                let bound = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                assert!(
                    diff <= bound,
                    "{} {dtype:?} position {i}: {diff}",
                    case.name
                );
            }
        }
    }
}

/// A multimodal Gemma-3 (`gemma3`, as Gemma-3-4B ships: the language model
/// under `language_model.model.*`, a SigLIP vision tower beside it) on
/// text: fedveil's loader reads its language model and computes the
/// logits transformers' `Gemma3ForConditionalGeneration` computes.
#[test]
#[ignore = "needs FEDVEIL_HF_PYTHON: a Python with torch and transformers"]
fn a_multimodal_gemma3_matches_transformers_on_text() {
    let python = std::env::var("FEDVEIL_HF_PYTHON").expect("set FEDVEIL_HF_PYTHON");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hf_logits.py");
    let case = cases().into_iter().find(|c| c.name == "gemma3").unwrap();
    let (dir, model) = write_and_load(&case);
    // Rewrite the directory as the multimodal checkpoint.
    let path = dir.join("config.json");
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let config = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 28, "patch_size": 14},
        "mm_tokens_per_image": 4, "boi_token_index": 255999, "eoi_token_index": 256000,
        "image_token_index": 262144,
    });
    std::fs::write(&path, config.to_string()).unwrap();
    let st = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| (n.replacen("model.", "language_model.model.", 1), t))
        .collect();
    candle_core::safetensors::save(&renamed, &st).unwrap();
    let ours = load_hf_dir(&dir, &Device::Cpu).unwrap().model;
    assert_eq!(fedveil_logits(&ours), fedveil_logits(&model));
    let out = dir.join("logits.json");
    let status = std::process::Command::new(&python)
        .arg(script)
        .arg(&dir)
        .arg(serde_json::to_string(&[IDS]).unwrap())
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "{script} failed");
    let logits: Vec<Vec<Vec<f32>>> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let reference: Vec<f32> = logits.into_iter().flatten().flatten().collect();
    let diff = relative_difference(&fedveil_logits(&ours), &reference);
    eprintln!("gemma3 multimodal: largest difference {diff:.2e} of the logits' scale");
    assert!(diff <= TOLERANCE, "{diff}");
    std::fs::remove_dir_all(&dir).unwrap();
}
