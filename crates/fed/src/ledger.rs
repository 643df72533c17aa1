//! The privacy ledger (protocols/federation.md §5.3, protocols/dp.md §4.3).
//!
//! Every released round adds its zCDP cost `ρ`, computed with the round's
//! actual number of survivors; `ε` at the configured `δ` comes from the
//! total through opendp's conversion. The ledger is saved in the
//! checkpoint, so a restarted server continues the same account, and the
//! server refuses to start a round whose worst case (`n_min` survivors)
//! would take `ε` past the budget. Aborted sessions release nothing and
//! cost nothing.
//!
//! No amplification by subsampling is credited: with Poisson sampling the
//! reported `ε` is an upper bound for the released models too, and it is
//! exactly what the server itself (which knows each cohort) can learn.

use fedveil_dp::mechanism::NoiseConfig;
use fedveil_dp::zcdp::{self, ZcdpLedger};
use fedveil_dp::{Accountant, SubsampledGaussian, rdp};
use serde::{Deserialize, Serialize};

use crate::FedError;
use crate::trainer::RecordSteps;

/// One released round's entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleasedRound {
    pub round: u64,
    /// The session of the round that was charged (0 in ledgers written
    /// before attempts were recorded).
    #[serde(default)]
    pub attempt: u32,
    pub survivors: u32,
    pub rho: f64,
}

/// The privacy spent so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyLedger {
    pub zcdp: ZcdpLedger,
    pub entries: Vec<ReleasedRound>,
    /// With record-level DP: the largest ε each client has reported
    /// (`Up::Spent`), by client id. Each client is its own accountant; the
    /// server only keeps their word.
    #[serde(default)]
    pub clients: std::collections::BTreeMap<u32, f64>,
    /// With record-level DP: how many sessions each client has reported
    /// spending in.
    #[serde(default)]
    pub client_sessions: std::collections::BTreeMap<u32, u64>,
}

impl PrivacyLedger {
    /// Takes clients' record-level reports into account.
    pub fn hear_clients(&mut self, reports: &std::collections::BTreeMap<u32, f64>) {
        for (&client, &epsilon) in reports {
            let e = self.clients.entry(client).or_insert(0.0);
            *e = e.max(epsilon);
            *self.client_sessions.entry(client).or_insert(0) += 1;
        }
    }

    /// The largest record-level ε any client has reported (0 before any).
    pub fn max_client_epsilon(&self) -> f64 {
        self.clients.values().copied().fold(0.0, f64::max)
    }

    /// `ε` at `delta` for everything released.
    pub fn epsilon(&self, delta: f64) -> Result<f64, FedError> {
        if self.entries.is_empty() {
            return Ok(0.0);
        }
        Ok(self.zcdp.epsilon(delta)?)
    }

    /// `ε` after one more round of `noise` with its floor of survivors:
    /// the most that round could cost.
    pub fn epsilon_after_worst_round(
        &self,
        noise: &NoiseConfig,
        delta: f64,
    ) -> Result<f64, FedError> {
        let rho = zcdp::round_rho(noise, noise.min_survivors)?;
        Ok(zcdp::epsilon(self.zcdp.rho + rho, delta)?)
    }

    /// Records a released session of a round.
    pub fn record(
        &mut self,
        round: u64,
        attempt: u32,
        noise: &NoiseConfig,
        survivors: u32,
    ) -> Result<f64, FedError> {
        let rho = self.zcdp.record(noise, survivors)?;
        self.entries.push(ReleasedRound {
            round,
            attempt,
            survivors,
            rho,
        });
        Ok(rho)
    }

    /// The first session number of `round` that no charged session used:
    /// a server restarted mid-round never reuses one (a client that
    /// revealed its input in a session refuses the same session again).
    pub fn next_attempt(&self, round: u64) -> u32 {
        self.entries
            .iter()
            .filter(|e| e.round == round)
            .map(|e| e.attempt + 1)
            .max()
            .unwrap_or(0)
    }
}

/// A client's own account of the privacy it has spent in one federation
/// (protocols/federation.md §4.4): every session in which it revealed its
/// input (sent its unmasking shares), charged at the session's worst case
/// (its survivor floor), whatever the server says about survivors. Saved
/// atomically before the shares leave, so that it survives a restart and a
/// crash can only overcount.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientLedger {
    /// The federation, in hex.
    pub federation: String,
    /// Total zCDP `ρ` of the charged sessions.
    pub rho: f64,
    /// The charged sessions.
    pub sessions: Vec<ClientCharge>,
    /// With record-level DP (protocols/dp.md §8): the DP-SGD steps of each
    /// revealed session.
    #[serde(default)]
    pub record: Vec<RecordCharge>,
}

/// One session's record-level DP-SGD steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordCharge {
    pub round: u64,
    pub attempt: u32,
    pub noise_multiplier: f64,
    pub sampling_rate: f64,
    pub steps: u64,
}

/// One session a client revealed its input in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientCharge {
    pub round: u64,
    pub attempt: u32,
    pub rho: f64,
}

impl ClientLedger {
    /// The largest ledger file read.
    const MAX_BYTES: u64 = 64 << 20;

