//! The float codec (§4.2): maps real vectors into `Z_{2^b}` so that the ring
//! sum of the encodings decodes to the (optionally weighted) mean.
//!
//! Encoding clamps each coordinate to `[-clip, clip]`, multiplies by the
//! client's weight `w` and by a scale `s`, and rounds stochastically:
//! `floor(v) + Bernoulli(v - floor(v))`, which is unbiased. The scale is the
//! largest that keeps the sum over `max_clients` clients inside the signed
//! range of the ring, so the sum never wraps:
//! `max_clients * (max_weight * clip * s + 1) <= 2^(b-1) - 1`.
//! With weights, one extra trailing element carries `w`, so the server learns
//! the total weight from the same secure sum.
//!
//! Each client's rounding error is below one unit, so the decoded mean is
//! within `1 / s` of the exact mean of the clamped (weighted) inputs in every
//! coordinate ([`FloatCodec::mean_error_bound`]).

use rand_core::CryptoRngCore;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::crypto::prg::{MASK_KEY_LEN, MaskStream, Sign};
use crate::ring::{MAX_BITS, modulus_mask};

/// A codec configuration that cannot work, or an input that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CodecError {
    #[error("bits per element must be in 2..=32, got {0}")]
    BadBits(u8),
    #[error("clip must be positive and finite, got {0}")]
    BadClip(f32),
    #[error("max_clients must be at least 1")]
    NoClients,
    #[error("max_weight must be at least 1")]
    BadMaxWeight,
    #[error(
        "a {bits}-bit ring has no room for {max_clients} clients at weight {max_weight}: \
         use more bits or fewer clients"
    )]
    NoHeadroom {
        bits: u8,
        max_clients: u32,
        max_weight: u32,
    },
    #[error("weight {weight} is outside 1..={max}")]
    WeightOutOfRange { weight: u32, max: u32 },
    #[error("this codec is weighted: every client must give a weight")]
    WeightMissing,
    #[error("this codec is unweighted: clients must not give a weight")]
    WeightUnexpected,
    #[error("input coordinate {index} is NaN")]
    NotANumber { index: usize },
    #[error("the sum has {got} elements, expected {expected}")]
    LengthMismatch { expected: usize, got: usize },
    #[error("cannot decode a mean over {survivors} survivors (max {max_clients})")]
    BadSurvivorCount { survivors: usize, max_clients: u32 },
    #[error("the rounding coin generator failed")]
    Rng,
    #[error("the decoded total weight {0} is not positive")]
    BadTotalWeight(i64),
}

/// `1.5 * 2^52`: adding and subtracting it rounds a double with magnitude
/// below 2^51 to the nearest integer, and the low bits of the sum are then that
/// integer in two's complement (IEEE 754, round-to-nearest).
const ROUNDER: f64 = 6_755_399_441_055_744.0;

/// Rounds `v` (|v| < 2^31) down or up to a neighbouring integer, up with
/// probability `v - floor(v)`, and returns the result mod 2^32. The coin is
/// uniform on the multiples of 2^-52 in [0, 1) (52 bits from `hi`, `lo`), so
/// the rounding is exactly unbiased whenever |v| >= 1 and biased by at most
/// 2^-52 otherwise. Only float add, compare and bit operations: no libm
/// `floor`, no saturating casts, and it vectorises on baseline x86-64.
#[inline(always)]
fn round_stochastic(v: f64, hi: u32, lo: u32) -> u32 {
    let nearest = (v + ROUNDER) - ROUNDER;
    let floor = nearest - f64::from(u8::from(nearest > v));
    let frac = v - floor;
    // A double in [1, 2) with 52 random mantissa bits, minus one.
    let bits = (u64::from(hi) << 20 ^ u64::from(lo)) & ((1 << 52) - 1);
    let coin = f64::from_bits(0x3ff0_0000_0000_0000 | bits) - 1.0;
    let rounded = floor + f64::from(u8::from(coin < frac));
    (rounded + ROUNDER).to_bits() as u32
}

