//! Token-level cross-entropy as one fused operation on the CPU.
//!
//! Written with tensor primitives, a cross-entropy over a `(tokens, vocab)`
//! matrix allocates half a dozen matrices of that size forward and as many
//! backward (SmolLM2: 50 MB each at 256 tokens), and on the CPU the kernel
//! spends more time zeroing their fresh pages than computing. Here the
//! forward pass reads the logits once per row and writes one value per row;
//! the backward pass writes the gradient `w·g·(softmax − onehot)` once.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `nll[i] = w[i] · (logsumexp(x[i]) − x[i, t[i]])` for logits `x`
/// `(n, vocab)` in f32.
pub(crate) fn weighted_nll(
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets: targets.to_vec(),
        weights: weights.to_vec(),
    })
}

struct CrossEntropy {
    targets: Vec<u32>,
    weights: Vec<f32>,
}

/// The rows of a contiguous `(n, vocab)` f32 storage.
fn rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    targets: usize,
) -> candle_core::Result<(&'a [f32], usize)> {
    let (n, vocab) = layout.shape().dims2()?;
    if n != targets {
        candle_core::bail!("cross-entropy: {n} rows of logits, {targets} targets");
    }
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("cross-entropy: the logits are not contiguous");
    };
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("cross-entropy: the logits must be f32");
    };
    Ok((&data[start..end], vocab))
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    max + sum.ln()
}

impl CrossEntropy {
    fn check_targets(&self, vocab: usize) -> candle_core::Result<()> {
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("cross-entropy: target {t} is outside the vocabulary of {vocab}");
        }
        Ok(())
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, vocab) = rows(storage, layout, self.targets.len())?;
        self.check_targets(vocab)?;
        let out: Vec<f32> = data
            .par_chunks(vocab)
            .zip(self.targets.par_iter().zip(self.weights.par_iter()))
            .map(|(row, (&t, &w))| {
                if w == 0.0 {
                    0.0
                } else {
                    w * (log_sum_exp(row) - row[t as usize])
                }
            })
            .collect();
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _nll: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad: Vec<f32> = grad.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        Ok(Some(logits.apply_op1_no_bwd(&CrossEntropyGrad {
            targets: &self.targets,
            scale: self.weights.iter().zip(&grad).map(|(w, g)| w * g).collect(),
        })?))
    }
}

struct CrossEntropyGrad<'a> {
    targets: &'a [u32],
    /// `w[i] · g[i]` per row.
    scale: Vec<f32>,
}

impl CustomOp1 for CrossEntropyGrad<'_> {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, vocab) = rows(storage, layout, self.targets.len())?;
        let mut out = vec![0f32; data.len()];
        out.par_chunks_mut(vocab)
            .zip(data.par_chunks(vocab))
            .zip(self.targets.par_iter().zip(self.scale.par_iter()))
            .for_each(|((dst, row), (&t, &s))| {
                if s == 0.0 {
                    return;
                }
                let lse = log_sum_exp(row);
                for (d, &x) in dst.iter_mut().zip(row) {
                    *d = s * (x - lse).exp();
                }
                dst[t as usize] -= s;
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}
