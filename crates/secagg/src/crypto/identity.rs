//! ed25519 identity keys and signatures (§5.5). A client signs its advertised
//! keys (R0) and the survivor set (R3); signatures are verified with
//! `verify_strict`, which rejects small-order keys and malleable signatures.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};

/// A client's long-term signing key. Zeroized on drop; never printed.
pub struct IdentityKeypair(SigningKey);

impl std::fmt::Debug for IdentityKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("IdentityKeypair")
            .field(&self.public())
            .finish()
    }
}

impl IdentityKeypair {
    /// A fresh key pair from a CSPRNG.
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        IdentityKeypair(SigningKey::from_bytes(&seed))
    }

    /// Restores a key pair from its 32-byte secret seed.
    pub fn from_secret_bytes(seed: &[u8; 32]) -> Self {
        IdentityKeypair(SigningKey::from_bytes(seed))
    }

    /// The 32-byte secret seed (for storing the identity on disk).
    pub fn secret_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    pub fn public(&self) -> IdentityPublic {
        IdentityPublic(self.0.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> SignatureBytes {
        SignatureBytes(self.0.sign(message).to_bytes())
    }
}

/// A client's public identity key, as it appears in the session roster.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdentityPublic(pub [u8; 32]);

impl std::fmt::Debug for IdentityPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityPublic(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

impl IdentityPublic {
    /// Verifies `signature` over `message` (strict ed25519 verification).
    pub fn verify(&self, message: &[u8], signature: &SignatureBytes) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify_strict(message, &Signature::from_bytes(&signature.0))
            .is_ok()
    }
}

/// Verifies a set of signatures at once (ed25519 batch verification, about
/// twice as fast per signature as one at a time). Small-order ("weak")
/// public keys are refused. On failure, returns the index of the first item
/// that fails strict verification on its own.
pub fn verify_all(items: &[(&IdentityPublic, &[u8], &SignatureBytes)]) -> Result<(), usize> {
    let mut keys = Vec::with_capacity(items.len());
    for (i, (pk, _, _)) in items.iter().enumerate() {
        match VerifyingKey::from_bytes(&pk.0) {
            Ok(k) if !k.is_weak() => keys.push(k),
            _ => return Err(i),
        }
    }
    let messages: Vec<&[u8]> = items.iter().map(|(_, m, _)| *m).collect();
    let signatures: Vec<Signature> = items
        .iter()
        .map(|(_, _, s)| Signature::from_bytes(&s.0))
        .collect();
    if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
        return Ok(());
    }
    match items.iter().position(|(pk, m, s)| !pk.verify(m, s)) {
        Some(i) => Err(i),
        // Batch and strict verification disagree only on crafted edge cases;
        // refuse rather than guess which item is at fault.
        None => Err(0),
    }
}

/// A 64-byte ed25519 signature.
#[derive(Copy, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SignatureBytes(#[serde(with = "serde_bytes")] pub [u8; 64]);

impl std::fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn sign_verify_and_reject() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let kp = IdentityKeypair::generate(&mut rng);
        let other = IdentityKeypair::generate(&mut rng);
        let sig = kp.sign(b"hello");
        assert!(kp.public().verify(b"hello", &sig));
        assert!(!kp.public().verify(b"hellp", &sig));
        assert!(!other.public().verify(b"hello", &sig));
        let mut bad = sig;
        bad.0[10] ^= 1;
        assert!(!kp.public().verify(b"hello", &bad));
        // The identity-point key is rejected outright.
        let mut ident = [0u8; 32];
        ident[0] = 1;
        assert!(!IdentityPublic(ident).verify(b"hello", &sig));
        // Batch verification: all good, or the index of the bad one.
        let keys: Vec<IdentityKeypair> = (0..5)
            .map(|_| IdentityKeypair::generate(&mut rng))
            .collect();
        let pubs: Vec<IdentityPublic> = keys.iter().map(|k| k.public()).collect();
        let msgs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 40]).collect();
        let mut sigs: Vec<SignatureBytes> =
            keys.iter().zip(&msgs).map(|(k, m)| k.sign(m)).collect();
        let items = |sigs: &[SignatureBytes]| -> Result<(), usize> {
            let v: Vec<_> = (0..5)
                .map(|i| (&pubs[i], msgs[i].as_slice(), &sigs[i]))
                .collect();
            verify_all(&v)
        };
        assert_eq!(items(&sigs), Ok(()));
        sigs[3].0[0] ^= 1;
        assert_eq!(items(&sigs), Err(3));
        sigs.swap(0, 1);
        assert_eq!(items(&sigs), Err(0));
        assert_eq!(verify_all(&[]), Ok(()));
        let restored = IdentityKeypair::from_secret_bytes(&kp.secret_bytes());
        assert_eq!(restored.public(), kp.public());
        assert!(!format!("{kp:?}").contains(&format!("{:?}", kp.secret_bytes().as_ref())));
    }
}
