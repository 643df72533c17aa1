//! The multiple-choice scorer: each choice's log-likelihood equals a direct
//! log-softmax over one unpadded forward pass (with every PEFT method,
//! batched among requests of other lengths, and cut on the left), the
//! context and continuation are split as lm-evaluation-harness splits
//! them, and accuracy follows the scores.

mod common;

use candle_core::{Device, Tensor};
use fedveil_model::choice::{
    Question, Request, accuracy, encode_pair, loglikelihoods, shared_loglikelihoods,
};
use fedveil_model::tiny::{EOS, tiny_model};
use fedveil_model::{Adapter, Llama, Mode};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// log p(continuation | context) from one forward pass over exactly the
/// request's tokens (the last `max_len + 1`), in f64.
fn direct(model: &Llama, adapter: Option<&Adapter>, r: &Request, max_len: usize) -> f64 {
    let mut ids = [r.context.as_slice(), &r.continuation].concat();
    let cut = ids.len().saturating_sub(max_len + 1);
    ids.drain(..cut);
    let input = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, adapter, Mode::Eval).unwrap();
    let virtual_tokens = adapter.map_or(0, Adapter::virtual_tokens);
    let logits = logits.narrow(1, virtual_tokens, ids.len() - 1).unwrap();
    let rows: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
    let first = ids.len() - r.continuation.len();
    (first..ids.len())
        .map(|t| {
            let row = &rows[t - 1];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row[ids[t] as usize] as f64 - lse
        })
        .sum()
}

fn requests() -> Vec<Request> {
    let r = |ctx: &[u32], cont: &[u32]| Request {
        context: ctx.to_vec(),
        continuation: cont.to_vec(),
    };
    vec![
        r(&[5, 6, 7, 8, 9, 10, 11], &[12, 13]),
        r(&[40], &[41]),
        r(&[70, 71, 72], &[73, 74, 75, 76]),
        r(
            &[100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111],
            &[1],
        ),
        r(&[200, 201], &[202, 203, 204, 205, 206]),
    ]
}

#[test]
fn loglikelihoods_equal_a_direct_log_softmax_for_every_method() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let model = tiny_model(2, &Device::Cpu, &mut rng).unwrap().model;
    let requests = requests();
    for config in std::iter::once(None).chain(common::methods(0.0).into_iter().map(Some)) {
        let adapter = config.map(|c| {
            let a = Adapter::new(c, &model, &mut rng).unwrap();
            common::set_lora_b(&a);
            a
        });
        for (batch_size, max_len) in [(1, 64), (3, 64), (8, 64), (2, 6)] {
            let got =
                loglikelihoods(&model, adapter.as_ref(), &requests, batch_size, max_len).unwrap();
            for (r, g) in requests.iter().zip(&got) {
                let want = direct(&model, adapter.as_ref(), r, max_len);
                assert!(
                    (g - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{:?}, batch {batch_size}, max_len {max_len}: {g} vs {want}",
                    adapter.as_ref().map(|a| a.config().method())
                );
                assert!(*g < 0.0);
            }
        }
    }
    // A continuation longer than max_len cannot be scored.
    let e = loglikelihoods(&model, None, &requests, 2, 4).unwrap_err();
    assert!(
        e.to_string().contains("5 tokens does not fit max_len = 4"),
        "{e}"
    );
}

#[test]
fn a_shared_context_scores_its_choices_as_separate_passes_do() {
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let model = tiny_model(2, &Device::Cpu, &mut rng).unwrap().model;
    let context = [5u32, 6, 7, 8, 9, 10, 11];
    let continuations = vec![vec![12, 13], vec![41], vec![73, 74, 75, 76], vec![1, 2, 3]];
    for config in std::iter::once(None).chain(common::methods(0.0).into_iter().map(Some)) {
        let adapter = config.map(|c| {
            let a = Adapter::new(c, &model, &mut rng).unwrap();
            common::set_lora_b(&a);
            a
        });
        // 64 fits every text; 8 makes the longest be cut on the left, which
        // scores the question one pass per choice.
        for max_len in [64, 8] {
            let shared = shared_loglikelihoods(
                &model,
                adapter.as_ref(),
                &context,
                &continuations,
                2,
                max_len,
            )
            .unwrap();
            let requests: Vec<Request> = continuations
                .iter()
                .map(|c| Request {
                    context: context.to_vec(),
                    continuation: c.clone(),
                })
                .collect();
            let separate = loglikelihoods(&model, adapter.as_ref(), &requests, 1, max_len).unwrap();
            for (s, p) in shared.iter().zip(&separate) {
                assert!(
                    (s - p).abs() < 1e-4 * (1.0 + p.abs()),
                    "{:?}, max_len {max_len}: shared {s}, separate {p}",
                    adapter.as_ref().map(|a| a.config().method())
                );
            }
        }
    }
}

