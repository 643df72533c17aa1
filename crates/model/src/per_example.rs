//! Per-example gradients of an adapter in one batched pass, for
//! record-level DP-SGD (protocols/dp.md §8).
//!
//! DP-SGD clips each example's gradient on its own, so the batch's summed
//! gradient is not enough. Running each example alone (the reference,
//! [`crate::train::AdapterTrainer::per_example_gradients_one_by_one`])
//! costs a pass per example. Here one forward and one backward pass over
//! the whole batch give every example's gradient:
//!
//! - **LoRA** (book-keeping, Bu et al. 2023): the pass runs with `A` and `B`
//!   as constants, records each branch's input `x` and adds a zero probe to
//!   its output, whose gradient is the output gradient `g`. For
//!   `y = s·x Aᵀ Bᵀ`, example `i`'s gradients are `∇B_i = g_iᵀ (s·x_i Aᵀ)`
//!   and `∇A_i = s·(g_i B)ᵀ x_i`, batched products of size `r·d`.
//! - **Prompt-, P- and prefix-tuning**: the virtual tokens (or prefix keys
//!   and values) are the same for every example; the pass broadcasts them
//!   detached and adds a per-example probe, whose gradient is each
//!   example's gradient with respect to them. Prompt-tuning's parameters
//!   are those tokens; P-tuning's encoder and prefix-tuning's projection
//!   are small MLPs whose per-example gradients follow by backpropagating
//!   all examples' probe gradients through them at once.
//!
//! Full-layer adapters (offsite-tuning's) have no batched path: the trainer
//! runs them one example at a time.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::model::Module;
use crate::peft::{Adapter, Kind, Mlp};
use crate::{ModelError, Result};

/// What a recording pass keeps for the per-example gradients.
pub struct Tape {
    lora: RefCell<Vec<LoraTrace>>,
    /// Probes on the per-batch copies of shared tensors, in the order the
    /// pass made them: the soft prompt, or each layer's prefix keys then
    /// values.
    shared: RefCell<Vec<Var>>,
}

struct LoraTrace {
    layer: usize,
    module: Module,
    /// The branch's input after dropout, `(batch·seq, in)`, detached.
    input: Tensor,
    /// Zero, `(batch·seq, out)`; its gradient is the branch's output gradient.
    probe: Var,
}

impl std::fmt::Debug for Tape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tape")
            .field("lora", &self.lora.borrow().len())
            .field("shared", &self.shared.borrow().len())
            .finish()
    }
}

impl Tape {
    pub(crate) fn new() -> Tape {
        Tape {
            lora: RefCell::new(Vec::new()),
            shared: RefCell::new(Vec::new()),
        }
    }

    /// Records a LoRA branch (`branch` computed from `input` with constant
    /// `A` and `B`) and returns it with its probe added.
    pub(crate) fn lora(
        &self,
        layer: usize,
        module: Module,
        input: &Tensor,
        branch: &Tensor,
    ) -> Result<Tensor> {
        let probe = Var::zeros(branch.shape(), branch.dtype(), branch.device())?;
        let out = (branch + probe.as_tensor())?;
        self.lora.borrow_mut().push(LoraTrace {
            layer,
            module,
            input: input.detach(),
            probe,
        });
        Ok(out)
    }

    /// `shared` broadcast to `dims` (a batch dimension first), plus a probe.
    pub(crate) fn shared(&self, shared: &Tensor, dims: &[usize]) -> Result<Tensor> {
        let probe = Var::zeros(dims, shared.dtype(), shared.device())?;
        let out = probe.as_tensor().broadcast_add(shared)?;
        self.shared.borrow_mut().push(probe);
        Ok(out)
    }

    /// Each example's gradient of every adapter parameter, `(batch, dim)`
    /// f32 in the adapter's canonical order, from the gradients of a
    /// recording pass's loss (the sum of the examples' own losses).
    pub(crate) fn gradients(
        &self,
        adapter: &Adapter,
        grads: &GradStore,
        batch: usize,
    ) -> Result<Tensor> {
        let parts = match &adapter.kind {
            Kind::Lora(layers) => self.lora_gradients(layers, grads, batch)?,
            Kind::Prompt { .. } => {
                let g = self.shared_gradients(grads, 1)?.remove(0);
                vec![g.reshape((batch, ()))?]
            }
            Kind::PTuning { embedding, encoder } => {
                let g = self.shared_gradients(grads, 1)?.remove(0);
                mlp_gradients(encoder, embedding.as_tensor(), &g, Activation::Relu)?
            }
            Kind::Prefix {
                embedding,
                transform,
                layers,
                ..
            } => {
                // Per layer (keys, values), each (batch, kv_heads, p, head_dim),
                // back to the flat (p, layers·2·kv_dim) the prefix comes from.
                let probes = self.shared_gradients(grads, 2 * layers)?;
                let stacked = Tensor::stack(&probes, 1)?;
                let (b, _, _, p, _) = stacked.dims5()?;
                let flat = stacked
                    .permute((0, 3, 1, 2, 4))?
                    .contiguous()?
                    .reshape((b, p, ()))?;
                match transform {
                    Some(mlp) => {
                        mlp_gradients(mlp, embedding.as_tensor(), &flat, Activation::Tanh)?
                    }
                    None => vec![flat.reshape((b, ()))?],
                }
            }
            Kind::Full { .. } => {
                return Err(ModelError::Config(
                    "full-layer adapters have no batched per-example gradients".into(),
                ));
            }
        };
        let out = Tensor::cat(&parts, 1)?;
        if out.dim(1)? != adapter.num_parameters() {
            return Err(ModelError::Numerical(format!(
                "per-example gradients of {} values for an adapter of {}",
                out.dim(1)?,
                adapter.num_parameters()
            )));
        }
        Ok(out)
    }

