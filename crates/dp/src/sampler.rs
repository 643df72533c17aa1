//! Exact discrete Gaussian sampling (protocols/dp.md §3.4).
//!
//! `N_Z(0, σ²)` puts mass proportional to `ρ(x) = exp(-x² / (2σ²))` on
//! every integer `x`. `σ²` is held as the exact fraction `num / 2^20`
//! (rounded up from the requested value, so the noise is never smaller than
//! asked for), so every probability a sampler uses is `exp(-a/b)` times a
//! rational, with integers `a`, `b`. Two implementations draw from exactly
//! this distribution:
//!
//! - [`DiscreteGaussian::fill`] and [`DiscreteGaussian::add_to`]: rejection
//!   from a precomputed envelope of integer heights over strips of the
//!   integers (`Envelope`), picked by an exact alias table and accepted
//!   with probability `K ρ(x) / height`. Each acceptance is the comparison
//!   `U < p` for a uniform `U` of which 16 bits are drawn first; a
//!   floating-point estimate of `p`, widened by far more than its error
//!   (2^-30 relative), gives an interval sure to hold `p`, and when the
//!   prefix puts `U` wholly below or above it the draw is decided as the
//!   true comparison would. Otherwise (about once in 30,000 draws) 32 more
//!   bits of `U` go the same way, and if even 48 bits cannot decide (about
//!   once in 2^47), the comparison is finished exactly: more bits of `U`
//!   against bounds on `p` computed in big-integer arithmetic, at growing
//!   precision, until they separate. No outcome depends on a rounding
//!   error. About 11 ns per sample here.
//! - [`DiscreteGaussian::fill_integer`]: Algorithm 3 of Canonne, Kamath &
//!   Steinke (2020) in integer arithmetic only (a discrete Laplace proposal
//!   of scale `t = ⌊σ⌋ + 1`, accepted with probability
//!   `exp(-(|Y| - σ²/t)² / (2σ²))`; Bernoulli(a/b) compares random bits with
//!   the binary expansion of `a/b`, Bernoulli(exp(-a/b)) is CKS20's
//!   Algorithm 1). It is the reference the tests hold the fast one to, and
//!   about twelve times slower.
//!
//! Random bits come from the caller's CSPRNG, 64 at a time.

use dashu_int::UBig;
use dashu_int::ops::BitTest;
use rand_core::{CryptoRng, RngCore};

use crate::DpError;

/// A uniform value in [0, 1) with 53 random bits.
#[inline]
pub fn uniform_unit<R: RngCore + ?Sized>(rng: &mut R) -> f64 {
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

/// An interval `[lo, hi]` around an estimate `p̂` of a probability `p`
/// that is sure to hold `p`, for deciding `U < p` from a prefix of `U`.
///
/// The estimates are [`exp_estimate`]`(g)` (within an ulp), where `g` is
/// the exponent `a/b` evaluated in `f64` from exact integers: at most seven
/// roundings, so `g` is within `2^-50` of `a/b` relatively, and for
/// `g ≤ 700` the estimate is within `2^-39` of `exp(-a/b)` relatively.
/// Past 700 the estimate is 0 and the true value is below `2^-1009`. (The
/// envelope's acceptance probabilities are such an estimate times `K/h`,
/// two roundings more, and past 700 below `2^-1009 K ≤ 2^-961`.) The
/// interval is `p̂ ± (p̂ 2^-30 + 2^-62)`,
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
    /// `U < p` for a fresh uniform `U`, where `near` holds `p`: see
    /// [`Bits::decide_after`].
    #[cfg(test)]
    fn decide(&mut self, near: Interval, exact: impl FnOnce() -> Exact) -> bool {
        let prefix = self.take(16);
        self.decide_after(prefix, near, exact)
    }

    /// `U < p` for the uniform `U` whose first 16 bits are `prefix`, where
    /// `near` holds `p`: decided by those bits unless they fall within the
    /// interval (about one draw in 30,000), then by 32 more (about one in
    /// 2^31 of those), and otherwise exactly by [`below_exp_exact`].
    /// `exact` gives `p`; it is only called then.
    #[inline]
    fn decide_after(&mut self, prefix: u64, near: Interval, exact: impl FnOnce() -> Exact) -> bool {
        if let Some(decided) = near.by_prefix(prefix, SCALE_16) {
            return decided;
        }
        let k = (prefix << 32) | self.take(32);
        if let Some(decided) = near.by_prefix(k, SCALE_48) {
            return decided;
        }
        below_exp_exact(self.rng, UBig::from(k), 48, &exact())
    }
}

