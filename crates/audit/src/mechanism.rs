//! Empirical privacy auditing (Jagielski, Ullman & Oprea 2020; Nasr et al.
//! 2021): a lower bound on the ε a mechanism really spends, measured by
//! attacking it, to set beside the ε the accountant claims.
//!
//! An (ε, δ)-DP mechanism bounds every test that tells two neighbouring
//! inputs apart (Kairouz, Oh & Viswanath 2015): its false-positive and
//! false-negative rates satisfy `FPR + e^ε FNR ≥ 1 − δ` and
//! `FNR + e^ε FPR ≥ 1 − δ`. So a test with measured rates proves
//! `ε ≥ ln((1 − δ − FNR) / FPR)` (and the mirror image); with
//! Clopper–Pearson bounds on the rates in place of the rates, the bound
//! holds with the stated confidence.
//!
//! [`audit_round`] runs one round of the real distributed discrete
//! Gaussian mechanism ([`ClientPrivatizer`] for every client, the ring sum
//! that secure aggregation reveals, [`ServerDecoder`]) many times, with a
//! canary client whose update is either a canary vector of norm `clip` or
//! zero. The adversary knows every other client's update (the white-box
//! threat model of DP itself) and scores a trial by the decoded sum's
//! projection on the canary, minus the others' share of it. A threshold
//! picked on half of the trials is evaluated on the other half.

use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use fedveil_fed::dp::mechanism::{ClientPrivatizer, NoiseConfig, ServerDecoder};
use fedveil_fed::dp::sampler::uniform_unit;
use fedveil_fed::dp::special::log_comb;
use fedveil_fed::dp::{DpError, zcdp};

use crate::{AuditError, Claim, Result};

/// The exact two-sided Clopper–Pearson interval for a binomial proportion
/// with `successes` of `trials`, at confidence `1 − alpha`: the lower end
/// has `P(X ≥ k) = α/2`, the upper `P(X ≤ k) = α/2`.
pub fn clopper_pearson(successes: u64, trials: u64, alpha: f64) -> Result<(f64, f64)> {
    if trials == 0 || successes > trials || !(alpha > 0.0 && alpha < 1.0) {
        return Err(AuditError::BadAudit(format!(
            "Clopper–Pearson needs 0 ≤ successes ≤ trials, trials ≥ 1 and α in (0, 1); got \
             {successes} of {trials} at α = {alpha}"
        )));
    }
    let (k, n) = (successes, trials);
    let lower = if k == 0 {
        0.0
    } else {
        // P(X ≥ k | p) rises with p.
        bisect(|p| 1.0 - binomial_cdf(k - 1, n, p), alpha / 2.0)
    };
    let upper = if k == n {
        1.0
    } else {
        // P(X ≤ k | p) falls with p.
        bisect(|p| -binomial_cdf(k, n, p), -alpha / 2.0)
    };
    Ok((lower, upper))
}

/// `P(X ≤ k)` for `X ~ Binomial(n, p)`, summed in log space.
fn binomial_cdf(k: u64, n: u64, p: f64) -> f64 {
    if p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return if k >= n { 1.0 } else { 0.0 };
    }
    let (lp, lq) = (p.ln(), (-p).ln_1p());
    let terms: Vec<f64> = (0..=k.min(n))
        .map(|i| log_comb(n as f64, i as f64) + i as f64 * lp + (n - i) as f64 * lq)
        .collect();
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = terms.iter().map(|t| (t - max).exp()).sum();
    (max + sum.ln()).exp().min(1.0)
}

