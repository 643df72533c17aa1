//! Multiple-choice accuracy by log-likelihood, scored as
//! lm-evaluation-harness and oe-eval score ranked classification:
//!
//! - each choice is a continuation of the question's context; the context
//!   and the continuation are tokenised together and the continuation's
//!   tokens are those after the context's own tokens (lm-evaluation-harness's
//!   `_encode_pair`, which also moves the context's trailing white space to
//!   the continuation);
//! - a choice's score is the summed log-probability of its tokens given
//!   everything before them (the whole text cut on the left to its last
//!   `max_len + 1` tokens). [`accuracy`] runs a question's context once and
//!   all its choices after it in one batch over the context's cached keys
//!   and values ([`shared_loglikelihoods`]), which gives the same scores as
//!   one forward pass per choice ([`loglikelihoods`]) at a fraction of the
//!   cost;
//! - `accuracy` takes the choice with the highest score, `accuracy_norm`
//!   the highest score per character of the choice (the continuation
//!   without the one space that joins it to the context: lm-evaluation-
//!   harness's `acc_norm`); ties go to the first.
//!
//! The standard errors are the sample's, as lm-evaluation-harness reports
//! them: `√(p(1 − p)/(n − 1))`.

use candle_core::{DType, Tensor};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::peft::Adapter;
use crate::train::{Batch, Example, example_nll};
use crate::{KvCache, Llama, Mode, ModelError, Result};

/// A question: the context, every continuation scored after it (verbatim,
/// with the text that joins it to the context) and the right one's index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

/// One choice's tokens: the context's and the continuation's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// Tokenises `context` and `continuation` as lm-evaluation-harness does:
/// trailing white space of the context moves to the continuation, the
/// whole text is encoded (with the tokenizer's special tokens, such as a
/// beginning-of-sequence token where it adds one), and the continuation is
/// what follows as many tokens as the context alone encodes to. A context
/// of no tokens is replaced by `eos`, as there.
pub fn encode_pair(
    tokenizer: &Tokenizer,
    context: &str,
    continuation: &str,
    eos: Option<u32>,
) -> Result<Request> {
    let kept = context.trim_end();
    let moved = &context[kept.len()..];
    let continuation = format!("{moved}{continuation}");
    let encode = |text: &str| -> Result<Vec<u32>> {
        Ok(tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Input(format!("cannot tokenise {text:?}: {e}")))?
            .get_ids()
            .to_vec())
    };
    let whole = encode(&format!("{kept}{continuation}"))?;
    let mut context = encode(kept)?;
    let cont = whole.get(context.len()..).unwrap_or_default().to_vec();
    if cont.is_empty() {
        return Err(ModelError::Input(format!(
            "the continuation {continuation:?} adds no token to its context"
        )));
    }
    if context.is_empty() || kept.is_empty() {
        let eos = eos.ok_or_else(|| {
            ModelError::Input(
                "an empty context needs an end-of-sequence token to stand in for it".into(),
            )
        })?;
        context = vec![eos];
    }
    Ok(Request {
        context,
        continuation: cont,
    })
}

/// The log-likelihood of each request's continuation given its context
/// (nats), in `requests`' order, evaluated in batches of `batch_size` of
/// similar lengths. A request longer than `max_len + 1` tokens loses its
/// first tokens; a continuation that does not fit is refused. `max_len` is
/// lowered, where it must be, to what the model's positions hold.
pub fn loglikelihoods(
    model: &Llama,
    adapter: Option<&Adapter>,
    requests: &[Request],
    batch_size: usize,
    max_len: usize,
) -> Result<Vec<f64>> {
    crate::pool::on_pool(|| loglikelihoods_on_pool(model, adapter, requests, batch_size, max_len))
}

/// `max_len`, lowered so that a text of `max_len + 1` tokens (and the
/// adapter's virtual tokens) fits the model's positions (a sliding window
/// is computed, not a limit).
fn fitted_max_len(model: &Llama, adapter: Option<&Adapter>, max_len: usize) -> usize {
    let positions = model.config().max_position_embeddings;
    let virtual_tokens = adapter.map_or(0, Adapter::virtual_tokens);
    max_len.min(positions.saturating_sub(virtual_tokens + 1))
}