    /// An empty ledger of `federation`.
    pub fn new(federation: &[u8; 32]) -> Self {
        ClientLedger {
            federation: hex::encode(federation),
            ..ClientLedger::default()
        }
    }

    /// Whether this is the ledger of `federation`.
    pub fn is_for(&self, federation: &[u8; 32]) -> bool {
        self.federation == hex::encode(federation)
    }

    /// Where the ledger of `federation` lives in `dir`.
    pub fn path(dir: &std::path::Path, federation: &[u8; 32]) -> std::path::PathBuf {
        dir.join(format!("{}.json", hex::encode(federation)))
    }

    /// Loads the ledger of `federation` from `dir` (an empty one if there
    /// is none yet).
    pub fn load(dir: &std::path::Path, federation: &[u8; 32]) -> Result<Self, FedError> {
        let path = Self::path(dir, federation);
        let bad = |reason: String| FedError::File {
            path: path.display().to_string(),
            reason,
        };
        let bytes = match std::fs::File::open(&path) {
            Ok(f) => {
                use std::io::Read;
                let mut b = Vec::new();
                f.take(Self::MAX_BYTES + 1)
                    .read_to_end(&mut b)
                    .map_err(|e| bad(e.to_string()))?;
                if b.len() as u64 > Self::MAX_BYTES {
                    return Err(bad("larger than a ledger can be".into()));
                }
                b
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::new(federation));
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        let l: ClientLedger = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if l.federation != hex::encode(federation) {
            return Err(bad("the ledger is another federation's".into()));
        }
        let sum: f64 = l.sessions.iter().map(|c| c.rho).sum();
        if !(l.rho.is_finite() && l.rho >= 0.0 && (sum - l.rho).abs() <= 1e-9 * l.rho.max(1.0)) {
            return Err(bad("the ledger's total does not match its sessions".into()));
        }
        let sane = |c: &RecordCharge| {
            c.noise_multiplier.is_finite()
                && c.noise_multiplier > 0.0
                && c.sampling_rate > 0.0
                && c.sampling_rate <= 1.0
        };
        if !l.record.iter().all(sane) {
            return Err(bad("a record-level charge is out of range".into()));
        }
        Ok(l)
    }

    /// Saves the ledger into `dir`, atomically and durably.
    pub fn save(&self, dir: &std::path::Path) -> Result<(), FedError> {
        let path = dir.join(format!("{}.json", self.federation));
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| FedError::Internal(format!("the client ledger: {e}")))?;
        fedveil_net::files::write_atomically(&path, &bytes, fedveil_net::files::Access::Default)
            .map_err(|e| FedError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    /// Whether the client already revealed its input in this session.
    pub fn charged(&self, round: u64, attempt: u32) -> bool {
        self.sessions
            .iter()
            .any(|c| c.round == round && c.attempt == attempt)
            || self
                .record
                .iter()
                .any(|c| c.round == round && c.attempt == attempt)
    }

    /// Charges a session's record-level DP-SGD steps.
    pub fn charge_record(&mut self, round: u64, attempt: u32, steps: &RecordSteps) {
        self.record.push(RecordCharge {
            round,
            attempt,
            noise_multiplier: steps.noise_multiplier,
            sampling_rate: steps.sampling_rate,
            steps: steps.steps,
        });
    }

    /// Record-level `ε` at `delta` of every charged DP-SGD step, and of
    /// `extra` more: with one noise multiplier and sampling rate throughout
    /// (a federation's), all steps compose as one Poisson-subsampled
    /// Gaussian under `accountant`; mixed ones compose their RDP curves.
    pub fn record_epsilon(
        &self,
        extra: Option<&RecordSteps>,
        delta: f64,
        accountant: Accountant,
    ) -> Result<f64, FedError> {
        let mut groups: Vec<(f64, f64, u64)> = Vec::new();
        let all = self
            .record
            .iter()
            .map(|c| (c.noise_multiplier, c.sampling_rate, c.steps))
            .chain(extra.map(|e| (e.noise_multiplier, e.sampling_rate, e.steps)));
        for (z, q, t) in all {
            match groups.iter_mut().find(|g| g.0 == z && g.1 == q) {
                Some(g) => g.2 = g.2.saturating_add(t),
                None => groups.push((z, q, t)),
            }
        }
        Ok(match groups.as_slice() {
            [] => 0.0,
            [(z, q, t)] if *t > 0 => SubsampledGaussian {
                noise_multiplier: *z,
                sampling_rate: *q,
                steps: *t,
            }
            .epsilon(delta, accountant)?,
            _ => {
                let orders = rdp::default_orders();
                let mut curve = vec![0.0; orders.len()];
                for (z, q, t) in &groups {
                    for (c, r) in curve.iter_mut().zip(rdp::compose(*q, *z, *t, &orders)) {
                        *c += r;
                    }
                }
                rdp::epsilon(&orders, &curve, delta)?.0
            }
        })
    }

    /// `ε` at `delta` for everything charged.
    pub fn epsilon(&self, delta: f64) -> Result<f64, FedError> {
        if self.sessions.is_empty() {
            return Ok(0.0);
        }
        Ok(zcdp::epsilon(self.rho, delta)?)
    }

    /// `ε` at `delta` after one more session costing `rho`.
    pub fn epsilon_after(&self, rho: f64, delta: f64) -> Result<f64, FedError> {
        Ok(zcdp::epsilon(self.rho + rho, delta)?)
    }

    /// Charges a session.
    pub fn charge(&mut self, round: u64, attempt: u32, rho: f64) {
        self.rho += rho;
        self.sessions.push(ClientCharge {
            round,
            attempt,
            rho,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedveil_dp::mechanism::Placement;

    #[test]
    fn fewer_survivors_cost_more_and_the_worst_case_bounds_any_round() {
        let noise = NoiseConfig {
            placement: Placement::Distributed,
            dim: 64,
            clip: 1.0,
            noise_multiplier: 1.0,
            granularity: 1e-3,
            beta: (-0.5f64).exp(),
            bits: 32,
            min_survivors: 8,
        };
        let mut a = PrivacyLedger::default();
        assert_eq!(a.epsilon(1e-5).unwrap(), 0.0);
        let worst = a.epsilon_after_worst_round(&noise, 1e-5).unwrap();
        a.record(0, 0, &noise, 10).unwrap();
        let mut b = PrivacyLedger::default();
        b.record(0, 0, &noise, 8).unwrap();
        let (ea, eb) = (a.epsilon(1e-5).unwrap(), b.epsilon(1e-5).unwrap());
        assert!(ea <= eb && (eb - worst).abs() < 1e-9, "{ea} {eb} {worst}");
        assert!(b.record(1, 0, &noise, 7).is_err());
        assert_eq!(b.next_attempt(0), 1);
        assert_eq!(b.next_attempt(1), 0);
    }

    #[test]
    fn a_client_ledger_survives_a_restart_and_refuses_tampering() {
        let dir = std::env::temp_dir().join(format!("fedveil-cledger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let fed = [7u8; 32];
        let mut l = ClientLedger::load(&dir, &fed).unwrap();
        assert_eq!(l.epsilon(1e-5).unwrap(), 0.0);
        l.charge(0, 0, 0.01);
        l.charge(0, 1, 0.01);
        l.save(&dir).unwrap();
        let back = ClientLedger::load(&dir, &fed).unwrap();
        assert_eq!(back, l);
        assert!(back.charged(0, 1) && !back.charged(1, 0));
        assert!(back.epsilon_after(0.01, 1e-5).unwrap() > back.epsilon(1e-5).unwrap());
        // Another federation's ledger is another file.
        assert_eq!(ClientLedger::load(&dir, &[8; 32]).unwrap().rho, 0.0);
        // A total that does not match its sessions is refused.
        let path = ClientLedger::path(&dir, &fed);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("0.02", "0.0");
        std::fs::write(&path, text).unwrap();
        assert!(ClientLedger::load(&dir, &fed).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_client_composes_its_record_level_steps_across_sessions_and_keeps_them() {
        let dir = std::env::temp_dir().join(format!("fedveil-rledger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let fed = [9u8; 32];
        let steps = RecordSteps {
            noise_multiplier: 1.1,
            sampling_rate: 0.01,
            steps: 250,
        };
        let eps = |steps: u64, accountant| {
            SubsampledGaussian {
                noise_multiplier: 1.1,
                sampling_rate: 0.01,
                steps,
            }
            .epsilon(1e-5, accountant)
            .unwrap()
        };
        let mut l = ClientLedger::load(&dir, &fed).unwrap();
        assert_eq!(l.record_epsilon(None, 1e-5, Accountant::Pld).unwrap(), 0.0);
        for round in 0..4 {
            l.charge_record(round, 0, &steps);
        }
        l.save(&dir).unwrap();
        let back = ClientLedger::load(&dir, &fed).unwrap();
        assert_eq!(back, l);
        assert!(back.charged(3, 0) && !back.charged(4, 0));
        // Four sessions of 250 steps compose as 1,000 steps (the design
        // note's sanity point: about 1.52 by PLD, 1.71 by RDP).
        for accountant in [Accountant::Pld, Accountant::Rdp] {
            let got = back.record_epsilon(None, 1e-5, accountant).unwrap();
            assert_eq!(got, eps(1000, accountant));
            let after = back.record_epsilon(Some(&steps), 1e-5, accountant).unwrap();
            assert_eq!(after, eps(1250, accountant));
        }
        // A session at other parameters composes by RDP, above either part.
        let other = RecordSteps {
            noise_multiplier: 2.0,
            ..steps
        };
        let mixed = back
            .record_epsilon(Some(&other), 1e-5, Accountant::Pld)
            .unwrap();
        assert!(mixed > eps(1000, Accountant::Rdp), "{mixed}");
        // A charge out of range is refused when the ledger is read.
        let path = ClientLedger::path(&dir, &fed);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replacen("0.01", "1.5", 1);
        std::fs::write(&path, text).unwrap();
        assert!(ClientLedger::load(&dir, &fed).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
