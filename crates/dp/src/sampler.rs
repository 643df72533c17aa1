//! Exact discrete Gaussian sampling (protocols/dp.md §3.4).
//!
//! `N_Z(0, σ²)` puts mass proportional to `exp(-x² / (2σ²))` on every integer
//! `x`. The sampler is Algorithm 3 of Canonne, Kamath & Steinke (2020):
//! propose from a discrete Laplace of integer scale `t = ⌊σ⌋ + 1`, accept with
//! probability `exp(-(|Y| - σ²/t)² / (2σ²))`. Every probability it uses is a
//! rational number computed in integer arithmetic: `σ²` is held as the exact
//! fraction `num / 2^20` (rounded up from the requested value, so the noise
//! is never smaller than asked for), and a Bernoulli(a/b) draw compares
//! random bits with the binary expansion of `a/b` until they differ, two bits
//! on average. There is no floating point anywhere in a draw.
//!
//! Random bits come from the caller's CSPRNG, 64 at a time.

use rand_core::{CryptoRng, RngCore};

use crate::DpError;

/// A uniform value in [0, 1) with 53 random bits.
#[inline]
pub(crate) fn uniform_unit<R: RngCore + ?Sized>(rng: &mut R) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Bits of the fixed denominator of `σ²`.
pub const VARIANCE_DENOMINATOR_BITS: u32 = 20;
/// The largest standard deviation the sampler accepts (2^20 ≈ 1.05e6), which
/// keeps every denominator below 2^122.
pub const MAX_SIGMA: f64 = (1u64 << 20) as f64;

/// Buffered random bits.
struct Bits<'r, R: RngCore + CryptoRng + ?Sized> {
    rng: &'r mut R,
    buf: u64,
    left: u32,
}

impl<'r, R: RngCore + CryptoRng + ?Sized> Bits<'r, R> {
    fn new(rng: &'r mut R) -> Self {
        Bits {
            rng,
            buf: 0,
            left: 0,
        }
    }

    #[inline]
    fn bit(&mut self) -> bool {
        if self.left == 0 {
            self.buf = self.rng.next_u64();
            self.left = 64;
        }
        let b = self.buf & 1 == 1;
        self.buf >>= 1;
        self.left -= 1;
        b
    }

    /// `k <= 32` random bits at once.
    #[inline]
    fn take(&mut self, k: u32) -> u64 {
        if self.left < k {
            self.buf = self.rng.next_u64();
            self.left = 64;
        }
        let v = self.buf & ((1u64 << k) - 1);
        self.buf >>= k;
        self.left -= k;
        v
    }

