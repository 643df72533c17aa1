//! Protocol messages (§6) and their wire encoding (§7).
//!
//! Messages are serde types; on the wire they are encoded with postcard. A
//! decoder never allocates more than the bytes it was given, so a frame-size
//! limit in the transport bounds the memory an attacker can make us use.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroize;

use crate::crypto::identity::{IdentityPublic, SignatureBytes};
use crate::crypto::kdf::{self, DOMAIN};
use crate::ring::PackedVec;
use crate::{ClientId, SessionId, SessionParams, Stage};

/// R0: a client's two X25519 public keys, signed with its identity key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedKeys {
    pub session: SessionId,
    pub sender: ClientId,
    /// Key agreement for share envelopes (`c_u`).
    pub cipher_pk: [u8; 32],
    /// Key agreement for pairwise masks (`s_u`).
    pub mask_pk: [u8; 32],
    /// ed25519 over [`AdvertisedKeys::signed_bytes`].
    pub signature: SignatureBytes,
}

impl AdvertisedKeys {
    /// DOMAIN ‖ "advertise" ‖ 0 ‖ session ‖ sender ‖ cipher_pk ‖ mask_pk.
    pub fn signed_bytes(
        session: &SessionId,
        sender: ClientId,
        cipher_pk: &[u8; 32],
        mask_pk: &[u8; 32],
    ) -> Vec<u8> {
        let mut m = Vec::with_capacity(DOMAIN.len() + 110);
        m.extend_from_slice(DOMAIN);
        m.extend_from_slice(b"advertise\0");
        m.extend_from_slice(&session.0);
        m.extend_from_slice(&kdf::id_bytes(sender));
        m.extend_from_slice(cipher_pk);
        m.extend_from_slice(mask_pk);
        m
    }

    /// Verifies the signature against the sender's identity key.
    pub fn verify(&self, identity: &IdentityPublic) -> bool {
        identity.verify(
            &Self::signed_bytes(&self.session, self.sender, &self.cipher_pk, &self.mask_pk),
            &self.signature,
        )
    }
}

/// An encrypted pair of shares, as sent by its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundEnvelope {
    pub to: ClientId,
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// An encrypted pair of shares, as relayed to its holder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundEnvelope {
    pub from: ClientId,
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// R1: one envelope per accepted neighbour and a commitment to the self-mask seed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareKeys {
    pub session: SessionId,
    pub envelopes: Vec<OutboundEnvelope>,
    pub self_mask_commitment: [u8; 32],
}

/// R2: the masked input and the neighbours whose envelopes did not open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    pub session: SessionId,
    pub masked: PackedVec,
    pub bad_envelopes: Vec<ClientId>,
}

/// R3: the client's signature of the survivor set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencySignature {
    pub session: SessionId,
    pub signature: SignatureBytes,
}

/// One revealed share (a field element, 32 bytes little-endian).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize)]
#[zeroize(drop)]
pub struct RevealedShare {
    #[zeroize(skip)]
    pub owner: ClientId,
    pub share: [u8; 32],
}

impl std::fmt::Debug for RevealedShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevealedShare")
            .field("owner", &self.owner)
            .field("share", &"<redacted>")
            .finish()
    }
}

/// R4: shares of survivors' self-mask seeds and dropped clients' mask seeds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskShares {
    pub session: SessionId,
    pub self_mask: Vec<RevealedShare>,
    pub mask_key: Vec<RevealedShare>,
}

/// Everything a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    AdvertiseKeys(AdvertisedKeys),
    ShareKeys(ShareKeys),
    MaskedInput(MaskedInput),
    Consistency(ConsistencySignature),
    UnmaskShares(UnmaskShares),
}

impl ClientMessage {
    /// The stage this message answers.
    pub fn stage(&self) -> Stage {
        match self {
            ClientMessage::AdvertiseKeys(_) => Stage::AdvertiseKeys,
            ClientMessage::ShareKeys(_) => Stage::ShareKeys,
            ClientMessage::MaskedInput(_) => Stage::MaskedInput,
            ClientMessage::Consistency(_) => Stage::ConsistencyCheck,
            ClientMessage::UnmaskShares(_) => Stage::Unmasking,
        }
    }

