//! Noise placements and the distributed discrete Gaussian (protocols/dp.md §3).
//!
//! A client turns its update into a vector of `Z_{2^b}` for secure
//! aggregation:
//!
//! 1. clip to L2 norm `c`;
//! 2. rotate with the per-round randomized Hadamard transform (§3.2);
//! 3. scale by `1/γ` (`γ` is the granularity of the integer grid);
//! 4. round each coordinate stochastically, retrying until the rounded
//!    vector's norm is at most `Δ₂` (conditional randomized rounding, §3.3);
//! 5. add discrete Gaussian noise (§3.4), where the placement says;
//! 6. reduce mod `2^b`.
//!
//! The server lifts the ring sum to signed integers, adds noise if the
//! placement is central, scales by `γ` and inverts the rotation. The result
//! is the sum of the survivors' clipped updates plus noise.
//!
//! Placements (`z` is the noise multiplier, so the aggregate noise standard
//! deviation is `z c` in the update's units):
//! - `central`: the server adds `N_Z(0, (zc/γ)²)` after unmasking; it is
//!   trusted with the noise;
//! - `distributed`: each client adds `N_Z(0, (zc/γ)² / n_min)`, so that any
//!   `n ≥ n_min` survivors together add at least the full noise (Kairouz,
//!   Liu & Steinke 2021);
//! - `local`: each client adds the full `N_Z(0, (zc/γ)²)`, so each message
//!   is private on its own.

use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::DpError;
use crate::rotation::RandomRotation;
use crate::sampler::DiscreteGaussian;

/// Where the noise is added.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    Central,
    Distributed,
    Local,
}

impl Placement {
    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Placement::Central => "central",
            Placement::Distributed => "distributed",
            Placement::Local => "local",
        }
    }
}

/// How many tries conditional rounding gets before it gives up. Each try
/// succeeds with probability at least `1 - β`.
const MAX_ROUNDING_TRIES: u32 = 1000;

/// The parameters of one round's noise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseConfig {
    pub placement: Placement,
    /// Length of the flattened update.
    pub dim: usize,
    /// L2 clip norm `c`, in the update's units.
    pub clip: f64,
    /// Noise multiplier `z`: aggregate noise standard deviation over `c`.
    pub noise_multiplier: f64,
    /// Granularity `γ` of the integer grid, in the update's units.
    pub granularity: f64,
    /// Conditional rounding parameter `β ∈ [0, 1)`: a rounding is retried
    /// with probability at most `β`.
    pub beta: f64,
    /// Ring width `b` of secure aggregation.
    pub bits: u8,
    /// The fewest survivors a round may have (`n_min`).
    pub min_survivors: u32,
}

impl NoiseConfig {
    /// Checks every parameter, naming the first that is out of range.
    pub fn validate(&self) -> Result<(), DpError> {
        if self.dim == 0 || self.dim > crate::rotation::MAX_PADDED_DIM {
            return Err(DpError::BadDimension(self.dim));
        }
        if !(self.clip > 0.0 && self.clip.is_finite()) {
            return Err(DpError::BadClip(self.clip));
        }
        if !(self.noise_multiplier > 0.0 && self.noise_multiplier.is_finite()) {
            return Err(DpError::BadNoiseMultiplier(self.noise_multiplier));
        }
        if !(self.granularity > 0.0 && self.granularity.is_finite()) {
            return Err(DpError::BadGranularity(self.granularity));
        }
        if !(0.0..1.0).contains(&self.beta) {
            return Err(DpError::BadBeta(self.beta));
        }
        if !(2..=32).contains(&self.bits) {
            return Err(DpError::BadBits(self.bits));
        }
        if self.min_survivors == 0 {
            return Err(DpError::BadMinSurvivors);
        }
        let sigma = self.aggregate_sigma();
        let per_client = match self.placement {
            Placement::Distributed => sigma / f64::from(self.min_survivors).sqrt(),
            _ => sigma,
        };
        if per_client > crate::sampler::MAX_SIGMA {
            return Err(DpError::GranularityTooFine(self.granularity));
        }
        Ok(())
    }

    /// The padded (rotated) dimension `m`.
    pub fn padded_dim(&self) -> usize {
        self.dim.max(1).next_power_of_two()
    }

