//! Cryptographic building blocks (§5). They are public so that auditors and
//! the adversarial test suite can build attacks from the same primitives; the
//! protocol state machines are the only intended users.

pub mod envelope;
pub mod identity;
pub mod kdf;
pub mod keys;
pub mod prg;
pub mod shamir;

/// A failure inside a cryptographic primitive that valid inputs never cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoFailure(pub &'static str);

impl std::fmt::Display for CryptoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for CryptoFailure {}
