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
}
