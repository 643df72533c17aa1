//! A quantised frozen base (crate::quant): a model whose projections,
//! embedding and output matrix are held in GGML blocks computes the logits
//! and the adapter gradients of the same model with the dequantised
//! weights, for every PEFT method and block format, and holds a fraction
//! of the memory.

mod common;

use candle_core::{Device, Tensor};
use fedveil_model::model::{Layer, Linear, Mode};
use fedveil_model::{
    Adapter, AdapterTrainer, Batch, Example, KvCache, Llama, LlamaConfig, LoraConfig, OptimConfig,
    PeftConfig, QuantFormat, Quantize, Weight, Weights,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn rng(seed: u8) -> ChaCha20Rng {
    ChaCha20Rng::from_seed([seed; 32])
}

/// Rows of 256 (one K-quant super-block) and more.
fn config(bias: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        attention_bias: bias,
        tie_word_embeddings: bias,
        ..LlamaConfig::tiny(96)
    }
}

/// The model with every quantised weight replaced by its f32 values.
fn dequantised(m: &Llama) -> Llama {
    let dense = |w: &Weight| Weight::Dense(w.dense().unwrap());
    let w = m.weights();
    let layers = w
        .layers
        .iter()
        .map(|l| {
            let linear = |x: &Linear| Linear::new(dense(&x.weight), x.bias.clone());
            Layer {
                q: linear(&l.q),
                k: linear(&l.k),
                v: linear(&l.v),
                o: linear(&l.o),
                gate: linear(&l.gate),
                up: linear(&l.up),
                down: linear(&l.down),
                ..l.clone()
            }
        })
        .collect();
    let weights = Weights {
        embed: dense(&w.embed),
        layers,
        norm: w.norm.clone(),
        lm_head: w.lm_head.as_ref().map(dense),
    };
    Llama::new(m.config().clone(), weights).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (diff, scale)
}

fn batch() -> Batch {
    let examples: Vec<Example> = (0..3u32)
        .map(|e| Example {
            ids: (0..12).map(|i| (e * 31 + i * 7) % 96).collect(),
            prompt_len: 3,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    Batch::new(&refs, 64, 0, &Device::Cpu).unwrap()
}

#[test]
fn a_quantised_base_computes_the_logits_and_gradients_of_its_dequantised_weights() {
    let batch = batch();
    for (bias, format) in [
        (false, QuantFormat::Q4K),
        (true, QuantFormat::Q5K),
        (false, QuantFormat::Q6K),
        (true, QuantFormat::Q8_0),
    ] {
        let f32_model = Llama::random(config(bias), &Device::Cpu, &mut rng(1)).unwrap();
        let q = f32_model.quantize(format).unwrap();
        assert!(q.weights().layers[0].q.weight.quantized().is_some());
        assert!(q.weights().embed.quantized().is_some());
        let d = dequantised(&q);
        let name = format.name();
        // Logits over several rows: the banded f32 product.
        let ids = Tensor::new(
            &[[1u32, 7, 42, 90, 3, 25], [5, 6, 7, 8, 9, 10]],
            &Device::Cpu,
        )
        .unwrap();
        let (diff, scale) = max_diff(
            &q.forward(&ids, None, Mode::Eval).unwrap(),
            &d.forward(&ids, None, Mode::Eval).unwrap(),
        );
        assert!(
            diff <= 1e-5 * scale,
            "{name}: logits differ by {diff} of {scale}"
        );
        // Quantisation changed the model, within the format's error.
        let (drift, _) = max_diff(
            &q.forward(&ids, None, Mode::Eval).unwrap(),
            &f32_model.forward(&ids, None, Mode::Eval).unwrap(),
        );
        assert!(
            drift > 0.0 && drift < 0.5 * scale,
            "{name}: drift {drift} of {scale}"
        );
        // One token at a time (generation): candle's quantised vector
        // product, activations quantised to 8 bits, close to the exact one.
        let mut cache = KvCache::new();
        let one = Tensor::new(&[[42u32]], &Device::Cpu).unwrap();
        let (diff, scale) = max_diff(
            &q.forward_cached_last(&one, None, &mut cache).unwrap(),
            &d.forward(&one.repeat((5, 1)).unwrap(), None, Mode::Eval)
                .unwrap()
                .narrow(0, 0, 1)
                .unwrap(),
        );
        assert!(
            diff <= 0.05 * scale,
            "{name}: one-row logits differ by {diff} of {scale}"
        );
        // Every PEFT method's gradients, the whole-layer adapter's
        // (trainable f32 copies of quantised layers) included.
        for peft in common::methods(0.0) {
            let grads = |m: &Llama| {
                let adapter = Adapter::new(peft.clone(), m, &mut rng(2)).unwrap();
                common::set_lora_b(&adapter);
                let trainer = AdapterTrainer::new(m, adapter, OptimConfig::default()).unwrap();
                trainer.parameter_gradients(&batch, &mut rng(3)).unwrap()
            };
            let (gq, gd) = (grads(&q), grads(&d));
            assert_eq!(gq.len(), gd.len());
            for ((n, a), (_, b)) in gq.iter().zip(&gd) {
                let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                let (diff, scale) = max_diff(a, b);
                assert!(
                    scale > 0.0 && diff <= 1e-4 * scale,
                    "{name} {}: {n} gradients differ by {diff} of {scale}",
                    peft.method()
                );
            }
        }
    }
}

#[test]
fn a_training_pass_over_a_few_rows_takes_the_exact_product() {
    // One example of four tokens: four rows per product, where inference
    // would take the quantised vector product. Training takes the exact
    // one, so the gradients are the dequantised model's.
    let f32_model = Llama::random(config(false), &Device::Cpu, &mut rng(1)).unwrap();
    let q = f32_model.quantize(QuantFormat::Q4K).unwrap();
    let d = dequantised(&q);
    let example = Example {
        ids: vec![3, 14, 15, 92],
        prompt_len: 1,
    };
    let batch = Batch::new(&[&example], 64, 0, &Device::Cpu).unwrap();
    let grads = |m: &Llama| {
        let adapter = Adapter::new(common::methods(0.0)[0].clone(), m, &mut rng(2)).unwrap();
        common::set_lora_b(&adapter);
        let trainer = AdapterTrainer::new(m, adapter, OptimConfig::default()).unwrap();
        trainer.parameter_gradients(&batch, &mut rng(3)).unwrap()
    };
    for ((n, a), (_, b)) in grads(&q).iter().zip(&grads(&d)) {
        let (diff, scale) = max_diff(a.as_ref().unwrap(), b.as_ref().unwrap());
        assert!(
            scale > 0.0 && diff <= 1e-4 * scale,
            "{n}: {diff} of {scale}"
        );
    }
}

#[test]
fn training_on_a_quantised_base_follows_the_dequantised_model_step_for_step() {
    let f32_model = Llama::random(config(false), &Device::Cpu, &mut rng(1)).unwrap();
    let q = f32_model.quantize(QuantFormat::Q4K).unwrap();
    let d = dequantised(&q);
    let lora = PeftConfig::Lora(LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        layers_to_transform: None,
    });
    let batch = batch();
    let losses = |m: &Llama| -> Vec<f64> {
        let adapter = Adapter::new(lora.clone(), m, &mut rng(2)).unwrap();
        let optim = OptimConfig {
            learning_rate: 1e-2,
            ..OptimConfig::default()
        };
        let mut trainer = AdapterTrainer::new(m, adapter, optim).unwrap();
        (0..5)
            .map(|_| {
                trainer
                    .step(std::slice::from_ref(&batch), &mut rng(4))
                    .unwrap()
                    .loss
            })
            .collect()
    };
    let (lq, ld) = (losses(&q), losses(&d));
    assert!(lq[4] < lq[0], "no learning: {lq:?}");
    for (a, b) in lq.iter().zip(&ld) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "{lq:?} against {ld:?}");
    }
}

