//! Exact discrete Gaussian sampling (protocols/dp.md §3.4).
//!
//! `N_Z(0, σ²)` puts mass proportional to `exp(-x² / (2σ²))` on every integer
//! `x`. The sampler is Algorithm 3 of Canonne, Kamath & Steinke (2020):
//! propose from a discrete Laplace of integer scale `t = ⌊σ⌋ + 1`, accept with
//! probability `exp(-(|Y| - σ²/t)² / (2σ²))`. `σ²` is held as the exact
//! fraction `num / 2^20` (rounded up from the requested value, so the noise
//! is never smaller than asked for), so every probability the algorithm
//! uses is `exp(-a/b)` or `a/b` for integers `a`, `b`.
//!
//! Two implementations of it draw from exactly the same distribution:
//!
//! - [`DiscreteGaussian::fill`] decides each Bernoulli(exp(-a/b)) as
//!   `U < exp(-a/b)` for a uniform `U` of which it first draws 16 bits. A
//!   floating-point estimate of `exp(-a/b)`, widened by far more than its
//!   error (2^-30 relative), gives an interval sure to hold the true value;
//!   when the prefix puts `U` wholly below or above that interval, the draw
//!   is decided, and decided as the true comparison would. Otherwise (about
//!   once in 30,000 draws) 32 more bits of `U` go the same way, and if even
//!   48 bits cannot decide (about once in 2^47), the comparison is finished
//!   exactly: more bits of `U` against bounds on `exp(-a/b)` computed in
//!   big-integer arithmetic, at growing precision, until they separate. No
//!   outcome depends on a rounding error.
//! - [`DiscreteGaussian::fill_integer`] uses only integer arithmetic: a
//!   Bernoulli(a/b) draw compares random bits with the binary expansion of
//!   `a/b`, and Bernoulli(exp(-a/b)) is CKS20's Algorithm 1. It is the
//!   reference the tests hold the fast one to, and about half as fast.
//!
//! Random bits come from the caller's CSPRNG, 64 at a time.

use dashu_int::UBig;
use dashu_int::ops::BitTest;
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

/// The relative error allowed to a floating-point estimate of a
/// probability `exp(-a/b)` (see [`Interval`]).
const REL_MARGIN: f64 = 1.0 / (1u64 << 30) as f64;
/// The absolute error allowed on top of it, which covers estimates that
/// underflow.
const ABS_MARGIN: f64 = 1.0 / (1u64 << 62) as f64;
/// Exponents past this are estimated as 0: `exp(-699.99) < 2^-1009`, well
/// inside [`ABS_MARGIN`].
const EXP_CUTOFF: f64 = 700.0;
/// The discrete Laplace's `exp(-u/t)` is a product of two table entries,
/// split at this many low bits of `u`.
const FINE_BITS: u32 = 11;

/// An interval `[lo, hi]` around an estimate `p̂` of a probability `p`
/// that is sure to hold `p`, for deciding `U < p` from a prefix of `U`.
///
/// The estimates are [`exp_estimate`]`(g)` (within an ulp), where `g` is
/// the exponent `a/b` evaluated in `f64` from exact integers: at most seven
/// roundings, so `g` is within `2^-50` of `a/b` relatively, and for
/// `g ≤ 700` the estimate is within `2^-39` of `exp(-a/b)` relatively.
/// Past 700 the estimate is 0 and the true value is below `2^-1009`. (The
/// discrete Laplace's estimates are products of two table entries, three
/// roundings more.) The interval is `p̂ ± (p̂ 2^-30 + 2^-62)`,
/// computed with two more roundings of `2^-53`: it holds `p` with room to
/// spare. (`tests::intervals_hold_the_true_probability` checks the claim
/// exactly, against [`exp_bounds`], over thousands of exponents.)
#[derive(Copy, Clone, Debug)]
struct Interval {
    lo: f64,
    hi: f64,
}

impl Interval {
    #[inline]
    fn around(estimate: f64, relative: f64) -> Interval {
        Interval {
            lo: estimate * (1.0 - relative) - ABS_MARGIN,
            hi: estimate * (1.0 + relative) + ABS_MARGIN,
        }
    }

    /// The decision of `U < p` when `U ∈ [k, k + 1) / 2^bits`, if that
    /// prefix makes one. `k + 1 ≤ 2^53`, so both ends are exact floats.
    #[inline]
    fn by_prefix(self, k: u64, scale: f64) -> Option<bool> {
        if (k + 1) as f64 * scale <= self.lo {
            Some(true)
        } else if k as f64 * scale >= self.hi {
            Some(false)
        } else {
            None
        }
    }
}

