//! Fused CPU kernels, with their backward passes, for the decoder's
//! element-wise work: RMSNorm, rotary embeddings, SwiGLU and softmax.
//!
//! Built from tensor primitives, each of these is five to fifteen graph
//! nodes, and candle's backward pass allocates, zero-fills and accumulates
//! a gradient for every node; on the CPU that bookkeeping cost more than
//! the matmuls. Each kernel here reads its inputs once and writes its
//! output once, forward and backward, over rows in parallel (rayon).
//!
//! They run for contiguous f32 tensors on the CPU; everywhere else (a GPU,
//! bf16) the model uses the differentiable primitives, which compute the
//! same function. The tests compare the two, values and gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Whether the fused kernels apply to `x`.
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// A contiguous f32 storage as a slice, and the width of its last
/// dimension.
fn slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<(&'a [f32], usize)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: the input is not contiguous");
    };
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: the input must be f32");
    };
    let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
    Ok((&data[start..end], width))
}

/// A new storage of `a`'s shape whose rows are `f(out_row, a_row, b_row)`,
/// the rows taken in parallel from two same-shaped contiguous f32 storages.
fn map_row_pairs(
    (a, al): (&CpuStorage, &Layout),
    (b, bl): (&CpuStorage, &Layout),
    what: &str,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (a, b, w) = pair(a, al, b, bl, what)?;
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(w)
        .zip(a.par_chunks(w).zip(b.par_chunks(w)))
        .for_each(|(y, (a, b))| f(y, a, b));
    Ok((CpuStorage::F32(out), al.shape().clone()))
}

/// Two contiguous f32 storages of the same shape, as slices, and the
/// width of their last dimension.
fn pair<'a>(
    a: &'a CpuStorage,
    al: &Layout,
    b: &'a CpuStorage,
    bl: &Layout,
    what: &str,
) -> candle_core::Result<(&'a [f32], &'a [f32], usize)> {
    same_shape(al, bl, what)?;
    let (a, width) = slice(a, al, what)?;
    let (b, _) = slice(b, bl, what)?;
    Ok((a, b, width))
}

fn same_shape(a: &Layout, b: &Layout, what: &str) -> candle_core::Result<()> {
    if a.shape() != b.shape() {
        candle_core::bail!("{what}: shapes {:?} and {:?} differ", a.shape(), b.shape());
    }
    Ok(())
}

// ---------------------------------------------------------------- RMSNorm

/// `x / sqrt(mean(x²) + ε) · w` over the last dimension, `w` frozen.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let weight: Vec<f32> = weight.to_dtype(DType::F32)?.to_vec1()?;
    x.contiguous()?.apply_op1(RmsNorm {
        weight,
        eps: eps as f32,
    })
}

struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, h) = slice(storage, layout, "rms-norm")?;
        if h != self.weight.len() {
            candle_core::bail!("rms-norm: width {h}, weight {}", self.weight.len());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(y, x)| {
                let r = inv_rms(x, self.eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(&self.weight) {
                    *y = x * r * w;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&dy.contiguous()?, &RmsNormGrad(self))?,
        ))
    }
}

/// `∂x = r·(w∘∂y) − x·r³·mean(x∘w∘∂y)` with `r = 1/rms(x)`.
struct RmsNormGrad<'a>(&'a RmsNorm);

impl CustomOp2 for RmsNormGrad<'_> {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0.weight;
        map_row_pairs((xs, xl), (dys, dyl), "rms-norm-grad", |dx, x, dy| {
            let h = x.len();
            let r = inv_rms(x, self.0.eps);
            let dot = x
                .iter()
                .zip(dy)
                .zip(w)
                .map(|((x, dy), w)| x * dy * w)
                .sum::<f32>()
                / h as f32;
            let c = r * r * r * dot;
            for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                *dx = r * w * dy - x * c;
            }
        })
    }
}

// ------------------------------------------------------- rotary embedding

/// Rotary embedding in the "rotate half" layout for `x`
/// `(batch, heads, seq, head_dim)` with tables `(seq, head_dim/2)`.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let cos: Vec<f32> = cos.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let sin: Vec<f32> = sin.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    x.contiguous()?.apply_op1(Rope {
        cos,
        sin,
        sign: 1.0,
    })
}

struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// −1 rotates the other way: the backward pass.
    sign: f32,
}

