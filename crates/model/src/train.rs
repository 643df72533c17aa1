//! Training an adapter: batching by length, the loss on completion tokens
//! only, AdamW with warmup and cosine decay, gradient accumulation and
//! gradient-norm clipping; evaluation loss and perplexity.

use candle_core::{D, DType, Device, Tensor, backprop::GradStore};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::model::{Llama, Mode};
use crate::peft::{Adapter, PeftConfig};
use crate::per_example::Tape;
use crate::{ModelError, Result};

/// One tokenised example: the loss covers `ids[prompt_len..]`, the
/// completion; the prompt is context only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

impl Example {
    /// A whole sequence whose every token after the first is a target.
    pub fn text(ids: Vec<u32>) -> Example {
        Example { ids, prompt_len: 0 }
    }

    /// `prompt` then `completion` and the end-of-sequence token, tokenised
    /// separately (no merge across the boundary) and cut at `max_len`; the
    /// loss covers the completion and the end token. `None` when no target
    /// is left within `max_len`.
    pub fn prompted(
        tokenizer: &tokenizers::Tokenizer,
        prompt: &str,
        completion: &str,
        eos: Option<u32>,
        max_len: usize,
    ) -> Result<Option<Example>> {
        let encode = |text: &str, special: bool| {
            tokenizer
                .encode(text, special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Input(format!("tokenising {text:?}: {e}")))
        };
        let mut ids = encode(prompt, true)?;
        let prompt_len = ids.len();
        ids.extend(encode(completion, false)?);
        ids.extend(eos);
        ids.truncate(max_len);
        let e = Example { ids, prompt_len };
        Ok((e.targets(max_len) > 0).then_some(e))
    }

    /// How many tokens the loss covers (a sequence's first token is never
    /// predicted).
    pub fn targets(&self, max_len: usize) -> usize {
        let len = self.ids.len().min(max_len);
        len.saturating_sub(self.prompt_len.max(1))
    }
}

/// Padded token ids and the loss's targets and weights, all `(batch, seq)`.
#[derive(Debug)]
pub struct Batch {
    ids: Tensor,
    targets: Tensor,
    weights: Tensor,
    /// 1 at every real token, 0 at padding, `(batch, seq)`.
    valid: Tensor,
    /// The same targets and weights, flat, on the host.
    host_targets: Vec<u32>,
    host_weights: Vec<f32>,
    tokens: usize,
}

impl Batch {
    /// Pads `examples` on the right to the longest (cut at `max_len`). The
    /// target at position `t` is token `t + 1`, weighted 1 when that token
    /// is part of a completion and 0 for prompt and padding.
    pub fn new(examples: &[&Example], max_len: usize, pad: u32, device: &Device) -> Result<Batch> {
        if examples.is_empty() {
            return Err(ModelError::Input("an empty batch".into()));
        }
        let seq = examples
            .iter()
            .map(|e| e.ids.len().min(max_len))
            .max()
            .unwrap_or(0);
        if seq < 2 {
            return Err(ModelError::Input(
                "every example in a batch has fewer than two tokens".into(),
            ));
        }
        let b = examples.len();
        let mut ids = vec![pad; b * seq];
        let mut targets = vec![0u32; b * seq];
        let mut weights = vec![0f32; b * seq];
        let mut valid = vec![0f32; b * seq];
        let mut tokens = 0;
        for (row, e) in examples.iter().enumerate() {
            let len = e.ids.len().min(max_len);
            ids[row * seq..row * seq + len].copy_from_slice(&e.ids[..len]);
            valid[row * seq..row * seq + len].fill(1.0);
            for t in 0..len.saturating_sub(1) {
                targets[row * seq + t] = e.ids[t + 1];
                if t + 1 >= e.prompt_len {
                    weights[row * seq + t] = 1.0;
                    tokens += 1;
                }
            }
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, seq), device)?,
            targets: Tensor::from_slice(&targets, (b, seq), device)?,
            weights: Tensor::from_slice(&weights, (b, seq), device)?,
            valid: Tensor::from_vec(valid, (b, seq), device)?,
            host_targets: targets,
            host_weights: weights,
            tokens,
        })
    }

    /// The same batch with each example's weights divided by its number
    /// of targets, so that the summed loss is the sum of the examples' mean
    /// losses per target token (DP-SGD's per-example loss).
    fn per_example_means(&self) -> Result<Batch> {
        let (b, seq) = self.ids.dims2()?;
        let mut weights = self.host_weights.clone();
        for row in weights.chunks_mut(seq) {
            let n: f32 = row.iter().sum();
            if n > 0.0 {
                row.iter_mut().for_each(|w| *w /= n);
            }
        }
        Ok(Batch {
            ids: self.ids.clone(),
            targets: self.targets.clone(),
            weights: Tensor::from_slice(&weights, (b, seq), self.ids.device())?,
            valid: self.valid.clone(),
            host_targets: self.host_targets.clone(),
            host_weights: weights,
            tokens: self.tokens,
        })
    }

    /// Target tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Positions in the batch, padding included.
    pub fn positions(&self) -> usize {
        self.ids.elem_count()
    }

    /// The padded token ids, `(batch, seq)`.
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// 1 at every real token and 0 at padding, `(batch, seq)` f32.
    pub fn valid(&self) -> &Tensor {
        &self.valid
    }
}

