//! Choosing the graph degree `k` and the Shamir threshold `t` (§3.3), after
//! Bell et al. 2020 §3–4 and the rules of Google's reference implementation.
//!
//! Given `n` clients, of which at most a fraction `γ` are corrupt and at most a
//! fraction `δ` drop out, the finder walks even degrees `k = 2, 4, …` and takes
//! the first for which a threshold exists such that, with `σ` bits of
//! statistical security and `η` bits of correctness:
//!
//! 1. **Connectivity.** Removing all corrupt and dropped clients leaves the
//!    (random) Harary graph connected, except with probability `2^-(σ+1)`.
//!    Disconnecting `H(k, n)` needs two disjoint runs of `k/2` consecutive
//!    removed vertices; a union bound over the `n(n-k-1)/2` pairs of runs gives
//!    `P ≤ n(n-k-1)/2 · B!/(B-k)! · (n-k)!/n!` with `B = ⌊γn⌋ + ⌊δn⌋`.
//! 2. **Privacy.** No client has `t` or more corrupt neighbours, except with
//!    probability `2^-(σ+1)` overall: `t1` is the least `x` with
//!    `P[A > x] < 2^-(σ+1)/n`, `A ~ Hypergeometric(n, ⌊γn⌋, k)`; then
//!    `t > t1`. Against a semi-malicious server, which may make honest
//!    neighbours reveal either share kind, two quorums of size `t` must not fit
//!    into `k` neighbours plus the corrupt ones: `2t - k > A`, so `t > (t1+k)/2`.
//! 3. **Correctness.** Every client keeps at least `t` surviving neighbours,
//!    except with probability `2^-η` overall: `t ≤ t2`, the largest `t` with
//!    `P[S < t] < 2^-η/n`, `S ~ Hypergeometric(n, ⌈(1-δ)n⌉, k)`.
//!
//! fedveil also requires `2t > k` for every session (§2.3), so the chosen
//! threshold is at least `⌊k/2⌋ + 1`.

use thiserror::Error;

/// Who the server is (§1 of SECURITY.md).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AdversaryModel {
    /// The server follows the protocol but tries to learn from what it sees.
    SemiHonest,
    /// The server may also lie about which clients dropped out.
    SemiMalicious,
}

/// The assumptions behind a parameter choice.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct ThreatModel {
    /// Fraction of clients that may be corrupt and collude with the server, `γ`.
    pub corrupt_rate: f64,
    /// Fraction of clients that may drop out, `δ`.
    pub dropout_rate: f64,
    /// Semi-honest or semi-malicious server.
    pub adversary: AdversaryModel,
    /// Statistical security parameter `σ` in bits (40 in the reference).
    pub security_bits: f64,
    /// Correctness parameter `η` in bits (20 in the reference).
    pub correctness_bits: f64,
}

impl ThreatModel {
    /// The reference setting: 40-bit security, 20-bit correctness.
    pub fn new(corrupt_rate: f64, dropout_rate: f64, adversary: AdversaryModel) -> Self {
        ThreatModel {
            corrupt_rate,
            dropout_rate,
            adversary,
            security_bits: 40.0,
            correctness_bits: 20.0,
        }
    }
}

/// A degree and threshold for `clients` clients.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GraphParams {
    pub clients: u32,
    /// Neighbours per client; `clients - 1` means the complete graph.
    pub degree: u32,
    pub threshold: u32,
}

/// Why no parameters were found.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ParamFinderError {
    #[error("need at least 3 clients, got {0}")]
    TooFewClients(u32),
    #[error("{name} must be in [0, 1), got {value}")]
    RateOutOfRange { name: &'static str, value: f64 },
    #[error("security and correctness bits must be positive and finite")]
    BadBits,
    #[error(
        "infeasible: corrupt rate {corrupt} plus {factor} x dropout rate {dropout} exceeds 0.9"
    )]
    Infeasible {
        corrupt: f64,
        dropout: f64,
        factor: f64,
    },
    #[error(
        "no degree below {n} and no complete-graph threshold meets the requirements for {n} clients"
    )]
    NotFound { n: u32 },
}

