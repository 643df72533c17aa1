//! Federation messages and the model-hash commitment (protocols/federation.md §3).
//!
//! After authentication (§2.2) the client opens one bidirectional control
//! stream. Both directions carry frames (§2.3); a frame announcing a large
//! vector is followed by that vector as a blob on the same stream.

use fedveil_dp::mechanism::NoiseConfig;
use fedveil_secagg::messages::{ClientMessage, ServerMessage};
use fedveil_secagg::{ClientId, SessionId, SessionParams};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::trainer::TrainingConfig;

/// The federation protocol version.
pub const VERSION: u16 = 1;

/// The largest control frame a client may send. Vectors travel as blobs;
/// the biggest control message is a share relay of a complete graph.
pub const MAX_UP_FRAME: usize = 8 << 20;

/// How a client turns its update into a ring vector this round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Encoding {
    /// No differential privacy: the float codec, weighted by the client's
    /// sample count (capped at `max_weight`), for up to `max_clients`.
    Plain {
        bits: u8,
        clamp: f32,
        max_clients: u32,
        max_weight: u32,
    },
    /// Clipping, rotation, rounding and noise (protocols/dp.md §3), with the
    /// round's public rotation seed.
    Private {
        noise: NoiseConfig,
        rotation_seed: [u8; 32],
    },
    /// No encoding and no secure aggregation: the client sends its update
    /// as `f32`s in an [`Up::Update`] (the insecure baseline).
    Unprotected,
}

impl Encoding {
    /// The ring vector length for a model of `dim` parameters.
    pub fn ring_len(&self, dim: usize) -> usize {
        match self {
            Encoding::Plain { .. } => dim + 1,
            Encoding::Private { noise, .. } => noise.padded_dim(),
            Encoding::Unprotected => dim,
        }
    }

    /// The ring width.
    pub fn bits(&self) -> u8 {
        match self {
            Encoding::Plain { bits, .. } => *bits,
            Encoding::Private { noise, .. } => noise.bits,
            Encoding::Unprotected => 32,
        }
    }
}

/// Everything a client needs for one round, except the parameters (which
/// follow as a blob).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundSpec {
    pub federation: [u8; 32],
    pub round: u64,
    /// Which session of the round this is (a round whose session aborted is
    /// tried again).
    pub attempt: u32,
    /// The number of model parameters; the blob holds `4 dim` bytes.
    pub dim: u64,
    /// SHA-256 of the parameter blob.
    pub params_hash: [u8; 32],
    pub training: TrainingConfig,
    pub encoding: Encoding,
    /// The secure-aggregation session; its `context` is
    /// [`RoundSpec::context`].
    pub session: SessionParams,
    /// The hash of the task's bundle (offsite-tuning's emulator) that the
    /// round's parameters go with, when the task has one (§3.4).
    pub bundle: Option<[u8; 32]>,
}

impl RoundSpec {
    /// The model-hash commitment (§3.3): SHA-256 over the federation id,
    /// round, attempt, dimension, parameter hash, training configuration,
    /// encoding and bundle hash. A client computes it from what it
    /// received (and checks the bundle hash against the bundle it holds);
    /// SecAgg+ puts it into the session id, so clients that received
    /// different models or configurations cannot share a session.
    pub fn context(&self, params_hash: &[u8; 32]) -> Result<[u8; 32], postcard::Error> {
        let committed = (
            &self.federation,
            self.round,
            self.attempt,
            self.dim,
            params_hash,
            &self.training,
            &self.encoding,
            &self.bundle,
        );
        let mut h = Sha256::new();
        h.update(b"fedveil/fed/v1/context\0");
        h.update(postcard::to_stdvec(&committed)?);
        Ok(h.finalize().into())
    }
}

/// SHA-256 of a parameter blob.
pub fn params_hash(blob: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fedveil/fed/v1/params\0");
    h.update(blob);
    h.finalize().into()
}

/// SHA-256 of a task bundle (§3.4).
pub fn bundle_hash(blob: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fedveil/fed/v1/bundle\0");
    h.update(blob);
    h.finalize().into()
}

/// `f32` parameters as a little-endian blob.
pub fn params_to_blob(params: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(params.len() * 4);
    for p in params {
        out.extend_from_slice(&p.to_le_bytes());
    }
    out
}

/// A blob back into parameters; `None` if the length is not `4 dim`.
pub fn blob_to_params(blob: &[u8], dim: usize) -> Option<Vec<f32>> {
    if blob.len() != dim.checked_mul(4)? {
        return None;
    }
    Some(
        blob.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Client → server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Up {
    /// The first frame on the control stream.
    Hello { version: u16 },
    /// A SecAgg+ message other than the masked input.
    Secagg(ClientMessage),
    /// The masked input; its packed vector follows as a blob of exactly
    /// `packed_len(len, bits)` bytes.
    Masked {
        session: SessionId,
        bits: u8,
        len: u32,
        bad_envelopes: Vec<ClientId>,
    },
    /// The client will not take part in this round, and why (its policy, a
    /// model that does not match its hash, a training failure).
    Decline { round: u64, reason: String },
    /// An unprotected round's raw update; `dim` little-endian `f32`s follow
    /// as a blob.
    Update {
        round: u64,
        attempt: u32,
        samples: u64,
    },
    /// The answer to [`Down::Bundle`]: `fetch` asks for the bundle (the
    /// client does not hold one with this hash).
    BundleReply { hash: [u8; 32], fetch: bool },
    /// With record-level DP: the ε this client has spent in the federation
    /// (its own account, protocols/dp.md §8), sent when it charges a
    /// session, before its unmasking shares.
    Spent {
        round: u64,
        attempt: u32,
        epsilon: f64,
    },
}

/// Server → client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Down {
    /// The answer to `Hello`.
    Welcome {
        federation: [u8; 32],
        client: ClientId,
        /// The round the federation is at.
        round: u64,
    },
    /// A round begins for this client; the parameters follow as a blob.
    Round(Box<RoundSpec>),
    /// A SecAgg+ message.
    Secagg(ServerMessage),
    /// The client's last message was refused; the connection stays.
    Rejected { reason: String },
    /// The federation is over.
    Finished { rounds: u64, reason: String },
    /// Before `Welcome`, when the task has a bundle (offsite-tuning's
    /// emulator): its hash and size. If the client's [`Up::BundleReply`]
    /// asks for it, exactly `bytes` bytes follow as a blob (§3.4).
    Bundle { hash: [u8; 32], bytes: u64 },
}

impl Down {
    pub fn name(&self) -> &'static str {
        match self {
            Down::Welcome { .. } => "Welcome",
            Down::Round(_) => "Round",
            Down::Secagg(m) => m.name(),
            Down::Rejected { .. } => "Rejected",
            Down::Finished { .. } => "Finished",
            Down::Bundle { .. } => "Bundle",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_and_wrong_lengths_are_refused() {
        let p = vec![1.5f32, -0.0, f32::MAX, 3.25];
        let b = params_to_blob(&p);
        assert_eq!(blob_to_params(&b, 4).unwrap(), p);
        assert!(blob_to_params(&b, 3).is_none());
        assert!(blob_to_params(&b[..15], 4).is_none());
        assert_ne!(params_hash(&b), params_hash(&b[..12]));
    }
}
