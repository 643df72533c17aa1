//! Record-level DP-SGD's mechanism for the model crate (protocols/dp.md
//! §8): `dp::dpsgd`'s Poisson sample and exact grid noise, with a CSPRNG.

use fedveil_fed::dp::DpError;
use fedveil_fed::dp::dpsgd::{GridGaussian, GridSum, poisson_sample};
use fedveil_fed::trainer::RecordDp;
use fedveil_model::ModelError;
use fedveil_model::federated::RecordMechanism;
use rand_core::{CryptoRng, RngCore};

/// Samples each step's records at rate `q`, clips each record's gradient to
/// `C`, sums exactly on the grid and adds exact discrete Gaussian noise of
/// standard deviation `σC` per step; every draw from `rng`.
pub struct GridNoise<R: RngCore + CryptoRng> {
    mechanism: GridGaussian,
    sampling_rate: f64,
    sum: GridSum,
    rng: R,
}

impl<R: RngCore + CryptoRng> std::fmt::Debug for GridNoise<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GridNoise")
            .field("mechanism", &self.mechanism)
            .field("sum", &self.sum)
            .finish_non_exhaustive()
    }
}

impl<R: RngCore + CryptoRng> GridNoise<R> {
    /// The mechanism `dp` for gradients of `dim` values, drawing from `rng`
    /// (a CSPRNG).
    pub fn new(dim: usize, dp: &RecordDp, rng: R) -> Result<Self, DpError> {
        if !(dp.sampling_rate > 0.0 && dp.sampling_rate <= 1.0) {
            return Err(DpError::BadSamplingRate(dp.sampling_rate));
        }
        let mechanism = GridGaussian::new(dp.clip, dp.noise_multiplier)?;
        let sum = mechanism.sum(dim);
        Ok(GridNoise {
            mechanism,
            sampling_rate: dp.sampling_rate,
            sum,
            rng,
        })
    }

    /// Adds one record's gradient (clipped) to the step's sum.
    pub fn add(&mut self, gradient: &[f32]) -> Result<f64, DpError> {
        self.mechanism.add_example(&mut self.sum, gradient)
    }

    /// The step's noised sum; the next step starts empty.
    pub fn release_sum(&mut self) -> Result<Vec<f64>, DpError> {
        let empty = self.mechanism.sum(self.sum.dim());
        let sum = std::mem::replace(&mut self.sum, empty);
        self.mechanism.release(sum, &mut self.rng)
    }

    /// One step's Poisson sample of `records`.
    pub fn sample_records(&mut self, records: usize) -> Result<Vec<usize>, DpError> {
        poisson_sample(&mut self.rng, records, self.sampling_rate)
    }
}

/// A ChaCha20 generator keyed with 32 bytes from `rng` (the caller's
/// CSPRNG), for the mechanism's draws.
pub fn csprng(rng: &mut dyn RngCore) -> rand_chacha::ChaCha20Rng {
    use rand_core::SeedableRng;
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    let out = rand_chacha::ChaCha20Rng::from_seed(seed);
    zeroize::Zeroize::zeroize(&mut seed);
    out
}

fn privacy(e: DpError) -> ModelError {
    ModelError::Privacy(e.to_string())
}

impl<R: RngCore + CryptoRng> RecordMechanism for GridNoise<R> {
    fn sampling_rate(&self) -> f64 {
        self.sampling_rate
    }

    fn sample(&mut self, records: usize) -> Result<Vec<usize>, ModelError> {
        self.sample_records(records).map_err(privacy)
    }

    fn add_example(&mut self, gradient: &[f32]) -> Result<f64, ModelError> {
        self.add(gradient).map_err(privacy)
    }

    fn release(&mut self) -> Result<Vec<f64>, ModelError> {
        self.release_sum().map_err(privacy)
    }
}