/// Groups example indices into batches of similar length (sorted by
/// length, cut into runs of `batch_size`), in a random order drawn from
/// `rng`, so that little of each batch is padding.
pub fn batches_by_length(
    examples: &[Example],
    batch_size: usize,
    rng: &mut dyn RngCore,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    shuffle(&mut order, rng);
    // A stable sort after a shuffle: equal lengths come in random order.
    order.sort_by_key(|&i| examples[i].ids.len());
    let mut batches: Vec<Vec<usize>> = order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    shuffle(&mut batches, rng);
    batches
}

/// Fisher–Yates with unbiased bounded draws.
fn shuffle<T>(items: &mut [T], rng: &mut dyn RngCore) {
    for i in (1..items.len()).rev() {
        let j = uniform_below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// A uniform draw from `0..n` (rejection, no modulo bias).
pub(crate) fn uniform_below(rng: &mut dyn RngCore, n: u64) -> u64 {
    let zone = u64::MAX - u64::MAX % n;
    loop {
        let x = rng.next_u64();
        if x < zone {
            return x % n;
        }
    }
}

/// The summed negative log-likelihood of a batch's targets (a scalar
/// tensor, differentiable), given logits `(batch, virtual + seq, vocab)`.
pub fn batch_nll(logits: &Tensor, batch: &Batch, virtual_tokens: usize) -> Result<Tensor> {
    Ok(position_nll(logits, batch, virtual_tokens)?.sum_all()?)
}

/// Each example's summed negative log-likelihood of its target tokens
/// (in nats, summed in f64), in the batch's order.
pub fn example_nll(logits: &Tensor, batch: &Batch, virtual_tokens: usize) -> Result<Vec<f64>> {
    let (_, seq) = batch.ids.dims2()?;
    let nll = position_nll(logits, batch, virtual_tokens)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    Ok(nll
        .chunks(seq)
        .map(|row| row.iter().map(|&x| f64::from(x)).sum())
        .collect())
}

/// The weighted negative log-likelihood at every position, `(batch · seq)`.
fn position_nll(logits: &Tensor, batch: &Batch, virtual_tokens: usize) -> Result<Tensor> {
    let (b, seq) = batch.ids.dims2()?;
    let logits = logits.narrow(1, virtual_tokens, seq)?;
    let vocab = logits.dim(D::Minus1)?;
    let logits = logits.reshape((b * seq, vocab))?;
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return Ok(crate::loss::weighted_nll(
            &logits,
            &batch.host_targets,
            &batch.host_weights,
        )?);
    }
    // Log-sum-exp does not depend on the shift: no gradient through it.
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_norm = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&batch.targets.reshape((b * seq, 1))?, 1)?;
    let nll = (log_norm - picked)?.reshape(b * seq)?;
    Ok((nll * batch.weights.reshape(b * seq)?)?)
}

