//! Text generation with a key/value cache: greedy, or temperature and
//! nucleus (top-p) sampling.

use candle_core::{D, Tensor};
use rand_core::RngCore;

use crate::model::{KvCache, Llama};
use crate::peft::Adapter;
use crate::{ModelError, Result, random};

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id among ties).
    Greedy,
    /// From the smallest set of most likely tokens whose probability
    /// reaches `top_p`, after dividing the logits by `temperature`.
    TopP { temperature: f64, top_p: f64 },
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation ends after any of these tokens (it is kept in the output).
    pub stop: Vec<u32>,
}

/// Continues `prompt` and returns the new tokens only.
pub fn generate(
    model: &Llama,
    adapter: Option<&Adapter>,
    prompt: &[u32],
    options: &GenerateOptions,
    rng: &mut dyn RngCore,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(ModelError::Input(
            "generation needs a non-empty prompt".into(),
        ));
    }
    if let Sampling::TopP { temperature, top_p } = options.sampling
        && !(temperature.is_finite() && temperature > 0.0 && top_p > 0.0 && top_p <= 1.0)
    {
        return Err(ModelError::Config(format!(
            "sampling needs temperature > 0 and top_p in (0, 1], got {temperature} and {top_p}"
        )));
    }
    let vocab = model.config().vocab_size;
    if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    crate::pool::on_pool_seeded(rng, |local| {
        continue_prompt(model, adapter, prompt, options, local)
    })
}

/// [`generate`]'s loop, on rayon's pool (crate::pool).
fn continue_prompt(
    model: &Llama,
    adapter: Option<&Adapter>,
    prompt: &[u32],
    options: &GenerateOptions,
    rng: &mut dyn RngCore,
) -> Result<Vec<u32>> {
    let mut cache = KvCache::new();
    let mut input = Tensor::from_slice(prompt, (1, prompt.len()), model.device())?;
    let mut out = Vec::with_capacity(options.max_new_tokens);
    while out.len() < options.max_new_tokens {
        let logits = model.forward_cached_last(&input, adapter, &mut cache)?;
        let last = logits.get(0)?.get(logits.dim(1)? - 1)?;
        let next = pick(&last, options.sampling, rng)?;
        out.push(next);
        if options.stop.contains(&next) {
            break;
        }
        input = Tensor::from_slice(&[next], (1, 1), model.device())?;
    }
    Ok(out)
}

fn pick(logits: &Tensor, sampling: Sampling, rng: &mut dyn RngCore) -> Result<u32> {
    match sampling {
        Sampling::Greedy => Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?),
        Sampling::TopP { temperature, top_p } => {
            let logits: Vec<f32> = logits.to_vec1()?;
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut probs: Vec<(usize, f64)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i, (f64::from(l - max) / temperature).exp()))
                .collect();
            let total: f64 = probs.iter().map(|p| p.1).sum();
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut kept = 0.0;
            let mut cut = probs.len();
            for (i, p) in probs.iter().enumerate() {
                kept += p.1 / total;
                if kept >= top_p {
                    cut = i + 1;
                    break;
                }
            }
            let probs = &probs[..cut];
            let mass: f64 = probs.iter().map(|p| p.1).sum();
            let mut u = random::unit(rng) * mass;
            for &(id, p) in probs {
                if u < p {
                    return Ok(id as u32);
                }
                u -= p;
            }
            Ok(probs[probs.len() - 1].0 as u32)
        }
    }
}
