//! HKDF-SHA256 key derivation (§5.1). Every derived key takes the session id
//! as its salt and a domain-separated label plus the identities it belongs to
//! as its info, so a key from one session, round or pair of clients is never
//! valid for another.

use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::CryptoFailure;
use crate::{ClientId, SessionId};

/// Prefix of every label, hash input and signed message in this protocol.
pub const DOMAIN: &[u8] = b"fedveil/secagg/v1/";

/// Labels of the derived keys (§5.1, table "derived keys").
pub mod label {
    /// AES-256-GCM key of a share envelope, per (sender, receiver).
    pub const SHARE_ENVELOPE: &[u8] = b"share-envelope";
    /// AES-128-CTR key of the pairwise mask, per unordered pair.
    pub const PAIR_MASK: &[u8] = b"pair-mask";
    /// AES-128-CTR key of a client's self mask.
    pub const SELF_MASK: &[u8] = b"self-mask";
    /// The X25519 mask secret derived from the Shamir-shared mask seed.
    pub const MASK_SECRET: &[u8] = b"mask-secret";
    /// The seed of the graph permutation.
    pub const GRAPH: &[u8] = b"graph";
    /// The commitment to a client's self-mask seed.
    pub const SELF_MASK_COMMIT: &[u8] = b"self-mask-commit";
}

/// Derives `N` bytes with HKDF-SHA256(salt = session id, ikm,
/// info = DOMAIN ‖ label ‖ 0x00 ‖ parts…). The parts of each label have fixed
/// lengths, so the info string is unambiguous.
pub fn derive<const N: usize>(
    ikm: &[u8],
    session: &SessionId,
    label: &[u8],
    parts: &[&[u8]],
) -> Result<Zeroizing<[u8; N]>, CryptoFailure> {
    let hk = Hkdf::<Sha256>::new(Some(&session.0), ikm);
    let mut info: Vec<&[u8]> = Vec::with_capacity(parts.len() + 3);
    info.push(DOMAIN);
    info.push(label);
    info.push(&[0u8]);
    info.extend_from_slice(parts);
    let mut okm = Zeroizing::new([0u8; N]);
    hk.expand_multi_info(&info, okm.as_mut())
        .map_err(|_| CryptoFailure("HKDF output length out of range"))?;
    Ok(okm)
}

/// The big-endian encoding of a client id, as it appears in labels.
pub fn id_bytes(id: ClientId) -> [u8; 4] {
    id.0.to_be_bytes()
}

/// The public commitment to a client's self-mask seed, sent with its shares
/// so that the server can verify a reconstruction (§6.2).
pub fn commit_self_mask(session: &SessionId, owner: ClientId, seed: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(label::SELF_MASK_COMMIT);
    h.update([0u8]);
    h.update(session.0);
    h.update(id_bytes(owner));
    h.update(seed);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_depend_on_session_label_and_parts() {
        let s1 = SessionId([1; 32]);
        let s2 = SessionId([2; 32]);
        let a = derive::<16>(b"ikm", &s1, label::PAIR_MASK, &[&[0, 0, 0, 1]]).unwrap();
        let b = derive::<16>(b"ikm", &s2, label::PAIR_MASK, &[&[0, 0, 0, 1]]).unwrap();
        let c = derive::<16>(b"ikm", &s1, label::SELF_MASK, &[&[0, 0, 0, 1]]).unwrap();
        let d = derive::<16>(b"ikm", &s1, label::PAIR_MASK, &[&[0, 0, 0, 2]]).unwrap();
        assert_ne!(*a, *b);
        assert_ne!(*a, *c);
        assert_ne!(*a, *d);
        let again = derive::<16>(b"ikm", &s1, label::PAIR_MASK, &[&[0, 0, 0, 1]]).unwrap();
        assert_eq!(*a, *again);
    }
}
