//! The randomized Hadamard rotation (protocols/dp.md §3.2): `x ↦ H D x / √m`
//! with `D` a diagonal of random signs from a public per-round seed and `H`
//! the `m × m` Walsh–Hadamard matrix, `m` the next power of two at or above
//! the update's length (zero-padded). It is orthogonal, so it keeps L2 norms,
//! and it spreads a vector's energy evenly over the coordinates, which keeps
//! each coordinate small before it is rounded and summed modulo 2^b.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::DpError;

/// The largest padded dimension (2^28).
pub const MAX_PADDED_DIM: usize = 1 << 28;

/// A rotation of `R^dim` into `R^m`, `m = 2^⌈log2 dim⌉`.
#[derive(Clone, Debug)]
pub struct RandomRotation {
    dim: usize,
    m: usize,
    /// The signs of `D`, one bit each (bit `i % 64` of word `i / 64` is
    /// set where `D_ii = -1`).
    signs: Vec<u64>,
}

/// Elements per cache block of [`fwht`]: 2^14 `f64` (128 KiB).
const BLOCK: usize = 1 << 14;
/// Columns per strip in [`fwht`]'s levels across blocks.
const STRIP: usize = 64;

/// The unnormalised fast Walsh–Hadamard transform, in place (`a.len()` a
/// power of two).
///
/// Level by level, as the textbook algorithm, but in two sweeps over
/// memory: the levels within a block of [`BLOCK`] elements one block at a
/// time, then the levels across blocks one strip of [`STRIP`] columns at a
/// time, so that a 2^22-long vector is read twice instead of 22 times.
/// Every element sees the same operations in the same order as in the
/// textbook algorithm, so the result is bit for bit the same.
pub fn fwht(a: &mut [f64]) {
    fwht_blocked(a, BLOCK, STRIP);
}

fn fwht_blocked(a: &mut [f64], block: usize, strip: usize) {
    let n = a.len();
    if n <= block {
        fwht_levels(a);
        return;
    }
    for b in a.chunks_mut(block) {
        fwht_levels(b);
    }
    let rows = n / block;
    for column in (0..block).step_by(strip) {
        let mut h = 1;
        while h < rows {
            for first in (0..rows).step_by(2 * h) {
                for r in first..first + h {
                    let (lo, hi) = a.split_at_mut((r + h) * block + column);
                    let x = &mut lo[r * block + column..r * block + column + strip];
                    butterflies(x, &mut hi[..strip]);
                }
            }
            h *= 2;
        }
    }
}

/// Every level of the transform of `a`, in place.
fn fwht_levels(a: &mut [f64]) {
    let n = a.len();
    let mut h = 1;
    while h < n {
        for block in a.chunks_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            butterflies(lo, hi);
        }
        h *= 2;
    }
}

/// `(x, y) ← (x + y, x − y)`, element by element.
#[inline]
fn butterflies(xs: &mut [f64], ys: &mut [f64]) {
    for (x, y) in xs.iter_mut().zip(ys.iter_mut()) {
        let (u, v) = (*x, *y);
        *x = u + v;
        *y = u - v;
    }
}

impl RandomRotation {
    /// The rotation for vectors of length `dim`, with signs from `seed`.
    pub fn new(dim: usize, seed: [u8; 32]) -> Result<Self, DpError> {
        let m = dim.max(1).next_power_of_two();
        if dim == 0 || m > MAX_PADDED_DIM {
            return Err(DpError::BadDimension(dim));
        }
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut signs: Vec<u64> = (0..m.div_ceil(64)).map(|_| rng.next_u64()).collect();
        if m < 64 {
            signs[0] &= (1u64 << m) - 1;
        }
        Ok(RandomRotation { dim, m, signs })
    }

    /// The input length.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The output length `m`.
    pub fn padded_dim(&self) -> usize {
        self.m
    }

    /// `D_ii v`: `v` with its sign flipped where the sign bit is set.
    #[inline]
    fn signed(&self, i: usize, v: f64) -> f64 {
        let bit = (self.signs[i / 64] >> (i % 64)) & 1;
        f64::from_bits(v.to_bits() ^ (bit << 63))
    }

    /// `H D x / √m` of `x` (length `dim`), length `m`.
    pub fn forward(&self, x: &[f64]) -> Result<Vec<f64>, DpError> {
        self.forward_scaled(x, 1.0)
    }