#[test]
fn a_quantised_base_holds_a_fraction_of_the_f32_weights() {
    let m = Llama::random(config(false), &Device::Cpu, &mut rng(1)).unwrap();
    let full = m.weight_bytes();
    for (format, bits) in [
        (QuantFormat::Q4K, 4.5),
        (QuantFormat::Q5K, 5.5),
        (QuantFormat::Q6K, 6.5625),
        (QuantFormat::Q8_0, 8.5),
    ] {
        let q = m.quantize(format).unwrap();
        // Everything but the norms (f32, 256 values each) is quantised.
        let norms = (2 * 2 + 1) * 256 * 4;
        let expected = ((full - norms) as f64 / 4.0 * bits / 8.0) as usize + norms;
        assert_eq!(q.weight_bytes(), expected, "{}", format.name());
    }
}

#[test]
fn unimplemented_quantisations_are_refused_by_name() {
    for bad in ["q4_k_m", "q3_k", "int4", "nf4", ""] {
        let err = Quantize::parse(bad).unwrap_err().to_string();
        assert!(err.contains(&format!("{bad:?}")), "{err}");
    }
    assert_eq!(
        Quantize::parse("q8_0").unwrap(),
        Quantize::To(QuantFormat::Q8_0)
    );
    assert_eq!(Quantize::parse("gguf").unwrap(), Quantize::Gguf);
    // A row that is not whole blocks cannot be quantised: the error says so.
    let narrow = Llama::random(LlamaConfig::tiny(64), &Device::Cpu, &mut rng(1)).unwrap();
    let err = narrow.quantize(QuantFormat::Q4K).unwrap_err().to_string();
    assert!(
        err.contains("q4_k") && err.contains("blocks of 256"),
        "{err}"
    );
    // A quantised base computes in f32 only.
    let q = narrow.quantize(QuantFormat::Q8_0).unwrap();
    let err = q
        .to_dtype(candle_core::DType::BF16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("computes in f32"), "{err}");
}
