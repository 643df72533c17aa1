//! Where every random choice of the runtime comes from.
//!
//! In operation, every generator is an AES-128-CTR CSPRNG (the mask PRG's
//! keystream, [`KeystreamRng`]) freshly keyed from the operating system
//! ([`Randomness::os`]). Tests and reproducible
//! experiments may instead derive every generator from one secret seed
//! ([`Randomness::seeded`]): each draw is keyed by
//! the first 16 bytes of
//! `SHA-256(domain ‖ seed ‖ purpose ‖ round ‖ attempt ‖ party)`, so a round
//! replays identically whatever happened before it (a restarted server
//! repeats the interrupted round bit for bit). The seed then protects the
//! noise and the masks, exactly like a key: anybody who knows it can remove
//! the differential-privacy noise. The command-line tools never offer it.

use std::fmt;

use fedveil_secagg::crypto::prg::{KeystreamRng, MASK_KEY_LEN};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::FedError;

/// What a generator is for; part of its derivation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The server's cohort selection.
    Cohort,
    /// The server's session nonce and rotation seed.
    Session,
    /// Central noise added by the server.
    ServerNoise,
    /// A client's local training (batch order).
    Training,
    /// A client's rounding, noise and secure-aggregation secrets.
    Privacy,
    /// The federation id of a fresh federation.
    Federation,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Cohort => b"cohort",
            Purpose::Session => b"session",
            Purpose::ServerNoise => b"server-noise",
            Purpose::Training => b"training",
            Purpose::Privacy => b"privacy",
            Purpose::Federation => b"federation",
        }
    }
}

/// The source of randomness.
#[derive(Clone)]
pub struct Randomness(Option<Zeroizing<[u8; 32]>>);

impl fmt::Debug for Randomness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("Randomness::Os"),
            Some(_) => f.write_str("Randomness::Seeded(<redacted>)"),
        }
    }
}

impl Randomness {
    /// Fresh OS randomness for every generator.
    pub fn os() -> Self {
        Randomness(None)
    }

    /// Every generator derived from `seed` (tests, reproducible research).
    pub fn seeded(seed: [u8; 32]) -> Self {
        Randomness(Some(Zeroizing::new(seed)))
    }

    /// Whether generators are derived from a seed.
    pub fn is_seeded(&self) -> bool {
        self.0.is_some()
    }

    /// The generator for `purpose` in `round`, attempt `attempt`, of party
    /// `party` (0 for the server, the client id otherwise).
    pub fn rng(
        &self,
        purpose: Purpose,
        round: u64,
        attempt: u32,
        party: u32,
    ) -> Result<KeystreamRng, FedError> {
        let mut key = Zeroizing::new([0u8; MASK_KEY_LEN]);
        match &self.0 {
            None => OsRng.fill_bytes(key.as_mut()),
            Some(seed) => {
                let mut h = Sha256::new();
                h.update(b"fedveil/fed/v2/randomness\0");
                h.update(seed.as_ref());
                h.update(purpose.label());
                h.update([0]);
                h.update(round.to_be_bytes());
                h.update(attempt.to_be_bytes());
                h.update(party.to_be_bytes());
                let digest = Zeroizing::new(<[u8; 32]>::from(h.finalize()));
                key.copy_from_slice(&digest[..MASK_KEY_LEN]);
            }
        }
        KeystreamRng::from_key(&key)
            .map_err(|e| FedError::Internal(format!("keying a generator: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_generators_are_separated_and_reproducible() {
        let r = Randomness::seeded([9; 32]);
        let a = r.rng(Purpose::Privacy, 3, 0, 7).unwrap().next_u64();
        assert_eq!(a, r.rng(Purpose::Privacy, 3, 0, 7).unwrap().next_u64());
        assert_ne!(a, r.rng(Purpose::Privacy, 3, 0, 8).unwrap().next_u64());
        assert_ne!(a, r.rng(Purpose::Privacy, 4, 0, 7).unwrap().next_u64());
        assert_ne!(a, r.rng(Purpose::Privacy, 3, 1, 7).unwrap().next_u64());
        assert_ne!(a, r.rng(Purpose::Training, 3, 0, 7).unwrap().next_u64());
        let os = Randomness::os();
        assert_ne!(
            os.rng(Purpose::Privacy, 3, 0, 7).unwrap().next_u64(),
            os.rng(Purpose::Privacy, 3, 0, 7).unwrap().next_u64()
        );
        assert!(!format!("{r:?}").contains('9'));
    }
}
