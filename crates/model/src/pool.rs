//! Running a whole pass on rayon's thread pool.
//!
//! candle's matrix products (gemm) split their work over rayon's global
//! pool. Called from a thread outside the pool, each product injects its
//! jobs into the pool, wakes the workers and puts the calling thread to
//! sleep until they finish: a LoRA step of SmolLM2-135M makes hundreds of
//! such round trips, and on two cores the wake-ups and the idle caller cost
//! about 8 % of the step (BENCHMARKS.md, "LoRA training throughput"). Run
//! from inside the pool, a product splits its work with the workers
//! directly, and the pass's own thread does its share.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// Runs `work` on a worker of rayon's global pool (or right here, if this
/// already is one) and returns its result.
pub(crate) fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        work()
    } else {
        rayon::scope(|_| work())
    }
}

/// [`on_pool`] for a pass that draws randomness: `work` gets a ChaCha20
/// generator seeded with 32 bytes from `rng` (the caller's generator need
/// not be `Send`; the pass's, which moves to the pool, must be).
pub(crate) fn on_pool_seeded<R: Send>(
    rng: &mut dyn RngCore,
    work: impl FnOnce(&mut dyn RngCore) -> R + Send,
) -> R {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    let mut local = ChaCha20Rng::from_seed(seed);
    on_pool(|| work(&mut local))
}

#[cfg(test)]
mod tests {
    #[test]
    fn work_runs_on_a_pool_worker_and_returns_its_value() {
        let (inside, value) = super::on_pool(|| (rayon::current_thread_index().is_some(), 7));
        assert!(inside);
        assert_eq!(value, 7);
        // Nested calls run in place.
        assert_eq!(super::on_pool(|| super::on_pool(|| 3)), 3);
    }
}
