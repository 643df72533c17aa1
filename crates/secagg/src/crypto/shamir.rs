//! t-of-k Shamir secret sharing over the prime field of order
//! ℓ = 2^252 + 27742317777372353535851937790883648493 (§5.3), using the
//! constant-time scalar arithmetic of curve25519-dalek.
//!
//! The shared secrets are 32-byte seeds drawn uniformly from the field (252
//! bits of entropy); the keys a client actually uses are derived from them
//! with HKDF. Client `u` holds the evaluation at `x = u + 1`.

use curve25519_dalek::scalar::Scalar;
use rand_core::CryptoRngCore;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::CryptoFailure;
use crate::ClientId;

/// One share: the holder (who determines the evaluation point) and the value.
/// The value is zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Share {
    #[zeroize(skip)]
    pub holder: ClientId,
    pub value: Scalar,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("holder", &self.holder)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// The evaluation point of a client: its id plus one (never zero).
pub fn eval_point(id: ClientId) -> Scalar {
    Scalar::from(u64::from(id.0) + 1)
}

/// A uniformly random field element, from 64 bytes of CSPRNG output reduced
/// mod ℓ (bias below 2^-250).
pub fn random_scalar<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Zeroizing<Scalar> {
    let mut wide = Zeroizing::new([0u8; 64]);
    rng.fill_bytes(wide.as_mut());
    Zeroizing::new(Scalar::from_bytes_mod_order_wide(&wide))
}

/// Splits `secret` into shares for `holders`, any `threshold` of which
/// reconstruct it. The polynomial's coefficients are zeroized on return.
pub fn split<R: CryptoRngCore + ?Sized>(
    secret: &Scalar,
    threshold: usize,
    holders: &[ClientId],
    rng: &mut R,
) -> Result<Vec<Share>, CryptoFailure> {
    if threshold == 0 || threshold > holders.len() {
        return Err(CryptoFailure("Shamir threshold out of range"));
    }
    let mut coeffs: Vec<Zeroizing<Scalar>> = Vec::with_capacity(threshold);
    coeffs.push(Zeroizing::new(*secret));
    for _ in 1..threshold {
        coeffs.push(random_scalar(rng));
    }
    Ok(holders
        .iter()
        .map(|&h| {
            let x = eval_point(h);
            // Horner's rule from the highest coefficient down.
            let mut share = Share {
                holder: h,
                value: Scalar::ZERO,
            };
            for c in coeffs.iter().rev() {
                share.value = share.value * x + **c;
            }
            share
        })
        .collect())
}

/// Lagrange-interpolates the polynomial through `shares` at `x`. The holders
/// must be distinct; with exactly `t` shares of a degree-(t-1) polynomial this
/// is the polynomial's value at `x`.
pub fn interpolate_at(x: &Scalar, shares: &[Share]) -> Result<Scalar, CryptoFailure> {
    if shares.is_empty() {
        return Err(CryptoFailure("no shares to interpolate"));
    }
    let xs: Vec<Scalar> = shares.iter().map(|s| eval_point(s.holder)).collect();
    // Denominators prod_{j != i} (x_i - x_j); one batched inversion for all.
    let mut denominators = Vec::with_capacity(xs.len());
    for (i, xi) in xs.iter().enumerate() {
        let mut d = Scalar::ONE;
        for (j, xj) in xs.iter().enumerate() {
            if i != j {
                d *= xi - xj;
            }
        }
        if d == Scalar::ZERO {
            return Err(CryptoFailure("repeated Shamir holder"));
        }
        denominators.push(d);
    }
    Scalar::batch_invert(&mut denominators);
    let mut acc = Scalar::ZERO;
    for (i, (share, inv)) in shares.iter().zip(&denominators).enumerate() {
        let mut num = Scalar::ONE;
        for (j, xj) in xs.iter().enumerate() {
            if i != j {
                num *= x - xj;
            }
        }
        acc += share.value * num * inv;
    }
    Ok(acc)
}

/// Reconstructs the secret (the value at zero) from `shares`.
pub fn reconstruct(shares: &[Share]) -> Result<Zeroizing<Scalar>, CryptoFailure> {
    interpolate_at(&Scalar::ZERO, shares).map(Zeroizing::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn ids(v: &[u32]) -> Vec<ClientId> {
        v.iter().map(|&i| ClientId(i)).collect()
    }

    #[test]
    fn any_t_shares_reconstruct_and_fewer_do_not() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let secret = random_scalar(&mut rng);
        let holders = ids(&[3, 9, 10, 11, 40, 41, 1000]);
        let shares = split(&secret, 4, &holders, &mut rng).unwrap();
        let pairs = shares;
        for start in 0..=3 {
            let got = reconstruct(&pairs[start..start + 4]).unwrap();
            assert_eq!(*got, *secret);
        }
        // All seven shares also interpolate to the secret (degree 3 polynomial).
        assert_eq!(*reconstruct(&pairs).unwrap(), *secret);
        // Three shares give some other value.
        assert_ne!(*reconstruct(&pairs[..3]).unwrap(), *secret);
        // A tampered share breaks reconstruction.
        let mut bad = pairs[..4].to_vec();
        bad[2].value += Scalar::ONE;
        assert_ne!(*reconstruct(&bad).unwrap(), *secret);
        // The polynomial through four shares predicts the others.
        let predicted = interpolate_at(&eval_point(holders[6]), &pairs[..4]).unwrap();
        assert_eq!(predicted, pairs[6].value);
    }

    #[test]
    fn repeated_holders_and_bad_thresholds_are_errors() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let secret = random_scalar(&mut rng);
        assert!(split(&secret, 0, &ids(&[1, 2]), &mut rng).is_err());
        assert!(split(&secret, 3, &ids(&[1, 2]), &mut rng).is_err());
        let one = |h| Share {
            holder: ClientId(h),
            value: Scalar::ONE,
        };
        let dup = [one(1), one(1)];
        assert!(reconstruct(&dup).is_err());
        assert!(reconstruct(&[]).is_err());
    }
}