    /// Uniform in `0..n` for `1 <= n <= 2^32`, by rejection on the smallest
    /// power of two at least `n`.
    #[inline]
    fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            return 0;
        }
        let bits = 64 - (n - 1).leading_zeros();
        loop {
            let v = self.take(bits);
            if v < n {
                return v;
            }
        }
    }

    /// Bernoulli(a / b) for `0 <= a <= b`, `0 < b < 2^127`: compare a
    /// uniform binary fraction with the expansion of `a/b`, digit by digit.
    #[inline]
    fn bernoulli(&mut self, a: u128, b: u128) -> bool {
        if a >= b {
            return true;
        }
        if let (Ok(a), Ok(b)) = (u64::try_from(a), u64::try_from(b))
            && b < 1 << 63
        {
            return self.bernoulli_small(a, b);
        }
        let mut r = a;
        loop {
            r <<= 1;
            let digit = r >= b;
            if digit {
                r -= b;
            }
            // The first differing digit decides: u < a/b iff u has the 0.
            // (Once a/b's expansion ends, its digits are 0 and the first 1
            // bit of u ends the loop with "no".)
            if self.bit() != digit {
                return digit;
            }
        }
    }

    /// [`Bits::bernoulli`] in 64-bit arithmetic, for `a < b < 2^63`.
    #[inline]
    fn bernoulli_small(&mut self, a: u64, b: u64) -> bool {
        let mut r = a;
        loop {
            r <<= 1;
            let digit = r >= b;
            if digit {
                r -= b;
            }
            if self.bit() != digit {
                return digit;
            }
        }
    }

    /// Bernoulli(exp(-n/d)) for `n >= 0`, `d > 0` (CKS20 Algorithm 1).
    fn bernoulli_exp(&mut self, n: u128, d: u128) -> bool {
        if n <= d {
            return self.bernoulli_exp_fraction(n, d);
        }
        let whole = n / d;
        for _ in 0..whole {
            if !self.bernoulli_exp_fraction(1, 1) {
                return false;
            }
        }
        self.bernoulli_exp_fraction(n % d, d)
    }

    /// Bernoulli(exp(-diff²/d)) for any `diff`, with `diff²` in 256 bits:
    /// `exp(-γ) = exp(-1)^⌊γ⌋ · exp(-(γ - ⌊γ⌋))`, the whole part counted in
    /// 256 bits (the loop ends at the first failure, after e/(e-1) draws on
    /// average).
    fn bernoulli_exp_square(&mut self, diff: u128, d: u128) -> bool {
        let (hi, lo) = mul_wide(diff, diff);
        if hi == 0 {
            return self.bernoulli_exp(lo, d);
        }
        let (whole, rem) = divrem_wide(hi, lo, d);
        let mut done: (u128, u128) = (0, 0);
        while done < whole {
            if !self.bernoulli_exp_fraction(1, 1) {
                return false;
            }
            done = if done.1 == u128::MAX {
                (done.0 + 1, 0)
            } else {
                (done.0, done.1 + 1)
            };
        }
        self.bernoulli_exp_fraction(rem, d)
    }

    /// Bernoulli(exp(-n/d)) for `0 <= n <= d`: the parity of the first `K`
    /// with a failed Bernoulli(γ/K).
    fn bernoulli_exp_fraction(&mut self, n: u128, d: u128) -> bool {
        let mut k: u128 = 1;
        loop {
            // Bernoulli(n / (d k)); if d k does not fit, the product of the
            // independent Bernoulli(n/d) and Bernoulli(1/k), which is equal.
            let success = match d.checked_mul(k) {
                Some(dk) if dk < 1 << 127 => self.bernoulli(n, dk),
                _ => self.bernoulli(n, d) && self.bernoulli(1, k),
            };
            if !success {
                return k % 2 == 1;
            }
            k += 1;
        }
    }
}

/// `a · b` as (high, low) 128-bit halves.
fn mul_wide(a: u128, b: u128) -> (u128, u128) {
    let mask = u128::from(u64::MAX);
    let (a1, a0) = (a >> 64, a & mask);
    let (b1, b0) = (b >> 64, b & mask);
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 64) + (p01 & mask) + (p10 & mask);
    let lo = (p00 & mask) | (mid << 64);
    let hi = p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64);
    (hi, lo)
}

/// `(hi·2^128 + lo) / d` as a (high, low) quotient and the remainder, by
/// binary long division; `d > 0`.
fn divrem_wide(hi: u128, lo: u128, d: u128) -> ((u128, u128), u128) {
    let (mut qh, mut ql, mut r) = (0u128, 0u128, 0u128);
    for i in (0..256).rev() {
        let bit = if i >= 128 {
            (hi >> (i - 128)) & 1
        } else {
            (lo >> i) & 1
        };
        // r < d <= 2^122, so the shift cannot overflow.
        r = (r << 1) | bit;
        if r >= d {
            r -= d;
            if i >= 128 {
                qh |= 1 << (i - 128);
            } else {
                ql |= 1 << i;
            }
        }
    }
    ((qh, ql), r)
}

/// An exact sampler for `N_Z(0, σ²)`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DiscreteGaussian {
    /// `σ² = var_num / 2^VARIANCE_DENOMINATOR_BITS`.
    var_num: u128,
    /// The discrete Laplace scale `⌊σ⌋ + 1`.
    t: u64,
}

