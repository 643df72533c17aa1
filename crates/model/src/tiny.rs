//! A tiny llama with a real tokenizer, for tests and demonstrations that
//! must not download anything: byte-level BPE over the 256 byte symbols
//! (no merges) plus an end-of-text token, and a random decoder whose every
//! tensor differs from every other (norms too), so that content hashes
//! tell tensors apart.

use candle_core::{DType, Device, Tensor};
use rand_core::RngCore;
use tokenizers::Tokenizer;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::config::LlamaConfig;
use crate::load::Loaded;
use crate::model::{Layer, Llama, Weights};
use crate::{ModelError, Result};

/// The end-of-text token's id (after the 256 byte tokens).
pub const EOS: u32 = 256;

/// Byte-level BPE with one token per byte and `<|endoftext|>`.
pub fn byte_tokenizer() -> Result<Tokenizer> {
    let bytes = ByteLevel::alphabet();
    let mut symbols: Vec<char> = bytes.into_iter().collect();
    symbols.sort_unstable();
    let mut vocab: tokenizers::models::bpe::Vocab = symbols
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    vocab.insert("<|endoftext|>".into(), EOS);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| ModelError::Config(format!("the byte tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens([tokenizers::AddedToken::from("<|endoftext|>", true)])
        .map_err(|e| ModelError::Config(format!("the byte tokenizer: {e}")))?;
    Ok(tok)
}

/// A random tiny llama with `layers` layers over the byte tokenizer's
/// vocabulary, drawn from `rng`.
pub fn tiny_model(layers: usize, device: &Device, rng: &mut dyn RngCore) -> Result<Loaded> {
    let config = LlamaConfig {
        num_hidden_layers: layers,
        eos_token_id: Some(EOS),
        ..LlamaConfig::tiny(EOS as usize + 1)
    };
    let model = Llama::random(config.clone(), device, rng)?;
    // Norms at one would hash alike in every layer: jitter them.
    let mut jitter = |t: &Tensor| -> Result<Tensor> {
        let n = t.elem_count();
        let noise = crate::random::normal_vec(rng, n, 0.05);
        Ok((t.to_dtype(DType::F32)? + Tensor::from_vec(noise, n, device)?)?)
    };
    let w = model.weights();
    let mut out = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        out.push(Layer {
            input_norm: jitter(&l.input_norm)?,
            post_norm: jitter(&l.post_norm)?,
            ..l.clone()
        });
    }
    let weights = Weights {
        embed: w.embed.clone(),
        layers: out,
        norm: jitter(&w.norm)?,
        lm_head: w.lm_head.clone(),
    };
    Ok(Loaded {
        model: Llama::new(config, weights)?,
        tokenizer: byte_tokenizer()?,
        source: format!("tiny random llama ({layers} layers)"),
    })
}