/// Whether the uniform `U ∈ [0, 1)` whose first `bits` bits are `prefix`
/// is below `p`, drawing further bits of `U` from `rng` until exact bounds
/// on `p` at the same precision separate them. It ends with probability 1;
/// each further 64 bits are needed with probability about
/// `2^-precision` times `p`'s `times / over`.
fn below_exp_exact<R: RngCore + ?Sized>(rng: &mut R, prefix: UBig, bits: usize, p: &Exact) -> bool {
    let (mut u, mut precision) = (prefix, bits);
    loop {
        u = (u << 64) | UBig::from(rng.next_u64());
        precision += 64;
        let (lo, hi) = exp_bounds(&p.num, &p.den, precision);
        // U ∈ [u, u + 1) / 2^precision, and
        // p ∈ [lo, hi] times / (over 2^precision).
        if (&u + UBig::ONE) * &p.over <= lo * &p.times {
            return true;
        }
        if &u * &p.over >= hi * &p.times {
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

/// Columns of the envelope's alias table.
const COLUMNS: usize = 256;
/// `log2(COLUMNS)`.
const COLUMN_BITS: u32 = 8;
/// The envelope's pieces have integer weights summing to exactly
/// `2^WEIGHT_BITS`, so one 64-bit word picks a column and a threshold.
const WEIGHT_BITS: u32 = 48;
/// The strips cover `1 ≤ |x| ≤ SPAN σ` (rounded up to whole strips); the
/// tail covers the rest.
const SPAN: f64 = 8.0;
/// Heights are rounded up from estimates raised by this much, relatively:
/// far more than the estimates' error.
const HEIGHT_MARGIN: f64 = 1.0 / (1u64 << 28) as f64;

/// The probability `exp(-num/den) · times / over`, exactly.
struct Exact {
    num: UBig,
    den: UBig,
    times: UBig,
    over: UBig,
}

/// The sampler's precomputed envelope for one `σ` (protocols/dp.md §3.4).
///
/// With `ρ(x) = exp(-x²/(2σ²))`, the envelope dominates `K ρ` by integer
/// heights on pieces of the integers:
///
/// - the piece `{0}`, of height `K` (`ρ(0) = 1`);
/// - `±[L, L + w)` for consecutive strips of width `w = 2^width_bits`
///   from `L = 1`, of height `h ≥ K ρ(L)`;
/// - the tail `±[X + k v, X + (k + 1) v)` for `k ≥ 0`, of height
///   `h_T 2^-k` with `h_T ≥ K ρ(X)`, where `v = 2^tail_bits ≥ σ²/X` makes
///   `ρ(X + y) ≤ ρ(X) exp(-X y/σ²) ≤ ρ(X) 2^-k` for `y ≥ k v`;
/// - a rejecting piece that brings the total to `2^48`.
///
/// A draw picks a piece with probability its weight (height times size)
/// over `2^48` by an exact alias table, a point of it uniformly (in the
/// tail: `k` with probability `2^-(k+1)`, then the offset), and accepts
/// with probability `K ρ(x) / height` — so every accepted `x` has
/// probability proportional to `ρ(x)`, exactly. About 98% of proposals are
/// accepted, and most of those are decided from 16 random bits against a
/// precomputed lower bound on the strip's acceptance probability, without
/// evaluating `exp`.
struct Envelope {
    /// The alias table: column `c` yields piece `c` if the threshold is
    /// below `keep[c]`, else piece `alias[c]`.
    keep: [u64; COLUMNS],
    alias: [u8; COLUMNS],
    /// Pieces `1..=strips` are the strips; `strips + 1` is the tail; the
    /// rest reject.
    strips: usize,
    width_bits: u32,
    /// Per piece (indexed by piece): the strip's first point, its height
    /// `h`, `K/h` as a float, and a lower bound on the acceptance
    /// probability over the strip.
    start: [u64; COLUMNS],
    height: [u64; COLUMNS],
    ratio: [f64; COLUMNS],
    squeeze: [f64; COLUMNS],
    tail_start: u64,
    tail_bits: u32,
    tail_height: u64,
    /// `K`.
    scale: u64,
    /// `σ² = var_num / 2^20`.
    var_num: u128,
    /// `2^20 / (2 var_num)`: `ρ(x) = exp(-x² gamma)`.
    gamma: f64,
    /// The relative margin of every interval ([`REL_MARGIN`]; wider in
    /// tests).
    relative: f64,
}

impl Envelope {
    fn new(g: &DiscreteGaussian, span: f64, relative: f64) -> Result<Envelope, DpError> {
        let overflow = DpError::Internal("sampler envelope");
        let p = g.var_num;
        let q: u128 = 1 << VARIANCE_DENOMINATOR_BITS;
        let sigma = (p as f64 / q as f64).sqrt();
        let gamma = q as f64 / (2.0 * p as f64);
        let estimate = |x: u64| exp_estimate(x as f64 * x as f64 * gamma);

        let reach = ((span * sigma).ceil() as u64).max(1);
        let most = (COLUMNS - 3) as u64;
        let mut width_bits = 0;
        while reach.div_ceil(1 << width_bits) > most {
            width_bits += 1;
        }
        let width = 1u64 << width_bits;
        let strips = reach.div_ceil(width) as usize;
        let tail_start = 1 + strips as u64 * width;
        let mut tail_bits = 0;
        while (u128::from(tail_start) << tail_bits) * q < p {
            tail_bits += 1;
        }
        if width_bits > 32 || tail_bits > 32 {
            return Err(overflow);
        }
        let tail_width = 1u64 << tail_bits;

        // The estimates of ρ at each strip's first point and at the tail's,
        // raised by the margin; a height is K times that, rounded up.
        let peaks: Vec<f64> = (0..strips)
            .map(|j| estimate(1 + j as u64 * width) * (1.0 + HEIGHT_MARGIN))
            .collect();
        let tail_peak = estimate(tail_start) * (1.0 + HEIGHT_MARGIN);
        let height = |peak: f64, scale: u64| ((peak * scale as f64).ceil() as u64).max(1);
        // Total weight ≈ K · per_unit + slack (each rounded-up height adds
        // less than one unit per point).
        let per_unit = 1.0
            + peaks.iter().map(|e| 2.0 * width as f64 * e).sum::<f64>()
            + 4.0 * tail_width as f64 * tail_peak;
        let slack = 2 * width * strips as u64 + 4 * tail_width;
        let capacity = 1u64 << WEIGHT_BITS;
        let mut scale =
            ((capacity.saturating_sub(slack)) as f64 / per_unit * (1.0 - 1e-9)).floor() as u64;
        let (weights, heights, tail_height) = loop {
            if scale == 0 {
                return Err(overflow);
            }
            let heights: Vec<u64> = peaks.iter().map(|&e| height(e, scale)).collect();
            let tail_height = height(tail_peak, scale);
            let mut weights = vec![u128::from(scale)];
            weights.extend(
                heights
                    .iter()
                    .map(|&h| 2 * u128::from(width) * u128::from(h)),
            );
            weights.push(4 * u128::from(tail_width) * u128::from(tail_height));
            let total: u128 = weights.iter().sum();
            if total <= u128::from(capacity) {
                weights.push(u128::from(capacity) - total);
                weights.resize(COLUMNS, 0);
                break (weights, heights, tail_height);
            }
            scale -= scale / 1024 + 1;
        };

        // Vose's alias method in exact integers: each column holds
        // `capacity`, each piece `COLUMNS × weight` in all.
        let mut scaled: Vec<u128> = weights.iter().map(|w| w * COLUMNS as u128).collect();
        let cap = u128::from(capacity);
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..COLUMNS).partition(|&i| scaled[i] < cap);
        let mut keep = [capacity; COLUMNS];
        let mut alias = [0u8; COLUMNS];
        for (i, a) in alias.iter_mut().enumerate() {
            *a = i as u8;
        }
        while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
            small.pop();
            keep[s] = scaled[s] as u64;
            alias[s] = l as u8;
            scaled[l] -= cap - scaled[s];
            if scaled[l] < cap {
                large.pop();
                small.push(l);
            }
        }
        // The weights sum to the capacity, so what is left is full.
        if small.iter().chain(&large).any(|&i| scaled[i] != cap) {
            return Err(DpError::Internal("sampler alias table"));
        }

        let mut start = [0u64; COLUMNS];
        let mut heights_by_piece = [0u64; COLUMNS];
        let mut ratio = [0f64; COLUMNS];
        let mut squeeze = [0f64; COLUMNS];
        for (j, &h) in heights.iter().enumerate() {
            let first = 1 + j as u64 * width;
            let r = scale as f64 / h as f64;
            start[j + 1] = first;
            heights_by_piece[j + 1] = h;
            ratio[j + 1] = r;
            squeeze[j + 1] = Interval::around(estimate(first + width - 1) * r, relative).lo;
        }
        Ok(Envelope {
            keep,
            alias,
            strips,
            width_bits,
            start,
            height: heights_by_piece,
            ratio,
            squeeze,
            tail_start,
            tail_bits,
            tail_height,
            scale,
            var_num: p,
            gamma,
            relative,
        })
    }

    /// Piece `c`'s weight as the alias table gives it (`COLUMNS ×` that is
    /// its share of all columns' capacity).
    #[cfg(test)]
    fn piece_weight(&self, c: usize) -> u128 {
        let mut total: u128 = 0;
        for column in 0..COLUMNS {
            if column == c {
                total += u128::from(self.keep[column]);
            }
            if usize::from(self.alias[column]) == c {
                total += u128::from((1u64 << WEIGHT_BITS) - self.keep[column]);
            }
        }
        total / COLUMNS as u128
    }

    /// `ρ(x) K / over` as an [`Exact`], times `2^shift`.
    fn exact(&self, x: u64, over: u64, shift: u32) -> Exact {
        let x = UBig::from(x);
        Exact {
            num: (&x * &x) << VARIANCE_DENOMINATOR_BITS as usize,
            den: UBig::from(self.var_num) << 1,
            times: UBig::from(self.scale) << shift as usize,
            over: UBig::from(over),
        }
    }

    /// One sample.
    #[inline]
    fn sample<R: RngCore + CryptoRng + ?Sized>(
        &self,
        bits: &mut Bits<'_, R>,
    ) -> Result<i64, DpError> {
        loop {
            let word = bits.rng.next_u64();
            let column = (word >> (64 - COLUMN_BITS)) as usize;
            let threshold = word & ((1 << WEIGHT_BITS) - 1);
            let piece = if threshold < self.keep[column] {
                column
            } else {
                usize::from(self.alias[column])
            };
            let negative = (word >> WEIGHT_BITS) & 1 == 1;
            let x = if piece == 0 {
                return Ok(0);
            } else if piece <= self.strips {
                let x = self.start[piece] + bits.take(self.width_bits);
                let prefix = bits.take(16);
                // U < squeeze ≤ the acceptance probability: accepted.
                if (prefix + 1) as f64 * SCALE_16 > self.squeeze[piece] {
                    let xf = x as f64;
                    let estimate = exp_estimate(xf * xf * self.gamma) * self.ratio[piece];
                    let near = Interval::around(estimate, self.relative);
                    if !bits.decide_after(prefix, near, || self.exact(x, self.height[piece], 0)) {
                        continue;
                    }
                }
                x
            } else if piece == self.strips + 1 {
                match self.tail(bits)? {
                    Some(x) => x,
                    None => continue,
                }
            } else {
                continue;
            };
            let x = i64::try_from(x).map_err(|_| DpError::Internal("sampler overflow"))?;
            return Ok(if negative { -x } else { x });
        }
    }

    /// A proposal from the tail, decided exactly (the tail is drawn about
    /// once in 2^27 proposals at most, so speed does not matter).
    #[cold]
    fn tail<R: RngCore + CryptoRng + ?Sized>(
        &self,
        bits: &mut Bits<'_, R>,
    ) -> Result<Option<u64>, DpError> {
        let mut k: u32 = 0;
        while !bits.bit() {
            k += 1;
        }
        let offset = bits.take(self.tail_bits);
        // x < 2^40 keeps x² 2^20 within 128 bits; a larger x has
        // probability below 2^-(2^40 / v).
        let x = u64::from(k)
            .checked_mul(1 << self.tail_bits)
            .and_then(|kv| kv.checked_add(self.tail_start + offset))
            .filter(|&x| x < 1 << 40)
            .ok_or(DpError::Internal("sampler overflow"))?;
        let exact = self.exact(x, self.tail_height, k);
        Ok(below_exp_exact(bits.rng, UBig::ZERO, 0, &exact).then_some(x))
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
        let envelope = Envelope::new(self, SPAN, REL_MARGIN)?;
        let mut bits = Bits::new(rng);
        for v in values.iter_mut() {
            *v = v.wrapping_add(envelope.sample(&mut bits)?);
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
                .filter(|_| bits.decide(Interval::around(p, 0.5), || plain(n, d)))
                .count() as f64;
            let sd = (p * (1.0 - p) / trials as f64).sqrt();
            assert!(
                (hits / trials as f64 - p).abs() < 5.0 * sd + 1e-9,
                "{n}/{d}"
            );
        }
        // p = exp(-70) ≈ 2^-101 with U's first 64 bits all 0: the next
        // word decides. All zeros puts U below 2^-128 < p...
        let mut zeros = Counter(0);
        let p = plain(70, 1);
        assert!(below_exp_exact(&mut zeros, UBig::ZERO, 64, &p));
        assert_eq!(zeros.0, 1, "one more word was drawn");
        // ...and a word with its top bit set puts U above 2^-65 > p.
        let mut ones = Counter(1);
        assert!(!below_exp_exact(&mut ones, UBig::ZERO, 64, &p));
        // A scaled probability: exp(-1) · 3/4 against U = 1/2 exactly
        // (a prefix of 1 then zeros): 0.2759 < 1/2, so no.
        let scaled = Exact {
            times: UBig::from(3u8),
            over: UBig::from(4u8),
            ..plain(1, 1)
        };
        assert!(!below_exp_exact(&mut Counter(0), UBig::ONE, 1, &scaled));
        // exp(-1) · 2 = 0.7358 against U ∈ [1/2, 1/2 + 2^-65): yes.
        let doubled = Exact {
            times: UBig::from(2u8),
            ..plain(1, 1)
        };
        assert!(below_exp_exact(&mut Counter(0), UBig::ONE, 1, &doubled));
    }

    /// `exp(-n/d)` as an [`Exact`].
    fn plain(n: u128, d: u128) -> Exact {
        Exact {
            num: UBig::from(n),
            den: UBig::from(d),
            times: UBig::ONE,
            over: UBig::ONE,
        }
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

    /// Chi-square z-score (Wilson–Hilferty) of (observed, expected)
    /// counts, consecutive cells grouped to expected counts of 5.
    fn grouped_z(cells: impl IntoIterator<Item = (f64, f64)>) -> f64 {
        let mut grouped: Vec<(f64, f64)> = Vec::new();
        let mut acc = (0.0, 0.0);
        for (o, e) in cells {
            acc = (acc.0 + o, acc.1 + e);
            if acc.1 >= 5.0 {
                grouped.push(acc);
                acc = (0.0, 0.0);
            }
        }
        let chi: f64 = grouped.iter().map(|(o, e)| (o - e) * (o - e) / e).sum();
        let k = (grouped.len() - 1) as f64;
        let a = 2.0 / (9.0 * k);
        ((chi / k).cbrt() - (1.0 - a)) / a.sqrt()
    }

    /// [`grouped_z`] of samples against the exact pmf over `|x| ≤ bound`.
    fn fit_z(g: &DiscreteGaussian, xs: &[i64], bound: i64) -> f64 {
        let pmf = g.pmf_table(bound);
        let mut counts = vec![0.0; pmf.len()];
        for &x in xs {
            assert!(x.abs() <= bound, "{x} beyond {bound}");
            counts[(x + bound) as usize] += 1.0;
        }
        let n = xs.len() as f64;
        grouped_z(counts.into_iter().zip(pmf.into_iter().map(|p| p * n)))
    }

    /// The envelope's pieces dominate `K ρ`, its squeezes are lower bounds
    /// on the acceptance probability, and the intervals around its
    /// estimates hold the true acceptance probabilities: all checked
    /// exactly against [`exp_bounds`], from tiny to the largest `σ`.
    #[test]
    fn the_envelope_dominates_and_its_intervals_hold() {
        const P: usize = 192;
        for sigma in [0.3, 0.75, 2.5, 10.0, 333.3, 1000.0, 12345.6, MAX_SIGMA] {
            let g = DiscreteGaussian::new(sigma).unwrap();
            let e = Envelope::new(&g, SPAN, REL_MARGIN).unwrap();
            let k = UBig::from(e.scale);
            let width = 1u64 << e.width_bits;
            let exact = |x: u64| {
                let x = UBig::from(x);
                let num = (&x * &x) << VARIANCE_DENOMINATOR_BITS as usize;
                exp_bounds(&num, &(UBig::from(g.var_num) << 1), P)
            };
            let mut pieces: Vec<(u64, u64, usize)> = (1..=e.strips)
                .map(|c| (e.start[c], e.height[c], c))
                .collect();
            pieces.push((e.tail_start, e.tail_height, 0));
            for (first, h, c) in pieces {
                // K ρ(first) ≤ h: K hi ≤ h 2^P.
                let (_, hi) = exact(first);
                assert!(&k * hi <= UBig::from(h) << P, "σ={sigma}: piece at {first}");
                if c == 0 {
                    continue;
                }
                // Over the strip, the acceptance probability K ρ(x)/h is at
                // least the squeeze (at the last point, where it is least)
                // and within the interval around its estimate.
                let last = first + width - 1;
                let step = (width / 7).max(1);
                for x in (first..=last).step_by(step as usize).chain([last]) {
                    let (lo, hi) = exact(x);
                    let floor = (&k * lo) / UBig::from(h);
                    let ceil = (&k * hi + UBig::from(h - 1)) / UBig::from(h);
                    assert!(
                        compare(e.squeeze[c], P, &floor, false),
                        "σ={sigma}: squeeze at {x}"
                    );
                    let xf = x as f64;
                    let estimate = exp_estimate(xf * xf * e.gamma) * e.ratio[c];
                    let near = Interval::around(estimate, REL_MARGIN);
                    assert!(
                        compare(near.lo, P, &floor, false),
                        "σ={sigma}: low end at {x}"
                    );
                    assert!(
                        compare(near.hi, P, &ceil, true),
                        "σ={sigma}: high end at {x}"
                    );
                }
            }
            // The tail is geometric in v = 2^tail_bits: v X ≥ σ².
            assert!(
                (u128::from(e.tail_start) << e.tail_bits) << VARIANCE_DENOMINATOR_BITS >= g.var_num
            );
            assert!(e.tail_start as f64 >= SPAN * sigma);
        }
    }

    /// The alias table gives every piece exactly its weight, and the
    /// weights add up to 2^48.
    #[test]
    fn the_alias_table_is_exact() {
        for sigma in [0.3, 3.0, 1000.0, MAX_SIGMA] {
            let g = DiscreteGaussian::new(sigma).unwrap();
            let e = Envelope::new(&g, SPAN, REL_MARGIN).unwrap();
            let width = 1u128 << e.width_bits;
            assert_eq!(e.piece_weight(0), u128::from(e.scale));
            let mut total = e.piece_weight(0);
            for c in 1..=e.strips {
                assert_eq!(e.piece_weight(c), 2 * width * u128::from(e.height[c]));
                total += e.piece_weight(c);
            }
            let tail = e.piece_weight(e.strips + 1);
            assert_eq!(tail, 4 * (1u128 << e.tail_bits) * u128::from(e.tail_height));
            total += tail;
            let reject: u128 = (e.strips + 2..COLUMNS).map(|c| e.piece_weight(c)).sum();
            assert_eq!(total + reject, 1 << WEIGHT_BITS);
            // Rejections are rare.
            assert!(reject < total / 1000, "σ={sigma}");
        }
    }

    /// The sampler keeps its distribution when every interval is wide
    /// enough to send a third of the decisions to the exact comparison;
    /// when the strips stop at one σ, so that the tail, which is always
    /// decided exactly, is drawn for about a third of the samples; and
    /// when the strips are wide (16 points at σ = 40, where ρ falls by a
    /// third across a strip at 2σ), so that acceptance matters.
    #[test]
    fn the_sampler_through_the_fallback_and_the_tail_keeps_its_distribution() {
        for (sigma, span, relative, seed) in [
            (2.5, SPAN, 0.3, 11),
            (2.5, 1.0, REL_MARGIN, 12),
            (40.0, 1.0, 0.3, 13),
            (40.0, 100.0, REL_MARGIN, 14),
        ] {
            let g = DiscreteGaussian::new(sigma).unwrap();
            let e = Envelope::new(&g, span, relative).unwrap();
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut bits = Bits::new(&mut rng);
            let xs: Vec<i64> = (0..40_000).map(|_| e.sample(&mut bits).unwrap()).collect();
            let beyond = xs
                .iter()
                .filter(|&&x| x.unsigned_abs() >= e.tail_start)
                .count();
            if span == 1.0 {
                assert!(beyond > 4_000, "σ={sigma}: the tail drew {beyond}");
            }
            let z = fit_z(&g, &xs, (12.0 * sigma) as i64 + 2);
            assert!(
                z.abs() < 4.5,
                "σ={sigma}, span {span}, margin {relative}: z = {z}"
            );
        }
    }

    /// The tail's proposals, once accepted, follow `ρ` conditioned on the
    /// tail, including several geometric levels (`v = 32` at `X = 81`).
    #[test]
    fn the_tail_draws_the_conditional_distribution() {
        let sigma = 40.0;
        let g = DiscreteGaussian::new(sigma).unwrap();
        let e = Envelope::new(&g, 2.0, REL_MARGIN).unwrap();
        assert_eq!((e.tail_start, e.tail_bits), (81, 5));
        let mut rng = ChaCha20Rng::seed_from_u64(15);
        let mut bits = Bits::new(&mut rng);
        let n = 40_000;
        let mut xs = Vec::with_capacity(n);
        while xs.len() < n {
            if let Some(x) = e.tail(&mut bits).unwrap() {
                xs.push(x);
            }
        }
        let (start, end) = (e.tail_start, e.tail_start + 400);
        let weights: Vec<f64> = (start..end)
            .map(|x| (-(x as f64).powi(2) / (2.0 * g.sigma_squared())).exp())
            .collect();
        let z: f64 = weights.iter().sum();
        let mut counts = vec![0.0; weights.len()];
        for &x in &xs {
            counts[(x - start) as usize] += 1.0;
        }
        let score = grouped_z(
            counts
                .into_iter()
                .zip(weights.iter().map(|w| w / z * n as f64)),
        );
        assert!(score.abs() < 4.5, "z = {score}");
        // Each geometric level (32 points) holds its exact share, within
        // five standard errors; the third level on holds about 270 draws.
        for (from, to) in [(0, 32), (32, 64), (64, 400)] {
            let p: f64 = weights[from..to].iter().sum::<f64>() / z;
            let expected = p * n as f64;
            let seen = xs
                .iter()
                .filter(|&&x| (start + from as u64..start + to as u64).contains(&x))
                .count() as f64;
            let se = (expected * (1.0 - p)).sqrt();
            assert!(
                (seen - expected).abs() < 5.0 * se,
                "[{from}, {to}): {seen} vs {expected}"
            );
        }
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
