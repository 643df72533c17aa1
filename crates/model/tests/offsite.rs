//! Offsite-tuning on a tiny random llama built here (no downloads): the
//! emulator keeps FS-LLM's layers and shares their weights, the adapter
//! trained on the emulator plugs into the full model, a client's bundle
//! holds no tensor of a dropped layer and reads back to the same model, and
//! distillation lowers the emulator's gap to the full model.

use std::collections::BTreeSet;

use candle_core::{Device, Tensor};
use fedveil_model::interop::{load_adapter, save_adapter};
use fedveil_model::model::Mode;
use fedveil_model::offsite::{
    self, Bundle, DistillConfig, DistillData, Layout, OffsiteConfig, Tuning, bundle_digests,
    weight_digests,
};
use fedveil_model::tiny::tiny_model;
use fedveil_model::train::evaluate;
use fedveil_model::{
    Activation, Adapter, AdapterTrainer, Batch, Example, LayerType, Llama, LlamaConfig, LoraConfig,
    OptimConfig,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

fn rng(seed: u8) -> ChaCha20Rng {
    ChaCha20Rng::from_seed([seed; 32])
}

/// Eight layers: l = 1, r = 1, and half of the six middle layers dropped.
fn setup() -> (fedveil_model::load::Loaded, Layout) {
    let loaded = tiny_model(8, &Device::Cpu, &mut rng(1)).unwrap();
    let layout = Layout::new(
        8,
        &OffsiteConfig {
            adapter_bottom: 1,
            adapter_top: 1,
            drop_ratio: 0.5,
        },
    )
    .unwrap();
    (loaded, layout)
}

fn text(n: usize, len: usize, seed: u8) -> Vec<Example> {
    let mut r = rng(seed);
    (0..n)
        .map(|_| Example::text((0..len).map(|_| r.next_u32() % 256).collect()))
        .collect()
}

fn logits(model: &Llama, adapter: Option<&Adapter>) -> Vec<f32> {
    let ids = Tensor::new(&[[72u32, 101, 108, 108, 111, 32, 119]], &Device::Cpu).unwrap();
    model
        .forward(&ids, adapter, Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_emulator_keeps_fs_llm_layers_and_shares_their_weights() {
    let (loaded, layout) = setup();
    // Middle layers 1..7 (six); keep round(6 · 0.5) = 3 at ⌊i · 5/2⌋.
    assert_eq!(layout.bottom, vec![0]);
    assert_eq!(layout.kept, vec![1, 3, 6]);
    assert_eq!(layout.top, vec![7]);
    assert_eq!(layout.dropped(), vec![2, 4, 5]);
    let emulator = offsite::emulator(&loaded.model, &layout).unwrap();
    assert_eq!(emulator.layer_ids(), &[0, 1, 3, 6, 7]);
    assert_eq!(emulator.config().num_hidden_layers, 5);
    let full: BTreeSet<_> = weight_digests(&loaded.model).unwrap().into_iter().collect();
    for entry in weight_digests(&emulator).unwrap() {
        assert!(
            full.contains(&entry),
            "{} differs from the full model's",
            entry.0
        );
    }
    // An emulator is cut from a whole model only.
    assert!(offsite::emulator(&emulator, &layout).is_err());
}

#[test]
fn full_tuning_starts_at_the_base_model_and_the_adapter_plugs_into_the_full_model() {
    let (loaded, layout) = setup();
    let full = &loaded.model;
    let emulator = offsite::emulator(full, &layout).unwrap();
    let peft = offsite::adapter_config(&layout, &Tuning::Full, false, false).unwrap();
    let on_full = Adapter::new(peft.clone(), full, &mut rng(2)).unwrap();
    let on_emulator = Adapter::new(peft.clone(), &emulator, &mut rng(3)).unwrap();
    // Same tensors, same order, same values: one vector fits both.
    let names = |a: &Adapter| {
        a.params()
            .iter()
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&on_full), names(&on_emulator));
    assert!(names(&on_full)[0].starts_with("model.layers.0."));
    assert!(
        names(&on_full)
            .last()
            .unwrap()
            .starts_with("model.layers.7.")
    );
    assert_eq!(on_full.to_vec().unwrap(), on_emulator.to_vec().unwrap());
    // Trainable copies of the base weights compute the base model.
    let d = max_diff(&logits(full, None), &logits(full, Some(&on_full)));
    assert!(d < 1e-4, "full tuning at its start moves the logits by {d}");

    // Train on the emulator; the vector then changes the full model.
    let examples = text(4, 24, 4);
    let refs: Vec<&Example> = examples.iter().collect();
    let optim = OptimConfig {
        learning_rate: 3e-3,
        ..OptimConfig::default()
    };
    let mut trainer = AdapterTrainer::new(&emulator, on_emulator, optim).unwrap();
    let before = evaluate(&emulator, Some(trainer.adapter()), &examples, 4, 64).unwrap();
    for _ in 0..30 {
        let batch = Batch::new(&refs, 64, 0, &Device::Cpu).unwrap();
        trainer.step(&[batch], &mut rng(5)).unwrap();
    }
    let after = evaluate(&emulator, Some(trainer.adapter()), &examples, 4, 64).unwrap();
    assert!(
        after.loss < 0.8 * before.loss,
        "{} → {}",
        before.loss,
        after.loss
    );
    let trained = trainer.adapter().to_vec().unwrap();
    on_full.set_from_slice(&trained).unwrap();
    let plugged = logits(full, Some(&on_full));
    assert!(max_diff(&logits(full, None), &plugged) > 1e-3);
    // Baking the adapter into the full model gives the plugged-in model.
    let baked = offsite::bake(full, &on_full).unwrap();
    let d = max_diff(&logits(&baked, None), &plugged);
    assert!(d < 1e-4, "baked and plugged-in differ by {d}");
}

#[test]
fn lora_on_the_adapter_layers_only_round_trips_through_peft_files() {
    let (loaded, layout) = setup();
    let emulator = offsite::emulator(&loaded.model, &layout).unwrap();
    let lora = LoraConfig {
        r: 2,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..LoraConfig::default()
    };
    let peft = offsite::adapter_config(&layout, &Tuning::Lora(lora), false, false).unwrap();
    assert!(
        offsite::adapter_config(&layout, &Tuning::Lora(LoraConfig::default()), true, false)
            .is_err()
    );
    let adapter = Adapter::new(peft, &emulator, &mut rng(6)).unwrap();
    let layers: BTreeSet<&str> = adapter
        .params()
        .iter()
        .map(|(n, _)| n.split('.').nth(4).unwrap())
        .collect();
    assert_eq!(layers, BTreeSet::from(["0", "7"]));
    assert_eq!(adapter.params().len(), 2 * 2 * 2);
    let values: Vec<f32> = (0..adapter.num_parameters())
        .map(|i| (i % 11) as f32 * 0.01)
        .collect();
    adapter.set_from_slice(&values).unwrap();
    let dir = std::env::temp_dir().join(format!("fedveil-offsite-lora-{}", rng(7).next_u64()));
    save_adapter(&adapter, &dir, "tiny").unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["layers_to_transform"], serde_json::json!([0, 7]));
    // PEFT's file loads onto the full model (the plug-in) and the emulator.
    let on_full = load_adapter(&dir, &loaded.model).unwrap();
    assert_eq!(on_full.to_vec().unwrap(), values);
    let on_emulator = load_adapter(&dir, &emulator).unwrap();
    assert_eq!(on_emulator.to_vec().unwrap(), values);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_bundle_holds_no_dropped_layer_and_reads_back_to_the_same_model() {
    let (loaded, layout) = setup();
    let emulator = offsite::emulator(&loaded.model, &layout).unwrap();
    let peft = offsite::adapter_config(&layout, &Tuning::Full, false, false).unwrap();
    let bundle = Bundle {
        model: emulator.clone(),
        tokenizer: Some(loaded.tokenizer.clone()),
        layout: layout.clone(),
        adapter: peft.clone(),
        source: "tiny".into(),
    };
    let bytes = bundle.to_bytes().unwrap();
    let received: BTreeSet<[u8; 32]> = bundle_digests(&bytes)
        .unwrap()
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    let full = weight_digests(&loaded.model).unwrap();
    let dropped: Vec<String> = layout
        .dropped()
        .iter()
        .map(|i| format!("model.layers.{i}."))
        .collect();
    let mut checked = 0;
    for (name, digest) in &full {
        if dropped.iter().any(|p| name.starts_with(p)) {
            checked += 1;
            assert!(!received.contains(digest), "the bundle holds {name}");
        }
    }
    assert_eq!(checked, 3 * 9, "every tensor of the three dropped layers");
    // Everything received is a tensor of the full model (nothing derived).
    let all: BTreeSet<[u8; 32]> = full.iter().map(|(_, d)| *d).collect();
    assert!(received.is_subset(&all));

    let back = Bundle::from_bytes(&bytes, &Device::Cpu).unwrap();
    assert_eq!(back.layout, layout);
    assert_eq!(back.adapter, peft);
    assert_eq!(back.model.layer_ids(), emulator.layer_ids());
    assert_eq!(
        max_diff(&logits(&back.model, None), &logits(&emulator, None)),
        0.0
    );
    let tok = back.tokenizer.unwrap();
    assert_eq!(
        tok.encode("hello", false).unwrap().get_ids(),
        loaded.tokenizer.encode("hello", false).unwrap().get_ids()
    );
    // Damaged bundles are refused, never a panic.
    for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        assert!(Bundle::from_bytes(&bytes[..cut], &Device::Cpu).is_err());
    }
    let mut flipped = bytes.clone();
    flipped[10] ^= 0xff;
    assert!(Bundle::from_bytes(&flipped, &Device::Cpu).is_err());
}

#[test]
fn distillation_lowers_the_emulators_gap_to_the_full_model() {
    let (loaded, layout) = setup();
    let emulator = offsite::emulator(&loaded.model, &layout).unwrap();
    let train = text(32, 32, 8);
    let held_out = text(8, 32, 9);
    let config = DistillConfig {
        steps: 80,
        learning_rate: 3e-3,
        batch_size: 8,
        max_len: 32,
        ..DistillConfig::default()
    };
    let (distilled, report) = offsite::distill(
        &loaded.model,
        &emulator,
        &layout,
        DistillData {
            train: &train,
            held_out: &held_out,
        },
        &config,
        &mut rng(10),
        &mut |_, _| {},
    )
    .unwrap();
    eprintln!(
        "gap {:.4} → {:.4}; loss {:.4} → {:.4}",
        report.gap_before,
        report.gap_after,
        report.losses[0],
        report.losses.last().unwrap()
    );
    assert_eq!(report.steps, 80);
    assert!(
        report.gap_after < 0.7 * report.gap_before,
        "the gap went {} → {}",
        report.gap_before,
        report.gap_after
    );
    let again = offsite::hidden_gap(&loaded.model, &distilled, &layout, &held_out, 8, 32).unwrap();
    assert!((again - report.gap_after).abs() < 1e-6);
    // Only the kept middle layers changed; the adapter layers did not.
    let before: BTreeSet<_> = weight_digests(&emulator).unwrap().into_iter().collect();
    for (name, digest) in weight_digests(&distilled).unwrap() {
        let layer = name.split('.').nth(2).and_then(|l| l.parse::<usize>().ok());
        let kept = layer.is_some_and(|l| layout.kept.contains(&l));
        let norm = name.contains("layernorm");
        if kept && !norm {
            assert!(
                !before.contains(&(name.clone(), digest)),
                "{name} did not change"
            );
        }
        if !kept {
            assert!(before.contains(&(name.clone(), digest)), "{name} changed");
        }
    }
}

#[test]
fn a_cached_distillation_runs_once_per_teacher_layout_settings_and_data() {
    let (loaded, layout) = setup();
    let emulator = offsite::emulator(&loaded.model, &layout).unwrap();
    let train = text(8, 32, 8);
    let held_out = text(4, 32, 9);
    let config = DistillConfig {
        steps: 3,
        batch_size: 4,
        max_len: 32,
        ..DistillConfig::default()
    };
    let cache = std::env::temp_dir().join(format!("fedveil-distill-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let run = |train: &[_], steps: &mut usize| {
        offsite::distill_cached(
            &cache,
            &loaded.model,
            &emulator,
            &layout,
            DistillData {
                train,
                held_out: &held_out,
            },
            &config,
            "tiny",
            &mut rng(11),
            &mut |_, _| *steps += 1,
        )
        .unwrap()
    };
    let mut steps = 0;
    let (first, report) = run(&train, &mut steps);
    assert_eq!((steps, report.map(|r| r.steps)), (3, Some(3)));
    let digests = weight_digests(&first).unwrap();
    // The same inputs: read back, not distilled again, the same weights.
    let (second, report) = run(&train, &mut steps);
    assert_eq!((steps, report.is_none()), (3, true));
    assert_eq!(weight_digests(&second).unwrap(), digests);
    // Other data: distilled afresh, into a second entry.
    let (_, report) = run(&train[..6], &mut steps);
    assert_eq!((steps, report.is_some()), (6, true));
    let mut entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    // A damaged entry is distilled again and replaced, never trusted.
    entries.sort();
    for e in &entries {
        std::fs::write(e, b"not a bundle").unwrap();
    }
    let (_, report) = run(&train, &mut steps);
    assert_eq!((steps, report.is_some()), (9, true));
    let (_, report) = run(&train, &mut steps);
    assert!(report.is_none(), "the replaced entry reads back");
    let _ = std::fs::remove_dir_all(&cache);
}

/// A Gemma-3 emulator keeps each kept layer's own attention (sliding with
/// the local rotary base, or full): it computes what the full model's
/// kept layers compute in a row, and its bundle reads back to it.
#[test]
fn a_gemma3_emulator_keeps_each_layers_attention_and_round_trips() {
    use LayerType::{Full, Sliding};
    let types = vec![
        Sliding, Sliding, Full, Sliding, Sliding, Full, Sliding, Full,
    ];
    let config = LlamaConfig {
        num_hidden_layers: 8,
        hidden_act: Activation::GeluTanh,
        norm_unit_offset: true,
        sandwich_norms: true,
        embed_scale: true,
        qk_norm: true,
        head_dim: Some(16),
        query_pre_attn_scalar: Some(16.0),
        rope_theta: 1e6,
        rope_local_base_freq: Some(1e4),
        sliding_window: Some(4),
        layer_types: Some(types.clone()),
        ..LlamaConfig::tiny(fedveil_model::tiny::EOS as usize + 1)
    };
    let full = Llama::random(config, &Device::Cpu, &mut rng(6)).unwrap();
    let (_, layout) = setup();
    let emulator = offsite::emulator(&full, &layout).unwrap();
    let kept: Vec<LayerType> = emulator.layer_ids().iter().map(|&i| types[i]).collect();
    assert_eq!(emulator.config().layer_types.as_ref(), Some(&kept));
    // The full model's kept layers, one after another.
    let ids = Tensor::new(&[[72u32, 101, 108, 108, 111, 32, 119]], &Device::Cpu).unwrap();
    let mut x = full.embed(&ids, None).unwrap();
    for &id in emulator.layer_ids() {
        x = full.run_layers(&x, id..id + 1, None, Mode::Eval).unwrap();
    }
    let by_hand: Vec<f32> = full
        .head(&x, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(max_diff(&logits(&emulator, None), &by_hand) < 1e-5);
    let bundle = Bundle {
        model: emulator.clone(),
        tokenizer: None,
        layout: layout.clone(),
        adapter: offsite::adapter_config(&layout, &Tuning::Full, false, false).unwrap(),
        source: "tiny gemma3".into(),
    };
    let back = Bundle::from_bytes(&bundle.to_bytes().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(back.model.config(), emulator.config());
    assert_eq!(
        max_diff(&logits(&back.model, None), &logits(&emulator, None)),
        0.0
    );
}