/// Coordinates rounded per keystream call: two coin words each, one PRG chunk.
const COIN_CHUNK: usize = crate::crypto::prg::CHUNK_WORDS / 2;

/// Encodes `f32` vectors into the ring and decodes ring sums into means.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatCodec {
    bits: u8,
    clip: f64,
    max_clients: u32,
    max_weight: Option<u32>,
    scale: f64,
}

impl FloatCodec {
    /// A codec for up to `max_clients` clients; `max_weight` makes it weighted.
    pub fn new(
        bits: u8,
        clip: f32,
        max_clients: u32,
        max_weight: Option<u32>,
    ) -> Result<Self, CodecError> {
        if !(2..=MAX_BITS).contains(&bits) {
            return Err(CodecError::BadBits(bits));
        }
        if !(clip.is_finite() && clip > 0.0) {
            return Err(CodecError::BadClip(clip));
        }
        if max_clients == 0 {
            return Err(CodecError::NoClients);
        }
        if max_weight == Some(0) {
            return Err(CodecError::BadMaxWeight);
        }
        let w = f64::from(max_weight.unwrap_or(1));
        let half = f64::from(modulus_mask(bits - 1));
        let n = f64::from(max_clients);
        let scale = (half / n - 1.0) / (w * f64::from(clip));
        // The weight slot itself must fit too: n * w <= 2^(b-1) - 1.
        if !(scale.is_finite() && scale > 0.0) || n * w > half {
            return Err(CodecError::NoHeadroom {
                bits,
                max_clients,
                max_weight: max_weight.unwrap_or(1),
            });
        }
        Ok(FloatCodec {
            bits,
            clip: f64::from(clip),
            max_clients,
            max_weight,
            scale,
        })
    }

    /// The ring width.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// The scale `s` (ring units per unit of input).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The clamp bound.
    pub fn clip(&self) -> f64 {
        self.clip
    }

    /// The ring vector length for a `dim`-dimensional input.
    pub fn encoded_len(&self, dim: usize) -> usize {
        dim + usize::from(self.max_weight.is_some())
    }

    /// Per coordinate, the decoded mean differs from the exact mean of the
    /// clamped (weighted) inputs by less than this.
    pub fn mean_error_bound(&self) -> f64 {
        1.0 / self.scale
    }

    /// Encodes one client's vector. The rounding coins come from AES-128-CTR
    /// keyed by 16 bytes of `rng` (a CSPRNG): 53 bits per coordinate at
    /// keystream speed, instead of a call into `rng` per coordinate.
    pub fn encode<R: CryptoRngCore + ?Sized>(
        &self,
        x: &[f32],
        weight: Option<u32>,
        rng: &mut R,
    ) -> Result<Vec<u32>, CodecError> {
        let w = match (self.max_weight, weight) {
            (Some(max), Some(w)) if (1..=max).contains(&w) => w,
            (Some(max), Some(w)) => return Err(CodecError::WeightOutOfRange { weight: w, max }),
            (Some(_), None) => return Err(CodecError::WeightMissing),
            (None, Some(_)) => return Err(CodecError::WeightUnexpected),
            (None, None) => 1,
        };
        let mut key = Zeroizing::new([0u8; MASK_KEY_LEN]);
        rng.fill_bytes(key.as_mut());
        let coins = MaskStream::new(&key, Sign::Add).map_err(|_| CodecError::Rng)?;
        let mask = modulus_mask(self.bits);
        let factor = f64::from(w) * self.scale;
        let (lo, hi) = (-self.clip, self.clip);
        // The output is the client's secret input until it is masked; a
        // failed encoding wipes what it wrote, and the coins are wiped too.
        let mut out = Zeroizing::new(vec![0u32; self.encoded_len(x.len())]);
        let mut words = Zeroizing::new(vec![0u32; 2 * COIN_CHUNK]);
        for (i, (chunk, dst)) in x
            .chunks(COIN_CHUNK)
            .zip(out.chunks_mut(COIN_CHUNK))
            .enumerate()
        {
            let words = &mut words[..2 * chunk.len()];
            coins
                .keystream(i * 2 * COIN_CHUNK, words)
                .map_err(|_| CodecError::Rng)?;
            let mut nan = false;
            for ((o, &xi), pair) in dst.iter_mut().zip(chunk).zip(words.chunks_exact(2)) {
                nan |= xi.is_nan();
                *o = round_stochastic(f64::from(xi).max(lo).min(hi) * factor, pair[0], pair[1])
                    & mask;
            }
            if nan {
                let index = i * COIN_CHUNK + chunk.iter().position(|v| v.is_nan()).unwrap_or(0);
                return Err(CodecError::NotANumber { index });
            }
        }
        if let (Some(_), Some(last)) = (self.max_weight, out.last_mut()) {
            *last = w;
        }
        Ok(std::mem::take(&mut *out))
    }

