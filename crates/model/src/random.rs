//! Random draws for initialisation and dropout, from a caller's CSPRNG.

use rand_core::RngCore;

/// A uniform draw in `[0, 1)` with 53 random bits.
pub(crate) fn unit(rng: &mut dyn RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `n` draws from `N(0, std²)` (Box–Muller).
pub(crate) fn normal_vec(rng: &mut dyn RngCore, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 − u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - unit(rng);
        let u2 = unit(rng);
        let radius = (-2.0 * u1.ln()).sqrt() * std;
        let angle = std::f64::consts::TAU * u2;
        out.push((radius * angle.cos()) as f32);
        out.push((radius * angle.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// `n` draws from `U(−bound, bound)`.
pub(crate) fn uniform_vec(rng: &mut dyn RngCore, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((2.0 * unit(rng) - 1.0) * bound) as f32)
        .collect()
}

/// An inverted-dropout mask of `n` values: 0 with probability `p`, else
/// `1 / (1 − p)`.
pub(crate) fn dropout_mask(rng: &mut dyn RngCore, n: usize, p: f32) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    // Drop when a 32-bit draw falls below p · 2³².
    let threshold = (f64::from(p) * 4_294_967_296.0) as u64;
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let bits = rng.next_u64();
        for half in [bits & 0xffff_ffff, bits >> 32] {
            out.push(if half < threshold { 0.0 } else { keep });
        }
    }
    out.truncate(n);
    out
}

/// An inverted-dropout mask of `shape` drawn on `device` itself, in
/// `dtype`: 0 with probability `p`, else `1 / (1 − p)`. A GPU draws it
/// with its own generator (curand), which the model seeds from the pass's
/// generator (`Llama::seed_device_dropout`); a host-drawn mask would cross
/// the bus for every adapted projection of every layer, batch × tokens ×
/// width values each time. The CPU uses [`dropout_mask`].
pub(crate) fn device_dropout_mask(
    device: &candle_core::Device,
    shape: &candle_core::Shape,
    p: f32,
    dtype: candle_core::DType,
) -> candle_core::Result<candle_core::Tensor> {
    let u = candle_core::Tensor::rand(0f32, 1f32, shape, device)?;
    let keep = u.ge(f64::from(p))?.to_dtype(candle_core::DType::F32)?;
    (keep * (1.0 / (1.0 - f64::from(p))))?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn draws_have_the_right_moments() {
        let mut rng = ChaCha20Rng::from_seed([7; 32]);
        let n = 200_000;
        let x = normal_vec(&mut rng, n, 0.5);
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 0.25).abs() < 0.01, "{var}");
        let mask = dropout_mask(&mut rng, n, 0.25);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        let mean = mask.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        let u = uniform_vec(&mut rng, n, 2.0);
        assert!(u.iter().all(|v| v.abs() <= 2.0));
    }

    /// The device-drawn mask has the host mask's law (drawn here on the
    /// CPU; on a GPU by curand).
    #[test]
    fn a_device_drawn_dropout_mask_drops_p_and_keeps_the_mean() {
        use candle_core::{DType, Device, Shape};
        let shape = Shape::from((4, 100, 500));
        let n = shape.elem_count() as f64;
        let mask = device_dropout_mask(&Device::Cpu, &shape, 0.25, DType::F32).unwrap();
        assert_eq!(mask.shape(), &shape);
        let values: Vec<f32> = mask.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            values
                .iter()
                .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6)
        );
        let dropped = values.iter().filter(|&&m| m == 0.0).count() as f64 / n;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        let half = device_dropout_mask(&Device::Cpu, &shape, 0.25, DType::BF16).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
    }
}