impl DiscreteGaussian {
    /// A sampler for the smallest variance `≥ sigma²` on the grid of
    /// `2^-20` (so never less noise than asked for).
    pub fn new(sigma: f64) -> Result<Self, DpError> {
        if !(sigma > 0.0 && sigma <= MAX_SIGMA) {
            return Err(DpError::BadNoiseMultiplier(sigma));
        }
        let den = (1u64 << VARIANCE_DENOMINATOR_BITS) as f64;
        let var_num = (sigma * sigma * den).ceil() as u128;
        // t = floor(sqrt(var)) + 1, computed exactly: the largest s with s² ≤ var.
        let mut s = (var_num as f64 / den).sqrt() as u64;
        let fits = |s: u64| (u128::from(s) * u128::from(s)) << VARIANCE_DENOMINATOR_BITS <= var_num;
        while !fits(s) {
            s -= 1;
        }
        while fits(s + 1) {
            s += 1;
        }
        Ok(DiscreteGaussian { var_num, t: s + 1 })
    }

    /// The exact variance parameter `σ²` used.
    pub fn sigma_squared(&self) -> f64 {
        self.var_num as f64 / (1u64 << VARIANCE_DENOMINATOR_BITS) as f64
    }

    /// One sample from the discrete Laplace with scale `t`: mass
    /// proportional to `exp(-|x|/t)` (CKS20 Algorithm 2).
    fn discrete_laplace<R: RngCore + CryptoRng + ?Sized>(
        &self,
        bits: &mut Bits<'_, R>,
    ) -> Result<i64, DpError> {
        let t = self.t;
        loop {
            let u = bits.below(t);
            if !bits.bernoulli_exp(u128::from(u), u128::from(t)) {
                continue;
            }
            let mut v: u64 = 0;
            while bits.bernoulli_exp(1, 1) {
                v += 1;
            }
            let x = v
                .checked_mul(t)
                .and_then(|vt| vt.checked_add(u))
                .and_then(|x| i64::try_from(x).ok())
                .ok_or(DpError::Internal("sampler overflow"))?;
            let negative = bits.bit();
            if negative && x == 0 {
                continue;
            }
            return Ok(if negative { -x } else { x });
        }
    }

    /// One sample (CKS20 Algorithm 3).
    fn sample_one<R: RngCore + CryptoRng + ?Sized>(
        &self,
        bits: &mut Bits<'_, R>,
    ) -> Result<i64, DpError> {
        // With σ² = p/q (q = 2^20): accept Y with probability exp(-γ),
        // γ = (|Y| q t - p)² / (2 p q t²).
        let p = self.var_num;
        let q: u128 = 1 << VARIANCE_DENOMINATOR_BITS;
        let t = u128::from(self.t);
        let overflow = DpError::Internal("sampler overflow");
        let d = p
            .checked_mul(2 * q)
            .and_then(|v| v.checked_mul(t * t))
            .ok_or(overflow.clone())?;
        loop {
            let y = self.discrete_laplace(bits)?;
            let a = u128::from(y.unsigned_abs())
                .checked_mul(q * t)
                .ok_or(overflow.clone())?;
            if bits.bernoulli_exp_square(a.abs_diff(p), d) {
                return Ok(y);
            }
        }
    }

