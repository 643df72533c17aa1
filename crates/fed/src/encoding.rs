//! From a client's update to a ring vector, and from the ring sum back to
//! the round's aggregate (protocols/federation.md §4.3).
//!
//! - Without differential privacy the float codec clamps, scales and rounds
//!   stochastically, with the client's sample count (capped) as its weight:
//!   the server decodes the sample-weighted mean (FedAvg).
//! - With differential privacy every client counts once: the update is
//!   clipped to L2 norm `c`, so one client's influence is bounded whatever
//!   its data set size; the server decodes the noisy sum of the clipped
//!   updates and divides by the number of survivors.

use fedveil_dp::mechanism::{ClientPrivatizer, ServerDecoder};
use fedveil_secagg::codec::FloatCodec;
use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroize;

use crate::FedError;
use crate::trainer::LocalUpdate;
use crate::wire::Encoding;

/// What encoding a client's update produced. The ring vector is the
/// client's secret input to secure aggregation until it is masked
/// (protocols/secagg-plus.md §5.7): it is wiped on drop, and `Debug` shows
/// only its length.
#[derive(Clone, PartialEq)]
pub struct Encoded {
    /// The ring vector (the client's secret input to secure aggregation).
    pub ring: Vec<u32>,
    /// The update's L2 norm before clipping (DP only).
    pub norm: Option<f64>,
}

impl Drop for Encoded {
    fn drop(&mut self) {
        self.ring.zeroize();
        self.norm.zeroize();
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded")
            .field(
                "ring",
                &format_args!("[{} elements, redacted]", self.ring.len()),
            )
            .finish_non_exhaustive()
    }
}

/// The ring codec of a plain (fixed-point, noiseless) encoding.
fn plain_codec(encoding: &Encoding) -> Result<FloatCodec, FedError> {
    match encoding {
        Encoding::Plain {
            bits,
            clamp,
            max_clients,
            max_weight,
        } => Ok(FloatCodec::new(
            *bits,
            *clamp,
            *max_clients,
            Some(*max_weight),
        )?),
        _ => Err(FedError::Internal(
            "only a plain encoding has a fixed-point codec".into(),
        )),
    }
}

/// Encodes `update` as `encoding` says. `rng` must be a CSPRNG: it draws
/// the rounding and the noise.
pub fn encode<R: RngCore + CryptoRng>(
    encoding: &Encoding,
    update: &LocalUpdate,
    rng: &mut R,
) -> Result<Encoded, FedError> {
    match encoding {
        Encoding::Plain { max_weight, .. } => {
            let codec = plain_codec(encoding)?;
            let weight = update.samples.clamp(1, u64::from(*max_weight)) as u32;
            Ok(Encoded {
                ring: codec.encode(&update.delta, Some(weight), rng)?,
                norm: None,
            })
        }
        Encoding::Private {
            noise,
            rotation_seed,
        } => {
            let p = ClientPrivatizer::new(noise.clone(), *rotation_seed)?;
            let mut out = p.privatize(&update.delta, rng)?;
            Ok(Encoded {
                ring: std::mem::take(&mut out.ring),
                norm: Some(out.norm),
            })
        }
        Encoding::Unprotected => Err(FedError::Internal(
            "an unprotected round's update is sent as it is, not encoded".into(),
        )),
    }
}

/// Decodes the ring sum of `survivors` clients into the aggregate update
/// (length `dim`). With central noise, `rng` (a CSPRNG) draws it.
pub fn decode<R: RngCore + CryptoRng>(
    encoding: &Encoding,
    sum: &[u32],
    survivors: usize,
    dim: usize,
    rng: &mut R,
) -> Result<Vec<f64>, FedError> {
    if survivors == 0 {
        return Err(FedError::Internal("no survivors to decode".into()));
    }
    let mean = match encoding {
        Encoding::Plain { .. } => plain_codec(encoding)?.decode_mean(sum, survivors)?,
        Encoding::Private {
            noise,
            rotation_seed,
        } => {
            let d = ServerDecoder::new(noise.clone(), *rotation_seed)?;
            let n = survivors as f64;
            let mut s = d.decode(sum, rng)?;
            s.iter_mut().for_each(|v| *v /= n);
            s
        }
        Encoding::Unprotected => {
            return Err(FedError::Internal(
                "an unprotected round has no ring sum to decode".into(),
            ));
        }
    };
    if mean.len() != dim {
        return Err(FedError::Internal(format!(
            "decoded {} values for a model of {dim}",
            mean.len()
        )));
    }
    Ok(mean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedveil_dp::mechanism::{NoiseConfig, Placement};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn update(delta: Vec<f32>, samples: u64) -> LocalUpdate {
        LocalUpdate {
            delta,
            samples,
            loss: 0.0,
            record_steps: None,
        }
    }

    fn ring_sum(a: &[u32], b: &[u32], bits: u8) -> Vec<u32> {
        let m = if bits == 32 {
            u32::MAX
        } else {
            (1 << bits) - 1
        };
        a.iter()
            .zip(b)
            .map(|(x, y)| x.wrapping_add(*y) & m)
            .collect()
    }

    #[test]
    fn plain_encoding_decodes_the_sample_weighted_mean() {
        let enc = Encoding::Plain {
            bits: 32,
            clamp: 1.0,
            max_clients: 2,
            max_weight: 100,
        };
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let a = encode(&enc, &update(vec![0.5, -0.25], 30), &mut rng).unwrap();
        let b = encode(&enc, &update(vec![-0.5, 0.75], 10), &mut rng).unwrap();
        let mean = decode(&enc, &ring_sum(&a.ring, &b.ring, 32), 2, 2, &mut rng).unwrap();
        let want = [
            (0.5 * 30.0 - 0.5 * 10.0) / 40.0,
            (-0.25 * 30.0 + 0.75 * 10.0) / 40.0,
        ];
        for (m, w) in mean.iter().zip(want) {
            assert!((m - w).abs() < 1e-6, "{m} vs {w}");
        }
    }

    #[test]
    fn private_encoding_decodes_the_clipped_mean() {
        let noise = NoiseConfig {
            placement: Placement::Distributed,
            dim: 3,
            clip: 1.0,
            noise_multiplier: 1e-3,
            granularity: 1e-5,
            beta: (-0.5f64).exp(),
            bits: 32,
            min_survivors: 2,
        };
        let enc = Encoding::Private {
            noise,
            rotation_seed: [4; 32],
        };
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        // The first update has norm 5 and is clipped to 1.
        let a = encode(&enc, &update(vec![3.0, 4.0, 0.0], 1), &mut rng).unwrap();
        assert_eq!(a.norm, Some(5.0));
        let b = encode(&enc, &update(vec![0.0, 0.0, 0.5], 1), &mut rng).unwrap();
        let mean = decode(&enc, &ring_sum(&a.ring, &b.ring, 32), 2, 3, &mut rng).unwrap();
        let want = [0.3, 0.4, 0.25];
        for (m, w) in mean.iter().zip(want) {
            assert!((m - w).abs() < 5e-3, "{mean:?}");
        }
    }
}
