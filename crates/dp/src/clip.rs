//! Client-level clipping (protocols/dp.md §2).

use serde::{Deserialize, Serialize};

use crate::DpError;

/// The L2 norm.
pub fn l2_norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Scales `x` down to L2 norm at most `clip`; returns the norm before.
pub fn clip_l2(x: &mut [f64], clip: f64) -> f64 {
    let norm = l2_norm(x);
    if norm > clip {
        let k = clip / norm;
        x.iter_mut().for_each(|v| *v *= k);
    }
    norm
}

/// Adaptive clipping by the geometric quantile update of Andrew, Thakkar,
/// McMahan & Ramaswamy (2021): after each round the clip norm moves towards
/// the `target_quantile` of the clients' update norms,
///
/// ```text
/// C ← C · exp(-η (b̃ - γ)),
/// ```
///
/// where `b̃` is the noised fraction of clients whose norm was at most `C`.
/// Each client contributes the bit `1[‖Δ‖ ≤ C]`; their sum gets Gaussian
/// noise of multiplier `σ_b` (sensitivity 1/2 after centring the bits), and
/// the update noise is raised so that the pair costs exactly what one
/// Gaussian mechanism of multiplier `z` would ([`update_noise_multiplier`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClip {
    /// The current clip norm `C`.
    pub clip: f64,
    /// The quantile `γ` of update norms the clip norm tracks.
    pub target_quantile: f64,
    /// The learning rate `η`.
    pub learning_rate: f64,
    /// The noise multiplier `σ_b` of the clipped-count estimate.
    pub count_noise_multiplier: f64,
}

impl AdaptiveClip {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), DpError> {
        if !(self.clip > 0.0 && self.clip.is_finite()) {
            return Err(DpError::BadClip(self.clip));
        }
        if !(self.target_quantile > 0.0 && self.target_quantile < 1.0) {
            return Err(DpError::BadQuantile(self.target_quantile));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(DpError::Internal("learning rate must be positive"));
        }
        if !(self.count_noise_multiplier > 0.0 && self.count_noise_multiplier.is_finite()) {
            return Err(DpError::BadNoiseMultiplier(self.count_noise_multiplier));
        }
        Ok(())
    }

    /// Moves the clip norm given the noised fraction of clients whose update
    /// norm was within it.
    pub fn update(&mut self, noised_fraction: f64) {
        let b = noised_fraction.clamp(0.0, 1.0);
        self.clip *= (-self.learning_rate * (b - self.target_quantile)).exp();
    }

    /// The bit a client contributes to the count.
    pub fn bit(&self, norm: f64) -> f64 {
        if norm <= self.clip { 1.0 } else { 0.0 }
    }
}

/// The update noise multiplier `z_Δ` that, together with count noise of
/// multiplier `σ_b`, costs the same as one Gaussian mechanism of multiplier
/// `z`: `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)` (Andrew et al. 2021).
/// Requires `2σ_b > z`.
pub fn update_noise_multiplier(z: f64, count_noise_multiplier: f64) -> Result<f64, DpError> {
    if !(z > 0.0 && z.is_finite()) {
        return Err(DpError::BadNoiseMultiplier(z));
    }
    let inv = z.powi(-2) - (2.0 * count_noise_multiplier).powi(-2);
    if inv.is_nan() || inv <= 0.0 {
        return Err(DpError::CountNoiseTooSmall {
            noise_multiplier: z,
            count_noise_multiplier,
        });
    }
    Ok(inv.powf(-0.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_bounds_the_norm_and_keeps_short_vectors() {
        let mut x = vec![3.0, 4.0];
        assert_eq!(clip_l2(&mut x, 1.0), 5.0);
        assert!((l2_norm(&x) - 1.0).abs() < 1e-15);
        let mut y = vec![0.3, 0.4];
        clip_l2(&mut y, 1.0);
        assert_eq!(y, vec![0.3, 0.4]);
    }

    #[test]
    fn adaptive_clip_converges_to_the_quantile() {
        // Norms uniform in [0, 10]; the median is 5.
        let norms: Vec<f64> = (0..1000).map(|i| f64::from(i) / 100.0).collect();
        let mut a = AdaptiveClip {
            clip: 0.1,
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise_multiplier: 10.0,
        };
        a.validate().unwrap();
        for _ in 0..300 {
            let b = norms.iter().map(|&n| a.bit(n)).sum::<f64>() / norms.len() as f64;
            a.update(b);
        }
        assert!((a.clip - 5.0).abs() < 0.3, "{}", a.clip);
    }

    #[test]
    fn the_count_takes_its_share_of_the_noise() {
        let z = 1.0;
        let zd = update_noise_multiplier(z, 5.0).unwrap();
        assert!(zd > z);
        // The two together compose to z exactly.
        let combined = (zd.powi(-2) + 10.0f64.powi(-2)).powf(-0.5);
        assert!((combined - z).abs() < 1e-12);
        assert!(matches!(
            update_noise_multiplier(1.0, 0.4),
            Err(DpError::CountNoiseTooSmall { .. })
        ));
    }
}
