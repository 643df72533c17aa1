//! Vectors in `Z_{2^b}` (§4.1) and their wire form.
//!
//! Elements are held in `u32` words and added with wrapping arithmetic; since
//! `2^b` divides `2^32`, reducing mod `2^b` once at the end gives the exact
//! ring sum. On the wire a vector is bit-packed at `b` bits per element, so a
//! 20-bit ring costs 20 bits per element, not 64 (Flower sends int64).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The largest supported ring width in bits.
pub const MAX_BITS: u8 = 32;

/// `2^b - 1`, the mask that reduces a word mod `2^b`.
pub fn modulus_mask(bits: u8) -> u32 {
    if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    }
}

/// Reduces every element mod `2^b`.
pub fn reduce(values: &mut [u32], bits: u8) {
    let m = modulus_mask(bits);
    if m != u32::MAX {
        for v in values {
            *v &= m;
        }
    }
}

/// Bytes taken by `len` elements packed at `bits` bits each.
pub fn packed_len(len: usize, bits: u8) -> usize {
    (len * usize::from(bits)).div_ceil(8)
}

/// A malformed packed vector.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PackError {
    #[error("bits per element must be in 1..=32, got {0}")]
    BadBits(u8),
    #[error("{len} elements at {bits} bits need {expected} bytes, got {got}")]
    WrongByteLength {
        len: u32,
        bits: u8,
        expected: usize,
        got: usize,
    },
    #[error("the padding bits after the last element are not zero")]
    NonCanonicalPadding,
    #[error("the vector has {got} elements, the accumulator {expected}")]
    LengthMismatch { expected: usize, got: usize },
}