    /// The clip norm on the integer grid, `c/γ`.
    fn scaled_clip(&self) -> f64 {
        self.clip / self.granularity
    }

    /// The aggregate noise standard deviation on the integer grid, `zc/γ`.
    pub fn aggregate_sigma(&self) -> f64 {
        self.noise_multiplier * self.scaled_clip()
    }

    /// The L2 bound `Δ₂` on a client's rounded vector (integer units):
    /// `min(c' + √m, √(c'² + m/4 + √(2 ln(1/β)) (c' + √m/2)))`, `c' = c/γ`
    /// (Kairouz, Liu & Steinke 2021).
    pub fn l2_sensitivity(&self) -> f64 {
        let c = self.scaled_clip();
        let m = self.padded_dim() as f64;
        let b1 = c + m.sqrt();
        if self.beta == 0.0 {
            return b1;
        }
        let b2 =
            (c * c + m / 4.0 + (2.0 * (1.0 / self.beta).ln()).sqrt() * (c + m.sqrt() / 2.0)).sqrt();
        b1.min(b2)
    }

    /// The L1 bound on a client's rounded vector: `Δ₂ min(√m, Δ₂)`
    /// (integer coordinates have `|z_i| ≤ z_i²`).
    pub fn l1_sensitivity(&self) -> f64 {
        let d2 = self.l2_sensitivity();
        d2 * (self.padded_dim() as f64).sqrt().min(d2)
    }

    /// The standard deviation each client adds (integer units), if any.
    pub fn client_sigma(&self) -> Option<f64> {
        match self.placement {
            Placement::Central => None,
            Placement::Distributed => {
                Some(self.aggregate_sigma() / f64::from(self.min_survivors).sqrt())
            }
            Placement::Local => Some(self.aggregate_sigma()),
        }
    }

    /// The standard deviation the server adds (integer units), if any.
    pub fn server_sigma(&self) -> Option<f64> {
        match self.placement {
            Placement::Central => Some(self.aggregate_sigma()),
            _ => None,
        }
    }

    /// An upper bound on the probability that any coordinate of the sum of
    /// `n` clients' vectors leaves the signed range of `Z_{2^b}` (which
    /// would corrupt the decoded sum; it never affects privacy, §3.5). Each
    /// coordinate is sub-Gaussian with variance proxy
    /// `n² c'²/m + n/4 + (noise variance)`; a union bound over `m`
    /// coordinates.
    pub fn overflow_probability(&self, n: u32) -> f64 {
        let n = f64::from(n);
        let m = self.padded_dim() as f64;
        let c = self.scaled_clip();
        let noise = match self.placement {
            Placement::Central => self.aggregate_sigma().powi(2),
            Placement::Distributed => n * self.client_sigma().unwrap_or(0.0).powi(2),
            Placement::Local => n * self.aggregate_sigma().powi(2),
        };
        let v = n * n * c * c / m + n / 4.0 + noise;
        let half = (f64::from(self.bits) - 1.0).exp2();
        (2.0 * m * (-half * half / (2.0 * v)).exp()).min(1.0)
    }

    /// The finest granularity `γ` (the smallest, so the most precise) at
    /// which `n` clients' sum stays within `k` standard deviations of the
    /// ring's signed range: `2^(b-1) ≥ k √v(γ)`. Any coarser `γ` is safer.
    pub fn finest_safe_granularity(&self, n: u32, k: f64) -> Result<f64, DpError> {
        let n = f64::from(n);
        let m = self.padded_dim() as f64;
        let zc2 = (self.noise_multiplier * self.clip).powi(2);
        let noise_scale = match self.placement {
            Placement::Central => 1.0,
            Placement::Distributed => n / f64::from(self.min_survivors),
            Placement::Local => n,
        };
        // v(γ) = (n² c²/m + noise_scale z² c²) / γ² + n/4
        let top = n * n * self.clip * self.clip / m + noise_scale * zc2;
        let room = ((f64::from(self.bits) - 1.0).exp2() / k).powi(2) - n / 4.0;
        if room.is_nan() || room <= 0.0 {
            return Err(DpError::BadBits(self.bits));
        }
        Ok((top / room).sqrt())
    }
}