/// The `p` in [0, 1] where the increasing `f(p)` crosses `target`.
fn bisect(f: impl Fn(f64) -> f64, target: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..64 {
        let mid = 0.5 * (lo + hi);
        if f(mid) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The ε that a test with these outcomes proves, at confidence
/// `1 − alpha` (each rate bounded at `1 − alpha/2`): the larger of
/// `ln((1 − δ − FNR⁺) / FPR⁺)` and `ln((1 − δ − FPR⁺) / FNR⁺)`, where `⁺`
/// is a Clopper–Pearson upper bound; 0 when neither is positive.
pub fn epsilon_lower_bound(outcome: &TestOutcome, delta: f64, alpha: f64) -> Result<f64> {
    if !(0.0..1.0).contains(&delta) {
        return Err(DpError::BadDelta(delta).into());
    }
    let (_, fpr) = clopper_pearson(outcome.false_positives, outcome.negatives, alpha)?;
    let (_, fnr) = clopper_pearson(outcome.false_negatives, outcome.positives, alpha)?;
    let bound = |a: f64, b: f64| {
        let num = 1.0 - delta - a;
        if num > 0.0 && b > 0.0 {
            (num / b).ln()
        } else {
            0.0
        }
    };
    Ok(bound(fnr, fpr).max(bound(fpr, fnr)).max(0.0))
}

/// How a threshold test did on trials whose truth is known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestOutcome {
    /// Trials with the canary, and those the test missed.
    pub positives: u64,
    pub false_negatives: u64,
    /// Trials without it, and those the test flagged.
    pub negatives: u64,
    pub false_positives: u64,
}

impl TestOutcome {
    /// Scores at or above `threshold` are called "canary present".
    pub fn at(threshold: f64, with: &[f64], without: &[f64]) -> TestOutcome {
        TestOutcome {
            positives: with.len() as u64,
            false_negatives: with.iter().filter(|&&s| s < threshold).count() as u64,
            negatives: without.len() as u64,
            false_positives: without.iter().filter(|&&s| s >= threshold).count() as u64,
        }
    }

    /// The true-positive and false-positive rates.
    pub fn rates(&self) -> (f64, f64) {
        (
            1.0 - self.false_negatives as f64 / self.positives.max(1) as f64,
            self.false_positives as f64 / self.negatives.max(1) as f64,
        )
    }
}

/// An audit's verdict: the ε the attack proves beside the ε claimed,
/// with the test behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Trials with the canary, and as many without.
    pub trials: u32,
    pub delta: f64,
    /// The confidence of the lower bound.
    pub confidence: f64,
    /// The ε the accountant claims.
    pub claimed_epsilon: f64,
    /// The ε the attack proves, at `confidence`.
    pub epsilon_lower_bound: f64,
    /// The largest ε this many trials can prove (a perfect test's bound):
    /// a claim above it cannot be refuted by this audit.
    pub ceiling: f64,
    /// The test, chosen on the first half of the trials and measured on
    /// the other.
    pub threshold: f64,
    pub outcome: TestOutcome,
}

impl Verdict {
    /// Picks the threshold on the first half of the scores, measures it on
    /// the second, and bounds ε at confidence `1 − alpha`.
    pub(crate) fn of(
        with: &[f64],
        without: &[f64],
        claimed_epsilon: f64,
        delta: f64,
        alpha: f64,
    ) -> Result<Verdict> {
        let half = with.len().min(without.len()) / 2;
        let threshold = best_threshold(&with[..half], &without[..half], delta, alpha);
        let outcome = TestOutcome::at(threshold, &with[half..], &without[half..]);
        let perfect = TestOutcome {
            positives: outcome.positives,
            false_negatives: 0,
            negatives: outcome.positives,
            false_positives: 0,
        };
        Ok(Verdict {
            trials: with.len() as u32,
            delta,
            confidence: 1.0 - alpha,
            claimed_epsilon,
            epsilon_lower_bound: epsilon_lower_bound(&outcome, delta, alpha)?,
            ceiling: epsilon_lower_bound(&perfect, delta, alpha)?,
            threshold,
            outcome,
        })
    }

    /// Whether the claim survived: the proven ε is at most the claimed one.
    pub fn held(&self) -> bool {
        self.epsilon_lower_bound <= self.claimed_epsilon
    }

    /// The true-positive and false-positive rates on the held-out half.
    pub fn rates(&self) -> (f64, f64) {
        self.outcome.rates()
    }

