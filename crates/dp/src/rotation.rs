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
    signs: Vec<f64>,
}

/// The unnormalised fast Walsh–Hadamard transform, in place.
pub fn fwht(a: &mut [f64]) {
    let n = a.len();
    let mut h = 1;
    while h < n {
        for block in a.chunks_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (x, y) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*x, *y);
                *x = u + v;
                *y = u - v;
            }
        }
        h *= 2;
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
        let mut signs = Vec::with_capacity(m);
        while signs.len() < m {
            let w = rng.next_u64();
            for b in 0..64.min(m - signs.len()) {
                signs.push(if (w >> b) & 1 == 1 { -1.0 } else { 1.0 });
            }
        }
        Ok(RandomRotation { dim, signs })
    }

    /// The input length.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The output length `m`.
    pub fn padded_dim(&self) -> usize {
        self.signs.len()
    }

    /// `H D x / √m` of `x` (length `dim`), length `m`.
    pub fn forward(&self, x: &[f64]) -> Result<Vec<f64>, DpError> {
        if x.len() != self.dim {
            return Err(DpError::LengthMismatch {
                expected: self.dim,
                got: x.len(),
            });
        }
        let mut y = vec![0.0; self.padded_dim()];
        for ((o, v), s) in y.iter_mut().zip(x).zip(&self.signs) {
            *o = v * s;
        }
        fwht(&mut y);
        let k = 1.0 / (self.padded_dim() as f64).sqrt();
        y.iter_mut().for_each(|v| *v *= k);
        Ok(y)
    }

    /// The inverse `D H y / √m`, truncated to length `dim`.
    pub fn inverse(&self, y: &[f64]) -> Result<Vec<f64>, DpError> {
        if y.len() != self.padded_dim() {
            return Err(DpError::LengthMismatch {
                expected: self.padded_dim(),
                got: y.len(),
            });
        }
        let mut x = y.to_vec();
        fwht(&mut x);
        let k = 1.0 / (self.padded_dim() as f64).sqrt();
        x.truncate(self.dim);
        for (v, s) in x.iter_mut().zip(&self.signs) {
            *v *= s * k;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let r2 = RandomRotation::new(1000, [6; 32]).unwrap();
        assert_ne!(r2.forward(&x).unwrap(), y);
        assert!(r.forward(&x[..999]).is_err());
        assert!(RandomRotation::new(0, [0; 32]).is_err());
    }
}
