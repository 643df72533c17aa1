//! Server optimisers (Reddi et al., "Adaptive Federated Optimization",
//! ICLR 2021). The round's aggregate `Δ` (the mean of the clients' updates,
//! noised when differential privacy is on) is a pseudo-gradient step:
//!
//! - FedAvg: `x ← x + η Δ`;
//! - FedAdam: `m ← β₁ m + (1 − β₁) Δ`, `v ← β₂ v + (1 − β₂) Δ²`,
//!   `x ← x + η m / (√v + τ)`;
//! - FedYogi: as FedAdam with `v ← v − (1 − β₂) Δ² sign(v − Δ²)`.
//!
//! `v` starts at `τ²`, as in the paper. FedProx is a client-side option
//! (`training.proximal_mu`).

use serde::{Deserialize, Serialize};

use crate::FedError;

/// Which server optimiser.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    FedAvg,
    FedAdam,
    FedYogi,
}

impl OptimizerKind {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::FedAvg => "fedavg",
            OptimizerKind::FedAdam => "fedadam",
            OptimizerKind::FedYogi => "fedyogi",
        }
    }
}

/// The `[optimizer]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    #[serde(default = "default_kind")]
    pub kind: OptimizerKind,
    /// Server learning rate `η` (default 1 for FedAvg, 0.01 otherwise).
    #[serde(default)]
    pub server_lr: Option<f32>,
    /// FedAdam/FedYogi: first-moment decay (default 0.9).
    #[serde(default)]
    pub beta1: Option<f32>,
    /// FedAdam/FedYogi: second-moment decay (default 0.99).
    #[serde(default)]
    pub beta2: Option<f32>,
    /// FedAdam/FedYogi: adaptivity `τ` (default 1e-3).
    #[serde(default)]
    pub tau: Option<f32>,
}

fn default_kind() -> OptimizerKind {
    OptimizerKind::FedAvg
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::FedAvg,
            server_lr: None,
            beta1: None,
            beta2: None,
            tau: None,
        }
    }
}

/// The resolved hyper-parameters.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Hyper {
    pub kind: OptimizerKind,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
}

impl OptimizerConfig {
    /// Resolves defaults and checks ranges and combinations.
    pub fn resolve(&self) -> Result<Hyper, FedError> {
        let adaptive = self.kind != OptimizerKind::FedAvg;
        for (name, v) in [
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("tau", self.tau),
        ] {
            if v.is_some() && !adaptive {
                return Err(FedError::config(
                    format!("optimizer.{name}"),
                    "applies to fedadam and fedyogi only",
                ));
            }
        }
        let h = Hyper {
            kind: self.kind,
            lr: self.server_lr.unwrap_or(if adaptive { 0.01 } else { 1.0 }),
            beta1: self.beta1.unwrap_or(0.9),
            beta2: self.beta2.unwrap_or(0.99),
            tau: self.tau.unwrap_or(1e-3),
        };
        if !(h.lr.is_finite() && h.lr > 0.0) {
            return Err(FedError::config(
                "optimizer.server_lr",
                format!("must be positive, got {}", h.lr),
            ));
        }
        for (name, b) in [("beta1", h.beta1), ("beta2", h.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(FedError::config(
                    format!("optimizer.{name}"),
                    format!("must be in [0, 1), got {b}"),
                ));
            }
        }
        if !(h.tau.is_finite() && h.tau > 0.0) {
            return Err(FedError::config(
                "optimizer.tau",
                format!("must be positive, got {}", h.tau),
            ));
        }
        Ok(h)
    }
}

/// A server optimiser with its state (saved in checkpoints).
#[derive(Clone, Debug, PartialEq)]
pub struct ServerOptimizer {
    hyper: Hyper,
    /// First moment (empty for FedAvg).
    pub m: Vec<f32>,
    /// Second moment (empty for FedAvg).
    pub v: Vec<f32>,
}

impl ServerOptimizer {
    /// A fresh optimiser for `dim` parameters.
    pub fn new(hyper: Hyper, dim: usize) -> Self {
        let (m, v) = if hyper.kind == OptimizerKind::FedAvg {
            (Vec::new(), Vec::new())
        } else {
            (vec![0.0; dim], vec![hyper.tau * hyper.tau; dim])
        };
        ServerOptimizer { hyper, m, v }
    }