/// The optimiser and schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    #[serde(default = "defaults::learning_rate")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "defaults::beta1")]
    pub beta1: f64,
    #[serde(default = "defaults::beta2")]
    pub beta2: f64,
    #[serde(default = "defaults::eps")]
    pub eps: f64,
    /// Linear warmup over this many optimiser steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Cosine decay to `min_lr_ratio · learning_rate` at this step (0: a
    /// constant rate after warmup).
    #[serde(default)]
    pub total_steps: usize,
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// Micro-batches per optimiser step.
    #[serde(default = "defaults::one")]
    pub grad_accum: usize,
    /// Clip the gradient's global L2 norm to this (none when absent).
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Recompute each layer's activations in the backward pass instead of
    /// keeping them ([`Llama::checkpointed_gradients`]): less memory, a
    /// second forward pass through the layers.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

mod defaults {
    pub fn learning_rate() -> f64 {
        1e-3
    }
    pub fn beta1() -> f64 {
        0.9
    }
    pub fn beta2() -> f64 {
        0.999
    }
    pub fn eps() -> f64 {
        1e-8
    }
    pub fn one() -> usize {
        1
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            learning_rate: defaults::learning_rate(),
            weight_decay: 0.0,
            beta1: defaults::beta1(),
            beta2: defaults::beta2(),
            eps: defaults::eps(),
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 0.0,
            grad_accum: 1,
            max_grad_norm: None,
            gradient_checkpointing: false,
        }
    }
}

impl OptimConfig {
    /// The learning rate of optimiser step `step` (0-based): linear warmup
    /// `lr · (step + 1) / warmup`, then cosine decay from `lr` to
    /// `min_lr_ratio · lr` over the steps up to `total_steps`.
    pub fn rate_at(&self, step: usize) -> f64 {
        let lr = self.learning_rate;
        if step < self.warmup_steps {
            return lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.total_steps <= self.warmup_steps {
            return lr;
        }
        let span = (self.total_steps - self.warmup_steps) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = lr * self.min_lr_ratio;
        floor + (lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(ModelError::Config(why));
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "learning_rate must be positive, got {}",
                self.learning_rate
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be non-negative, got {}",
                self.weight_decay
            ));
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(format!("{name} must be in [0, 1), got {beta}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("eps must be positive, got {}", self.eps));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "min_lr_ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
        if self.grad_accum == 0 {
            return bad("grad_accum must be positive".into());
        }
        if let Some(norm) = self.max_grad_norm
            && !(norm.is_finite() && norm > 0.0)
        {
            return bad(format!("max_grad_norm must be positive, got {norm}"));
        }
        Ok(())
    }
}

/// What one optimiser step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean loss per target token over the step's micro-batches.
    pub loss: f64,
    /// The gradient's global L2 norm before clipping.
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub tokens: usize,
}

/// AdamW state (Loshchilov and Hutter: decoupled weight decay) for an
/// adapter's f32 parameters.
#[derive(Debug)]
struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: i32,
}

/// Trains one adapter on one frozen model. The trainer holds a handle to
/// the model (its weights are shared, not copied).
#[derive(Debug)]
pub struct AdapterTrainer {
    model: Llama,
    adapter: Adapter,
    config: OptimConfig,
    state: AdamW,
    /// FedProx: `μ` and the global parameters the proximal term pulls
    /// towards, one tensor per adapter parameter.
    proximal: Option<(f64, Vec<Tensor>)>,
}

impl AdapterTrainer {
    pub fn new(model: &Llama, adapter: Adapter, config: OptimConfig) -> Result<Self> {
        config.validate()?;
        let state = fresh_state(&adapter)?;
        Ok(AdapterTrainer {
            model: model.clone(),
            adapter,
            config,
            state,
            proximal: None,
        })
    }