fn loglikelihoods_on_pool(
    model: &Llama,
    adapter: Option<&Adapter>,
    requests: &[Request],
    batch_size: usize,
    max_len: usize,
) -> Result<Vec<f64>> {
    let max_len = fitted_max_len(model, adapter, max_len);
    let examples = requests
        .iter()
        .map(|r| {
            if r.continuation.len() > max_len {
                return Err(ModelError::Input(format!(
                    "a continuation of {} tokens does not fit max_len = {max_len}",
                    r.continuation.len()
                )));
            }
            let mut ids = [r.context.as_slice(), &r.continuation].concat();
            let cut = ids.len().saturating_sub(max_len + 1);
            ids.drain(..cut);
            // Exactly the continuation's tokens are targets.
            Ok(Example {
                prompt_len: ids.len() - r.continuation.len(),
                ids,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].ids.len());
    let virtual_tokens = adapter.map_or(0, Adapter::virtual_tokens);
    let mut out = vec![0.0; examples.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        // Every id is kept: the longest is at most max_len + 1 tokens.
        let batch = Batch::new(&batch, max_len + 1, 0, model.device())?;
        let logits = model.forward(batch.ids(), adapter, Mode::Eval)?;
        for (&i, nll) in chunk
            .iter()
            .zip(example_nll(&logits, &batch, virtual_tokens)?)
        {
            out[i] = -nll;
        }
    }
    Ok(out)
}

/// The log-likelihood of each of `continuations` after one shared
/// `context`: one forward pass over the context (the output projection at
/// its last position only), then one over every continuation at once, each
/// attending to the context's cached keys and values. The same as
/// [`loglikelihoods`] of the pairs, at a fraction of the cost; a question
/// that must be cut on the left to fit `max_len` goes through that instead
/// (in batches of `batch_size`).
pub fn shared_loglikelihoods(
    model: &Llama,
    adapter: Option<&Adapter>,
    context: &[u32],
    continuations: &[Vec<u32>],
    batch_size: usize,
    max_len: usize,
) -> Result<Vec<f64>> {
    let max_len = fitted_max_len(model, adapter, max_len);
    let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
    if context.is_empty()
        || continuations.iter().any(Vec::is_empty)
        || context.len() + longest > max_len + 1
    {
        let requests: Vec<Request> = continuations
            .iter()
            .map(|c| Request {
                context: context.to_vec(),
                continuation: c.clone(),
            })
            .collect();
        return loglikelihoods(model, adapter, &requests, batch_size, max_len);
    }
    crate::pool::on_pool(|| {
        let device = model.device();
        let mut cache = KvCache::new();
        let ids = Tensor::new(context, device)?.unsqueeze(0)?;
        let last = model.forward_cached_last(&ids, adapter, &mut cache)?;
        let last: Vec<f32> = last.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let first = log_softmax_at(&last, continuations.iter().map(|c| c[0]))?;
        let mut out: Vec<f64> = first;
        if longest > 1 {
            // Every continuation but its last token, padded on the right
            // (padding comes after each real token, so it changes nothing
            // before it).
            let width = longest - 1;
            let k = continuations.len();
            let mut ids = vec![0u32; k * width];
            for (row, c) in continuations.iter().enumerate() {
                ids[row * width..row * width + c.len() - 1].copy_from_slice(&c[..c.len() - 1]);
            }
            let ids = Tensor::from_vec(ids, (k, width), device)?;
            let mut batch_cache = cache.repeat_batch(k)?;
            let logits = model.forward_cached(&ids, adapter, &mut batch_cache)?;
            let vocab = logits.dim(2)?;
            let logits: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            for (row, c) in continuations.iter().enumerate() {
                for (j, &target) in c.iter().enumerate().skip(1) {
                    let at = (row * width + j - 1) * vocab;
                    out[row] += log_softmax_at(&logits[at..at + vocab], [target])?[0];
                }
            }
        }
        Ok(out)
    })
}

/// `log softmax(logits)[t]` for each `t` of `targets`, in f64.
fn log_softmax_at(logits: &[f32], targets: impl IntoIterator<Item = u32>) -> Result<Vec<f64>> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&x| (f64::from(x) - max).exp())
            .sum::<f64>()
            .ln();
    targets
        .into_iter()
        .map(|t| {
            logits
                .get(t as usize)
                .map(|&x| f64::from(x) - lse)
                .ok_or_else(|| ModelError::Input(format!("token {t} is outside the vocabulary")))
        })
        .collect()
}