    /// `k H D x / √m` of `x` (length `dim`, any float type), length `m`:
    /// one vector, written once and transformed in place.
    pub fn forward_scaled<T: Copy + Into<f64>>(
        &self,
        x: &[T],
        k: f64,
    ) -> Result<Vec<f64>, DpError> {
        if x.len() != self.dim {
            return Err(DpError::LengthMismatch {
                expected: self.dim,
                got: x.len(),
            });
        }
        let mut y = vec![0.0; self.m];
        for (i, (o, v)) in y.iter_mut().zip(x).enumerate() {
            *o = self.signed(i, (*v).into());
        }
        fwht(&mut y);
        let k = k / (self.m as f64).sqrt();
        y.iter_mut().for_each(|v| *v *= k);
        Ok(y)
    }

    /// The inverse `D H y / √m`, truncated to length `dim`.
    pub fn inverse(&self, y: &[f64]) -> Result<Vec<f64>, DpError> {
        if y.len() != self.m {
            return Err(DpError::LengthMismatch {
                expected: self.m,
                got: y.len(),
            });
        }
        let mut x = y.to_vec();
        fwht(&mut x);
        let k = 1.0 / (self.m as f64).sqrt();
        x.truncate(self.dim);
        for (i, v) in x.iter_mut().enumerate() {
            *v = self.signed(i, *v * k);
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blocked_transform_is_the_textbook_one_bit_for_bit() {
        let a: Vec<f64> = (0..4096)
            .map(|i| ((i * 7919 % 1013) as f64).sin() * 1e3)
            .collect();
        let mut textbook = a.clone();
        fwht_levels(&mut textbook);
        for (block, strip) in [(4096, 64), (1024, 64), (64, 8), (8, 8), (2, 1)] {
            let mut blocked = a.clone();
            fwht_blocked(&mut blocked, block, strip);
            assert!(
                blocked
                    .iter()
                    .zip(&textbook)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "block {block}, strip {strip}"
            );
        }
        // And it is the Walsh–Hadamard transform: H e_3 has entries ±1.
        let mut e = vec![0.0; 16];
        e[3] = 1.0;
        fwht(&mut e);
        let signs: Vec<f64> = (0..16u32)
            .map(|i| {
                if (i & 3).count_ones() % 2 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        assert_eq!(e, signs);
    }

    #[test]
    fn rotation_is_orthogonal_and_invertible() {
        let x: Vec<f64> = (0..1000)
            .map(|i| ((i * 37 % 101) as f64 - 50.0) / 7.0)
            .collect();
        let r = RandomRotation::new(1000, [5; 32]).unwrap();
        assert_eq!(r.padded_dim(), 1024);
        let y = r.forward(&x).unwrap();
        let n = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!((n(&x) - n(&y)).abs() < 1e-9 * n(&x));
        let back = r.inverse(&y).unwrap();
        assert!(x.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-9));
        // A spike is spread evenly: every coordinate has magnitude |x|/√m.
        let mut spike = vec![0.0; 1000];
        spike[3] = 32.0;
        let s = r.forward(&spike).unwrap();
        assert!(s.iter().all(|v| (v.abs() - 1.0).abs() < 1e-12));
        // Another seed gives another rotation.
        // The signs are the seed's ChaCha20 stream, one bit per sign, least
        // significant first (protocols/dp.md §3.2).
        let mut stream = ChaCha20Rng::from_seed([5; 32]);
        let word = stream.next_u64();
        let mut unit = vec![0.0; 1000];
        unit[0] = 1.0;
        let back = r.inverse(&r.forward(&unit).unwrap()).unwrap();
        assert_eq!(back[0], 1.0);
        for i in 0..64 {
            let mut e = vec![0.0; 1000];
            e[i] = 1.0;
            // Entry 0 of H D e_i / √m is H[0][i] D_ii / √m = D_ii / 32.
            let y = r.forward(&e).unwrap();
            let expected = if (word >> i) & 1 == 1 { -1.0 } else { 1.0 } / 32.0;
            assert_eq!(y[0], expected, "sign {i}");
        }
        let r2 = RandomRotation::new(1000, [6; 32]).unwrap();
        assert_ne!(r2.forward(&x).unwrap(), y);
        assert!(r.forward(&x[..999]).is_err());
        assert!(RandomRotation::new(0, [0; 32]).is_err());
    }
}