    /// Adds FedProx's proximal term `μ/2 ‖w − anchor‖²` to the loss (its
    /// gradient `μ (w − anchor)` to every step); `μ = 0` removes it.
    pub fn set_proximal(&mut self, mu: f64, anchor: &[f32]) -> Result<()> {
        if !(mu.is_finite() && mu >= 0.0) {
            return Err(ModelError::Config(format!(
                "proximal mu must be non-negative, got {mu}"
            )));
        }
        if mu == 0.0 {
            self.proximal = None;
            return Ok(());
        }
        let tensors = self.per_parameter(anchor, "the proximal anchor")?;
        self.proximal = Some((mu, tensors));
        Ok(())
    }

    /// A flat vector in the canonical order, cut into one tensor per
    /// adapter parameter; `what` names it in the error for a wrong length.
    fn per_parameter(&self, values: &[f32], what: &str) -> Result<Vec<Tensor>> {
        if values.len() != self.adapter.num_parameters() {
            return Err(ModelError::Input(format!(
                "{what} has {} values, the adapter {}",
                values.len(),
                self.adapter.num_parameters()
            )));
        }
        let mut at = 0;
        let mut out = Vec::with_capacity(self.adapter.params().len());
        for (_, var) in self.adapter.params() {
            let n = var.elem_count();
            out.push(Tensor::from_slice(
                &values[at..at + n],
                var.shape(),
                var.device(),
            )?);
            at += n;
        }
        Ok(out)
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    pub fn into_adapter(self) -> Adapter {
        self.adapter
    }

    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// Optimiser steps taken since the last reset.
    pub fn steps(&self) -> usize {
        self.state.steps as usize
    }

    /// Forgets the moments and restarts the schedule (a new federated round).
    pub fn reset(&mut self, config: OptimConfig) -> Result<()> {
        config.validate()?;
        self.config = config;
        self.state = fresh_state(&self.adapter)?;
        Ok(())
    }

    /// The adapter's parameters as tensors, in the canonical order.
    fn param_tensors(&self) -> Vec<Tensor> {
        self.adapter
            .params()
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect()
    }

    /// The summed loss and gradients of one micro-batch, the loss divided by
    /// `denominator` before differentiation.
    fn gradients(
        &self,
        batch: &Batch,
        denominator: f64,
        rng: &mut dyn RngCore,
    ) -> Result<(f64, GradStore)> {
        if self.config.gradient_checkpointing {
            let params = self.param_tensors();
            let virtual_tokens = self.adapter.virtual_tokens();
            let (loss, grads) = self.model.checkpointed_gradients(
                &batch.ids,
                Some(&self.adapter),
                &params,
                rng,
                &|logits| Ok((batch_nll(logits, batch, virtual_tokens)? / denominator)?),
            )?;
            return Ok((f64::from(loss.to_scalar::<f32>()?) * denominator, grads));
        }
        let logits = self
            .model
            .forward(&batch.ids, Some(&self.adapter), Mode::Train(rng))?;
        let nll = batch_nll(&logits, batch, self.adapter.virtual_tokens())?;
        let loss = (nll / denominator)?;
        let grads = loss.backward()?;
        Ok((f64::from(loss.to_scalar::<f32>()?) * denominator, grads))
    }

    /// One optimiser step over `micro_batches` (normally
    /// `config.grad_accum` of them): the gradient of the mean loss per
    /// target token over all of them, clipped, then AdamW.
    pub fn step(&mut self, micro_batches: &[Batch], rng: &mut dyn RngCore) -> Result<StepStats> {
        // The pass runs on rayon's pool; its dropout masks come from a
        // generator seeded by `rng` (crate::pool).
        crate::pool::on_pool_seeded(rng, |local| self.step_on_pool(micro_batches, local))
    }

    fn step_on_pool(
        &mut self,
        micro_batches: &[Batch],
        rng: &mut dyn RngCore,
    ) -> Result<StepStats> {
        let tokens: usize = micro_batches.iter().map(Batch::tokens).sum();
        if tokens == 0 {
            return Err(ModelError::Input(
                "no target tokens in the step's batches (every token is prompt or padding)".into(),
            ));
        }
        let params = self.param_tensors();
        let mut sum: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut total_loss = 0.0;
        for batch in micro_batches {
            let (loss, grads) = self.gradients(batch, tokens as f64, rng)?;
            total_loss += loss;
            for (slot, p) in sum.iter_mut().zip(&params) {
                if let Some(g) = grads.get(p) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let mut grads: Vec<Tensor> = sum
            .into_iter()
            .zip(&params)
            .map(|(g, p)| match g {
                Some(g) => Ok(g),
                None => Tensor::zeros_like(p),
            })
            .collect::<candle_core::Result<_>>()?;
        if let Some((mu, anchor)) = &self.proximal {
            for ((g, p), a) in grads.iter_mut().zip(&params).zip(anchor) {
                *g = (&*g + ((p - a)? * *mu)?)?;
            }
        }
        let (norm, clip) = norm_and_clip(&grads, self.config.max_grad_norm)?;
        let lr = self
            .state
            .update(&self.adapter, &grads, &self.config, clip)?;
        Ok(StepStats {
            loss: total_loss / tokens as f64,
            grad_norm: norm,
            learning_rate: lr,
            tokens,
        })
    }

    /// The gradient of the mean loss over `batch` for every adapter
    /// parameter, in the canonical order (`None` where none reached it).
    pub fn parameter_gradients(
        &self,
        batch: &Batch,
        rng: &mut dyn RngCore,
    ) -> Result<Vec<(String, Option<Tensor>)>> {
        let (_, grads) = crate::pool::on_pool_seeded(rng, |local| {
            self.gradients(batch, batch.tokens().max(1) as f64, local)
        })?;
        Ok(self
            .adapter
            .params()
            .iter()
            .map(|(name, v)| (name.clone(), grads.get(v.as_tensor()).cloned()))
            .collect())
    }
}

/// Each example's gradient of its own mean loss per target token, for
/// record-level DP-SGD: row `i` belongs to example `i`, in the adapter's
/// canonical parameter order. Per-example gradients can reveal their
/// records, so they are wiped when dropped and never printed.
pub struct PerExample {
    dim: usize,
    rows: Vec<f32>,
    /// The mean over the examples with targets of their mean loss.
    pub loss: f64,
}

impl PerExample {
    /// How many examples.
    pub fn len(&self) -> usize {
        self.rows.len().checked_div(self.dim).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The length of each gradient.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Example `i`'s gradient.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.rows[i * self.dim..(i + 1) * self.dim]
    }
}

impl Drop for PerExample {
    fn drop(&mut self) {
        self.rows.zeroize();
    }
}

impl std::fmt::Debug for PerExample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerExample")
            .field("examples", &self.len())
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

impl AdapterTrainer {
    /// Each example's gradient (see [`PerExample`]) from one batched
    /// forward and backward pass (crate::per_example); full-layer adapters,
    /// which have no batched path, one example at a time. Sequences are
    /// cut at `max_len` and padded with `pad`.
    pub fn per_example_gradients(
        &self,
        examples: &[&Example],
        max_len: usize,
        pad: u32,
        rng: &mut dyn RngCore,
    ) -> Result<PerExample> {
        // Whole-layer adapters have no batched path; with gradient
        // checkpointing, one example at a time keeps one example's layer
        // inputs in memory.
        if matches!(self.adapter.config(), PeftConfig::Full(_))
            || self.config.gradient_checkpointing
        {
            return self.per_example_gradients_one_by_one(examples, max_len, pad, rng);
        }
        if examples.is_empty() {
            return Ok(self.no_examples());
        }
        crate::pool::on_pool_seeded(rng, |local| {
            let batch =
                Batch::new(examples, max_len, pad, self.model.device())?.per_example_means()?;
            let tape = Tape::new();
            let logits =
                self.model
                    .forward(&batch.ids, Some(&self.adapter), Mode::Record(local, &tape))?;
            let nll = batch_nll(&logits, &batch, self.adapter.virtual_tokens())?;
            let grads = nll.backward()?;
            let rows = tape
                .gradients(&self.adapter, &grads, examples.len())?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let with_targets = examples.iter().filter(|e| e.targets(max_len) > 0).count();
            Ok(PerExample {
                dim: self.adapter.num_parameters(),
                rows,
                loss: f64::from(nll.to_scalar::<f32>()?) / with_targets.max(1) as f64,
            })
        })
    }

    /// [`AdapterTrainer::per_example_gradients`] the plain way, each
    /// example in a pass of its own: the reference the batched path is
    /// tested against, and the path for full-layer adapters.
    pub fn per_example_gradients_one_by_one(
        &self,
        examples: &[&Example],
        max_len: usize,
        pad: u32,
        rng: &mut dyn RngCore,
    ) -> Result<PerExample> {
        let dim = self.adapter.num_parameters();
        let mut rows = Vec::with_capacity(examples.len() * dim);
        let mut loss = 0.0;
        let mut with_targets = 0;
        crate::pool::on_pool_seeded(rng, |local| {
            for e in examples {
                let tokens = e.targets(max_len);
                if tokens == 0 {
                    rows.resize(rows.len() + dim, 0.0);
                    continue;
                }
                let batch = Batch::new(&[*e], max_len, pad, self.model.device())?;
                let (l, grads) = self.gradients(&batch, tokens as f64, local)?;
                loss += l / tokens as f64;
                with_targets += 1;
                for (_, var) in self.adapter.params() {
                    match grads.get(var.as_tensor()) {
                        Some(g) => {
                            rows.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                        }
                        None => rows.resize(rows.len() + var.elem_count(), 0.0),
                    }
                }
            }
            Ok::<_, ModelError>(())
        })?;
        Ok(PerExample {
            dim,
            rows,
            loss: loss / f64::from(with_targets.max(1)),
        })
    }

    fn no_examples(&self) -> PerExample {
        PerExample {
            dim: self.adapter.num_parameters(),
            rows: Vec::new(),
            loss: 0.0,
        }
    }

    /// One optimiser step with a gradient computed elsewhere, flat in the
    /// canonical order: DP-SGD's privatised mean. FedProx's proximal term,
    /// `max_grad_norm` and AdamW act on it as they do on any gradient;
    /// none of them looks at the data again, so the step is
    /// post-processing of the privatised gradient. Returns the gradient's
    /// norm (after the proximal term) and the learning rate.
    pub fn apply_gradient(&mut self, gradient: &[f32]) -> Result<(f64, f64)> {
        let mut grads = self.per_parameter(gradient, "the gradient")?;
        if let Some((mu, anchor)) = &self.proximal {
            for ((g, (_, var)), a) in grads.iter_mut().zip(self.adapter.params()).zip(anchor) {
                *g = (&*g + ((var.as_tensor() - a)? * *mu)?)?;
            }
        }
        let (norm, clip) = norm_and_clip(&grads, self.config.max_grad_norm)?;
        let lr = self
            .state
            .update(&self.adapter, &grads, &self.config, clip)?;
        Ok((norm, lr))
    }
}

fn fresh_state(adapter: &Adapter) -> Result<AdamW> {
    let zeros = || -> Result<Vec<Tensor>> {
        adapter
            .params()
            .iter()
            .map(|(_, v)| Ok(Tensor::zeros_like(v.as_tensor())?))
            .collect()
    };
    Ok(AdamW {
        m: zeros()?,
        v: zeros()?,
        steps: 0,
    })
}

impl AdamW {
    /// One step on `adapter`'s parameters with their gradients `grads`
    /// (canonical order) scaled by `clip`, at the schedule's rate for this
    /// step; returns that rate.
    fn update(
        &mut self,
        adapter: &Adapter,
        grads: &[Tensor],
        c: &OptimConfig,
        clip: f64,
    ) -> Result<f64> {
        let lr = c.rate_at(self.steps as usize);
        self.steps += 1;
        let t = self.steps;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (i, ((_, var), g)) in adapter.params().iter().zip(grads).enumerate() {
            let g = (g * clip)?;
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bias1)? / ((&v / bias2)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(lr)
    }
}

/// The gradients' global L2 norm and the factor that clips it to
/// `max_norm`; a non-finite norm is an error (the step must not be taken).
fn norm_and_clip(grads: &[Tensor], max_norm: Option<f64>) -> Result<(f64, f64)> {
    let norm = global_norm(grads)?;
    if !norm.is_finite() {
        return Err(ModelError::Numerical(format!(
            "the gradient norm is {norm}; the step was not applied"
        )));
    }
    let clip = match max_norm {
        Some(max) if norm > max => max / (norm + 1e-6),
        _ => 1.0,
    };
    Ok((norm, clip))
}

/// A fresh optimiser for `adapter` under `config`, for training loops
/// other than [`AdapterTrainer`]'s (offsite-tuning's distillation).
pub(crate) struct Optimizer {
    state: AdamW,
    config: OptimConfig,
}

impl Optimizer {
    pub(crate) fn new(adapter: &Adapter, config: OptimConfig) -> Result<Optimizer> {
        config.validate()?;
        Ok(Optimizer {
            state: fresh_state(adapter)?,
            config,
        })
    }

    /// Clips and applies `grads`; returns the norm before clipping and the
    /// learning rate.
    pub(crate) fn step(&mut self, adapter: &Adapter, grads: &GradStore) -> Result<(f64, f64)> {
        let grads: Vec<Tensor> = adapter
            .params()
            .iter()
            .map(|(_, v)| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => Tensor::zeros_like(v.as_tensor()),
            })
            .collect::<candle_core::Result<_>>()?;
        let (norm, clip) = norm_and_clip(&grads, self.config.max_grad_norm)?;
        let lr = self.state.update(adapter, &grads, &self.config, clip)?;
        Ok((norm, lr))
    }
}

/// The L2 norm of all of `grads` together, read back once (one host
/// synchronisation on a GPU, not one per tensor): each tensor's sum of
/// squares in f32, their total in f64.
fn global_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let sums = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = Tensor::stack(&sums, 0)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(total.sqrt())
}

/// Loss and perplexity of a model (with an adapter or without) on a set
/// of examples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean negative log-likelihood per target token, in nats.
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

/// Evaluates `examples` in batches of `batch_size`, cut at `max_len`.
pub fn evaluate(
    model: &Llama,
    adapter: Option<&Adapter>,
    examples: &[Example],
    batch_size: usize,
    max_len: usize,
) -> Result<EvalResult> {
    crate::pool::on_pool(|| evaluate_on_pool(model, adapter, examples, batch_size, max_len))
}

fn evaluate_on_pool(
    model: &Llama,
    adapter: Option<&Adapter>,
    examples: &[Example],
    batch_size: usize,
    max_len: usize,
) -> Result<EvalResult> {
    let mut order: Vec<&Example> = examples.iter().filter(|e| e.targets(max_len) > 0).collect();
    order.sort_by_key(|e| e.ids.len());
    let mut sum = 0.0;
    let mut tokens = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let batch = Batch::new(chunk, max_len, 0, model.device())?;
        let logits = model.forward(&batch.ids, adapter, Mode::Eval)?;
        let virtual_tokens = adapter.map_or(0, Adapter::virtual_tokens);
        sum += f64::from(batch_nll(&logits, &batch, virtual_tokens)?.to_scalar::<f32>()?);
        tokens += batch.tokens();
    }
    if tokens == 0 {
        return Err(ModelError::Input(
            "no example has a target token to evaluate".into(),
        ));
    }
    let loss = sum / tokens as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}