impl NoiseConfig {
    /// The granularity to use when none is configured: the finest at which
    /// `n` clients' sum keeps `k` standard deviations of headroom in the
    /// ring ([`NoiseConfig::finest_safe_granularity`]), coarsened if needed
    /// so that every noise standard deviation on the integer grid stays
    /// within the exact sampler's range (a quarter of its maximum).
    pub fn default_granularity(&self, n: u32, k: f64) -> Result<f64, DpError> {
        let safe = self.finest_safe_granularity(n, k)?;
        let zc = self.noise_multiplier * self.clip;
        let per_client = match self.placement {
            Placement::Distributed => zc / f64::from(self.min_survivors.max(1)).sqrt(),
            Placement::Central | Placement::Local => zc,
        };
        Ok(safe.max(4.0 * per_client / crate::sampler::MAX_SIGMA))
    }
}

/// A client's privatised update, ready for secure aggregation. Its ring
/// vector is the client's input to secure aggregation, secret until it is
/// masked: it is wiped on drop and `Debug` shows only its length.
#[derive(Clone, PartialEq)]
pub struct Privatized {
    /// The ring vector, length `m`, elements in `Z_{2^b}`.
    pub ring: Vec<u32>,
    /// The update's L2 norm before clipping.
    pub norm: f64,
    /// How many roundings were tried.
    pub rounding_tries: u32,
}

impl Privatized {
    /// The ring vector, handed over (the caller then owns the secret).
    pub fn into_ring(mut self) -> Vec<u32> {
        std::mem::take(&mut self.ring)
    }
}

impl Drop for Privatized {
    fn drop(&mut self) {
        self.ring.zeroize();
        self.norm.zeroize();
    }
}

impl std::fmt::Debug for Privatized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Privatized")
            .field(
                "ring",
                &format_args!("[{} elements, redacted]", self.ring.len()),
            )
            .field("rounding_tries", &self.rounding_tries)
            .finish_non_exhaustive()
    }
}

/// The client side of a round.
#[derive(Clone, Debug)]
pub struct ClientPrivatizer {
    config: NoiseConfig,
    rotation: RandomRotation,
    noise: Option<DiscreteGaussian>,
    /// `⌊Δ₂²⌋` with a safety margin: a rounded vector is accepted iff the sum
    /// of its squares is at most this.
    max_square_norm: u128,
}

