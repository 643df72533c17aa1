//! PEFT on a tiny random llama built here (no downloads): gradients reach
//! every adapter tensor, LoRA with B = 0 is the base model, each method
//! memorises a small task, adapters round-trip through vectors and files
//! under PEFT's key names, and the cached and uncached forward passes agree.

mod common;

use candle_core::{Device, Tensor};
use fedveil_model::generate::{GenerateOptions, Sampling, generate};
use fedveil_model::interop::{load_adapter, save_adapter};
use fedveil_model::model::Mode;
use fedveil_model::peft::lora_key;
use fedveil_model::train::evaluate;
use fedveil_model::{
    Adapter, AdapterTrainer, Batch, Example, KvCache, Llama, LlamaConfig, LoraConfig, Module,
    OptimConfig, PeftConfig, PromptConfig,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn rng(seed: u8) -> ChaCha20Rng {
    ChaCha20Rng::from_seed([seed; 32])
}

fn tiny(config: LlamaConfig) -> Llama {
    Llama::random(config, &Device::Cpu, &mut rng(1)).unwrap()
}

fn methods() -> Vec<PeftConfig> {
    common::methods(0.1)
}

/// Fixed token sequences the adapters learn to reproduce; the first three
/// tokens of each are the prompt.
fn memorisation_task(vocab: u32) -> Vec<Example> {
    let mut r = rng(9);
    (0..4)
        .map(|_| {
            let len = 10 + (rand_core::RngCore::next_u32(&mut r) % 6) as usize;
            let ids = (0..len)
                .map(|_| rand_core::RngCore::next_u32(&mut r) % vocab)
                .collect();
            Example { ids, prompt_len: 3 }
        })
        .collect()
}

/// On Llama's layer, Qwen3's (q/k norms, heads 16 wide in a 32-wide
/// model), Llama's with `attention_bias` (q, k and v biases here), and
/// Gemma-2's and Gemma-3's (GeGLU, `1 + w` norms around attention and the
/// MLP, soft caps, a sliding layer whose window the examples overrun).
#[test]
fn every_adapter_tensor_gets_a_gradient_for_every_method_and_layer_kind() {
    let examples = memorisation_task(64);
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = Batch::new(&refs, 64, 0, &Device::Cpu).unwrap();
    let kinds = [
        LlamaConfig::tiny(64),
        LlamaConfig {
            qk_norm: true,
            head_dim: Some(16),
            ..LlamaConfig::tiny(64)
        },
        LlamaConfig {
            attention_bias: true,
            ..LlamaConfig::tiny(64)
        },
        common::gemma(false),
        common::gemma(true),
    ];
    for (config, peft) in kinds
        .iter()
        .flat_map(|c| methods().into_iter().map(move |m| (c, m)))
    {
        let model = tiny(config.clone());
        let adapter = Adapter::new(peft.clone(), &model, &mut rng(2)).unwrap();
        if let PeftConfig::Lora(_) = peft {
            // B starts at zero, which (correctly) zeroes A's gradient; move
            // B off zero so that both matrices must receive one.
            for (name, var) in adapter.params() {
                if name.ends_with("lora_B.weight") {
                    let t = Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap();
                    var.set(&t).unwrap();
                }
            }
        }
        let trainer = AdapterTrainer::new(&model, adapter, OptimConfig::default()).unwrap();
        let grads = trainer.parameter_gradients(&batch, &mut rng(3)).unwrap();
        assert!(!grads.is_empty());
        // Whole-layer adapters train Qwen3's q/k norms with the rest, and
        // Gemma's four norms under their Hugging Face names.
        if matches!(peft, PeftConfig::Full(_)) {
            let mut norms = vec!["input_layernorm"];
            if config.qk_norm {
                norms.extend(["self_attn.q_norm", "self_attn.k_norm"]);
            }
            if config.sandwich_norms {
                norms.extend([
                    "post_attention_layernorm",
                    "pre_feedforward_layernorm",
                    "post_feedforward_layernorm",
                ]);
            } else {
                norms.push("post_attention_layernorm");
            }
            for norm in norms {
                let name = format!("model.layers.1.{norm}.weight");
                assert!(grads.iter().any(|(n, _)| *n == name), "no {name}");
            }
        }
        for (name, grad) in grads {
            let grad = grad.unwrap_or_else(|| {
                panic!("{}: no gradient reached {name} ({config:?})", peft.method())
            });
            let norm = grad
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{}: {name} has gradient norm² {norm} ({config:?})",
                peft.method()
            );
        }
    }
}