/// `2^-16` and `2^-48`, the scales of `U`'s prefixes in [`Bits::decide`].
const SCALE_16: f64 = 1.0 / (1u64 << 16) as f64;
const SCALE_48: f64 = 1.0 / (1u64 << 48) as f64;

/// `exp(-g)` for `g ≥ 0`, as [`Interval`] needs it: the platform's `exp`
/// (glibc's and musl's are within one ulp), or 0 when `g > 700` (the true
/// value is then below `2^-1009`).
#[inline]
fn exp_estimate(g: f64) -> f64 {
    if g > EXP_CUTOFF { 0.0 } else { (-g).exp() }
}

impl<R: RngCore + CryptoRng + ?Sized> Bits<'_, R> {
    /// `U < exp(-num/den)` for a fresh uniform `U`, where `near` holds that
    /// probability: decided by the first 16 bits of `U` unless they fall
    /// within the interval (about one draw in 30,000), then by 32 more
    /// (about one in 2^31 of those), and otherwise exactly by
    /// [`below_exp_exact`]. `exact` gives `(num, den)`; it is only called
    /// then.
    #[inline]
    fn decide(&mut self, near: Interval, exact: impl FnOnce() -> (UBig, UBig)) -> bool {
        let k = self.take(16);
        if let Some(decided) = near.by_prefix(k, SCALE_16) {
            return decided;
        }
        let k = (k << 32) | self.take(32);
        if let Some(decided) = near.by_prefix(k, SCALE_48) {
            return decided;
        }
        let (num, den) = exact();
        below_exp_exact(self.rng, UBig::from(k), 48, &num, &den)
    }
}

/// Whether the uniform `U ∈ [0, 1)` whose first `bits` bits are `prefix`
/// is below `exp(-num/den)` (`den > 0`), drawing further bits of `U` from
/// `rng` until exact bounds on `exp(-num/den)` at the same precision
/// separate them. It ends with probability 1; each further 64 bits are
/// needed with probability about `2^-precision`.
fn below_exp_exact<R: RngCore + ?Sized>(
    rng: &mut R,
    prefix: UBig,
    bits: usize,
    num: &UBig,
    den: &UBig,
) -> bool {
    let (mut u, mut precision) = (prefix, bits);
    loop {
        u = (u << 64) | UBig::from(rng.next_u64());
        precision += 64;
        let (lo, hi) = exp_bounds(num, den, precision);
        // U ∈ [u, u + 1) / 2^precision.
        if &u + UBig::ONE <= lo {
            return true;
        }
        if u >= hi {
            return false;
        }
    }
}

/// `a - b`, or 0 when `b > a`.
fn sub_or_zero(a: &UBig, b: &UBig) -> UBig {
    if a > b { a - b } else { UBig::ZERO }
}

/// Integers `(lo, hi)` with `lo ≤ exp(-num/den) 2^precision ≤ hi`, and
/// `hi - lo` a few units for moderate exponents (`den > 0`).
///
/// The exponent is halved `s` times to `y = num/(den 2^s) ≤ 1/2`, where the
/// Taylor series of `exp(-y)` alternates with decreasing terms, so its odd
/// partial sums are lower bounds and its even ones upper bounds. Each term
/// is bounded below and above in fixed point (`q` fraction bits, rounded
/// down and up), and the bounds are squared `s` times, rounded outwards.
fn exp_bounds(num: &UBig, den: &UBig, precision: usize) -> (UBig, UBig) {
    let one = UBig::ONE << precision;
    if *num == UBig::ZERO {
        return (one.clone(), one);
    }
    let s = (num.bit_len() + 2).saturating_sub(den.bit_len());
    let q = precision + s + 32;
    let b = den << s;
    let (mut term_lo, mut term_hi) = (UBig::ONE << q, UBig::ONE << q);
    // Sums of the even and odd terms so far, each bounded both ways.
    let (mut even_lo, mut even_hi) = (term_lo.clone(), term_hi.clone());
    let (mut odd_lo, mut odd_hi) = (UBig::ZERO, UBig::ZERO);
    let (mut lower, mut upper) = (UBig::ZERO, UBig::ZERO);
    let mut k: usize = 1;
    loop {
        let step = &b * UBig::from(k);
        term_lo = (&term_lo * num) / &step;
        term_hi = (&term_hi * num + &step - UBig::ONE) / &step;
        if k % 2 == 1 {
            odd_lo += &term_lo;
            odd_hi += &term_hi;
            lower = sub_or_zero(&even_lo, &odd_hi);
        } else {
            even_lo += &term_lo;
            even_hi += &term_hi;
            upper = sub_or_zero(&even_hi, &odd_lo);
        }
        if k >= 2 && term_hi <= UBig::ONE {
            break;
        }
        k += 1;
    }
    let round_up = (UBig::ONE << q) - UBig::ONE;
    for _ in 0..s {
        lower = (&lower * &lower) >> q;
        upper = (&upper * &upper + &round_up) >> q;
    }
    let drop = q - precision;
    let round_up = (UBig::ONE << drop) - UBig::ONE;
    (lower >> drop, (upper + round_up) >> drop)
}