impl ClientPrivatizer {
    /// The privatiser for `config` with the round's public rotation seed.
    pub fn new(config: NoiseConfig, round_seed: [u8; 32]) -> Result<Self, DpError> {
        config.validate()?;
        let rotation = RandomRotation::new(config.dim, round_seed)?;
        let noise = config
            .client_sigma()
            .map(DiscreteGaussian::new)
            .transpose()?;
        let d2 = config.l2_sensitivity();
        // Integer sums of squares at most ⌊Δ₂²(1 - 1e-12)⌋ have norm ≤ Δ₂.
        let max_square_norm = (d2 * d2 * (1.0 - 1e-12)).floor() as u128;
        Ok(ClientPrivatizer {
            config,
            rotation,
            noise,
            max_square_norm,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NoiseConfig {
        &self.config
    }

    /// Clips, rotates, scales, rounds, noises and wraps `update`.
    pub fn privatize<R: RngCore + CryptoRng + ?Sized>(
        &self,
        update: &[f32],
        rng: &mut R,
    ) -> Result<Privatized, DpError> {
        let cfg = &self.config;
        if update.len() != cfg.dim {
            return Err(DpError::LengthMismatch {
                expected: cfg.dim,
                got: update.len(),
            });
        }
        if let Some(index) = update.iter().position(|v| !v.is_finite()) {
            return Err(DpError::NotFinite { index });
        }
        // Clip, rotate and scale to the grid in one vector: the rotation is
        // linear, so scaling by min(1, c/‖x‖)/γ after it is the same.
        let norm = update
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        let clip_scale = if norm > cfg.clip {
            cfg.clip / norm
        } else {
            1.0
        };
        // Every intermediate holds the update in some form: each is wiped
        // when dropped, on the error paths too.
        let y = Zeroizing::new(
            self.rotation
                .forward_scaled(update, clip_scale / cfg.granularity)?,
        );
        let (z, rounding_tries) = self.conditional_round(&y, rng)?;
        let mut z = Zeroizing::new(z);
        drop(y);
        if let Some(noise) = &self.noise {
            noise.add_to(rng, &mut z)?;
        }
        let mask = if cfg.bits == 32 {
            u64::from(u32::MAX)
        } else {
            (1u64 << cfg.bits) - 1
        };
        let ring = z.iter().map(|&v| (v as u64 & mask) as u32).collect();
        Ok(Privatized {
            ring,
            norm,
            rounding_tries,
        })
    }

    /// Unbiased stochastic rounding, retried until the L2 norm is at most
    /// `Δ₂` (checked exactly on the integers).
    fn conditional_round<R: RngCore + CryptoRng + ?Sized>(
        &self,
        y: &[f64],
        rng: &mut R,
    ) -> Result<(Vec<i64>, u32), DpError> {
        let mut z = Zeroizing::new(vec![0i64; y.len()]);
        for tries in 1..=MAX_ROUNDING_TRIES {
            let mut sq: u128 = 0;
            for (o, &v) in z.iter_mut().zip(y) {
                let f = floor_i64(v);
                let coin = crate::sampler::uniform_unit(rng);
                let r = f + i64::from(coin < v - f as f64);
                *o = r;
                sq = sq.saturating_add(u128::from(r.unsigned_abs()) * u128::from(r.unsigned_abs()));
            }
            if sq <= self.max_square_norm {
                return Ok((std::mem::take(&mut *z), tries));
            }
        }
        Err(DpError::RoundingFailed {
            tries: MAX_ROUNDING_TRIES,
        })
    }
}

/// `⌊v⌋` as an integer, without the library call that the baseline x86-64
/// target makes of `f64::floor` and without a branch (the sign of a rotated
/// coordinate is a coin toss, so a branch on it would be mispredicted half
/// the time): truncate, then step down where truncation went up. Exact for
/// `|v| < 2^63`, and saturating beyond, as `v.floor() as i64` does.
#[inline]
fn floor_i64(v: f64) -> i64 {
    let t = v as i64;
    t.saturating_sub(i64::from((t as f64) > v))
}

/// The server side of a round.
#[derive(Clone, Debug)]
pub struct ServerDecoder {
    config: NoiseConfig,
    rotation: RandomRotation,
    noise: Option<DiscreteGaussian>,
}

impl ServerDecoder {
    /// The decoder for `config` with the round's public rotation seed.
    pub fn new(config: NoiseConfig, round_seed: [u8; 32]) -> Result<Self, DpError> {
        config.validate()?;
        let rotation = RandomRotation::new(config.dim, round_seed)?;
        let noise = config
            .server_sigma()
            .map(DiscreteGaussian::new)
            .transpose()?;
        Ok(ServerDecoder {
            config,
            rotation,
            noise,
        })
    }

    /// Turns the ring sum of the survivors' vectors into the noisy sum of
    /// their clipped updates (length `dim`). Adds the noise first when the
    /// placement is central.
    pub fn decode<R: RngCore + CryptoRng + ?Sized>(
        &self,
        sum: &[u32],
        rng: &mut R,
    ) -> Result<Vec<f64>, DpError> {
        let cfg = &self.config;
        let m = self.rotation.padded_dim();
        if sum.len() != m {
            return Err(DpError::LengthMismatch {
                expected: m,
                got: sum.len(),
            });
        }
        let bits = u32::from(cfg.bits);
        let modulus = 1i64 << bits;
        let half = 1i64 << (bits - 1);
        let mut noise = vec![0i64; m];
        if let Some(g) = &self.noise {
            g.fill(rng, &mut noise)?;
        }
        let y: Vec<f64> = sum
            .iter()
            .zip(&noise)
            .map(|(&s, &e)| {
                let v = (i64::from(s) + e).rem_euclid(modulus);
                let signed = if v >= half { v - modulus } else { v };
                signed as f64 * cfg.granularity
            })
            .collect();
        self.rotation.inverse(&y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::clip_l2;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn config(placement: Placement) -> NoiseConfig {
        NoiseConfig {
            placement,
            dim: 100,
            clip: 1.0,
            noise_multiplier: 1.0,
            granularity: 1e-3,
            beta: (-0.5f64).exp(),
            bits: 32,
            min_survivors: 10,
        }
    }

    #[test]
    fn floor_i64_matches_the_library() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let mut values = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.0,
            -1.0,
            2.999_999_999_999_999_6,
            -3.000_000_000_000_000_4,
            4503599627370495.5,
            -4503599627370495.5,
            4503599627370496.0,
            -4503599627370497.0,
            1e300,
            -1e300,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
        ];
        for _ in 0..10_000 {
            let scale = 2f64.powi((rng.next_u32() % 120) as i32 - 60);
            values.push((rng.next_u64() as i64) as f64 / i64::MAX as f64 * scale);
        }
        for v in values {
            assert_eq!(floor_i64(v), v.floor() as i64, "{v}");
        }
    }

    #[test]
    fn rounded_vectors_respect_the_sensitivity() {
        let cfg = config(Placement::Central);
        let p = ClientPrivatizer::new(cfg.clone(), [1; 32]).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let x: Vec<f32> = (0..100).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        for _ in 0..50 {
            let out = p.privatize(&x, &mut rng).unwrap();
            assert!(out.norm > 1.0);
            let lifted: Vec<f64> = out.ring.iter().map(|&v| f64::from(v as i32)).collect();
            let n = lifted.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!(n <= cfg.l2_sensitivity(), "{n} > {}", cfg.l2_sensitivity());
        }
    }

    #[test]
    fn without_noise_the_decoded_sum_is_the_clipped_sum() {
        // Central placement, decoded without adding noise: only rounding error.
        let cfg = config(Placement::Central);
        let p = ClientPrivatizer::new(cfg.clone(), [2; 32]).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let xs: Vec<Vec<f32>> = (0..5)
            .map(|c| {
                (0..100)
                    .map(|i| ((c * 100 + i) as f32 * 0.13).cos() * 0.05)
                    .collect()
            })
            .collect();
        let mut sum = vec![0u32; cfg.padded_dim()];
        for x in &xs {
            let out = p.privatize(x, &mut rng).unwrap();
            for (s, v) in sum.iter_mut().zip(&out.ring) {
                *s = s.wrapping_add(*v);
            }
        }
        let decoder = ServerDecoder {
            config: cfg.clone(),
            rotation: RandomRotation::new(100, [2; 32]).unwrap(),
            noise: None,
        };
        let got = decoder.decode(&sum, &mut rng).unwrap();
        for i in 0..100 {
            let mut clipped = 0.0;
            for x in &xs {
                let mut v: Vec<f64> = x.iter().map(|&a| f64::from(a)).collect();
                clip_l2(&mut v, 1.0);
                clipped += v[i];
            }
            // Rounding error: at most γ per client per rotated coordinate,
            // spread back by the orthogonal inverse.
            assert!(
                (got[i] - clipped).abs() < 5.0 * cfg.granularity * 5f64.sqrt(),
                "{i}"
            );
        }
    }

    #[test]
    fn bad_configurations_name_the_parameter() {
        let mut c = config(Placement::Distributed);
        c.beta = 1.0;
        assert_eq!(c.validate(), Err(DpError::BadBeta(1.0)));
        let mut c = config(Placement::Distributed);
        c.bits = 40;
        assert_eq!(c.validate(), Err(DpError::BadBits(40)));
        let mut c = config(Placement::Distributed);
        c.min_survivors = 0;
        assert_eq!(c.validate(), Err(DpError::BadMinSurvivors));
        let mut c = config(Placement::Central);
        c.granularity = 1e-12;
        assert!(matches!(c.validate(), Err(DpError::GranularityTooFine(_))));
        let p = ClientPrivatizer::new(config(Placement::Local), [0; 32]).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        assert!(matches!(
            p.privatize(&[0.0; 99], &mut rng),
            Err(DpError::LengthMismatch { .. })
        ));
        let mut bad = vec![0.0f32; 100];
        bad[7] = f32::NAN;
        assert_eq!(
            p.privatize(&bad, &mut rng),
            Err(DpError::NotFinite { index: 7 })
        );
    }

    #[test]
    fn the_granularity_helper_keeps_overflow_negligible() {
        let mut c = config(Placement::Distributed);
        c.bits = 20;
        let g = c.finest_safe_granularity(100, 6.0).unwrap();
        c.granularity = g;
        assert!(
            c.overflow_probability(100) < 1e-3,
            "{}",
            c.overflow_probability(100)
        );
        c.granularity = g / 100.0;
        assert!(c.overflow_probability(100) > 0.5);
    }
}