impl Rope {
    fn rotate(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, d) = slice(storage, layout, "rope")?;
        let dims = layout.shape().dims();
        if dims.len() != 4 || d % 2 != 0 {
            candle_core::bail!("rope: expected (batch, heads, seq, even width), got {dims:?}");
        }
        let (t, half) = (dims[2], d / 2);
        if self.cos.len() != t * half || self.sin.len() != t * half {
            candle_core::bail!(
                "rope: tables of {} for {t} positions of width {d}",
                self.cos.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(row, (y, x))| {
                let p = row % t;
                let (c, s) = (
                    &self.cos[p * half..(p + 1) * half],
                    &self.sin[p * half..(p + 1) * half],
                );
                let (x1, x2) = x.split_at(half);
                let (y1, y2) = y.split_at_mut(half);
                for i in 0..half {
                    let s = self.sign * s[i];
                    y1[i] = x1[i] * c[i] - x2[i] * s;
                    y2[i] = x2[i] * c[i] + x1[i] * s;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.rotate(storage, layout)
    }

    /// A rotation's gradient is the opposite rotation.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            sign: -self.sign,
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

// ----------------------------------------------------------------- SwiGLU

/// `silu(gate) · up`.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Which of SwiGLU's gradients a pass computes.
#[derive(Clone, Copy)]
enum SwiGluPart {
    Gate,
    Up,
}

struct SwiGluGrad {
    part: SwiGluPart,
    dy: Tensor,
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map_row_pairs((gs, gl), (us, ul), "swiglu", |y, g, u| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g * sigmoid(g) * u;
            }
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let pass = |part| {
            gate.apply_op2_no_bwd(
                up,
                &SwiGluGrad {
                    part,
                    dy: dy.clone(),
                },
            )
        };
        Ok((Some(pass(SwiGluPart::Gate)?), Some(pass(SwiGluPart::Up)?)))
    }
}

impl CustomOp2 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u, w) = pair(gs, gl, us, ul, "swiglu-grad")?;
        let (storage, dyl) = self.dy.storage_and_layout();
        let candle_core::Storage::Cpu(dys) = &*storage else {
            candle_core::bail!("swiglu-grad: the gradient is not on the CPU");
        };
        same_shape(gl, dyl, "swiglu-grad")?;
        let (dy, _) = slice(dys, dyl, "swiglu-grad")?;
        let mut out = vec![0f32; g.len()];
        let part = self.part;
        out.par_chunks_mut(w)
            .zip(g.par_chunks(w).zip(u.par_chunks(w)).zip(dy.par_chunks(w)))
            .for_each(|(d, ((g, u), dy))| {
                for (((d, &g), &u), &dy) in d.iter_mut().zip(g).zip(u).zip(dy) {
                    let s = sigmoid(g);
                    *d = match part {
                        SwiGluPart::Up => dy * g * s,
                        SwiGluPart::Gate => dy * u * s * (1.0 + g * (1.0 - s)),
                    };
                }
            });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dimension.
pub(crate) fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax::plain())
}

/// Causal attention weights: `softmax(scale · x)` over the last dimension
/// of scores `(…, rows, keys)`, where row `r` is the query at key slot
/// `q = past + (r mod t)` and sees keys [`visible_keys`]`(q, window)`; the
/// others get weight 0.
pub(crate) fn causal_softmax(
    x: &Tensor,
    scale: f64,
    t: usize,
    past: usize,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax {
        scale: scale as f32,
        causal: Some((t, past, window)),
    })
}

/// The key slots `start..end` the query at slot `q` sees: every one up to
/// itself, or (sliding-window attention) the last `window` of them, as
/// transformers masks them (`q − window < j ≤ q`).
pub(crate) fn visible_keys(q: usize, window: Option<usize>) -> (usize, usize) {
    let end = q + 1;
    (window.map_or(0, |w| end.saturating_sub(w)), end)
}

struct Softmax {
    scale: f32,
    /// `(t, past, window)` for causal masking.
    causal: Option<(usize, usize, Option<usize>)>,
}

impl Softmax {
    fn plain() -> Softmax {
        Softmax {
            scale: 1.0,
            causal: None,
        }
    }

    /// The entries `start..end` row `row` sees (all, without masking).
    fn visible(&self, row: usize, width: usize) -> (usize, usize) {
        match self.causal {
            Some((t, past, window)) => {
                let (start, end) = visible_keys(past + row % t.max(1), window);
                (start.min(width), end.min(width))
            }
            None => (0, width),
        }
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = slice(storage, layout, "softmax")?;
        let scale = self.scale;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(w)
            .zip(x.par_chunks(w))
            .enumerate()
            .for_each(|(row, (y, x))| {
                let (start, end) = self.visible(row, w);
                let (y, x) = (&mut y[start..end], &x[start..end]);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale;
                let mut sum = 0.0;
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = (x * scale - max).exp();
                    sum += *y;
                }
                let inv = 1.0 / sum;
                y.iter_mut().for_each(|y| *y *= inv);
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `∂x = scale · y∘(∂y − Σ ∂y∘y)` (masked entries have `y = 0`).
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &dy.contiguous()?,
            &SoftmaxGrad(self.scale),
        )?))
    }
}

