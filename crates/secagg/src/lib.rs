//! SecAgg+ secure aggregation (Bell et al., CCS 2020), sans-IO.
//!
//! The server learns the sum of the surviving clients' vectors in `Z_{2^b}` and
//! nothing else, as long as fewer than `t` of any client's neighbours collude
//! with it. With the complete graph (`degree >= n - 1`) this is the classic
//! SecAgg protocol of Bonawitz et al. (CCS 2017).
//!
//! The crate has no I/O: [`client::Client`] and [`server::Server`] are state
//! machines that take typed [`messages`] in and hand typed messages out. The
//! RNG and the clock are injected, so a whole federation runs deterministically
//! in memory ([`sim`]). The normative specification is
//! `protocols/secagg-plus.md`; the section numbers cited in this crate (§N)
//! refer to it.
//!
//! Module map:
//! - [`params`]: session parameters, validation and the session id (§2);
//! - [`graph`]: the seeded k-regular Harary graph (§3);
//! - [`paramfinder`]: choosing `(k, t)` from `n`, dropout and corruption rates (§3.3);
//! - [`ring`]: vectors in `Z_{2^b}` and their bit-packed wire form (§4);
//! - [`codec`]: the float codec with stochastic rounding and weights (§4.2);
//! - [`crypto`]: KDF, AES-CTR mask PRG, Shamir, AEAD envelopes, identities (§5);
//! - [`client`], [`server`]: the protocol rounds (§6);
//! - [`sim`]: the in-memory federation harness used by tests, benches and
//!   `fedveil simulate`.

#![forbid(unsafe_code)]
#![deny(missing_debug_implementations)]

pub mod client;
pub mod codec;
pub mod crypto;
pub mod error;
pub mod graph;
pub mod messages;
pub mod paramfinder;
pub mod params;
pub mod ring;
pub mod server;
pub mod sim;

mod ids;

pub use client::Client;
pub use error::{AbortReason, ClientError, ParamsError, Rejected};
pub use ids::{ClientId, SessionId, ShareKind, Stage};
pub use params::SessionParams;
pub use server::{Aggregate, Server, StageDeadlines};

/// The protocol version this crate speaks; it is part of the session id.
pub const PROTOCOL_VERSION: u16 = 1;
