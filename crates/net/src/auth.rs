//! Client authentication (protocols/federation.md §2.2).
//!
//! On the first stream the client names its key (`Begin`); the server
//! refuses a key that is not on its allow-list at once, and otherwise sends a
//! fresh 32-byte nonce (`Challenge`). The client signs
//!
//! ```text
//! "fedveil/net/v1/client-auth\0" ‖ nonce ‖ exporter ‖ key
//! ```
//!
//! where `exporter` is 32 bytes of TLS exporter keying material for this
//! connection (label `EXPORTER-fedveil-client-auth`, context = nonce). The
//! signature is therefore worthless on any other connection: a relay or a
//! replay fails. Only after `Accepted` does the application see the
//! connection.

use serde::{Deserialize, Serialize};

use crate::NetError;
use crate::frame::{read_frame, write_frame};
use crate::identity::{ClientIdentity, ClientKey, transcript};

/// The largest authentication frame.
pub const MAX_AUTH_FRAME: usize = 1024;
/// The TLS exporter label.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-fedveil-client-auth";

/// The authentication exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthMessage {
    Begin {
        key: ClientKey,
    },
    Challenge {
        nonce: [u8; 32],
    },
    Proof {
        #[serde(with = "serde_bytes")]
        signature: [u8; 64],
    },
    Accepted,
    Refused {
        reason: String,
    },
}

/// The 32 bytes of TLS exporter keying material that bind a proof of key to
/// `conn` (label `EXPORTER-fedveil-client-auth`, context `nonce`). Both ends
/// of one connection compute the same value; no other connection can.
pub fn channel_binding(conn: &quinn::Connection, nonce: &[u8; 32]) -> Result<[u8; 32], NetError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, nonce)
        .map_err(|_| NetError::Tls("TLS exporter unavailable".into()))?;
    Ok(out)
}

fn conn_err(e: impl std::fmt::Display) -> NetError {
    NetError::Connection(e.to_string())
}

/// The server's side: returns the authenticated client key.
pub(crate) async fn server_side(
    conn: &quinn::Connection,
    allowed: impl Fn(&ClientKey) -> bool,
) -> Result<ClientKey, NetError> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(conn_err)?;
    let key = match read_frame::<AuthMessage>(&mut recv, MAX_AUTH_FRAME).await? {
        AuthMessage::Begin { key } => key,
        other => {
            return Err(NetError::Malformed(format!(
                "expected Begin, got {other:?}"
            )));
        }
    };
    let refuse = |reason: String| AuthMessage::Refused { reason };
    if !allowed(&key) {
        let _ = write_frame(
            &mut send,
            &refuse(format!("{key} is not allowed")),
            MAX_AUTH_FRAME,
        )
        .await;
        let _ = send.finish();
        return Err(NetError::NotAllowed { key });
    }
    let mut nonce = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    write_frame(&mut send, &AuthMessage::Challenge { nonce }, MAX_AUTH_FRAME).await?;
    let signature = match read_frame::<AuthMessage>(&mut recv, MAX_AUTH_FRAME).await? {
        AuthMessage::Proof { signature } => signature,
        other => {
            return Err(NetError::Malformed(format!(
                "expected Proof, got {other:?}"
            )));
        }
    };
    let exported = channel_binding(conn, &nonce)?;
    if !key.verify(&transcript(&nonce, &exported, &key), &signature) {
        let _ = write_frame(
            &mut send,
            &refuse("bad proof of key".into()),
            MAX_AUTH_FRAME,
        )
        .await;
        let _ = send.finish();
        return Err(NetError::Unauthenticated(format!("bad proof for {key}")));
    }
    write_frame(&mut send, &AuthMessage::Accepted, MAX_AUTH_FRAME).await?;
    send.finish().map_err(conn_err)?;
    Ok(key)
}

/// The client's side.
pub(crate) async fn client_side(
    conn: &quinn::Connection,
    identity: &ClientIdentity,
) -> Result<(), NetError> {
    let key = identity.public();
    let (mut send, mut recv) = conn.open_bi().await.map_err(conn_err)?;
    write_frame(&mut send, &AuthMessage::Begin { key }, MAX_AUTH_FRAME).await?;
    let nonce = match read_frame::<AuthMessage>(&mut recv, MAX_AUTH_FRAME).await? {
        AuthMessage::Challenge { nonce } => nonce,
        AuthMessage::Refused { reason } => return Err(NetError::Refused(reason)),
        other => {
            return Err(NetError::Malformed(format!(
                "expected Challenge, got {other:?}"
            )));
        }
    };
    let exported = channel_binding(conn, &nonce)?;
    let signature = identity.sign(&transcript(&nonce, &exported, &key));
    write_frame(&mut send, &AuthMessage::Proof { signature }, MAX_AUTH_FRAME).await?;
    match read_frame::<AuthMessage>(&mut recv, MAX_AUTH_FRAME).await? {
        AuthMessage::Accepted => Ok(()),
        AuthMessage::Refused { reason } => Err(NetError::Refused(reason)),
        other => Err(NetError::Malformed(format!(
            "expected Accepted, got {other:?}"
        ))),
    }
}
