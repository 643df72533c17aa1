//! The mask PRG (§5.6): AES-128 in counter mode, keyed by a 16-byte key from
//! HKDF, with the 128-bit big-endian counter starting at zero. Element `i` of a
//! mask is the little-endian word at keystream bytes `4i..4i+4`, reduced mod
//! `2^b` (a power-of-two modulus needs no rejection sampling, so the reduced
//! words are exactly uniform if the keystream is).
//!
//! AES-CTR comes from aws-lc-rs, which uses AES-NI and VAES where the CPU has
//! them. Masks are never materialised: the accumulator is walked in chunks that
//! fit in L1, and every stream's keystream for that chunk is generated and
//! added (or subtracted) in place.

use aws_lc_rs::cipher::{AES_128, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::iv::FixedLength;
use zeroize::Zeroizing;

use super::CryptoFailure;

/// Length of a mask key in bytes (AES-128).
pub const MASK_KEY_LEN: usize = 16;

/// Words of keystream generated at a time (8 KiB, a multiple of 4 words).
const CHUNK_WORDS: usize = 2048;

/// Words handed to one thread at a time by [`apply_parallel`].
#[cfg(feature = "parallel")]
const PAR_CHUNK_WORDS: usize = 32 * CHUNK_WORDS;

/// Whether a stream is added to or subtracted from the accumulator.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Sign {
    Add,
    Sub,
}

impl Sign {
    /// The opposite sign.
    pub fn negate(self) -> Sign {
        match self {
            Sign::Add => Sign::Sub,
            Sign::Sub => Sign::Add,
        }
    }
}

/// A keyed mask stream. The AES key schedule lives inside aws-lc-rs, which
/// zeroizes it on drop.
pub struct MaskStream {
    key: EncryptingKey,
    sign: Sign,
}

impl std::fmt::Debug for MaskStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskStream")
            .field("key", &"<redacted>")
            .field("sign", &self.sign)
            .finish()
    }
}

impl MaskStream {
    /// Keys a stream with a 16-byte mask key.
    pub fn new(key: &Zeroizing<[u8; MASK_KEY_LEN]>, sign: Sign) -> Result<Self, CryptoFailure> {
        let unbound = UnboundCipherKey::new(&AES_128, key.as_ref())
            .map_err(|_| CryptoFailure("AES-128 key rejected"))?;
        let key = EncryptingKey::ctr(unbound).map_err(|_| CryptoFailure("AES-CTR setup failed"))?;
        Ok(MaskStream { key, sign })
    }

    /// The sign with which this stream is applied.
    pub fn sign(&self) -> Sign {
        self.sign
    }

    /// Writes keystream words `first_word .. first_word + out.len()` into
    /// `out`. `first_word` must be a multiple of 4 (one AES block).
    pub fn keystream(&self, first_word: usize, out: &mut [u32]) -> Result<(), CryptoFailure> {
        if !first_word.is_multiple_of(4) {
            return Err(CryptoFailure("keystream offset is not block aligned"));
        }
        let mut buf = [0u32; CHUNK_WORDS];
        for (i, dst) in out.chunks_mut(CHUNK_WORDS).enumerate() {
            let ks = self.fill(&mut buf, first_word + i * CHUNK_WORDS, dst.len())?;
            dst.copy_from_slice(&ks[..dst.len()]);
        }
        Ok(())
    }

    /// Generates the keystream for `len <= CHUNK_WORDS` words starting at the
    /// block-aligned word `first_word`, and returns it as native-endian words.
    #[inline]
    fn fill<'b>(
        &self,
        buf: &'b mut [u32; CHUNK_WORDS],
        first_word: usize,
        len: usize,
    ) -> Result<&'b [u32], CryptoFailure> {
        let words = len.div_ceil(4) * 4;
        let ks = buf
            .get_mut(..words)
            .ok_or(CryptoFailure("keystream chunk too long"))?;
        ks.fill(0);
        let counter = (first_word / 4) as u128;
        let iv = FixedLength::from(counter.to_be_bytes());
        self.key
            .less_safe_encrypt(bytemuck::cast_slice_mut(ks), EncryptionContext::Iv128(iv))
            .map_err(|_| CryptoFailure("AES-CTR encryption failed"))?;
        if cfg!(target_endian = "big") {
            for w in ks.iter_mut() {
                *w = u32::from_le(*w);
            }
        }
        Ok(&ks[..len])
    }
}

