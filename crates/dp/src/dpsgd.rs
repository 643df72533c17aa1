//! Record-level DP-SGD noise, exact (protocols/dp.md §8).
//!
//! One step of DP-SGD (Abadi et al. 2016) releases `Σ_i clip_C(g_i) + N(0,
//! σ²C²)` over the examples `i` that Poisson sampling put in the step.
//! Drawn in floating point, that noise leaks through its rounding (Mironov,
//! CCS 2012): the set of doubles a sum can land on depends on the sum. Here
//! nothing of the kind is released:
//!
//! 1. each example's gradient is clipped to `⌊C/γ⌋γ ≤ C` and rounded
//!    *toward zero* onto the grid `γℤ^d`, so that its integer vector `k_i`
//!    has `‖k_i‖₂ ≤ ⌊C/γ⌋`, hence `‖γ k_i‖₂ ≤ C`. That bound is then
//!    checked exactly in integer arithmetic (`Σ k_ij² ≤ ⌊C/γ⌋²`), so
//!    floating-point error in the norm or the scaling can never raise the
//!    sensitivity above `C`;
//! 2. the integer vectors are summed exactly (`i64`);
//! 3. every coordinate gets an independent exact discrete Gaussian sample
//!    `N_Z(0, (σC/γ)²)` ([`crate::sampler::DiscreteGaussian`], CKS20) drawn
//!    from the caller's CSPRNG;
//! 4. the release is `γ · (Σ k_i + noise)`: an integer times the grid, the
//!    same set of values whatever the data.
//!
//! The grid is chosen so that the noise is `2^18` grid units wide
//! (`γ = σC / 2^18`): rounding toward zero moves a clipped gradient by at
//! most `γ√d` in L2, `2^-18 · √d ≈ 0.0024` of the noise's per-coordinate
//! standard deviation at `d = 4·10^5`, and shrinks it (never grows it).
//!
//! The privacy accounting is that of the Poisson-subsampled Gaussian with
//! noise multiplier `σ` and sensitivity `C` ([`crate::SubsampledGaussian`]);
//! protocols/dp.md §8.3 gives the argument that the discrete mechanism is
//! no worse.

use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroize;

use crate::DpError;
use crate::sampler::DiscreteGaussian;

/// The noise's standard deviation in grid units (`σC/γ`).
pub const NOISE_GRID_UNITS: f64 = (1u64 << 18) as f64;

/// The largest clip-to-noise ratio `1/σ` the grid supports: `C/γ` must
/// stay far below `2^62 / d` for the exact sum.
const MAX_CLIP_UNITS: f64 = (1u64 << 40) as f64;

/// One step's Poisson sample of `n` records: each included independently
/// with probability `q` (exactly `⌊q·2^64⌋ / 2^64`, a 64-bit draw below it;
/// `q = 1` includes all). `rng` must be a CSPRNG: the amplification by
/// sampling assumes nobody learns which records a step used.
pub fn poisson_sample<R: RngCore + CryptoRng + ?Sized>(
    rng: &mut R,
    n: usize,
    q: f64,
) -> Result<Vec<usize>, DpError> {
    if !(q > 0.0 && q <= 1.0) {
        return Err(DpError::BadSamplingRate(q));
    }
    if q == 1.0 {
        return Ok((0..n).collect());
    }
    let threshold = (q * 18_446_744_073_709_551_616.0) as u64;
    Ok((0..n).filter(|_| rng.next_u64() < threshold).collect())
}

/// The exact Gaussian mechanism of one DP-SGD step: clip norm `C`, noise
/// multiplier `σ`, on the grid `γ = σC / 2^18`.
#[derive(Clone, Debug)]
pub struct GridGaussian {
    clip: f64,
    noise_multiplier: f64,
    grid: f64,
    /// `⌊C/γ⌋`: the largest norm of a rounded example, in grid units.
    limit: f64,
    /// `⌊C/γ⌋²`, exactly.
    limit_sq: u128,
    sampler: DiscreteGaussian,
}

impl GridGaussian {
    /// The mechanism for clip norm `clip` and noise multiplier
    /// `noise_multiplier` (the noise's standard deviation over `clip`).
    pub fn new(clip: f64, noise_multiplier: f64) -> Result<GridGaussian, DpError> {
        if !(clip > 0.0 && clip.is_finite()) {
            return Err(DpError::BadClip(clip));
        }
        if !(noise_multiplier > 0.0 && noise_multiplier.is_finite()) {
            return Err(DpError::BadNoiseMultiplier(noise_multiplier));
        }
        let grid = noise_multiplier * clip / NOISE_GRID_UNITS;
        let clip_units = (clip / grid).floor();
        if !(grid > 0.0 && grid.is_finite() && (1.0..=MAX_CLIP_UNITS).contains(&clip_units)) {
            return Err(DpError::BadNoiseMultiplier(noise_multiplier));
        }
        let limit = clip_units as u128;
        Ok(GridGaussian {
            clip,
            noise_multiplier,
            grid,
            limit: clip_units,
            limit_sq: limit * limit,
            sampler: DiscreteGaussian::new(NOISE_GRID_UNITS)?,
        })
    }

