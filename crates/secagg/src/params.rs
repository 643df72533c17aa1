//! Session parameters (§2): what every party must agree on before keys are
//! generated. The session id is a hash of all of them, so a client that was
//! given different parameters, or a different context (model hash), ends up in
//! a different session and every signature across the two fails.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypto::identity::IdentityPublic;
use crate::crypto::kdf::DOMAIN;
use crate::{ClientId, PROTOCOL_VERSION, ParamsError, SessionId};

/// The most clients a session may have.
pub const MAX_CLIENTS: usize = 1 << 20;
/// The longest vector a session may aggregate (2^28 elements, 1 GiB at 32 bits).
pub const MAX_DIM: u32 = 1 << 28;

/// One roster entry: a client id and its long-term identity key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    pub id: ClientId,
    pub identity: IdentityPublic,
}

/// The parameters of one aggregation session (one federated round).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionParams {
    /// Protocol version; must equal [`PROTOCOL_VERSION`].
    pub version: u16,
    /// A fresh random value from the server's CSPRNG, unique per session.
    pub nonce: [u8; 32],
    /// The federated round this session aggregates.
    pub round: u64,
    /// A hash of everything the clients' inputs depend on (model, config,
    /// round), computed by the layer above. Clients check it against their own.
    pub context: [u8; 32],
    /// Vector length.
    pub dim: u32,
    /// Ring width `b`: vectors live in `Z_{2^b}`.
    pub bits: u8,
    /// Number of neighbours `k`; `k >= n - 1` selects the complete graph.
    pub degree: u32,
    /// Shamir threshold `t`.
    pub threshold: u32,
    /// The fewest clients whose inputs may be summed (`1 ≤ n_min ≤ n`). The
    /// server aborts after MaskedInput with fewer survivors, and clients
    /// refuse a survivor set smaller than this (§6.4): a floor that
    /// distributed differential privacy relies on (protocols/dp.md §5).
    pub min_survivors: u32,
    /// The cohort, sorted by id.
    pub roster: Vec<RosterEntry>,
}

impl SessionParams {
    /// The number of clients.
    pub fn clients(&self) -> usize {
        self.roster.len()
    }

    /// The number of neighbours each client actually has: `min(k, n - 1)`.
    pub fn effective_degree(&self) -> u32 {
        let n1 = u32::try_from(self.roster.len().saturating_sub(1)).unwrap_or(u32::MAX);
        self.degree.min(n1)
    }

    /// Whether the graph is complete (classic SecAgg).
    pub fn is_complete(&self) -> bool {
        self.effective_degree() as usize + 1 >= self.roster.len()
    }

    /// The roster position of `id`.
    pub fn index_of(&self, id: ClientId) -> Option<usize> {
        self.roster.binary_search_by_key(&id, |e| e.id).ok()
    }

    /// The identity key of `id`.
    pub fn identity_of(&self, id: ClientId) -> Option<&IdentityPublic> {
        self.index_of(id)
            .and_then(|i| self.roster.get(i))
            .map(|e| &e.identity)
    }

    /// Checks every rule of §2.3 (the graph's and the threshold's through
    /// [`degree_fits`] and [`threshold_fits`], which configurations use
    /// too).
    pub fn validate(&self) -> Result<(), ParamsError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ParamsError::UnsupportedVersion {
                got: self.version,
                supported: PROTOCOL_VERSION,
            });
        }
        let n = self.roster.len();
        if n < 3 {
            return Err(ParamsError::TooFewClients { n });
        }
        if n > MAX_CLIENTS {
            return Err(ParamsError::TooManyClients {
                n,
                max: MAX_CLIENTS,
            });
        }
        for pair in self.roster.windows(2) {
            if pair[0].id >= pair[1].id {
                return Err(ParamsError::RosterNotSorted { client: pair[1].id });
            }
        }
        if self.bits == 0 || self.bits > crate::ring::MAX_BITS {
            return Err(ParamsError::BitsOutOfRange { bits: self.bits });
        }
        if self.dim == 0 || self.dim > MAX_DIM {
            return Err(ParamsError::DimOutOfRange {
                dim: self.dim,
                max: MAX_DIM,
            });
        }
        let k = self.effective_degree();
        if self.degree < 2 {
            return Err(ParamsError::InvalidDegree {
                degree: self.degree,
                n,
                reason: "each client needs at least 2 neighbours",
            });
        }
        if !degree_fits(k, u32::try_from(n).unwrap_or(u32::MAX)) {
            return Err(ParamsError::InvalidDegree {
                degree: self.degree,
                n,
                reason: "an odd degree needs an even number of clients (use k-1 or k+1)",
            });
        }
        if self.threshold < 2 {
            return Err(ParamsError::ThresholdTooLow {
                threshold: self.threshold,
            });
        }
        if self.threshold > k {
            return Err(ParamsError::ThresholdAboveDegree {
                threshold: self.threshold,
                degree: k,
            });
        }
        if !threshold_fits(self.threshold, k) {
            return Err(ParamsError::ThresholdNotMajority {
                threshold: self.threshold,
                degree: k,
            });
        }
        if self.min_survivors == 0 || self.min_survivors as usize > n {
            return Err(ParamsError::MinSurvivorsOutOfRange {
                min_survivors: self.min_survivors,
                n,
            });
        }
        Ok(())
    }

    /// The canonical byte encoding hashed into the session id (§2.2).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + 36 * self.roster.len());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.round.to_be_bytes());
        out.extend_from_slice(&self.context);
        out.extend_from_slice(&self.dim.to_be_bytes());
        out.push(self.bits);
        out.extend_from_slice(&self.degree.to_be_bytes());
        out.extend_from_slice(&self.threshold.to_be_bytes());
        out.extend_from_slice(&self.min_survivors.to_be_bytes());
        out.extend_from_slice(&(self.roster.len() as u64).to_be_bytes());
        for e in &self.roster {
            out.extend_from_slice(&e.id.0.to_be_bytes());
            out.extend_from_slice(&e.identity.0);
        }
        out
    }

    /// The session id: SHA-256(DOMAIN ‖ "session" ‖ 0 ‖ canonical bytes).
    pub fn session_id(&self) -> SessionId {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(b"session\0");
        h.update(self.canonical_bytes());
        SessionId(h.finalize().into())
    }
}