    fn lora_gradients(
        &self,
        layers: &[(usize, Vec<(Module, crate::peft::LoraPair)>)],
        grads: &GradStore,
        batch: usize,
    ) -> Result<Vec<Tensor>> {
        let traces = self.lora.borrow();
        let by_place: HashMap<(usize, Module), &LoraTrace> =
            traces.iter().map(|t| ((t.layer, t.module), t)).collect();
        if by_place.len() != traces.len() {
            return Err(ModelError::Numerical(
                "a LoRA branch ran twice in one pass".into(),
            ));
        }
        let mut parts = Vec::new();
        for (layer, pairs) in layers {
            for (module, pair) in pairs {
                let a = pair.a.as_tensor().detach();
                let b = pair.b.as_tensor().detach();
                let (r, input) = a.dims2()?;
                let out = b.dim(0)?;
                let Some(trace) = by_place.get(&(*layer, *module)) else {
                    // The pass never reached this branch: no gradient.
                    parts.push(Tensor::zeros((batch, r * input), DType::F32, a.device())?);
                    parts.push(Tensor::zeros((batch, out * r), DType::F32, a.device())?);
                    continue;
                };
                let x = trace
                    .input
                    .to_dtype(DType::F32)?
                    .reshape((batch, (), input))?;
                let g = match grads.get(trace.probe.as_tensor()) {
                    Some(g) => g.to_dtype(DType::F32)?.reshape((batch, (), out))?,
                    None => Tensor::zeros((batch, x.dim(1)?, out), DType::F32, a.device())?,
                };
                let s = pair.scale();
                // h = s·x Aᵀ, (batch, seq, r).
                let h = (x.broadcast_matmul(&a.t()?)? * s)?;
                // ∇B_i = g_iᵀ h_i, (batch, out, r).
                let grad_b = g.transpose(1, 2)?.contiguous()?.matmul(&h)?;
                // ∇A_i = s·(g_i B)ᵀ x_i, (batch, r, in).
                let gb = g.broadcast_matmul(&b)?;
                let grad_a = (gb.transpose(1, 2)?.contiguous()?.matmul(&x)? * s)?;
                parts.push(grad_a.reshape((batch, ()))?);
                parts.push(grad_b.reshape((batch, ()))?);
            }
        }
        Ok(parts)
    }

    /// The gradients of the first `n` shared probes, f32; a probe the loss
    /// never reached has a zero gradient.
    fn shared_gradients(&self, grads: &GradStore, n: usize) -> Result<Vec<Tensor>> {
        let probes = self.shared.borrow();
        if probes.len() != n {
            return Err(ModelError::Numerical(format!(
                "the pass made {} shared probes, {n} expected",
                probes.len()
            )));
        }
        probes
            .iter()
            .map(|p| {
                Ok(match grads.get(p.as_tensor()) {
                    Some(g) => g.to_dtype(DType::F32)?,
                    None => p.as_tensor().zeros_like()?.to_dtype(DType::F32)?,
                })
            })
            .collect()
    }
}

#[derive(Clone, Copy)]
enum Activation {
    Relu,
    Tanh,
}

/// Per-example gradients of an MLP's input and parameters (in the
/// adapter's order: the input, then each layer's weight and bias), given
/// each example's gradient `delta` `(batch, p, out)` with respect to the
/// MLP's output on the shared input `x` `(p, in)`.
fn mlp_gradients(mlp: &Mlp, x: &Tensor, delta: &Tensor, act: Activation) -> Result<Vec<Tensor>> {
    let batch = delta.dim(0)?;
    let last = mlp.layers.len().saturating_sub(1);
    // The forward pass again, keeping each layer's input and pre-activation.
    let mut inputs = Vec::with_capacity(mlp.layers.len());
    let mut pre = Vec::with_capacity(mlp.layers.len());
    let mut u = x.detach().to_dtype(DType::F32)?;
    for (i, (w, b)) in mlp.layers.iter().enumerate() {
        let z = u
            .matmul(&w.as_tensor().detach().t()?)?
            .broadcast_add(&b.as_tensor().detach())?;
        inputs.push(u);
        u = if i < last {
            match act {
                Activation::Relu => z.relu()?,
                Activation::Tanh => z.tanh()?,
            }
        } else {
            z.clone()
        };
        pre.push(z);
    }
    let mut layer_grads = Vec::with_capacity(2 * mlp.layers.len());
    let mut delta = delta.clone();
    for (i, (w, _)) in mlp.layers.iter().enumerate().rev() {
        // ∇W_i = δ_iᵀ u, ∇b_i = Σ_p δ_i, then δ back through W and the
        // activation.
        let grad_w = delta
            .transpose(1, 2)?
            .contiguous()?
            .broadcast_matmul(&inputs[i])?;
        let grad_b = delta.sum(1)?;
        layer_grads.push(grad_b.reshape((batch, ()))?);
        layer_grads.push(grad_w.reshape((batch, ()))?);
        let back = delta.broadcast_matmul(&w.as_tensor().detach())?;
        delta = if i > 0 {
            let z = &pre[i - 1];
            let slope = match act {
                // As candle differentiates it: slope 1 at zero.
                Activation::Relu => z.ge(0f64)?.to_dtype(DType::F32)?,
                Activation::Tanh => (1.0 - z.tanh()?.sqr()?)?,
            };
            back.broadcast_mul(&slope)?
        } else {
            back
        };
    }
    let mut out = vec![delta.reshape((batch, ()))?];
    out.extend(layer_grads.into_iter().rev());
    Ok(out)
}