    pub fn clip(&self) -> f64 {
        self.clip
    }

    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// The grid `γ` every released value is an integer multiple of.
    pub fn grid(&self) -> f64 {
        self.grid
    }

    /// An empty sum of `dim`-dimensional gradients.
    pub fn sum(&self, dim: usize) -> GridSum {
        GridSum {
            values: vec![0; dim],
            examples: 0,
        }
    }

    /// Adds one example's gradient to `sum`: scaled to L2 norm at most
    /// `⌊C/γ⌋γ ≤ C` and rounded toward zero onto the grid, its bound
    /// checked exactly.
    /// Returns the gradient's norm before clipping.
    pub fn add_example(&self, sum: &mut GridSum, gradient: &[f32]) -> Result<f64, DpError> {
        if gradient.len() != sum.values.len() {
            return Err(DpError::LengthMismatch {
                expected: sum.values.len(),
                got: gradient.len(),
            });
        }
        let mut norm_sq = 0.0f64;
        for (index, &g) in gradient.iter().enumerate() {
            if !g.is_finite() {
                return Err(DpError::NotFinite { index });
            }
            norm_sq += f64::from(g) * f64::from(g);
        }
        let norm = norm_sq.sqrt();
        // Grid units per gradient unit, after clipping to `⌊C/γ⌋` grid units
        // (`⌊C/γ⌋γ ≤ C`): the bound checked below. Scaling to `C/γ` itself
        // would leave a rounded vector up to a unit above it whenever `C/γ`
        // is not an integer (a low-dimensional gradient loses less than a
        // unit to rounding toward zero).
        let mut scale = if norm > self.limit * self.grid {
            self.limit / norm
        } else {
            1.0 / self.grid
        };
        let mut units = vec![0i64; gradient.len()];
        // Rounding toward zero never grows the norm, so the check passes at
        // once unless the norm or the scaling rounded up; then shrink a
        // little and round again.
        for _ in 0..8 {
            let mut sq: u128 = 0;
            for (u, &g) in units.iter_mut().zip(gradient) {
                *u = (f64::from(g) * scale).trunc() as i64;
                sq += u128::from(u.unsigned_abs()) * u128::from(u.unsigned_abs());
            }
            if sq <= self.limit_sq {
                for (s, u) in sum.values.iter_mut().zip(&units) {
                    *s += u;
                }
                units.zeroize();
                sum.examples += 1;
                return Ok(norm);
            }
            scale *= 1.0 - 1e-9;
        }
        units.zeroize();
        Err(DpError::Internal(
            "a clipped gradient exceeds its bound after rounding",
        ))
    }

    /// Adds the noise to `sum` and returns the release `γ · (Σ k_i + noise)`
    /// in gradient units. `rng` must be a CSPRNG.
    pub fn release<R: RngCore + CryptoRng + ?Sized>(
        &self,
        mut sum: GridSum,
        rng: &mut R,
    ) -> Result<Vec<f64>, DpError> {
        self.sampler.add_to(rng, &mut sum.values)?;
        Ok(sum.values.iter().map(|&v| v as f64 * self.grid).collect())
    }
}

/// The exact integer sum of the rounded, clipped gradients of one step
/// (not yet private: it is wiped when dropped).
pub struct GridSum {
    values: Vec<i64>,
    examples: usize,
}

impl GridSum {
    /// How many examples were added.
    pub fn examples(&self) -> usize {
        self.examples
    }

    pub fn dim(&self) -> usize {
        self.values.len()
    }
}

impl Drop for GridSum {
    fn drop(&mut self) {
        self.values.zeroize();
    }
}

