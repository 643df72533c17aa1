//! `fedveil model check`: what a model is, and whether it works.

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde::Serialize;

use crate::generate::{GenerateOptions, Sampling, generate};
use crate::load::Loaded;
use crate::model::Mode;
use crate::train::{Example, evaluate};
use crate::{ModelError, Result};

/// The sentence whose perplexity is reported.
pub const SENTENCE: &str =
    "The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.";
/// The prompt that is completed greedily.
pub const PROMPT: &str = "The capital of France is";

/// What `fedveil model check` prints.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub source: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
    pub parameters: usize,
    /// Bytes the frozen weights occupy (quantised or not).
    pub weight_bytes: usize,
    /// The block formats of the quantised weights (`q4_k`, ...), empty
    /// for an unquantised model.
    pub quantized: Vec<String>,
    pub sentence: String,
    pub perplexity: f64,
    pub prompt: String,
    pub completion: String,
}

/// Measures the perplexity of [`SENTENCE`] and completes [`PROMPT`] with
/// `max_new_tokens` greedy tokens.
pub fn check(loaded: &Loaded, max_new_tokens: usize) -> Result<CheckReport> {
    let config = loaded.model.config();
    let encode = |text: &str| -> Result<Vec<u32>> {
        Ok(loaded
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Input(format!("cannot tokenise {text:?}: {e}")))?
            .get_ids()
            .to_vec())
    };
    let sentence = encode(SENTENCE)?;
    let eval = evaluate(
        &loaded.model,
        None,
        &[Example::text(sentence)],
        1,
        usize::MAX,
    )?;
    let prompt = encode(PROMPT)?;
    let options = GenerateOptions {
        max_new_tokens,
        sampling: Sampling::Greedy,
        stop: config.eos_token_id.into_iter().collect(),
    };
    // Greedy decoding draws nothing; the generator only needs a source.
    let mut rng = ChaCha20Rng::from_seed([0; 32]);
    let new = generate(&loaded.model, None, &prompt, &options, &mut rng)?;
    let completion = loaded
        .tokenizer
        .decode(&new, true)
        .map_err(|e| ModelError::Input(format!("cannot decode the completion: {e}")))?;
    Ok(CheckReport {
        source: loaded.source.clone(),
        layers: config.num_hidden_layers,
        hidden_size: config.hidden_size,
        intermediate_size: config.intermediate_size,
        attention_heads: config.num_attention_heads,
        kv_heads: config.kv_heads(),
        vocab_size: config.vocab_size,
        tied_embeddings: config.tie_word_embeddings,
        parameters: config.parameter_count(),
        weight_bytes: loaded.model.weight_bytes(),
        quantized: loaded.model.quantized_formats(),
        sentence: SENTENCE.to_string(),
        perplexity: eval.perplexity,
        prompt: PROMPT.to_string(),
        completion,
    })
}

/// The token ids of [`SENTENCE`] and the model's logits for them, `(t,
/// vocab)` in f32 on the CPU: to compare with another implementation
/// holding the same weights (`fedveil model check --logits`).
pub fn sentence_logits(loaded: &Loaded) -> Result<(Vec<u32>, candle_core::Tensor)> {
    let ids = loaded
        .tokenizer
        .encode(SENTENCE, false)
        .map_err(|e| ModelError::Input(format!("cannot tokenise {SENTENCE:?}: {e}")))?
        .get_ids()
        .to_vec();
    let input = candle_core::Tensor::new(ids.as_slice(), loaded.model.device())?.unsqueeze(0)?;
    let logits = loaded
        .model
        .forward(&input, None, Mode::Eval)?
        .squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    Ok((ids, logits))
}