    /// Fills `out` with independent samples.
    pub fn fill<R: RngCore + CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        out: &mut [i64],
    ) -> Result<(), DpError> {
        let mut bits = Bits::new(rng);
        for o in out.iter_mut() {
            *o = self.sample_one(&mut bits)?;
        }
        Ok(())
    }

    /// `n` independent samples.
    pub fn sample<R: RngCore + CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        n: usize,
    ) -> Result<Vec<i64>, DpError> {
        let mut out = vec![0; n];
        self.fill(rng, &mut out)?;
        Ok(out)
    }

    /// The exact probability mass at `x`, computed in floating point for
    /// checking (normalised over `|x| <= bound`).
    pub fn pmf_table(&self, bound: i64) -> Vec<f64> {
        let s2 = self.sigma_squared();
        let w: Vec<f64> = (-bound..=bound)
            .map(|x| (-(x as f64) * (x as f64) / (2.0 * s2)).exp())
            .collect();
        let z: f64 = w.iter().sum();
        w.into_iter().map(|v| v / z).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn variance_is_rounded_up_and_t_is_exact() {
        let g = DiscreteGaussian::new(3.0).unwrap();
        assert_eq!(g.sigma_squared(), 9.0);
        assert_eq!(g.t, 4);
        let g = DiscreteGaussian::new(0.3).unwrap();
        assert!(g.sigma_squared() >= 0.09 && g.sigma_squared() < 0.09 + 1e-6);
        assert_eq!(g.t, 1);
        assert!(DiscreteGaussian::new(0.0).is_err());
        assert!(DiscreteGaussian::new(f64::NAN).is_err());
        assert!(DiscreteGaussian::new(1e9).is_err());
        assert!(DiscreteGaussian::new(MAX_SIGMA).is_ok());
    }

    #[test]
    fn wide_arithmetic_is_exact() {
        let a = u128::MAX - 12345;
        let (hi, lo) = mul_wide(a, a);
        // (2^128 - c)^2 = 2^256 - 2c 2^128 + c^2, c = 12346.
        let c: u128 = 12346;
        assert_eq!(lo, c * c);
        assert_eq!(hi, u128::MAX - 2 * c + 1);
        let d: u128 = (1 << 121) + 977;
        let ((qh, ql), r) = divrem_wide(hi, lo, d);
        // Check q·d + r == hi:lo.
        let (ph, pl) = mul_wide(ql, d);
        let (extra_h, _) = mul_wide(qh, d);
        assert_eq!(extra_h, 0);
        let sum_lo = pl.wrapping_add(r);
        let carry = u128::from(sum_lo < pl);
        assert_eq!(sum_lo, lo);
        assert_eq!(ph + (qh.wrapping_mul(d)) + carry, hi);
        assert!(r < d);
        assert_eq!(mul_wide(3, 5), (0, 15));
        assert_eq!(divrem_wide(0, 17, 5), ((0, 3), 2));
    }

    #[test]
    fn a_far_tail_proposal_is_decided_exactly() {
        // diff² overflows 128 bits: γ ≥ 2^128 / d is enormous, so the draw
        // is (exactly) a rejection with overwhelming probability.
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut bits = Bits::new(&mut rng);
        for _ in 0..100 {
            assert!(!bits.bernoulli_exp_square(u128::MAX / 3, 1 << 100));
        }
        // And a value just inside 128 bits goes the fast way.
        let hits = (0..20_000)
            .filter(|_| bits.bernoulli_exp_square(2, 8))
            .count() as f64;
        let p = (-0.5f64).exp();
        assert!((hits / 20_000.0 - p).abs() < 5.0 * (p * (1.0 - p) / 20_000.0).sqrt());
    }

    #[test]
    fn bernoulli_matches_its_probability() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut bits = Bits::new(&mut rng);
        for (a, b) in [(1u128, 3u128), (2, 7), (5, 8), (0, 5), (5, 5)] {
            let n = 200_000;
            let hits = (0..n).filter(|_| bits.bernoulli(a, b)).count() as f64;
            let p = a as f64 / b as f64;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((hits / n as f64 - p).abs() <= 5.0 * sd + 1e-12, "{a}/{b}");
        }
        let n = 200_000;
        let hits = (0..n).filter(|_| bits.bernoulli_exp(3, 2)).count() as f64;
        let p = (-1.5f64).exp();
        assert!((hits / n as f64 - p).abs() < 5.0 * (p * (1.0 - p) / n as f64).sqrt());
    }
}