#[test]
fn context_and_continuation_split_as_lm_evaluation_harness_does() {
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let loaded = tiny_model(1, &Device::Cpu, &mut rng).unwrap();
    let tok = &loaded.tokenizer;
    let ids = |s: &str| tok.encode(s, true).unwrap().get_ids().to_vec();
    // The byte tokenizer has one token per byte.
    let r = encode_pair(tok, "Q: sky?\nA:", " blue", Some(EOS)).unwrap();
    assert_eq!(r.context, ids("Q: sky?\nA:"));
    assert_eq!(r.continuation, ids(" blue"));
    // Trailing white space of the context moves to the continuation.
    let r = encode_pair(tok, "Q: sky?\nA: ", "blue", Some(EOS)).unwrap();
    assert_eq!(r.context, ids("Q: sky?\nA:"));
    assert_eq!(r.continuation, ids(" blue"));
    // An empty context becomes the end-of-text token.
    let r = encode_pair(tok, "", "blue", Some(EOS)).unwrap();
    assert_eq!(r.context, [EOS]);
    assert_eq!(r.continuation, ids("blue"));
    assert!(encode_pair(tok, "", "blue", None).is_err());
    let e = encode_pair(tok, "Q:", "", Some(EOS)).unwrap_err();
    assert!(e.to_string().contains("adds no token"), "{e}");
}

#[test]
fn accuracy_follows_the_scores_raw_and_per_character() {
    let mut rng = ChaCha20Rng::seed_from_u64(13);
    let loaded = tiny_model(2, &Device::Cpu, &mut rng).unwrap();
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let contexts = ["Question: a?\nAnswer:", "Goal: b\nAnswer:", "c d e f"];
    let choices = [" x", " yes", " a much longer choice", " no"];
    let mut questions = Vec::new();
    let mut best = Vec::new();
    for c in contexts {
        let reqs: Vec<Request> = choices
            .iter()
            .map(|ch| encode_pair(tok, c, ch, Some(EOS)).unwrap())
            .collect();
        let lls = loglikelihoods(model, None, &reqs, 4, 64).unwrap();
        let argmax = |v: Vec<f64>| {
            (0..v.len())
                .max_by(|&i, &j| v[i].total_cmp(&v[j]).then(j.cmp(&i)))
                .unwrap()
        };
        let raw = argmax(lls.clone());
        let norm = argmax(
            lls.iter()
                .zip(choices)
                .map(|(ll, ch)| ll / (ch.len() - 1) as f64)
                .collect(),
        );
        best.push((raw, norm));
        questions.push(Question {
            context: c.into(),
            choices: choices.iter().map(|s| s.to_string()).collect(),
            gold: raw,
        });
    }
    let acc = accuracy(model, None, tok, &questions, 3, 64).unwrap();
    assert_eq!(acc.questions, 3);
    assert_eq!(acc.accuracy, 1.0);
    assert_eq!(acc.accuracy_stderr, 0.0);
    for (s, (raw, norm)) in acc.scored.iter().zip(&best) {
        assert_eq!((s.predicted, s.predicted_norm), (*raw, *norm));
        assert_eq!(s.chars, [1, 3, 20, 2]);
    }
    let expected_norm = best.iter().filter(|(r, n)| r == n).count() as f64 / 3.0;
    assert_eq!(acc.accuracy_norm, expected_norm);
    // Gold elsewhere: none right.
    for (q, (raw, _)) in questions.iter_mut().zip(&best) {
        q.gold = (raw + 1) % choices.len();
    }
    let acc = accuracy(model, None, tok, &questions, 3, 64).unwrap();
    assert_eq!(acc.accuracy, 0.0);
    // Questions that cannot be scored are refused.
    questions[1].gold = 4;
    assert!(accuracy(model, None, tok, &questions, 3, 64).is_err());
    assert!(accuracy(model, None, tok, &[], 3, 64).is_err());
}
