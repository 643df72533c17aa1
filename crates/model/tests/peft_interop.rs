//! A LoRA adapter written by fedveil loads in Hugging Face PEFT onto the
//! same base model and gives the same logits.
//!
//! Ignored by default: it needs SmolLM2 in the cache (fetched by
//! `fedveil model check`) and a Python with torch, transformers and peft:
//!
//!     FEDVEIL_PEFT_PYTHON=.venv-torch/bin/python \
//!         cargo test --release -p fedveil-model --test peft_interop -- --ignored

use candle_core::{Device, Tensor};
use fedveil_model::fetch::{SMOLLM2_135M, cache_dir, ensure};
use fedveil_model::interop::save_adapter;
use fedveil_model::model::Mode;
use fedveil_model::{Adapter, LoraConfig, PeftConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

#[test]
#[ignore = "needs the default model and Python with torch, transformers and peft"]
fn peft_loads_a_fedveil_lora_adapter_to_the_same_logits() {
    let python = std::env::var("FEDVEIL_PEFT_PYTHON").expect("set FEDVEIL_PEFT_PYTHON");
    let gguf = ensure(&SMOLLM2_135M, &cache_dir().unwrap(), &mut |m| {
        eprintln!("{m}")
    })
    .unwrap();
    let loaded = fedveil_model::load::load(&gguf, &Device::Cpu).unwrap();
    let model = &loaded.model;
    let adapter = Adapter::new(
        PeftConfig::Lora(LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec!["all-linear".into()],
            layers_to_transform: None,
        }),
        model,
        &mut ChaCha20Rng::from_seed([5; 32]),
    )
    .unwrap();
    // A trained-looking adapter: B away from zero.
    let values: Vec<f32> = adapter
        .to_vec()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if *v == 0.0 {
                ((i % 13) as f32 - 6.0) * 2e-3
            } else {
                *v
            }
        })
        .collect();
    adapter.set_from_slice(&values).unwrap();
    let ids: Vec<u32> = loaded
        .tokenizer
        .encode("The capital of France is Paris, and", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    let flat = |a: Option<&Adapter>| -> Vec<f32> {
        model
            .forward(&input, a, Mode::Eval)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let dir = std::env::temp_dir().join(format!("fedveil-peft-{}", std::process::id()));
    save_adapter(&adapter, &dir, "HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
    let ours = serde_json::json!({
        "gguf": gguf,
        "ids": ids,
        "base": flat(None),
        "adapted": flat(Some(&adapter)),
    });
    std::fs::write(dir.join("fedveil.json"), ours.to_string()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/interop/peft_load.py"
    );
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let diff = report["adapted_max_abs_diff"].as_f64().unwrap();
    let base = report["base_max_abs_diff"].as_f64().unwrap();
    let effect = report["adapter_effect"].as_f64().unwrap();
    assert_eq!(report["peft_type"], "LORA");
    // f32 on both sides; the tolerance is for summation order.
    assert!(base < 1e-2, "base logits differ by {base}");
    assert!(diff < 1e-2, "adapted logits differ by {diff}");
    // The adapter changed the logits far more than the two sides differ.
    assert!(
        effect > 100.0 * diff.max(1e-6),
        "adapter effect {effect}, difference {diff}"
    );

    // And an adapter PEFT made loads here to PEFT's logits.
    let made = dir.join("peft_made");
    let theirs = fedveil_model::interop::load_adapter(&made, model).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(made.join("peft.json")).unwrap()).unwrap();
    let expected: Vec<f64> = expected["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let got = flat(Some(&theirs));
    let base_logits = flat(None);
    let diff = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    let effect = got
        .iter()
        .zip(&base_logits)
        .map(|(a, b)| f64::from(a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("PEFT-made adapter: max |difference| {diff:.2e}, adapter effect {effect:.3}");
    assert!(
        diff < 1e-2,
        "PEFT's adapter gives logits {diff} away from PEFT's"
    );
    assert!(effect > 100.0 * diff.max(1e-6));
    std::fs::remove_dir_all(&dir).unwrap();
}