struct SoftmaxGrad(f32);

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map_row_pairs((ys, yl), (dys, dyl), "softmax-grad", |dx, y, dy| {
            let dot: f32 = y.iter().zip(dy).map(|(y, dy)| y * dy).sum();
            for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                *dx = self.0 * y * (dy - dot);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use crate::model::{rms_norm_composite, rope_composite, softmax_composite, swiglu_composite};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        // A fixed pseudo-random pattern; these tests need variety, not secrecy.
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| {
                let x = (i as u64)
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(seed);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Values and the gradient of `Σ f(x)·r` agree between the fused kernel
    /// and the primitives.
    fn agree(
        shape: &[usize],
        fused: impl Fn(&Tensor) -> Tensor,
        composite: impl Fn(&Tensor) -> Tensor,
    ) {
        let x = Var::from_tensor(&random(shape, 1)).unwrap();
        let r = random(shape, 2);
        let mut outs = Vec::new();
        for f in [&fused as &dyn Fn(&Tensor) -> Tensor, &composite] {
            let y = f(x.as_tensor());
            let loss = (&y * &r).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g = grads
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            outs.push((y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), g));
        }
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        assert!(max_diff(&outs[0].0, &outs[1].0) < 1e-5, "values differ");
        assert!(max_diff(&outs[0].1, &outs[1].1) < 1e-4, "gradients differ");
        assert!(outs[0].1.iter().any(|&g| g != 0.0));
    }

    #[test]
    fn fused_kernels_match_the_primitives_in_value_and_gradient() {
        let w = random(&[24], 3);
        agree(
            &[2, 5, 24],
            |x| super::rms_norm(x, &w, 1e-5).unwrap(),
            |x| rms_norm_composite(x, &w, 1e-5).unwrap(),
        );
        agree(
            &[2, 3, 7, 11],
            |x| super::softmax(x).unwrap(),
            |x| softmax_composite(x).unwrap(),
        );
        let cos = random(&[7, 4], 4).cos().unwrap();
        let sin = random(&[7, 4], 4).sin().unwrap();
        agree(
            &[2, 3, 7, 8],
            |x| super::rope(x, &cos, &sin).unwrap(),
            |x| rope_composite(x, &cos, &sin).unwrap(),
        );
        // Causal, scaled: rows are (query head, position) pairs with t = 4
        // positions after 3 earlier keys.
        // Then within a sliding window of 5 keys, which hides the earliest
        // keys from the later queries.
        let (t, past) = (4usize, 3usize);
        let width = past + t;
        for window in [None, Some(5)] {
            let mut mask = vec![0f32; 2 * t * width];
            for r in 0..2 * t {
                let q = past + r % t;
                for j in 0..width {
                    if j > q || window.is_some_and(|w| j + w <= q) {
                        mask[r * width + j] = f32::NEG_INFINITY;
                    }
                }
            }
            if window.is_some() {
                assert!(
                    mask[(t - 1) * width].is_infinite(),
                    "the window hides something"
                );
            }
            let mask = Tensor::from_vec(mask, (2 * t, width), &Device::Cpu).unwrap();
            agree(
                &[3, 2 * t, width],
                |x| super::causal_softmax(x, 0.5, t, past, window).unwrap(),
                |x| softmax_composite(&(x * 0.5).unwrap().broadcast_add(&mask).unwrap()).unwrap(),
            );
        }
        let up = random(&[6, 10], 5);
        agree(
            &[6, 10],
            |g| super::swiglu(g, &up).unwrap(),
            |g| swiglu_composite(g, &up).unwrap(),
        );
        let gate = random(&[6, 10], 6);
        agree(
            &[6, 10],
            |u| super::swiglu(&gate, u).unwrap(),
            |u| swiglu_composite(&gate, u).unwrap(),
        );
    }

    #[test]
    fn the_fused_cross_entropy_matches_the_primitives() {
        let logits = Var::from_tensor(&random(&[5, 13], 7)).unwrap();
        let targets = [3u32, 0, 12, 7, 7];
        let weights = [1.0f32, 0.0, 1.0, 1.0, 0.5];
        let fused = crate::loss::weighted_nll(logits.as_tensor(), &targets, &weights)
            .unwrap()
            .sum_all()
            .unwrap();
        let x = logits.as_tensor();
        let lse = x.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
        let t = Tensor::new(&targets, &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let picked = x.gather(&t, 1).unwrap();
        let w = Tensor::new(&weights, &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let composite = ((lse - picked).unwrap() * w).unwrap().sum_all().unwrap();
        let a = fused.to_scalar::<f32>().unwrap();
        let b = composite.to_scalar::<f32>().unwrap();
        assert!((a - b).abs() < 1e-4, "{a} against {b}");
        let ga = fused
            .backward()
            .unwrap()
            .get(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gb = composite
            .backward()
            .unwrap()
            .get(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(ga.iter().zip(&gb).all(|(a, b)| (a - b).abs() < 1e-5));
        // An out-of-vocabulary target is an error, not a panic.
        assert!(crate::loss::weighted_nll(x, &[13, 0, 0, 0, 0], &weights).is_err());
    }
}
