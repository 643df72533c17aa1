//! fedveil's attacks on its own promises. Each audit claim lives beside
//! the attack that tests it and the control that shows the measurement can
//! see a failure; everything here goes through the other crates' public
//! APIs, over real loopback QUIC where the promise involves the network.
//!
//! - [`secagg`]: a malicious server's and malicious clients' attacks on
//!   the SecAgg+ state machines, in memory (protocols/secagg-plus.md §8);
//! - [`quic`]: the same attacks played over QUIC by the federation's own
//!   server and clients, through fed's adversary hooks;
//! - [`transport`]: hostile peers against the QUIC transport
//!   (protocols/federation.md §2);
//! - [`mechanism`]: the empirical privacy audit of the DP mechanism
//!   (protocols/dp.md §7);
//! - [`record`]: the empirical audit of record-level DP-SGD, a canary
//!   record in a client's real private round (protocols/dp.md §8.5);
//! - [`hardening`]: the claims about resource bounds, ledgers, retries,
//!   weights and the pass@k sandbox (issue 17), with their [`harness`];
//! - [`report`]: every claim in order, and the report `fedveil audit` prints.

pub mod hardening;
pub mod harness;
pub mod mechanism;
pub mod quic;
pub mod record;
pub mod report;
pub mod secagg;
pub mod transport;

use serde::Serialize;

/// Why an attack could not be run at all (a failure of the audit's run,
/// not of a claim).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Fed(#[from] fedveil_fed::FedError),
    #[error(transparent)]
    Dp(#[from] fedveil_fed::dp::DpError),
    #[error(transparent)]
    Model(#[from] fedveil_model::ModelError),
    #[error(transparent)]
    Net(#[from] fedveil_fed::net::NetError),
    #[error("privacy audit: {0}")]
    BadAudit(String),
    #[error("{0}")]
    Harness(String),
}

pub type Result<T> = std::result::Result<T, AuditError>;

/// One claim of `fedveil audit`'s report (docs/audit.md; the JSON keys are
/// the report's contract).
#[derive(Clone, Debug, Serialize)]
pub struct Claim {
    /// A short stable name.
    pub id: String,
    /// Where the promise is made (a section of protocols/ or SECURITY.md).
    pub section: String,
    pub claim: String,
    pub attack: String,
    /// The attack failed and the control showed that the measurement sees
    /// a success.
    pub held: bool,
    pub evidence: String,
    /// The measurements behind the evidence, the control's included.
    pub details: serde_json::Value,
}

impl Claim {
    pub fn new(
        id: impl Into<String>,
        section: impl Into<String>,
        claim: impl Into<String>,
        attack: impl Into<String>,
        held: bool,
        evidence: String,
        details: &impl Serialize,
    ) -> Result<Claim> {
        let id = id.into();
        Ok(Claim {
            details: serde_json::to_value(details)
                .map_err(|e| AuditError::Harness(format!("serialising {id}'s details: {e}")))?,
            id,
            section: section.into(),
            claim: claim.into(),
            attack: attack.into(),
            held,
            evidence,
        })
    }
}