/// `ln(x!)`.
fn ln_fact(x: f64) -> f64 {
    libm::lgamma(x + 1.0)
}

/// `ln C(a, b)`.
fn ln_choose(a: f64, b: f64) -> f64 {
    ln_fact(a) - ln_fact(b) - ln_fact(a - b)
}

/// The hypergeometric distribution: draws from `total` items of which
/// `marked` are marked; the count of marked items among the draws.
struct Hypergeometric {
    pmf: Vec<f64>,
}

impl Hypergeometric {
    fn new(total: u32, marked: u32, draws: u32) -> Self {
        let (n, m, d) = (f64::from(total), f64::from(marked), f64::from(draws));
        let lo = draws.saturating_sub(total - marked);
        let hi = draws.min(marked);
        let denom = ln_choose(n, d);
        let pmf = (0..=draws)
            .map(|x| {
                if x < lo || x > hi {
                    0.0
                } else {
                    let x = f64::from(x);
                    (ln_choose(m, x) + ln_choose(n - m, d - x) - denom).exp()
                }
            })
            .collect();
        Hypergeometric { pmf }
    }

    /// `P[X > x]`, summed from the top for accuracy in the tail.
    fn upper_tail(&self, x: usize) -> f64 {
        self.pmf.iter().skip(x + 1).rev().sum()
    }

    /// `P[X < x]`, summed from the bottom.
    fn lower_tail(&self, x: usize) -> f64 {
        self.pmf.iter().take(x).sum()
    }
}

/// `ln` of the union bound on the probability that removing `bad` random
/// clients disconnects `H(k, n)`.
fn ln_prob_disconnected(n: u32, k: u32, bad: u32) -> f64 {
    if k > bad {
        return f64::NEG_INFINITY;
    }
    let (nf, kf, bf) = (f64::from(n), f64::from(k), f64::from(bad));
    let pairs = nf.ln() + (nf - kf - 1.0).ln() - std::f64::consts::LN_2;
    pairs + ln_fact(bf) - ln_fact(bf - kf) + ln_fact(nf - kf) - ln_fact(nf)
}

/// Finds `(k, t)` for `n` clients under `threat`. Falls back to the complete
/// graph when no sparser graph qualifies (small `n`).
pub fn find(n: u32, threat: &ThreatModel) -> Result<GraphParams, ParamFinderError> {
    if n < 3 {
        return Err(ParamFinderError::TooFewClients(n));
    }
    for (name, value) in [
        ("corrupt rate", threat.corrupt_rate),
        ("dropout rate", threat.dropout_rate),
    ] {
        if !(0.0..1.0).contains(&value) {
            return Err(ParamFinderError::RateOutOfRange { name, value });
        }
    }
    if !(threat.security_bits > 0.0
        && threat.security_bits.is_finite()
        && threat.correctness_bits > 0.0
        && threat.correctness_bits.is_finite())
    {
        return Err(ParamFinderError::BadBits);
    }
    let factor = match threat.adversary {
        AdversaryModel::SemiHonest => 1.0,
        AdversaryModel::SemiMalicious => 2.0,
    };
    if threat.corrupt_rate + factor * threat.dropout_rate > 0.9 {
        return Err(ParamFinderError::Infeasible {
            corrupt: threat.corrupt_rate,
            dropout: threat.dropout_rate,
            factor,
        });
    }
    // A tiny slack keeps floating-point error from rounding in the insecure direction.
    const SLACK: f64 = 1e-14;
    let nf = f64::from(n);
    let corrupt = ((threat.corrupt_rate + SLACK) * nf).floor() as u32;
    let dropped = ((threat.dropout_rate + SLACK) * nf).floor() as u32;
    let surviving = ((1.0 - threat.dropout_rate - SLACK) * nf).ceil() as u32;
    let ln_sec = -(threat.security_bits + 1.0) * std::f64::consts::LN_2;
    let q_sec = (-(threat.security_bits + 1.0)).exp2() / nf;
    let q_cor = (-threat.correctness_bits).exp2() / nf;

    let mut k = 2;
    while k + 1 < n {
        if ln_prob_disconnected(n, k, corrupt + dropped) < ln_sec
            && let Some(t) = threshold_for(
                n,
                k,
                corrupt,
                surviving.min(n),
                q_sec,
                q_cor,
                threat.adversary,
            )
        {
            return Ok(GraphParams {
                clients: n,
                degree: k,
                threshold: t,
            });
        }
        k += 2;
    }
    complete_graph(n, corrupt, dropped, threat.adversary)
}