    /// Lifts a ring element to the signed integer in `[-2^(b-1), 2^(b-1))`.
    fn lift(&self, v: u32) -> i64 {
        let v = i64::from(v & modulus_mask(self.bits));
        let half = 1i64 << (self.bits - 1);
        if v >= half {
            v - (1i64 << self.bits)
        } else {
            v
        }
    }

    /// Decodes the ring sum of `survivors` clients' encodings into the mean
    /// (weighted by the clients' weights when the codec is weighted).
    pub fn decode_mean(&self, sum: &[u32], survivors: usize) -> Result<Vec<f64>, CodecError> {
        if survivors == 0 || survivors > self.max_clients as usize {
            return Err(CodecError::BadSurvivorCount {
                survivors,
                max_clients: self.max_clients,
            });
        }
        let (values, denominator) = if self.max_weight.is_some() {
            let Some((&total, values)) = sum.split_last() else {
                return Err(CodecError::LengthMismatch {
                    expected: 1,
                    got: 0,
                });
            };
            let total = self.lift(total);
            if total <= 0 {
                return Err(CodecError::BadTotalWeight(total));
            }
            (values, total as f64)
        } else {
            (sum, survivors as f64)
        };
        let k = 1.0 / (self.scale * denominator);
        Ok(values.iter().map(|&v| self.lift(v) as f64 * k).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn ring_sum(vs: &[Vec<u32>], bits: u8) -> Vec<u32> {
        let mut acc = vec![0u32; vs[0].len()];
        for v in vs {
            for (a, x) in acc.iter_mut().zip(v) {
                *a = a.wrapping_add(*x);
            }
        }
        crate::ring::reduce(&mut acc, bits);
        acc
    }

    #[test]
    fn mean_is_within_the_bound_and_rounding_is_unbiased() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let codec = FloatCodec::new(16, 1.0, 10, None).unwrap();
        let inputs: Vec<Vec<f32>> = (0..10)
            .map(|c| {
                (0..50)
                    .map(|i| ((c * 50 + i) as f32 * 0.37).sin() * 1.5)
                    .collect()
            })
            .collect();
        let enc: Vec<Vec<u32>> = inputs
            .iter()
            .map(|x| codec.encode(x, None, &mut rng).unwrap())
            .collect();
        let mean = codec.decode_mean(&ring_sum(&enc, 16), 10).unwrap();
        for i in 0..50 {
            let exact: f64 = inputs
                .iter()
                .map(|x| f64::from(x[i]).clamp(-1.0, 1.0))
                .sum::<f64>()
                / 10.0;
            assert!(
                (mean[i] - exact).abs() < codec.mean_error_bound(),
                "coordinate {i}"
            );
        }
        // Unbiased: the average encoding of 0.3 over many draws approaches 0.3 * s.
        let trials = 20_000;
        let total: i64 = (0..trials)
            .map(|_| codec.lift(codec.encode(&[0.3], None, &mut rng).unwrap()[0]))
            .sum();
        let avg = total as f64 / f64::from(trials);
        let target = 0.3 * codec.scale();
        assert!((avg - target).abs() < 0.02, "{avg} vs {target}");
    }

    #[test]
    fn stochastic_rounding_is_exact_at_the_edges() {
        // Integers stay put whatever the coin.
        for v in [0.0, 1.0, -1.0, 12345.0, -2147483000.0] {
            for (hi, lo) in [(0, 0), (u32::MAX, u32::MAX), (0x8000_0000, 7)] {
                assert_eq!(round_stochastic(v, hi, lo), v as i64 as u32, "{v}");
            }
        }
        // 2.25 rounds to 2 on a high coin and to 3 on a low one; -2.25 to -3 or -2.
        let low = (0, 0);
        let high = (u32::MAX, u32::MAX);
        assert_eq!(round_stochastic(2.25, low.0, low.1), 3);
        assert_eq!(round_stochastic(2.25, high.0, high.1), 2);
        assert_eq!(round_stochastic(-2.25, low.0, low.1), (-2i64) as u32);
        assert_eq!(round_stochastic(-2.25, high.0, high.1), (-3i64) as u32);
        // The coin is compared with the fraction: 0.25 is crossed at 2^50 of 2^52.
        let quarter = 1u64 << 50;
        let split = |b: u64| ((b >> 20) as u32, (b & 0xf_ffff) as u32);
        let (h, l) = split(quarter - 1);
        assert_eq!(round_stochastic(7.25, h, l), 8);
        let (h, l) = split(quarter);
        assert_eq!(round_stochastic(7.25, h, l), 7);
    }

    #[test]
    fn weighted_mean_uses_the_weights() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let codec = FloatCodec::new(32, 2.0, 3, Some(100)).unwrap();
        let xs = [vec![1.0f32, -2.0], vec![0.5, 0.5], vec![-1.0, 9.0]];
        let ws = [10u32, 30, 60];
        let enc: Vec<Vec<u32>> = xs
            .iter()
            .zip(ws)
            .map(|(x, w)| codec.encode(x, Some(w), &mut rng).unwrap())
            .collect();
        assert_eq!(enc[0].len(), 3);
        let mean = codec.decode_mean(&ring_sum(&enc, 32), 3).unwrap();
        let expect = [
            (10.0 * 1.0 + 30.0 * 0.5 - 60.0) / 100.0,
            (10.0 * -2.0 + 30.0 * 0.5 + 60.0 * 2.0) / 100.0,
        ];
        for i in 0..2 {
            assert!((mean[i] - expect[i]).abs() < codec.mean_error_bound());
        }
    }