/// Adds (or subtracts) words `first_word ..` of every stream into `acc`, with
/// wrapping arithmetic mod 2^32. The caller reduces mod 2^b at the end.
/// `first_word` must be a multiple of 4.
pub fn apply(
    acc: &mut [u32],
    first_word: usize,
    streams: &[MaskStream],
) -> Result<(), CryptoFailure> {
    if !first_word.is_multiple_of(4) {
        return Err(CryptoFailure("mask offset is not block aligned"));
    }
    let mut buf = Box::new([0u32; CHUNK_WORDS]);
    for (i, chunk) in acc.chunks_mut(CHUNK_WORDS).enumerate() {
        let word = first_word + i * CHUNK_WORDS;
        for s in streams {
            let ks = s.fill(&mut buf, word, chunk.len())?;
            match s.sign {
                Sign::Add => add_words(chunk, ks),
                Sign::Sub => sub_words(chunk, ks),
            }
        }
    }
    Ok(())
}

/// [`apply`] over the whole vector, spread over the rayon thread pool when the
/// `parallel` feature is on.
pub fn apply_parallel(acc: &mut [u32], streams: &[MaskStream]) -> Result<(), CryptoFailure> {
    #[cfg(feature = "parallel")]
    {
        use rayon::prelude::*;
        if acc.len() > PAR_CHUNK_WORDS && rayon::current_num_threads() > 1 {
            return acc
                .par_chunks_mut(PAR_CHUNK_WORDS)
                .enumerate()
                .try_for_each(|(i, chunk)| apply(chunk, i * PAR_CHUNK_WORDS, streams));
        }
    }
    apply(acc, 0, streams)
}

#[inline]
fn add_words(acc: &mut [u32], ks: &[u32]) {
    for (a, k) in acc.iter_mut().zip(ks) {
        *a = a.wrapping_add(*k);
    }
}

#[inline]
fn sub_words(acc: &mut [u32], ks: &[u32]) {
    for (a, k) in acc.iter_mut().zip(ks) {
        *a = a.wrapping_sub(*k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{KeyIvInit, StreamCipher};

    type RefCtr = ctr::Ctr128BE<aes::Aes128>;

    fn reference(key: &[u8; 16], words: usize) -> Vec<u32> {
        let mut bytes = vec![0u8; words * 4];
        let mut c = RefCtr::new(key.into(), &[0u8; 16].into());
        c.apply_keystream(&mut bytes);
        bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn keystream_matches_an_independent_aes_ctr() {
        let key = Zeroizing::new([7u8; 16]);
        // Longer than one chunk, and not a multiple of the chunk or the block.
        let words = CHUNK_WORDS * 3 + 7;
        let expected = reference(&key, words);
        let s = MaskStream::new(&key, Sign::Add).unwrap();
        let mut out = vec![0u32; words];
        s.keystream(0, &mut out).unwrap();
        assert_eq!(out, expected);
        // Starting mid-stream at a block boundary gives the same words.
        let mut tail = vec![0u32; words - 4100];
        s.keystream(4100, &mut tail).unwrap();
        assert_eq!(tail[..], expected[4100..]);
        assert!(s.keystream(3, &mut tail).is_err());
    }

    #[test]
    fn apply_adds_and_subtracts_streams() {
        let k1 = Zeroizing::new([1u8; 16]);
        let k2 = Zeroizing::new([2u8; 16]);
        let words = CHUNK_WORDS * 40 + 3;
        let r1 = reference(&k1, words);
        let r2 = reference(&k2, words);
        let streams = [
            MaskStream::new(&k1, Sign::Add).unwrap(),
            MaskStream::new(&k2, Sign::Sub).unwrap(),
        ];
        let mut acc: Vec<u32> = (0..words as u32).collect();
        apply_parallel(&mut acc, &streams).unwrap();
        for i in 0..words {
            assert_eq!(acc[i], (i as u32).wrapping_add(r1[i]).wrapping_sub(r2[i]));
        }
        // Applying the negated streams restores the input exactly.
        let undo = [
            MaskStream::new(&k1, Sign::Sub).unwrap(),
            MaskStream::new(&k2, Sign::Add).unwrap(),
        ];
        apply(&mut acc, 0, &undo).unwrap();
        assert!(acc.iter().enumerate().all(|(i, &v)| v == i as u32));
    }
}
