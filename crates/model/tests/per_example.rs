//! Per-example gradients for record-level DP-SGD (protocols/dp.md §8): the
//! batched pass gives, for every PEFT method, the gradients that running
//! each example alone gives, on a tiny random llama built here.

use candle_core::Device;
use fedveil_model::{
    Adapter, AdapterTrainer, Example, FullConfig, Llama, LlamaConfig, LoraConfig, OptimConfig,
    PTuningConfig, PeftConfig, PrefixConfig, PromptConfig,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

fn rng(seed: u8) -> ChaCha20Rng {
    ChaCha20Rng::from_seed([seed; 32])
}

fn lora(targets: &[&str], layers: Option<Vec<usize>>) -> PeftConfig {
    PeftConfig::Lora(LoraConfig {
        r: 4,
        alpha: 8.0,
        // Dropout draws differ between a batch and its examples alone.
        dropout: 0.0,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        layers_to_transform: layers,
    })
}

/// Examples of different lengths (so the batch is padded), with prompts
/// of different lengths, and one whose every token is prompt.
fn examples(vocab: u32) -> Vec<Example> {
    let mut r = rng(5);
    let mut out: Vec<Example> = [(9, 2), (14, 5), (6, 1), (12, 0), (11, 4)]
        .iter()
        .map(|&(len, prompt_len)| Example {
            ids: (0..len).map(|_| r.next_u32() % vocab).collect(),
            prompt_len,
        })
        .collect();
    out.push(Example {
        ids: (0..7).map(|_| r.next_u32() % vocab).collect(),
        prompt_len: 7,
    });
    out
}

/// A trainer whose every adapter value is random (LoRA's B starts at zero,
/// which would hide A's gradient).
fn trainer(model: &Llama, peft: PeftConfig) -> AdapterTrainer {
    let adapter = Adapter::new(peft, model, &mut rng(2)).unwrap();
    let mut r = rng(3);
    let values: Vec<f32> = (0..adapter.num_parameters())
        .map(|_| (r.next_u32() as f32 / u32::MAX as f32 - 0.5) * 0.2)
        .collect();
    adapter.set_from_slice(&values).unwrap();
    AdapterTrainer::new(model, adapter, OptimConfig::default()).unwrap()
}

fn assert_rows_match(method: &str, model: &Llama, peft: PeftConfig) {
    let trainer = trainer(model, peft);
    let examples = examples(model.config().vocab_size as u32);
    let refs: Vec<&Example> = examples.iter().collect();
    let batched = trainer
        .per_example_gradients(&refs, 64, 0, &mut rng(4))
        .unwrap();
    let alone = trainer
        .per_example_gradients_one_by_one(&refs, 64, 0, &mut rng(4))
        .unwrap();
    assert_eq!(batched.len(), examples.len(), "{method}");
    assert_eq!(alone.len(), examples.len(), "{method}");
    assert_eq!(batched.dim(), trainer.adapter().num_parameters());
    for (i, example) in examples.iter().enumerate() {
        let (a, b) = (batched.row(i), alone.row(i));
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        if example.targets(64) == 0 {
            assert_eq!(scale, 0.0, "{method}: example {i} has no targets");
            assert!(a.iter().all(|&v| v == 0.0), "{method}: example {i}");
            continue;
        }
        assert!(scale > 0.0, "{method}: example {i} has a zero gradient");
        assert!(
            worst <= 1e-4 * scale,
            "{method}: example {i} differs by {worst} (largest value {scale})"
        );
    }
    assert!(
        (batched.loss - alone.loss).abs() <= 1e-4 * alone.loss,
        "{method}: loss {} against {}",
        batched.loss,
        alone.loss
    );
}

#[test]
fn batched_per_example_gradients_equal_each_example_alone_for_every_method() {
    let model = Llama::random(LlamaConfig::tiny(64), &Device::Cpu, &mut rng(1)).unwrap();
    let cases = [
        ("lora on every projection", lora(&["all-linear"], None)),
        (
            "lora on q and v of layer 1",
            lora(&["q_proj", "v_proj"], Some(vec![1])),
        ),
        (
            "prefix",
            PeftConfig::Prefix(PrefixConfig {
                num_virtual_tokens: 3,
                projection: None,
            }),
        ),
        (
            "prefix with its projection",
            PeftConfig::Prefix(PrefixConfig {
                num_virtual_tokens: 3,
                projection: Some(16),
            }),
        ),
        (
            "prompt",
            PeftConfig::Prompt(PromptConfig {
                num_virtual_tokens: 3,
            }),
        ),
        (
            "p-tuning",
            PeftConfig::PTuning(PTuningConfig {
                num_virtual_tokens: 3,
                encoder_hidden_size: 16,
            }),
        ),
        (
            "full layers (one example at a time)",
            PeftConfig::Full(FullConfig {
                layers: vec![1],
                norm: true,
                embeddings: false,
            }),
        ),
    ];
    for (method, peft) in cases {
        assert_rows_match(method, &model, peft);
    }
}

#[test]
fn a_step_with_an_outside_gradient_moves_the_adapter_against_it() {
    let model = Llama::random(LlamaConfig::tiny(64), &Device::Cpu, &mut rng(1)).unwrap();
    let mut trainer = trainer(&model, lora(&["q_proj"], None));
    let before = trainer.adapter().to_vec().unwrap();
    let gradient: Vec<f32> = (0..before.len())
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let (norm, lr) = trainer.apply_gradient(&gradient).unwrap();
    assert!((norm - (before.len() as f64).sqrt()).abs() < 1e-3);
    let after = trainer.adapter().to_vec().unwrap();
    for ((b, a), g) in before.iter().zip(&after).zip(&gradient) {
        // Adam's first step moves every coordinate by the rate, against the
        // gradient's sign.
        assert!(
            ((b - a) * g.signum() - lr as f32).abs() < 1e-5,
            "{b} -> {a}"
        );
    }
    assert!(trainer.apply_gradient(&gradient[1..]).is_err());
}