/// Whether `k` neighbours each among `n` clients make a Harary graph
/// (§3): short of the complete graph, an odd degree needs an even number
/// of clients.
pub fn degree_fits(k: u32, n: u32) -> bool {
    k + 1 >= n || k.is_multiple_of(2) || n.is_multiple_of(2)
}

/// The degree to use for `n` clients when `k` is wanted: `k` capped at
/// the complete graph, and raised to the next even degree where an odd
/// one does not fit (a Poisson cohort of odd size).
pub fn fitting_degree(k: u32, n: u32) -> u32 {
    let k = k.min(n.saturating_sub(1));
    if degree_fits(k, n) { k } else { k + 1 }
}

/// The smallest majority of `k` neighbours, the default threshold (§2.3).
pub fn majority(k: u32) -> u32 {
    k / 2 + 1
}

/// Whether `t` is a threshold §2.3 allows for `k` neighbours: at least 2,
/// at most `k`, and more than half of them (or a malicious server could
/// collect both kinds of a client's shares).
pub fn threshold_fits(t: u32, k: u32) -> bool {
    t >= 2 && t <= k && 2 * t > k
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn params(n: u32, degree: u32, threshold: u32) -> SessionParams {
        SessionParams {
            version: PROTOCOL_VERSION,
            nonce: [1; 32],
            round: 3,
            context: [2; 32],
            dim: 10,
            bits: 32,
            degree,
            threshold,
            min_survivors: 2,
            roster: (0..n)
                .map(|i| RosterEntry {
                    id: ClientId(i * 2),
                    identity: IdentityPublic([i as u8; 32]),
                })
                .collect(),
        }
    }

    #[test]
    fn validation_names_the_rule() {
        assert_eq!(params(10, 4, 3).validate(), Ok(()));
        assert_eq!(params(10, 100, 6).validate(), Ok(()));
        assert_eq!(
            params(2, 1, 1).validate(),
            Err(ParamsError::TooFewClients { n: 2 })
        );
        assert!(matches!(
            params(9, 3, 2).validate(),
            Err(ParamsError::InvalidDegree { .. })
        ));
        assert!(params(10, 3, 2).validate().is_ok());
        assert_eq!(
            params(10, 4, 2).validate(),
            Err(ParamsError::ThresholdNotMajority {
                threshold: 2,
                degree: 4
            })
        );
        assert_eq!(
            params(10, 4, 5).validate(),
            Err(ParamsError::ThresholdAboveDegree {
                threshold: 5,
                degree: 4
            })
        );
        let mut p = params(10, 4, 3);
        p.roster.swap(2, 3);
        assert!(matches!(
            p.validate(),
            Err(ParamsError::RosterNotSorted { .. })
        ));
        let mut p = params(10, 4, 3);
        p.bits = 33;
        assert_eq!(p.validate(), Err(ParamsError::BitsOutOfRange { bits: 33 }));
        let mut p = params(10, 4, 3);
        p.dim = 0;
        assert!(matches!(
            p.validate(),
            Err(ParamsError::DimOutOfRange { .. })
        ));
        let mut p = params(10, 4, 3);
        p.version = 9;
        assert!(matches!(
            p.validate(),
            Err(ParamsError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn session_id_binds_every_field() {
        let base = params(10, 4, 3);
        let id = base.session_id();
        type Change = Box<dyn Fn(&mut SessionParams)>;
        let variants: Vec<Change> = vec![
            Box::new(|p| p.nonce[0] ^= 1),
            Box::new(|p| p.round += 1),
            Box::new(|p| p.context[31] ^= 1),
            Box::new(|p| p.dim += 1),
            Box::new(|p| p.bits -= 1),
            Box::new(|p| p.degree += 2),
            Box::new(|p| p.threshold += 1),
            Box::new(|p| p.min_survivors += 1),
            Box::new(|p| p.roster[3].identity.0[0] ^= 1),
            Box::new(|p| p.roster[3].id.0 += 1),
            Box::new(|p| {
                p.roster.pop();
            }),
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut p = base.clone();
            change(&mut p);
            assert_ne!(p.session_id(), id, "variant {i}");
        }
    }
}