#[test]
fn lora_with_zero_b_reproduces_the_base_logits_exactly() {
    let mut config = LlamaConfig::tiny(64);
    config.attention_bias = true;
    config.tie_word_embeddings = false;
    let model = tiny(config);
    let adapter = Adapter::new(
        PeftConfig::Lora(LoraConfig {
            r: 4,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: vec!["all-linear".into()],
            layers_to_transform: None,
        }),
        &model,
        &mut rng(2),
    )
    .unwrap();
    let ids = Tensor::new(&[[3u32, 17, 5, 9, 60, 2], [1, 1, 2, 3, 5, 8]], &Device::Cpu).unwrap();
    let base = model.forward(&ids, None, Mode::Eval).unwrap();
    let with = model.forward(&ids, Some(&adapter), Mode::Eval).unwrap();
    let base: Vec<f32> = base.flatten_all().unwrap().to_vec1().unwrap();
    let with: Vec<f32> = with.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(base.len(), 2 * 6 * 64);
    assert!(
        base.iter()
            .zip(&with)
            .all(|(a, b)| a.to_bits() == b.to_bits() || a == b)
    );
    // And a non-zero B changes them.
    let b = adapter.get(&lora_key(0, Module::Q, 'B')).unwrap();
    b.set(&Tensor::ones(b.shape(), candle_core::DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let changed = model.forward(&ids, Some(&adapter), Mode::Eval).unwrap();
    let changed: Vec<f32> = changed.flatten_all().unwrap().to_vec1().unwrap();
    assert!(base.iter().zip(&changed).any(|(a, b)| a != b));
}

#[test]
fn the_loss_falls_on_a_memorisation_task_for_every_method() {
    let model = tiny(LlamaConfig::tiny(64));
    let examples = memorisation_task(64);
    let mut report = Vec::new();
    for peft in methods() {
        let adapter = Adapter::new(peft.clone(), &model, &mut rng(4)).unwrap();
        let lr = match peft {
            PeftConfig::Lora(_) => 1e-2,
            PeftConfig::Full(_) => 3e-3,
            _ => 1e-1,
        };
        let optim = OptimConfig {
            learning_rate: lr,
            warmup_steps: 5,
            total_steps: 120,
            max_grad_norm: Some(1.0),
            ..OptimConfig::default()
        };
        let before = evaluate(&model, Some(&adapter), &examples, 4, 64).unwrap();
        let mut trainer = AdapterTrainer::new(&model, adapter, optim).unwrap();
        let refs: Vec<&Example> = examples.iter().collect();
        let mut r = rng(5);
        for _ in 0..120 {
            let batch = Batch::new(&refs, 64, 0, &Device::Cpu).unwrap();
            let stats = trainer.step(&[batch], &mut r).unwrap();
            assert!(stats.loss.is_finite());
        }
        let after = evaluate(&model, Some(trainer.adapter()), &examples, 4, 64).unwrap();
        assert!((after.perplexity - after.loss.exp()).abs() < 1e-9);
        report.push((peft.method(), before.loss, after.loss));
    }
    eprintln!("{report:?}");
    for (method, before, after) in report {
        assert!(
            after < 0.7 * before,
            "{method}: loss {before:.3} → {after:.3}"
        );
    }
}

#[test]
fn flatten_unflatten_and_files_round_trip_for_every_method() {
    let model = tiny(LlamaConfig::tiny(64));
    let dir = tempdir();
    for (i, peft) in methods().into_iter().enumerate() {
        let adapter = Adapter::new(peft.clone(), &model, &mut rng(6)).unwrap();
        let mut values = adapter.to_vec().unwrap();
        assert_eq!(values.len(), adapter.num_parameters());
        for (j, v) in values.iter_mut().enumerate() {
            *v += (j % 7) as f32 * 0.01;
        }
        adapter.set_from_slice(&values).unwrap();
        assert_eq!(adapter.to_vec().unwrap(), values);
        assert!(adapter.set_from_slice(&values[1..]).is_err());

        let path = dir.join(format!("adapter-{i}"));
        save_adapter(&adapter, &path, "tiny").unwrap();
        let loaded = load_adapter(&path, &model).unwrap();
        assert_eq!(loaded.config(), adapter.config());
        assert_eq!(loaded.to_vec().unwrap(), values, "{}", peft.method());
        let names: Vec<&String> = loaded.params().iter().map(|(n, _)| n).collect();
        let expected: Vec<&String> = adapter.params().iter().map(|(n, _)| n).collect();
        assert_eq!(names, expected);
        // The same logits from the loaded adapter.
        let ids = Tensor::new(&[[3u32, 17, 5, 9]], &Device::Cpu).unwrap();
        let a = model.forward(&ids, Some(&adapter), Mode::Eval).unwrap();
        let b = model.forward(&ids, Some(&loaded), Mode::Eval).unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn lora_files_use_peft_key_names_and_config() {
    let model = tiny(LlamaConfig::tiny(64));
    let adapter = Adapter::new(
        PeftConfig::Lora(LoraConfig {
            r: 2,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec!["v_proj".into(), "q_proj".into()],
            layers_to_transform: None,
        }),
        &model,
        &mut rng(7),
    )
    .unwrap();
    let dir = tempdir().join("peft");
    save_adapter(&adapter, &dir, "HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
        ]
    );
    // A: (r, in); B: (out, r). v_proj's out is the key/value width (GQA).
    assert_eq!(
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dims(),
        [2, 32]
    );
    assert_eq!(
        tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].dims(),
        [16, 2]
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 2);
    assert_eq!(config["lora_alpha"], 16.0);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert_eq!(
        config["base_model_name_or_path"],
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );

    // Variants PEFT can express but this implementation would misread are
    // refused with the reason.
    let mut dora = config.clone();
    dora["use_dora"] = serde_json::json!(true);
    std::fs::write(dir.join("adapter_config.json"), dora.to_string()).unwrap();
    let err = load_adapter(&dir, &model).unwrap_err().to_string();
    assert!(err.contains("use_dora"), "{err}");
    // A tensor of the wrong shape, or a missing one, is named.
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut wrong = tensors.clone();
    wrong.insert(
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight".into(),
        Tensor::zeros((3, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&wrong, dir.join("adapter_model.safetensors")).unwrap();
    let err = load_adapter(&dir, &model).unwrap_err().to_string();
    assert!(
        err.contains("layers.1.self_attn.q_proj.lora_A.weight has shape [3, 32]"),
        "{err}"
    );
    wrong.remove("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight");
    candle_core::safetensors::save(&wrong, dir.join("adapter_model.safetensors")).unwrap();
    let err = load_adapter(&dir, &model).unwrap_err().to_string();
    assert!(err.contains("is missing"), "{err}");
}

#[test]
fn cached_generation_matches_the_full_forward_pass() {
    let model = tiny(LlamaConfig::tiny(64));
    let prompt = [5u32, 9, 33, 2, 7];
    for peft in [None].into_iter().chain(methods().into_iter().map(Some)) {
        let adapter = peft.map(|p| {
            let a = Adapter::new(p, &model, &mut rng(8)).unwrap();
            // LoRA's B = 0 would make it the base model; perturb everything.
            let values: Vec<f32> = a.to_vec().unwrap().iter().map(|v| v + 0.05).collect();
            a.set_from_slice(&values).unwrap();
            a
        });
        let options = GenerateOptions {
            max_new_tokens: 6,
            sampling: Sampling::Greedy,
            stop: vec![],
        };
        let out = generate(&model, adapter.as_ref(), &prompt, &options, &mut rng(1)).unwrap();
        assert_eq!(out.len(), 6);
        // Re-derive each token with an uncached forward over the whole text.
        let mut text = prompt.to_vec();
        for &token in &out {
            let ids = Tensor::from_slice(&text, (1, text.len()), &Device::Cpu).unwrap();
            let logits = model.forward(&ids, adapter.as_ref(), Mode::Eval).unwrap();
            let last = logits
                .get(0)
                .unwrap()
                .get(logits.dim(1).unwrap() - 1)
                .unwrap();
            let expect = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            assert_eq!(token, expect);
            text.push(token);
        }
        // The cached logits match the uncached ones closely.
        let mut cache = KvCache::new();
        let head = Tensor::from_slice(&text[..5], (1, 5), &Device::Cpu).unwrap();
        model
            .forward_cached(&head, adapter.as_ref(), &mut cache)
            .unwrap();
        let next = Tensor::from_slice(&text[5..6], (1, 1), &Device::Cpu).unwrap();
        let cached = model
            .forward_cached(&next, adapter.as_ref(), &mut cache)
            .unwrap();
        let full = model
            .forward(
                &Tensor::from_slice(&text[..6], (1, 6), &Device::Cpu).unwrap(),
                adapter.as_ref(),
                Mode::Eval,
            )
            .unwrap();
        let full_last: Vec<f32> = full
            .get(0)
            .unwrap()
            .get(full.dim(1).unwrap() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let cached_last: Vec<f32> = cached.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        let diff = full_last
            .iter()
            .zip(&cached_last)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "cached and full logits differ by {diff}");
    }
}

#[test]
fn gradient_accumulation_equals_one_large_batch() {
    let model = tiny(LlamaConfig::tiny(64));
    let examples = memorisation_task(64);
    let peft = PeftConfig::Prompt(PromptConfig {
        num_virtual_tokens: 3,
    });
    let optim = OptimConfig {
        learning_rate: 1e-2,
        ..OptimConfig::default()
    };
    let run = |split: bool| -> Vec<f32> {
        let adapter = Adapter::new(peft.clone(), &model, &mut rng(11)).unwrap();
        let mut trainer = AdapterTrainer::new(&model, adapter, optim.clone()).unwrap();
        let refs: Vec<&Example> = examples.iter().collect();
        let batches = if split {
            vec![
                Batch::new(&refs[..2], 64, 0, &Device::Cpu).unwrap(),
                Batch::new(&refs[2..], 64, 0, &Device::Cpu).unwrap(),
            ]
        } else {
            vec![Batch::new(&refs, 64, 0, &Device::Cpu).unwrap()]
        };
        trainer.step(&batches, &mut rng(12)).unwrap();
        trainer.adapter().to_vec().unwrap()
    };
    let whole = run(false);
    let split = run(true);
    let diff = whole
        .iter()
        .zip(&split)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-6,
        "accumulated and whole-batch steps differ by {diff}"
    );
}

#[test]
fn clipping_bounds_the_step_and_the_schedule_warms_up_then_decays() {
    let optim = OptimConfig {
        learning_rate: 1.0,
        warmup_steps: 4,
        total_steps: 14,
        min_lr_ratio: 0.1,
        ..OptimConfig::default()
    };
    assert_eq!(optim.rate_at(0), 0.25);
    assert_eq!(optim.rate_at(3), 1.0);
    assert!((optim.rate_at(9) - 0.55).abs() < 1e-12);
    assert!((optim.rate_at(14) - 0.1).abs() < 1e-12);
    assert!((optim.rate_at(100) - 0.1).abs() < 1e-12);

    let model = tiny(LlamaConfig::tiny(64));
    let examples = memorisation_task(64);
    let refs: Vec<&Example> = examples.iter().collect();
    let adapter = Adapter::new(
        PeftConfig::Prompt(PromptConfig {
            num_virtual_tokens: 2,
        }),
        &model,
        &mut rng(13),
    )
    .unwrap();
    let before = adapter.to_vec().unwrap();
    // With eps = 1 Adam's first step is about lr · g / (|g| + 1) ≈ lr · g for
    // small gradients, so the step's norm shows the clipped gradient's.
    let step_norm = |max_grad_norm: Option<f64>| -> (f64, f64) {
        let optim = OptimConfig {
            learning_rate: 1.0,
            eps: 1.0,
            max_grad_norm,
            ..OptimConfig::default()
        };
        let mut trainer = AdapterTrainer::new(&model, adapter.clone(), optim).unwrap();
        trainer.adapter().set_from_slice(&before).unwrap();
        let stats = trainer
            .step(
                &[Batch::new(&refs, 64, 0, &Device::Cpu).unwrap()],
                &mut rng(14),
            )
            .unwrap();
        let after = trainer.adapter().to_vec().unwrap();
        let moved = before
            .iter()
            .zip(&after)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        (stats.grad_norm, moved)
    };
    let (grad_norm, unclipped) = step_norm(None);
    assert!(grad_norm > 0.01, "{grad_norm}");
    assert!(
        unclipped > 0.5 * grad_norm,
        "{unclipped} against {grad_norm}"
    );
    let (_, clipped) = step_norm(Some(0.01));
    assert!(clipped <= 0.01 * 1.001 && clipped > 0.005, "{clipped}");
    let bad = OptimConfig {
        grad_accum: 0,
        ..OptimConfig::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("grad_accum")
    );
}

#[test]
fn prompt_tokens_carry_no_loss() {
    let model = tiny(LlamaConfig::tiny(64));
    let a = Example {
        ids: vec![1, 2, 3, 4, 5, 6],
        prompt_len: 4,
    };
    let b = Example {
        ids: vec![9, 9, 9, 9, 5, 6],
        prompt_len: 4,
    };
    let batch_a = Batch::new(&[&a], 64, 0, &Device::Cpu).unwrap();
    assert_eq!(batch_a.tokens(), 2);
    // Only tokens 4 and 5 are scored; a prompt that differs changes the
    // context, but a prompt longer than the sequence leaves nothing.
    let none = Example {
        ids: vec![1, 2, 3],
        prompt_len: 5,
    };
    assert_eq!(
        Batch::new(&[&none], 64, 0, &Device::Cpu).unwrap().tokens(),
        0
    );
    let eval = evaluate(&model, None, &[a.clone(), b], 2, 64).unwrap();
    assert_eq!(eval.tokens, 4);
    let err = evaluate(&model, None, &[none], 2, 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no example"), "{err}");
}

fn tempdir() -> std::path::PathBuf {
    let mut bytes = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    let dir = std::env::temp_dir().join(format!("fedveil-model-{}", hex::encode(bytes)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The GPU path computes in bf16 with f32 adapter weights. The same code
/// runs on the CPU (through the differentiable primitives, as on a GPU,
/// since the fused kernels are f32-only): gradients reach the f32 adapter,
/// the loss falls, and the logits stay close to the f32 model's.
#[test]
fn a_bf16_model_trains_an_f32_adapter() {
    let model = tiny(LlamaConfig::tiny(64));
    let half = model.to_dtype(candle_core::DType::BF16).unwrap();
    assert_eq!(half.dtype(), candle_core::DType::BF16);
    let examples = memorisation_task(64);
    let refs: Vec<&Example> = examples.iter().collect();
    let ids = Tensor::new(&[[3u32, 17, 5, 9]], &Device::Cpu).unwrap();
    let full: Vec<f32> = model
        .forward(&ids, None, Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let low: Vec<f32> = half
        .forward(&ids, None, Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let diff = full
        .iter()
        .zip(&low)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 0.1, "bf16 logits differ from f32 by {diff}");
    for peft in methods() {
        let adapter = Adapter::new(peft.clone(), &half, &mut rng(4)).unwrap();
        assert!(
            adapter
                .params()
                .iter()
                .all(|(_, v)| v.dtype() == candle_core::DType::F32)
        );
        let (first, last, _) = common::train_steps(&half, &peft, &refs, 30);
        assert!(
            last.is_finite() && last < first,
            "{}: {first} → {last}",
            peft.method()
        );
    }
}