    /// The session the message claims to belong to.
    pub fn session(&self) -> SessionId {
        match self {
            ClientMessage::AdvertiseKeys(m) => m.session,
            ClientMessage::ShareKeys(m) => m.session,
            ClientMessage::MaskedInput(m) => m.session,
            ClientMessage::Consistency(m) => m.session,
            ClientMessage::UnmaskShares(m) => m.session,
        }
    }
}

/// A survivor's signature of the survivor set, forwarded in R4.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurvivorSignature {
    pub client: ClientId,
    pub signature: SignatureBytes,
}

/// Everything the server sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Starts a session.
    Setup(SessionParams),
    /// R0 → R1: the signed keys of the client's neighbours that advertised.
    KeyDirectory {
        session: SessionId,
        keys: Vec<AdvertisedKeys>,
    },
    /// R1 → R2: the envelopes addressed to the client.
    ShareRelay {
        session: SessionId,
        envelopes: Vec<InboundEnvelope>,
    },
    /// R2 → R3: the clients whose masked input the server accepted.
    ConsistencyRequest {
        session: SessionId,
        survivors: Vec<ClientId>,
    },
    /// R3 → R4: neighbours' signatures of the survivor set, and which share
    /// kind the server asks for, per neighbour.
    UnmaskRequest {
        session: SessionId,
        signatures: Vec<SurvivorSignature>,
        alive: Vec<ClientId>,
        dropped: Vec<ClientId>,
    },
    /// The session is over for this client.
    Abort { session: SessionId, reason: String },
}

impl ServerMessage {
    /// A short name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ServerMessage::Setup(_) => "Setup",
            ServerMessage::KeyDirectory { .. } => "KeyDirectory",
            ServerMessage::ShareRelay { .. } => "ShareRelay",
            ServerMessage::ConsistencyRequest { .. } => "ConsistencyRequest",
            ServerMessage::UnmaskRequest { .. } => "UnmaskRequest",
            ServerMessage::Abort { .. } => "Abort",
        }
    }
}

/// The digest of a survivor set that clients sign in R3.
pub fn survivors_digest(survivors: &[ClientId]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(b"survivors\0");
    h.update((survivors.len() as u64).to_be_bytes());
    for s in survivors {
        h.update(kdf::id_bytes(*s));
    }
    h.finalize().into()
}

/// DOMAIN ‖ "consistency" ‖ 0 ‖ session ‖ digest(survivors).
pub fn consistency_signed_bytes(session: &SessionId, digest: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 76);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(b"consistency\0");
    m.extend_from_slice(&session.0);
    m.extend_from_slice(digest);
    m
}

/// A frame that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("malformed message: {0}")]
pub struct WireError(pub String);

/// Encodes a message into a buffer of exactly the right size (a counting
/// pass first, so a 4 MB vector is not copied through doubling reallocations).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let size: usize = postcard::serialize_with_flavor(msg, postcard::ser_flavors::Size::default())
        .map_err(|e| WireError(e.to_string()))?;
    postcard::to_extend(msg, Vec::with_capacity(size)).map_err(|e| WireError(e.to_string()))
}

/// Decodes a message; trailing bytes are an error.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, WireError> {
    let (msg, rest) = postcard::take_from_bytes(bytes).map_err(|e| WireError(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_roundtrip_and_garbage_is_an_error() {
        let m = ClientMessage::MaskedInput(MaskedInput {
            session: SessionId([3; 32]),
            masked: PackedVec::pack(&[1, 2, 3], 12).unwrap(),
            bad_envelopes: vec![ClientId(4)],
        });
        let bytes = encode(&m).unwrap();
        assert_eq!(decode::<ClientMessage>(&bytes).unwrap(), m);
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode::<ClientMessage>(&extra).is_err());
        assert!(decode::<ClientMessage>(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode::<ClientMessage>(&[0xff, 0xff, 0xff]).is_err());
        // A length prefix claiming 4 GiB of envelopes must fail without allocating it.
        let mut huge = vec![1u8];
        huge.extend_from_slice(&[3; 32]);
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode::<ClientMessage>(&huge).is_err());
    }
}
