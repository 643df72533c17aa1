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
use serde::{Deserialize, Serialize};

use crate::FedError;

/// One released round's entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub round: u64,
    pub survivors: u32,
    pub rho: f64,
}

/// The privacy spent so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyLedger {
    pub zcdp: ZcdpLedger,
    pub entries: Vec<Entry>,
}

impl PrivacyLedger {
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

    /// Records a released round.
    pub fn record(
        &mut self,
        round: u64,
        noise: &NoiseConfig,
        survivors: u32,
    ) -> Result<f64, FedError> {
        let rho = self.zcdp.record(noise, survivors)?;
        self.entries.push(Entry {
            round,
            survivors,
            rho,
        });
        Ok(rho)
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
        a.record(0, &noise, 10).unwrap();
        let mut b = PrivacyLedger::default();
        b.record(0, &noise, 8).unwrap();
        let (ea, eb) = (a.epsilon(1e-5).unwrap(), b.epsilon(1e-5).unwrap());
        assert!(ea <= eb && (eb - worst).abs() < 1e-9, "{ea} {eb} {worst}");
        assert!(b.record(1, &noise, 7).is_err());
    }
}