    /// The one-line evidence of a claim; `claimed_by` names who claims.
    pub(crate) fn evidence(&self, claimed_by: &str) -> String {
        let (tpr, fpr) = self.rates();
        format!(
            "ε lower bound {:.2} ({:.0} % confidence) against {claimed_by} {:.2} at δ = {:e} \
             (this many trials can prove at most {:.2}); TPR {:.3}, FPR {:.3} on {} held-out \
             trials each way (threshold chosen on {} more)",
            self.epsilon_lower_bound,
            100.0 * self.confidence,
            self.claimed_epsilon,
            self.delta,
            self.ceiling,
            tpr,
            fpr,
            self.outcome.positives,
            u64::from(self.trials) - self.outcome.positives
        )
    }
}

/// A mechanism broken on purpose, to show that the audit catches it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sabotage {
    /// The clients add (almost) no noise, while the accountant still
    /// counts the configured noise multiplier.
    NoNoise,
    /// Updates are not clipped: the canary has 20 times the clip norm.
    NoClip,
}

impl Sabotage {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Sabotage::NoNoise => "noise off",
            Sabotage::NoClip => "clipping off",
        }
    }
}

/// One audit: the mechanism's configuration and the experiment's size.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditConfig {
    /// The round's noise (the placement must be distributed or central).
    pub noise: NoiseConfig,
    /// Clients in the round, the canary's included (at least
    /// `noise.min_survivors`).
    pub clients: u32,
    /// Trials with the canary, and as many without.
    pub trials: u32,
    pub delta: f64,
    /// The bound holds with probability `1 − alpha`.
    pub alpha: f64,
    pub broken: Option<Sabotage>,
}

/// What an audit measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditResult {
    pub noise_multiplier: f64,
    pub clients: u32,
    /// The claim (the zCDP accountant's ε for the round) and the bound.
    #[serde(flatten)]
    pub verdict: Verdict,
    pub broken: Option<Sabotage>,
}

/// Audits one round of the mechanism `config.noise` describes, with a
/// fresh random canary direction and other clients' updates. The claimed
/// ε is the zCDP accountant's for one round with `config.clients`
/// survivors.
pub fn audit_round<R: RngCore + CryptoRng + ?Sized>(
    config: &AuditConfig,
    rng: &mut R,
) -> Result<AuditResult> {
    let noise = &config.noise;
    noise.validate()?;
    if config.clients < noise.min_survivors.max(1) || config.trials < 100 {
        return Err(AuditError::BadAudit(format!(
            "an audit needs at least min_survivors = {} clients and 100 trials, got {} and {}",
            noise.min_survivors, config.clients, config.trials
        )));
    }
    if !(config.alpha > 0.0 && config.alpha < 1.0) {
        return Err(AuditError::BadAudit(format!(
            "alpha must be in (0, 1), got {}",
            config.alpha
        )));
    }
    let claimed = zcdp::epsilon(zcdp::round_rho(noise, config.clients)?, config.delta)?;
    // What the clients run: the configured mechanism, or a broken one.
    let mut run = noise.clone();
    let canary_norm = match config.broken {
        Some(Sabotage::NoClip) => {
            run.clip = noise.clip * 20.0;
            // The same noise in absolute terms: z·c is unchanged.
            run.noise_multiplier = noise.noise_multiplier / 20.0;
            // Room in the ring for the larger sum.
            run.granularity = noise
                .granularity
                .max(run.finest_safe_granularity(config.clients, 8.0)?);
            noise.clip * 20.0
        }
        Some(Sabotage::NoNoise) => {
            run.noise_multiplier = 1e-9;
            noise.clip
        }
        None => noise.clip,
    };
    let dim = noise.dim;
    let canary = scaled(random_direction(dim, rng), canary_norm);
    let mut round_seed = [0u8; 32];
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for trial in 0..2 * config.trials {
        let present = trial % 2 == 0;
        // A fresh public rotation each round, as the federation draws.
        rng.fill_bytes(&mut round_seed);
        let client = ClientPrivatizer::new(run.clone(), round_seed)?;
        let server = ServerDecoder::new(run.clone(), round_seed)?;
        let mut sum = vec![0u32; noise.padded_dim()];
        let mut known = vec![0f64; dim];
        for c in 0..config.clients {
            let update: Vec<f32> = if c == 0 {
                if present {
                    canary.iter().map(|&v| v as f32).collect()
                } else {
                    vec![0.0; dim]
                }
            } else {
                // Others: random updates of up to the clip norm, known to
                // the adversary.
                let norm = noise.clip * uniform_unit(rng);
                let u = scaled(random_direction(dim, rng), norm);
                known.iter_mut().zip(&u).for_each(|(k, v)| *k += v);
                u.iter().map(|&v| v as f32).collect()
            };
            let p = client.privatize(&update, rng)?;
            for (s, v) in sum.iter_mut().zip(&p.ring) {
                *s = s.wrapping_add(*v);
            }
        }
        if run.bits < 32 {
            let mask = (1u32 << run.bits) - 1;
            sum.iter_mut().for_each(|s| *s &= mask);
        }
        let decoded = server.decode(&sum, rng)?;
        let score: f64 = decoded
            .iter()
            .zip(&known)
            .zip(&canary)
            .map(|((d, k), c)| (d - k) * c)
            .sum::<f64>()
            / canary_norm;
        if present {
            with.push(score);
        } else {
            without.push(score);
        }
    }
    Ok(AuditResult {
        noise_multiplier: noise.noise_multiplier,
        clients: config.clients,
        verdict: Verdict::of(&with, &without, claimed, config.delta, config.alpha)?,
        broken: config.broken,
    })
}