    #[test]
    fn bad_configurations_and_inputs_are_errors() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        assert_eq!(
            FloatCodec::new(1, 1.0, 2, None),
            Err(CodecError::BadBits(1))
        );
        assert_eq!(
            FloatCodec::new(33, 1.0, 2, None),
            Err(CodecError::BadBits(33))
        );
        assert!(matches!(
            FloatCodec::new(16, -1.0, 2, None),
            Err(CodecError::BadClip(_))
        ));
        assert!(matches!(
            FloatCodec::new(16, f32::NAN, 2, None),
            Err(CodecError::BadClip(_))
        ));
        assert_eq!(
            FloatCodec::new(16, 1.0, 0, None),
            Err(CodecError::NoClients)
        );
        assert!(matches!(
            FloatCodec::new(8, 1.0, 1000, None),
            Err(CodecError::NoHeadroom { .. })
        ));
        let c = FloatCodec::new(16, 1.0, 4, Some(5)).unwrap();
        assert_eq!(
            c.encode(&[0.0], None, &mut rng),
            Err(CodecError::WeightMissing)
        );
        assert!(matches!(
            c.encode(&[0.0], Some(6), &mut rng),
            Err(CodecError::WeightOutOfRange { .. })
        ));
        assert_eq!(
            c.encode(&[f32::NAN], Some(1), &mut rng),
            Err(CodecError::NotANumber { index: 0 })
        );
        assert!(c.decode_mean(&[0, 0], 0).is_err());
        assert!(matches!(
            c.decode_mean(&[0, 0], 1),
            Err(CodecError::BadTotalWeight(0))
        ));
        let u = FloatCodec::new(16, 1.0, 4, None).unwrap();
        assert_eq!(
            u.encode(&[0.0], Some(1), &mut rng),
            Err(CodecError::WeightUnexpected)
        );
    }
}