impl std::fmt::Debug for GridSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GridSum")
            .field("dim", &self.values.len())
            .field("examples", &self.examples)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn a_gradient_inside_the_ball_is_kept_to_within_one_grid_step_per_coordinate() {
        let m = GridGaussian::new(1.0, 1.0).unwrap();
        let mut sum = m.sum(3);
        let g = [0.3f32, -0.4, 0.1];
        let norm = m.add_example(&mut sum, &g).unwrap();
        assert!((norm - (0.26f64).sqrt()).abs() < 1e-6);
        for (&k, &v) in sum.values.iter().zip(&g) {
            let back = k as f64 * m.grid();
            assert!(
                (back - f64::from(v)).abs() <= m.grid(),
                "{back} against {v}"
            );
            // Toward zero: never larger in magnitude.
            assert!(back.abs() <= f64::from(v).abs() + 1e-12);
        }
    }

    // C/γ = 2^18/3 = 87,381.33 grid units is not an integer: a gradient
    // of two coordinates, 50.7 units off the first axis, once rounded to
    // (87,381, 50) units, above the bound ⌊C/γ⌋ = 87,381, and was refused.
    #[test]
    fn a_low_dimensional_gradient_fits_the_bound_when_c_over_the_grid_is_fractional() {
        let m = GridGaussian::new(1.0, 3.0).unwrap();
        let units = 1.0 / m.grid();
        assert!(units.fract() > 0.3, "{units}");
        let off = 50.7 * m.grid();
        let g = [(1.0 - off * off).sqrt() as f32 * 4.0, off as f32 * 4.0];
        let mut sum = m.sum(2);
        m.add_example(&mut sum, &g).unwrap();
        let sq: i128 = sum
            .values
            .iter()
            .map(|&k| i128::from(k) * i128::from(k))
            .sum();
        assert!(sq as u128 <= m.limit_sq);
        // Any clipped gradient, in few dimensions and many.
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        for d in [1usize, 2, 3, 4, 8, 64] {
            let mut sum = m.sum(d);
            for _ in 0..2000 {
                let g: Vec<f32> = (0..d)
                    .map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 10.0)
                    .collect();
                m.add_example(&mut sum, &g).unwrap();
            }
        }
    }

    #[test]
    fn a_long_gradient_is_clipped_and_its_bound_holds_exactly() {
        let m = GridGaussian::new(0.5, 0.7).unwrap();
        let mut sum = m.sum(1000);
        let g: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 3.0)
            .collect();
        let norm = m.add_example(&mut sum, &g).unwrap();
        assert!(norm > 100.0);
        let sq: u128 = sum
            .values
            .iter()
            .map(|v| u128::from(v.unsigned_abs()).pow(2))
            .sum();
        assert!(sq <= m.limit_sq);
        let released_norm = (sq as f64).sqrt() * m.grid();
        assert!(
            released_norm <= 0.5 && released_norm > 0.499,
            "{released_norm}"
        );
    }

    #[test]
    fn a_poisson_sample_includes_each_record_at_the_rate() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let n = 200_000;
        let got = poisson_sample(&mut rng, n, 0.01).unwrap();
        // Binomial(200000, 0.01): mean 2000, standard deviation 44.5.
        assert!((got.len() as f64 - 2000.0).abs() < 250.0, "{}", got.len());
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            poisson_sample(&mut rng, 5, 1.0).unwrap(),
            vec![0, 1, 2, 3, 4]
        );
        assert!(poisson_sample(&mut rng, 5, 0.0).is_err());
        assert!(poisson_sample(&mut rng, 5, 1.5).is_err());
    }

    #[test]
    fn bad_gradients_and_parameters_are_refused() {
        let m = GridGaussian::new(1.0, 1.0).unwrap();
        let mut sum = m.sum(2);
        assert_eq!(
            m.add_example(&mut sum, &[1.0, f32::NAN]),
            Err(DpError::NotFinite { index: 1 })
        );
        assert!(matches!(
            m.add_example(&mut sum, &[1.0]),
            Err(DpError::LengthMismatch { .. })
        ));
        assert_eq!(sum.examples(), 0);
        assert!(GridGaussian::new(0.0, 1.0).is_err());
        assert!(GridGaussian::new(1.0, -1.0).is_err());
        assert!(GridGaussian::new(f64::INFINITY, 1.0).is_err());
    }

    #[test]
    fn the_release_lies_on_the_grid_and_its_noise_has_the_configured_spread() {
        let (clip, sigma) = (2.0, 0.8);
        let m = GridGaussian::new(clip, sigma).unwrap();
        let dim = 20_000;
        let mut sum = m.sum(dim);
        m.add_example(&mut sum, &vec![0.0; dim]).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let out = m.release(sum, &mut rng).unwrap();
        let mut var = 0.0;
        for v in &out {
            let units = v / m.grid();
            assert!((units - units.round()).abs() < 1e-6, "{v} is off the grid");
            var += v * v;
        }
        let sd = (var / dim as f64).sqrt();
        let want = sigma * clip;
        // The sample standard deviation of 20,000 draws is within 3% with
        // overwhelming probability (its relative error is about 0.5%).
        assert!((sd / want - 1.0).abs() < 0.03, "{sd} against {want}");
    }
}