/// A vector in `Z_{2^b}`, bit-packed little-endian: element `i` occupies bits
/// `i*b .. (i+1)*b` of the byte string read as one little-endian integer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedVec {
    /// Bits per element, `b`.
    pub bits: u8,
    /// Number of elements.
    pub len: u32,
    /// The packed elements, exactly `packed_len(len, bits)` bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for PackedVec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedVec")
            .field("bits", &self.bits)
            .field("len", &self.len)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl PackedVec {
    /// Packs `values`, each reduced mod `2^bits`.
    pub fn pack(values: &[u32], bits: u8) -> Result<PackedVec, PackError> {
        if bits == 0 || bits > MAX_BITS {
            return Err(PackError::BadBits(bits));
        }
        let len = u32::try_from(values.len()).map_err(|_| PackError::WrongByteLength {
            len: u32::MAX,
            bits,
            expected: 0,
            got: 0,
        })?;
        let mut data = Vec::with_capacity(packed_len(values.len(), bits));
        match bits {
            32 if cfg!(target_endian = "little") => {
                data.extend_from_slice(bytemuck::cast_slice(values));
            }
            32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&(*v as u16).to_le_bytes())),
            8 => data.extend(values.iter().map(|v| *v as u8)),
            _ => {
                let m = u64::from(modulus_mask(bits));
                let mut acc: u64 = 0;
                let mut held: u32 = 0;
                for v in values {
                    acc |= (u64::from(*v) & m) << held;
                    held += u32::from(bits);
                    while held >= 8 {
                        data.push(acc as u8);
                        acc >>= 8;
                        held -= 8;
                    }
                }
                if held > 0 {
                    data.push(acc as u8);
                }
            }
        }
        Ok(PackedVec { bits, len, data })
    }

    /// Checks the byte length and the padding; a vector that passes decodes
    /// to exactly `len` elements.
    pub fn check(&self) -> Result<(), PackError> {
        if self.bits == 0 || self.bits > MAX_BITS {
            return Err(PackError::BadBits(self.bits));
        }
        let expected = packed_len(self.len as usize, self.bits);
        if self.data.len() != expected {
            return Err(PackError::WrongByteLength {
                len: self.len,
                bits: self.bits,
                expected,
                got: self.data.len(),
            });
        }
        let used = (self.len as usize * usize::from(self.bits)) % 8;
        if used != 0 {
            let last = self.data.last().copied().unwrap_or(0);
            if last >> used != 0 {
                return Err(PackError::NonCanonicalPadding);
            }
        }
        Ok(())
    }

    /// Calls `f(i, element)` for every element, in order.
    fn for_each(&self, mut f: impl FnMut(usize, u32)) -> Result<(), PackError> {
        self.check()?;
        match self.bits {
            32 => self
                .data
                .chunks_exact(4)
                .enumerate()
                .for_each(|(i, c)| f(i, u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            16 => self
                .data
                .chunks_exact(2)
                .enumerate()
                .for_each(|(i, c)| f(i, u32::from(u16::from_le_bytes([c[0], c[1]])))),
            8 => self
                .data
                .iter()
                .enumerate()
                .for_each(|(i, b)| f(i, u32::from(*b))),
            bits => {
                let m = u64::from(modulus_mask(bits));
                let mut acc: u64 = 0;
                let mut held: u32 = 0;
                let mut bytes = self.data.iter();
                for i in 0..self.len as usize {
                    while held < u32::from(bits) {
                        // `check` guarantees enough bytes for `len` elements.
                        let b = bytes.next().copied().unwrap_or(0);
                        acc |= u64::from(b) << held;
                        held += 8;
                    }
                    f(i, (acc & m) as u32);
                    acc >>= bits;
                    held -= u32::from(bits);
                }
            }
        }
        Ok(())
    }

    /// Unpacks into a new vector.
    pub fn unpack(&self) -> Result<Vec<u32>, PackError> {
        let mut out = vec![0u32; self.len as usize];
        self.for_each(|i, v| out[i] = v)?;
        Ok(out)
    }

    /// Adds the elements into `acc` with wrapping arithmetic, without
    /// materialising the unpacked vector.
    pub fn add_into(&self, acc: &mut [u32]) -> Result<(), PackError> {
        if acc.len() != self.len as usize {
            return Err(PackError::LengthMismatch {
                expected: acc.len(),
                got: self.len as usize,
            });
        }
        self.for_each(|i, v| acc[i] = acc[i].wrapping_add(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_roundtrips_for_every_width(bits in 1u8..=32, raw in prop::collection::vec(any::<u32>(), 0..200)) {
            let m = modulus_mask(bits);
            let values: Vec<u32> = raw.iter().map(|v| v & m).collect();
            let p = PackedVec::pack(&values, bits).unwrap();
            prop_assert_eq!(p.data.len(), packed_len(values.len(), bits));
            prop_assert_eq!(p.unpack().unwrap(), values.clone());
            let mut acc = vec![1u32; values.len()];
            p.add_into(&mut acc).unwrap();
            for (a, v) in acc.iter().zip(&values) {
                prop_assert_eq!(*a, v.wrapping_add(1));
            }
        }
    }

    #[test]
    fn malformed_packed_vectors_are_rejected() {
        let p = PackedVec::pack(&[1, 2, 3], 20).unwrap();
        assert_eq!(p.data.len(), 8);
        let mut short = p.clone();
        short.data.pop();
        assert!(matches!(
            short.check(),
            Err(PackError::WrongByteLength { .. })
        ));
        let mut padded = p.clone();
        *padded.data.last_mut().unwrap() |= 0x80;
        assert_eq!(padded.check(), Err(PackError::NonCanonicalPadding));
        let mut zero_bits = p.clone();
        zero_bits.bits = 0;
        assert_eq!(zero_bits.check(), Err(PackError::BadBits(0)));
        let mut long = p.clone();
        long.len = 1_000_000;
        assert!(long.unpack().is_err());
        let mut acc = vec![0u32; 2];
        assert!(matches!(
            p.add_into(&mut acc),
            Err(PackError::LengthMismatch { .. })
        ));
        assert_eq!(PackedVec::pack(&[1], 33), Err(PackError::BadBits(33)));
    }
}