    /// An optimiser resumed from saved moments.
    pub fn resume(hyper: Hyper, dim: usize, m: Vec<f32>, v: Vec<f32>) -> Result<Self, FedError> {
        let want = if hyper.kind == OptimizerKind::FedAvg {
            0
        } else {
            dim
        };
        if m.len() != want || v.len() != want {
            return Err(FedError::Internal(format!(
                "optimizer state has {} and {} entries, {} needs {want}",
                m.len(),
                v.len(),
                hyper.kind.name()
            )));
        }
        Ok(ServerOptimizer { hyper, m, v })
    }

    pub fn hyper(&self) -> &Hyper {
        &self.hyper
    }

    /// Applies the round's aggregate `delta` to `params`.
    pub fn step(&mut self, params: &mut [f32], delta: &[f64]) -> Result<(), FedError> {
        if params.len() != delta.len() {
            return Err(FedError::Internal(format!(
                "aggregate has {} entries, the model {}",
                delta.len(),
                params.len()
            )));
        }
        let h = self.hyper;
        match h.kind {
            OptimizerKind::FedAvg => {
                for (x, d) in params.iter_mut().zip(delta) {
                    *x += h.lr * *d as f32;
                }
            }
            OptimizerKind::FedAdam | OptimizerKind::FedYogi => {
                let yogi = h.kind == OptimizerKind::FedYogi;
                for (((x, d), m), v) in params
                    .iter_mut()
                    .zip(delta)
                    .zip(self.m.iter_mut())
                    .zip(self.v.iter_mut())
                {
                    let d = *d as f32;
                    let d2 = d * d;
                    *m = h.beta1 * *m + (1.0 - h.beta1) * d;
                    *v = if yogi {
                        *v - (1.0 - h.beta2) * d2 * (*v - d2).signum()
                    } else {
                        h.beta2 * *v + (1.0 - h.beta2) * d2
                    };
                    *x += h.lr * *m / (v.max(0.0).sqrt() + h.tau);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyper(kind: OptimizerKind) -> Hyper {
        OptimizerConfig {
            kind,
            ..OptimizerConfig::default()
        }
        .resolve()
        .unwrap()
    }

    #[test]
    fn fedavg_adds_the_scaled_mean() {
        let mut o = ServerOptimizer::new(hyper(OptimizerKind::FedAvg), 2);
        let mut x = vec![1.0, 2.0];
        o.step(&mut x, &[0.5, -1.0]).unwrap();
        assert_eq!(x, vec![1.5, 1.0]);
    }

    #[test]
    fn adaptive_steps_follow_the_paper() {
        for kind in [OptimizerKind::FedAdam, OptimizerKind::FedYogi] {
            let h = hyper(kind);
            let mut o = ServerOptimizer::new(h, 1);
            let mut x = vec![0.0f32];
            o.step(&mut x, &[2.0]).unwrap();
            let m = 0.1 * 2.0f32;
            let v0 = h.tau * h.tau;
            let v = match kind {
                OptimizerKind::FedAdam => 0.99 * v0 + 0.01 * 4.0,
                _ => v0 + 0.01 * 4.0, // v0 < Δ², so sign(v - Δ²) = -1
            };
            let want = h.lr * m / (v.sqrt() + h.tau);
            assert!((x[0] - want).abs() < 1e-7, "{kind:?}: {} vs {want}", x[0]);
            // Constant gradients: the step approaches η (sign-like updates).
            for _ in 0..2000 {
                o.step(&mut x, &[2.0]).unwrap();
            }
            let before = x[0];
            o.step(&mut x, &[2.0]).unwrap();
            assert!(((x[0] - before) - h.lr).abs() < 0.01 * h.lr, "{kind:?}");
        }
    }

    #[test]
    fn misplaced_and_out_of_range_settings_are_named() {
        let e = OptimizerConfig {
            beta1: Some(0.9),
            ..OptimizerConfig::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("optimizer.beta1") && e.contains("fedadam"),
            "{e}"
        );
        let e = OptimizerConfig {
            kind: OptimizerKind::FedYogi,
            beta2: Some(1.0),
            ..OptimizerConfig::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.contains("optimizer.beta2"), "{e}");
    }
}