/// The threshold for degree `k`, if one exists.
fn threshold_for(
    n: u32,
    k: u32,
    corrupt: u32,
    surviving: u32,
    q_sec: f64,
    q_cor: f64,
    adversary: AdversaryModel,
) -> Option<u32> {
    let adv = Hypergeometric::new(n, corrupt, k);
    let t1 = (0..=k).find(|&x| adv.upper_tail(x as usize) < q_sec)?;
    let surv = Hypergeometric::new(n, surviving, k);
    let t2 = (0..=k)
        .rev()
        .find(|&t| surv.lower_tail(t as usize) < q_cor)?;
    let t1 = match adversary {
        AdversaryModel::SemiHonest => t1,
        AdversaryModel::SemiMalicious => (t1 + k) / 2,
    };
    let t = (t1 + 1).max(crate::params::majority(k)).max(2);
    (t <= t2).then_some(t)
}

/// Parameters on the complete graph, where the counts are deterministic.
fn complete_graph(
    n: u32,
    corrupt: u32,
    dropped: u32,
    adversary: AdversaryModel,
) -> Result<GraphParams, ParamFinderError> {
    let k = n - 1;
    let t1 = match adversary {
        AdversaryModel::SemiHonest => corrupt,
        AdversaryModel::SemiMalicious => (corrupt + k) / 2,
    };
    let t = (t1 + 1).max(crate::params::majority(k)).max(2);
    let t2 = k.saturating_sub(dropped);
    if t <= t2 {
        Ok(GraphParams {
            clients: n,
            degree: k,
            threshold: t,
        })
    } else {
        Err(ParamFinderError::NotFound { n })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypergeometric_matches_a_hand_computed_case() {
        // 10 items, 4 marked, 3 draws: P[X = x] = C(4,x) C(6,3-x) / C(10,3).
        let h = Hypergeometric::new(10, 4, 3);
        let expect = [20.0 / 120.0, 60.0 / 120.0, 36.0 / 120.0, 4.0 / 120.0];
        for (p, e) in h.pmf.iter().zip(expect) {
            assert!((p - e).abs() < 1e-12);
        }
        assert!((h.upper_tail(1) - 40.0 / 120.0).abs() < 1e-12);
        assert!((h.lower_tail(1) - 20.0 / 120.0).abs() < 1e-12);
    }

    #[test]
    fn small_cohorts_fall_back_to_the_complete_graph() {
        // n = 10 with one corrupt and one dropped client: two removals cannot
        // disconnect H(4, 10), and t = 3 clears both quantiles.
        let p = find(10, &ThreatModel::new(0.1, 0.1, AdversaryModel::SemiHonest)).unwrap();
        assert_eq!((p.degree, p.threshold), (4, 3));
        // n = 5: no sparse graph qualifies, so the complete graph it is.
        let p = find(5, &ThreatModel::new(0.2, 0.2, AdversaryModel::SemiHonest)).unwrap();
        assert_eq!((p.degree, p.threshold), (4, 3));
        assert!(find(2, &ThreatModel::new(0.0, 0.0, AdversaryModel::SemiHonest)).is_err());
        assert!(matches!(
            find(
                100,
                &ThreatModel::new(0.5, 0.3, AdversaryModel::SemiMalicious)
            ),
            Err(ParamFinderError::Infeasible { .. })
        ));
        assert!(matches!(
            find(100, &ThreatModel::new(1.2, 0.0, AdversaryModel::SemiHonest)),
            Err(ParamFinderError::RateOutOfRange { .. })
        ));
    }
}