/// One `fill` call's precomputed estimates.
struct Fast {
    t: u64,
    /// `exp(-(a 2^FINE_BITS)/t)` for every `a ≤ (t - 1) >> FINE_BITS`.
    coarse: Vec<f64>,
    /// `exp(-b/t)` for every `b < min(t, 2^FINE_BITS)`.
    fine: Vec<f64>,
    /// The cut for `exp(-1)`.
    inv_e: Interval,
    /// `σ² = p / 2^20`.
    p: u128,
    /// `q t` with `q = 2^20`.
    qt: u128,
    /// The acceptance exponent's denominator `2 p q t²`, exactly and as a
    /// float.
    d: u128,
    d_float: f64,
    /// The relative margin of every interval ([`REL_MARGIN`]; wider in
    /// tests).
    relative: f64,
}

impl Fast {
    fn new(g: &DiscreteGaussian, relative: f64) -> Result<Fast, DpError> {
        let t = g.t;
        let tf = t as f64;
        let coarse = (0..=((t - 1) >> FINE_BITS))
            .map(|a| exp_estimate((a << FINE_BITS) as f64 / tf))
            .collect();
        let fine = (0..t.min(1 << FINE_BITS))
            .map(|b| exp_estimate(b as f64 / tf))
            .collect();
        let q: u128 = 1 << VARIANCE_DENOMINATOR_BITS;
        let p = g.var_num;
        let t = u128::from(t);
        let d = p
            .checked_mul(2 * q)
            .and_then(|v| v.checked_mul(t * t))
            .ok_or(DpError::Internal("sampler overflow"))?;
        Ok(Fast {
            t: g.t,
            coarse,
            fine,
            inv_e: Interval::around(exp_estimate(1.0), relative),
            p,
            qt: q * t,
            d,
            d_float: d as f64,
            relative,
        })
    }

