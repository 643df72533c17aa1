//! AES-256-GCM share envelopes (§5.4). Each envelope carries one client's two
//! shares for one neighbour. Its key is derived from the X25519 agreement of
//! the two clients' cipher keys and is specific to the direction
//! (sender → receiver) and the session, so it is used for exactly one message
//! and a fixed nonce is safe. The associated data binds the session and both
//! identities: a replayed, swapped or re-addressed envelope fails to open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use super::CryptoFailure;
use super::kdf::{self, DOMAIN, label};
use crate::{ClientId, SessionId};

/// Plaintext length: a self-mask share and a mask-key share, 32 bytes each.
pub const PLAINTEXT_LEN: usize = 64;
/// Ciphertext length: plaintext plus the 16-byte GCM tag.
pub const ENVELOPE_LEN: usize = PLAINTEXT_LEN + 16;

/// The key of one directed envelope.
pub type EnvelopeKey = Zeroizing<[u8; 32]>;

/// Derives the directed envelope key from the shared X25519 secret of the
/// sender's and receiver's cipher keys.
pub fn envelope_key(
    shared: &[u8; 32],
    session: &SessionId,
    sender: ClientId,
    receiver: ClientId,
    sender_pk: &[u8; 32],
    receiver_pk: &[u8; 32],
) -> Result<EnvelopeKey, CryptoFailure> {
    kdf::derive::<32>(
        shared,
        session,
        label::SHARE_ENVELOPE,
        &[
            &kdf::id_bytes(sender),
            &kdf::id_bytes(receiver),
            sender_pk,
            receiver_pk,
        ],
    )
}

fn associated_data(session: &SessionId, sender: ClientId, receiver: ClientId) -> Vec<u8> {
    let mut ad = Vec::with_capacity(DOMAIN.len() + label::SHARE_ENVELOPE.len() + 41);
    ad.extend_from_slice(DOMAIN);
    ad.extend_from_slice(label::SHARE_ENVELOPE);
    ad.push(0);
    ad.extend_from_slice(&session.0);
    ad.extend_from_slice(&kdf::id_bytes(sender));
    ad.extend_from_slice(&kdf::id_bytes(receiver));
    ad
}

/// Encrypts the two shares for `receiver`.
pub fn seal(
    key: &EnvelopeKey,
    session: &SessionId,
    sender: ClientId,
    receiver: ClientId,
    plaintext: &Zeroizing<[u8; PLAINTEXT_LEN]>,
) -> Result<Vec<u8>, CryptoFailure> {
    let cipher = Aes256Gcm::new_from_slice(key.as_ref())
        .map_err(|_| CryptoFailure("AES-256-GCM key rejected"))?;
    let ad = associated_data(session, sender, receiver);
    cipher
        .encrypt(
            Nonce::from_slice(&[0u8; 12]),
            Payload {
                msg: plaintext.as_ref(),
                aad: &ad,
            },
        )
        .map_err(|_| CryptoFailure("AES-256-GCM encryption failed"))
}

/// Decrypts an envelope. `None` if it was tampered with, replayed from another
/// session, or addressed differently.
pub fn open(
    key: &EnvelopeKey,
    session: &SessionId,
    sender: ClientId,
    receiver: ClientId,
    ciphertext: &[u8],
) -> Option<Zeroizing<[u8; PLAINTEXT_LEN]>> {
    if ciphertext.len() != ENVELOPE_LEN {
        return None;
    }
    let cipher = Aes256Gcm::new_from_slice(key.as_ref()).ok()?;
    let ad = associated_data(session, sender, receiver);
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(&[0u8; 12]),
                Payload {
                    msg: ciphertext,
                    aad: &ad,
                },
            )
            .ok()?,
    );
    let mut out = Zeroizing::new([0u8; PLAINTEXT_LEN]);
    out.copy_from_slice(plain.get(..PLAINTEXT_LEN)?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_open_only_with_matching_session_and_addresses() {
        let s = SessionId([9; 32]);
        let (a, b) = (ClientId(1), ClientId(2));
        let key = envelope_key(&[5; 32], &s, a, b, &[1; 32], &[2; 32]).unwrap();
        let pt = Zeroizing::new([42u8; PLAINTEXT_LEN]);
        let ct = seal(&key, &s, a, b, &pt).unwrap();
        assert_eq!(ct.len(), ENVELOPE_LEN);
        assert_eq!(*open(&key, &s, a, b, &ct).unwrap(), *pt);
        assert!(open(&key, &SessionId([8; 32]), a, b, &ct).is_none());
        assert!(open(&key, &s, b, a, &ct).is_none());
        assert!(open(&key, &s, a, ClientId(3), &ct).is_none());
        let mut tampered = ct.clone();
        tampered[5] ^= 1;
        assert!(open(&key, &s, a, b, &tampered).is_none());
        assert!(open(&key, &s, a, b, &ct[..ct.len() - 1]).is_none());
        // The reverse direction has a different key.
        let rev = envelope_key(&[5; 32], &s, b, a, &[2; 32], &[1; 32]).unwrap();
        assert_ne!(*rev, *key);
    }
}
