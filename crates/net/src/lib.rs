//! fedveil's transport (protocols/federation.md §2): QUIC (quinn) with
//! TLS 1.3 (rustls on aws-lc-rs).
//!
//! - The server presents a self-signed certificate; clients pin its SHA-256
//!   fingerprint instead of trusting any certificate authority.
//! - Clients prove an ed25519 identity by signing a fresh server challenge
//!   bound to the TLS session (an exporter secret), and the server refuses
//!   any key not on its allow-list before the application sees the
//!   connection.
//! - Messages travel as length-prefixed frames with a size limit; large
//!   payloads as length-prefixed blobs read in chunks, also bounded. A peer
//!   can never make the other side allocate more than its limits.

#![forbid(unsafe_code)]
#![deny(missing_debug_implementations)]

pub mod auth;
pub mod endpoint;
pub use fedveil_files as files;
pub mod frame;
pub mod identity;
mod tls;

/// The QUIC implementation, re-exported so that users name the same version.
pub use quinn;

pub use endpoint::{Authenticated, Limits, NetClient, NetServer, Pending};
pub use identity::{ClientIdentity, ClientKey, Fingerprint, ServerIdentity, load_allow_list};

use thiserror::Error;

/// The ALPN protocol identifier.
pub const ALPN: &[u8] = b"fedveil/1";

/// A transport failure, naming what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NetError {
    #[error("I/O: {0}")]
    Io(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("connection: {0}")]
    Connection(String),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u64, max: u64 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("timed out waiting for {what}")]
    Timeout { what: &'static str },
    #[error("client authentication failed: {0}")]
    Unauthenticated(String),
    #[error("client key {key} is not on the allow-list")]
    NotAllowed { key: ClientKey },
    #[error("the server refused this client: {0}")]
    Refused(String),
    #[error("{path}: {reason}")]
    BadFile { path: String, reason: String },
    #[error("the peer closed the stream")]
    Closed,
}