    /// CKS20 Algorithm 2 (the discrete Laplace of scale `t`), deciding
    /// each Bernoulli(exp(-·)) by [`Bits::decide`].
    #[inline]
    fn laplace<R: RngCore + CryptoRng + ?Sized>(
        &self,
        bits: &mut Bits<'_, R>,
    ) -> Result<i64, DpError> {
        let t = self.t;
        loop {
            let u = bits.below(t);
            // exp(-u/t) = exp(-(a 2^11)/t) exp(-b/t): three roundings more,
            // still far inside the cut's margin.
            let estimate = self.coarse[(u >> FINE_BITS) as usize]
                * self.fine[(u & ((1 << FINE_BITS) - 1)) as usize];
            if !bits.decide(Interval::around(estimate, self.relative), || {
                (UBig::from(u), UBig::from(t))
            }) {
                continue;
            }
            let mut v: u64 = 0;
            while bits.decide(self.inv_e, || (UBig::ONE, UBig::ONE)) {
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

    /// CKS20 Algorithm 3: accept `Y` with probability
    /// `exp(-(|Y| q t - p)² / (2 p q t²))`.
    #[inline]
    fn gaussian<R: RngCore + CryptoRng + ?Sized>(
        &self,
        bits: &mut Bits<'_, R>,
    ) -> Result<i64, DpError> {
        loop {
            let y = self.laplace(bits)?;
            let diff = u128::from(y.unsigned_abs())
                .checked_mul(self.qt)
                .ok_or(DpError::Internal("sampler overflow"))?
                .abs_diff(self.p);
            // Two 64-bit conversions (u128's goes through a slow library
            // call): within 2^-52 of diff, relatively.
            let df =
                ((diff >> 64) as u64) as f64 * 18_446_744_073_709_551_616.0 + (diff as u64) as f64;
            let estimate = exp_estimate(df * df / self.d_float);
            if bits.decide(Interval::around(estimate, self.relative), || {
                let diff = UBig::from(diff);
                (&diff * &diff, UBig::from(self.d))
            }) {
                return Ok(y);
            }
        }
    }
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

    /// Fills `out` with independent samples (the fast exact path, see the
    /// module's documentation).
    pub fn fill<R: RngCore + CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        out: &mut [i64],
    ) -> Result<(), DpError> {
        out.fill(0);
        self.add_to(rng, out)
    }

    /// Adds an independent sample to every element of `values` (wrapping),
    /// as [`DiscreteGaussian::fill`] draws them.
    pub fn add_to<R: RngCore + CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        values: &mut [i64],
    ) -> Result<(), DpError> {
        let fast = Fast::new(self, REL_MARGIN)?;
        let mut bits = Bits::new(rng);
        for v in values.iter_mut() {
            *v = v.wrapping_add(fast.gaussian(&mut bits)?);
        }
        Ok(())
    }

    /// Fills `out` with independent samples from the same distribution as
    /// [`DiscreteGaussian::fill`], in integer arithmetic only (CKS20 as
    /// published): the reference implementation.
    pub fn fill_integer<R: RngCore + CryptoRng + ?Sized>(
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

    /// `exp(-n/d)` to f64 precision.
    fn exp_f64(n: u128, d: u128) -> f64 {
        (-(n as f64) / d as f64).exp()
    }

    #[test]
    fn exact_bounds_bracket_the_exponential() {
        for (n, d) in [
            (0u128, 1u128),
            (1, 1),
            (1, 3),
            (2, 7),
            (5, 2),
            (1000, 3),
            (12345, 1 << 40),
            (u128::MAX / 5, 1 << 100),
        ] {
            for precision in [64usize, 128, 256] {
                let (lo, hi) = exp_bounds(&UBig::from(n), &UBig::from(d), precision);
                assert!(lo <= hi, "{n}/{d}");
                // Within a few units of each other...
                assert!(
                    &hi - &lo <= UBig::from(4u8),
                    "{n}/{d} at {precision}: {lo} {hi}"
                );
                // ...and around the true value (checked in f64 at 64 bits).
                let scale = 2f64.powi(precision as i32);
                let (l, h) = (lo.to_f64().value() / scale, hi.to_f64().value() / scale);
                let e = exp_f64(n, d);
                assert!(
                    l <= e * (1.0 + 1e-15) && e <= h * (1.0 + 1e-15),
                    "{n}/{d}: {l} {e} {h}"
                );
            }
        }
        // A 256-bit exponent: the value is 0 to any precision we reach.
        let huge = UBig::from(u128::MAX) * UBig::from(u128::MAX);
        let (lo, hi) = exp_bounds(&huge, &UBig::from(3u8), 128);
        assert_eq!(lo, UBig::ZERO);
        assert_eq!(hi, UBig::ONE);
    }

    /// `f` as `(m, e)` with `f = m 2^e` exactly (`f ≥ 0`, finite).
    fn decode(f: f64) -> (u64, i32) {
        let bits = f.to_bits();
        let exponent = ((bits >> 52) & 0x7ff) as i32;
        let fraction = bits & ((1 << 52) - 1);
        if exponent == 0 {
            (fraction, -1074)
        } else {
            (fraction | (1 << 52), exponent - 1075)
        }
    }

    /// `f 2^precision ≤ n` (or `≥ n` with `at_least`), exactly.
    fn compare(f: f64, precision: usize, n: &UBig, at_least: bool) -> bool {
        if f <= 0.0 {
            return !at_least || *n == UBig::ZERO;
        }
        let (m, e) = decode(f);
        let shift = e + precision as i32;
        // Compare m 2^shift with n.
        let (left, right) = if shift >= 0 {
            (UBig::from(m) << shift as usize, n.clone())
        } else {
            (UBig::from(m), n << (-shift) as usize)
        };
        if at_least {
            left >= right
        } else {
            left <= right
        }
    }

    /// The claim of [`Interval`], checked exactly: for exponents a/b from
    /// the sampler's three uses and from a pseudo-random spread, the
    /// interval's ends bracket exact bounds on exp(-a/b) at 192 bits.
    #[test]
    fn intervals_hold_the_true_probability() {
        let mut rng = ChaCha20Rng::seed_from_u64(21);
        let mut exponents: Vec<(u128, u128)> = vec![
            (0, 1),
            (1, 1),
            (1, 3),
            (699, 1),
            (700, 1),
            (1401, 2),
            (701, 1),
        ];
        for _ in 0..3000 {
            let d = u128::from(rng.next_u64() >> (rng.next_u32() % 64)).max(1);
            let n = (u128::from(rng.next_u64())
                * u128::from(rng.next_u32() >> (rng.next_u32() % 32)))
                % (d.saturating_mul(1100));
            exponents.push((n, d));
        }
        // The discrete Laplace's table products at t = 1001.
        let g = DiscreteGaussian::new(1000.0).unwrap();
        let fast = Fast::new(&g, REL_MARGIN).unwrap();
        let mut checked = 0;
        for (n, d) in exponents {
            let estimate = exp_estimate(n as f64 / d as f64);
            let near = Interval::around(estimate, REL_MARGIN);
            let (lo, hi) = exp_bounds(&UBig::from(n), &UBig::from(d), 192);
            assert!(
                compare(near.lo, 192, &lo, false),
                "{n}/{d}: low end above exp"
            );
            assert!(
                compare(near.hi, 192, &hi, true),
                "{n}/{d}: high end below exp"
            );
            checked += 1;
        }
        for u in (0..1001u64).step_by(7) {
            let estimate = fast.coarse[(u >> FINE_BITS) as usize]
                * fast.fine[(u & ((1 << FINE_BITS) - 1)) as usize];
            let near = Interval::around(estimate, REL_MARGIN);
            let (lo, hi) = exp_bounds(&UBig::from(u), &UBig::from(1001u16), 192);
            assert!(
                compare(near.lo, 192, &lo, false) && compare(near.hi, 192, &hi, true),
                "{u}"
            );
        }
        let (lo, hi) = exp_bounds(&UBig::ONE, &UBig::ONE, 192);
        assert!(compare(fast.inv_e.lo, 192, &lo, false) && compare(fast.inv_e.hi, 192, &hi, true));
        assert!(checked > 3000);
    }

    /// Frequencies of `decide` against the probability, with the margin so
    /// wide that about half of the draws go to the exact comparison.
    #[test]
    fn the_exact_fallback_decides_with_the_right_probability() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut bits = Bits::new(&mut rng);
        for (n, d) in [(1u128, 1u128), (2, 7), (7, 2), (30, 1)] {
            let p = exp_f64(n, d);
            let trials = 40_000;
            let hits = (0..trials)
                .filter(|_| {
                    bits.decide(Interval::around(p, 0.5), || (UBig::from(n), UBig::from(d)))
                })
                .count() as f64;
            let sd = (p * (1.0 - p) / trials as f64).sqrt();
            assert!(
                (hits / trials as f64 - p).abs() < 5.0 * sd + 1e-9,
                "{n}/{d}"
            );
        }
        // p = exp(-70) ≈ 2^-101 with U's first 64 bits all 0: the next
        // word decides. All zeros puts U below 2^-128 < p...
        let seventy = UBig::from(70u8);
        let mut zeros = Counter(0);
        assert!(below_exp_exact(
            &mut zeros,
            UBig::ZERO,
            64,
            &seventy,
            &UBig::ONE
        ));
        assert_eq!(zeros.0, 1, "one more word was drawn");
        // ...and a word with its top bit set puts U above 2^-65 > p.
        let mut ones = Counter(1);
        assert!(!below_exp_exact(
            &mut ones,
            UBig::ZERO,
            64,
            &seventy,
            &UBig::ONE
        ));
    }

    /// Word `i` of its stream is `i` times an odd constant: the first is 0.
    struct Counter(u64);
    impl RngCore for Counter {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            let v = self.0;
            self.0 += 1;
            v.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            rand_core::impls::fill_bytes_via_next(self, dest)
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    /// The fast sampler, with every cut wide enough to send a third of
    /// the decisions to the exact comparison, has the right moments.
    #[test]
    fn the_sampler_through_the_fallback_keeps_its_distribution() {
        let g = DiscreteGaussian::new(2.5).unwrap();
        let fast = Fast::new(&g, 0.3).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let mut bits = Bits::new(&mut rng);
        let n = 40_000;
        let xs: Vec<i64> = (0..n).map(|_| fast.gaussian(&mut bits).unwrap()).collect();
        let pmf = g.pmf_table(30);
        let var: f64 = pmf
            .iter()
            .enumerate()
            .map(|(i, p)| p * (i as f64 - 30.0).powi(2))
            .sum();
        let mean = xs.iter().sum::<i64>() as f64 / n as f64;
        let m2 = xs.iter().map(|&x| (x * x) as f64).sum::<f64>() / n as f64;
        assert!(mean.abs() < 5.0 * (var / n as f64).sqrt(), "{mean}");
        assert!(
            (m2 - var).abs() < 5.0 * var * (2.0 / n as f64).sqrt(),
            "{m2} vs {var}"
        );
        let zeros = xs.iter().filter(|&&x| x == 0).count() as f64 / n as f64;
        assert!(
            (zeros - pmf[30]).abs() < 5.0 * (pmf[30] / n as f64).sqrt(),
            "{zeros}"
        );
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