/// The threshold whose test proves the largest ε on these trials, among
/// 128 quantiles of the scores (at the same confidence as the final
/// bound, so that a threshold in a thin tail does not look better than it
/// is).
fn best_threshold(with: &[f64], without: &[f64], delta: f64, alpha: f64) -> f64 {
    let mut scores: Vec<f64> = with.iter().chain(without).copied().collect();
    scores.sort_by(f64::total_cmp);
    if scores.is_empty() {
        return 0.0;
    }
    let candidates: Vec<f64> = (1..128)
        .map(|i| scores[i * (scores.len() - 1) / 128])
        .collect();
    let proven = |t: f64| {
        epsilon_lower_bound(&TestOutcome::at(t, with, without), delta, alpha).unwrap_or(0.0)
    };
    candidates
        .iter()
        .copied()
        .max_by(|&a, &b| proven(a).total_cmp(&proven(b)))
        .unwrap_or(0.0)
}

/// A uniformly random unit vector (normalised Gaussians, Box–Muller).
fn random_direction<R: RngCore + ?Sized>(dim: usize, rng: &mut R) -> Vec<f64> {
    let v: Vec<f64> = (0..dim)
        .map(|_| {
            let u1 = 1.0 - uniform_unit(rng);
            let u2 = uniform_unit(rng);
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
    v.into_iter().map(|x| x / norm).collect()
}

fn scaled(v: Vec<f64>, norm: f64) -> Vec<f64> {
    v.into_iter().map(|x| x * norm).collect()
}

/// Noise levels audited by `fedveil audit`, each against the accountant's
/// claim.
pub const NOISE_LEVELS: [f64; 3] = [0.5, 1.0, 2.0];
/// The level the sabotaged mechanisms are audited at (its claim, ε ≈ 2.2,
/// sits well below the 5.6 a perfect test proves with 2,000 trials).
pub const SABOTAGE_LEVEL: f64 = 2.0;

/// The mechanism `fedveil audit` attacks: distributed noise at multiplier
/// `z` over 64 coordinates, clip 1, 3 clients, a 32-bit ring.
pub fn audited_noise(z: f64) -> Result<NoiseConfig> {
    let mut noise = NoiseConfig {
        placement: fedveil_fed::dp::mechanism::Placement::Distributed,
        dim: 64,
        clip: 1.0,
        noise_multiplier: z,
        granularity: 1.0,
        beta: (-0.5f64).exp(),
        bits: 32,
        min_survivors: 3,
    };
    noise.granularity = noise.default_granularity(3, 8.0)?;
    Ok(noise)
}

/// `fedveil audit`'s DP claims: one round at each of [`NOISE_LEVELS`]
/// (the mechanism sabotaged throughout when `sabotage` is set, which must
/// then fail), and both sabotages caught at [`SABOTAGE_LEVEL`]. The
/// randomness comes from the OS.
pub fn claims(trials: u32, sabotage: Option<Sabotage>) -> Result<Vec<Claim>> {
    let audit = |z: f64, sabotage: Option<Sabotage>| -> Result<AuditResult> {
        let config = AuditConfig {
            noise: audited_noise(z)?,
            clients: 3,
            trials,
            delta: 1e-5,
            alpha: 0.05,
            broken: sabotage,
        };
        audit_round(&config, &mut rand_core::OsRng)
    };
    let attack = "A canary client sends a clipped update or zero, alternately, in one round of \
                  the distributed discrete Gaussian mechanism with 3 clients; the adversary \
                  knows the others' updates and thresholds the decoded sum's projection on the \
                  canary (threshold chosen on half the trials, rates measured on the other \
                  half, Clopper–Pearson bounds).";
    let mut claims = Vec::new();
    for z in NOISE_LEVELS {
        let r = audit(z, sabotage)?;
        let mechanism = match sabotage {
            None => String::new(),
            Some(b) => format!(" (with the mechanism deliberately broken: {})", b.name()),
        };
        claims.push(claim(
            format!("dp.noise_{z}"),
            format!(
                "At noise multiplier {z} one round spends at most the ε the accountant \
                 claims{mechanism}."
            ),
            attack.into(),
            &r,
            r.verdict.held(),
        )?);
    }
    for b in [Sabotage::NoNoise, Sabotage::NoClip] {
        let r = audit(SABOTAGE_LEVEL, Some(b))?;
        claims.push(claim(
            format!("dp.catches_{}", b.name().replace(' ', "_")),
            format!(
                "The DP audit catches a mechanism with {} (at noise multiplier \
                 {SABOTAGE_LEVEL}).",
                b.name()
            ),
            format!("The same attack on a mechanism with {}.", b.name()),
            &r,
            !r.verdict.held(),
        )?);
    }
    Ok(claims)
}

fn claim(id: String, text: String, attack: String, r: &AuditResult, held: bool) -> Result<Claim> {
    let evidence = r.verdict.evidence("the claimed ε");
    Claim::new(id, "dp.md §7", text, attack, held, evidence, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clopper_pearson_matches_reference_values() {
        // scipy.stats.binomtest(k, n).proportion_ci("exact"), 95 %.
        let (lo, hi) = clopper_pearson(5, 20, 0.05).unwrap();
        assert!((lo - 0.086_571_5).abs() < 1e-5, "{lo}");
        assert!((hi - 0.491_046_3).abs() < 1e-5, "{hi}");
        let (lo, hi) = clopper_pearson(0, 100, 0.05).unwrap();
        assert_eq!(lo, 0.0);
        // 1 − (α/2)^(1/n).
        assert!((hi - (1.0 - 0.025f64.powf(0.01))).abs() < 1e-9, "{hi}");
        let (lo, hi) = clopper_pearson(100, 100, 0.05).unwrap();
        assert!((lo - 0.025f64.powf(0.01)).abs() < 1e-9, "{lo}");
        assert_eq!(hi, 1.0);
        assert!(clopper_pearson(3, 2, 0.05).is_err());
        assert!(clopper_pearson(0, 0, 0.05).is_err());
    }

    #[test]
    fn a_perfect_test_proves_about_ln_n_and_a_coin_proves_nothing() {
        let perfect = TestOutcome {
            positives: 1000,
            false_negatives: 0,
            negatives: 1000,
            false_positives: 0,
        };
        let eps = epsilon_lower_bound(&perfect, 1e-5, 0.05).unwrap();
        // FPR⁺ = 1 − 0.025^(1/1000) ≈ 3.7e-3; FNR⁺ the same.
        let fpr: f64 = 1.0 - 0.025f64.powf(1e-3);
        assert!(
            (eps - ((1.0 - 1e-5 - fpr) / fpr).ln()).abs() < 1e-9,
            "{eps}"
        );
        let coin = TestOutcome {
            positives: 1000,
            false_negatives: 500,
            negatives: 1000,
            false_positives: 500,
        };
        assert_eq!(epsilon_lower_bound(&coin, 1e-5, 0.05).unwrap(), 0.0);
    }
}
