use std::fmt;

use serde::{Deserialize, Serialize};

/// A client's identifier within a session roster.
///
/// Ids are chosen by the layer above (the federation assigns them); within a
/// session they must be distinct. The Shamir evaluation point of a client is
/// `id + 1`, so every id, including `u32::MAX - 1`, maps to a non-zero point.
#[derive(Copy, Clone, Eq, PartialEq, Ord, PartialOrd, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientId(pub u32);

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The session id: SHA-256 over the canonical encoding of the session
/// parameters (§2.2). Every signature, derived key and AEAD associated data is
/// bound to it, so nothing from one session or round is accepted in another.
#[derive(Copy, Clone, Eq, PartialEq, Ord, PartialOrd, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub [u8; 32]);

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The protocol stages, in order (§6).
#[derive(Copy, Clone, Eq, PartialEq, Ord, PartialOrd, Hash, Debug, Serialize, Deserialize)]
pub enum Stage {
    /// R0: clients advertise two signed X25519 public keys.
    AdvertiseKeys,
    /// R1: clients send encrypted Shamir shares to their neighbours.
    ShareKeys,
    /// R2: clients send their masked input.
    MaskedInput,
    /// R3: clients sign the survivor set.
    ConsistencyCheck,
    /// R4: clients reveal shares so that the server can unmask the sum.
    Unmasking,
}

impl Stage {
    /// All stages in protocol order.
    pub const ALL: [Stage; 5] = [
        Stage::AdvertiseKeys,
        Stage::ShareKeys,
        Stage::MaskedInput,
        Stage::ConsistencyCheck,
        Stage::Unmasking,
    ];

    /// The short name used on the command line (`--drop STAGE:COUNT`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Stage::AdvertiseKeys => "advertise",
            Stage::ShareKeys => "share",
            Stage::MaskedInput => "masked",
            Stage::ConsistencyCheck => "consistency",
            Stage::Unmasking => "unmask",
        }
    }

    /// Parses a command-line stage name.
    pub fn from_cli_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.cli_name() == name)
    }

    /// Position of the stage in protocol order, starting at 0.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

/// The two secrets a client shares with its neighbours. For every neighbour,
/// an honest client reveals at most one of the two kinds, ever (§6.5).
#[derive(Copy, Clone, Eq, PartialEq, Ord, PartialOrd, Hash, Debug, Serialize, Deserialize)]
pub enum ShareKind {
    /// A share of the self-mask seed `b_u`; revealed only for survivors.
    SelfMask,
    /// A share of the mask-key seed behind `s_u`; revealed only for dropped clients.
    MaskKey,
}

impl fmt::Display for ShareKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShareKind::SelfMask => "self-mask",
            ShareKind::MaskKey => "mask-key",
        })
    }
}