/// The score of one question.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scored {
    /// Each choice's log-likelihood (nats).
    pub loglikelihoods: Vec<f64>,
    /// Each choice's length in characters, for `accuracy_norm`.
    pub chars: Vec<usize>,
    pub gold: usize,
    /// The choice with the highest log-likelihood.
    pub predicted: usize,
    /// The choice with the highest log-likelihood per character.
    pub predicted_norm: usize,
}

/// Accuracy over a set of questions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Accuracy {
    pub questions: usize,
    pub accuracy: f64,
    pub accuracy_stderr: f64,
    pub accuracy_norm: f64,
    pub accuracy_norm_stderr: f64,
    /// Every question's scores, in order.
    pub scored: Vec<Scored>,
}

/// The first index of the largest value.
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// A choice's length for `accuracy_norm`: its characters without the one
/// space that joins it to the context (at least 1).
fn choice_chars(choice: &str) -> usize {
    choice
        .strip_prefix(' ')
        .unwrap_or(choice)
        .chars()
        .count()
        .max(1)
}

/// The sample mean of 0/1 outcomes and its standard error.
fn mean_stderr(hits: usize, n: usize) -> (f64, f64) {
    let p = hits as f64 / n as f64;
    let se = if n > 1 {
        (p * (1.0 - p) / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    (p, se)
}

/// Scores `questions` with `model` (and `adapter`), lm-evaluation-harness's
/// way (see the module's documentation).
pub fn accuracy(
    model: &Llama,
    adapter: Option<&Adapter>,
    tokenizer: &Tokenizer,
    questions: &[Question],
    batch_size: usize,
    max_len: usize,
) -> Result<Accuracy> {
    if questions.is_empty() {
        return Err(ModelError::Input("no question to score".into()));
    }
    let eos = model.config().eos_token_id;
    let mut scored = Vec::with_capacity(questions.len());
    for (i, q) in questions.iter().enumerate() {
        if q.choices.len() < 2 || q.gold >= q.choices.len() {
            return Err(ModelError::Input(format!(
                "question {i} has {} choices and gold {}: it needs two or more and a gold among them",
                q.choices.len(),
                q.gold
            )));
        }
        let requests = q
            .choices
            .iter()
            .map(|c| encode_pair(tokenizer, &q.context, c, eos))
            .collect::<Result<Vec<_>>>()?;
        // Every choice's context is the same tokens (the context is
        // encoded alone; the continuation is what follows as many tokens).
        let context = requests[0].context.clone();
        let continuations: Vec<Vec<u32>> = requests.into_iter().map(|r| r.continuation).collect();
        let loglikelihoods = shared_loglikelihoods(
            model,
            adapter,
            &context,
            &continuations,
            batch_size,
            max_len,
        )?;
        let chars: Vec<usize> = q.choices.iter().map(|c| choice_chars(c)).collect();
        let predicted = argmax(loglikelihoods.iter().copied());
        let predicted_norm = argmax(
            loglikelihoods
                .iter()
                .zip(&chars)
                .map(|(ll, &n)| ll / n as f64),
        );
        scored.push(Scored {
            loglikelihoods,
            chars,
            gold: q.gold,
            predicted,
            predicted_norm,
        });
    }
    let n = scored.len();
    let hits = scored.iter().filter(|s| s.predicted == s.gold).count();
    let hits_norm = scored.iter().filter(|s| s.predicted_norm == s.gold).count();
    let (accuracy, accuracy_stderr) = mean_stderr(hits, n);
    let (accuracy_norm, accuracy_norm_stderr) = mean_stderr(hits_norm, n);
    Ok(Accuracy {
        questions: n,
        accuracy,
        accuracy_stderr,
        accuracy_norm,
        accuracy_norm_stderr,
        scored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_ties_and_lengths_drop_the_joining_space() {
        assert_eq!(argmax([1.0, 3.0, 3.0, 2.0].into_iter()), 1);
        assert_eq!(argmax([f64::NEG_INFINITY, -1.0].into_iter()), 1);
        assert_eq!(choice_chars(" blue"), 4);
        assert_eq!(choice_chars("  two"), 4);
        assert_eq!(choice_chars(" é"), 1);
        assert_eq!(choice_chars(" "), 1);
        let (p, se) = mean_stderr(3, 4);
        assert_eq!(p, 0.75);
        assert!((se - (0.75f64 * 0.25 / 3.0).sqrt()).abs() < 1e-15);
    }
}
