//! Accountants against Google's dp-accounting 0.6.0 (protocols/dp.md §4).
//!
//! The fixtures were computed with the library itself; the command is at the
//! top of `fixtures/gen_dp_accounting.py`. Grid: σ ∈ {0.5 … 5},
//! q ∈ {0.01, 0.1, 1}, T ∈ {1 … 1000}, δ ∈ {10⁻³, 10⁻⁵, 10⁻⁸}.

use fedveil_dp::{Accountant, SubsampledGaussian, pld};
use serde::Deserialize;

#[derive(Deserialize)]
struct Point {
    sigma: f64,
    q: f64,
    steps: u64,
    delta: f64,
    epsilon: f64,
}

#[derive(Deserialize)]
struct Fixtures {
    rdp: Vec<Point>,
    pld: Vec<Point>,
}

fn fixtures() -> Fixtures {
    serde_json::from_str(include_str!("fixtures/dp_accounting_0_6_0.json")).expect("fixture JSON")
}

fn ours(p: &Point, accountant: Accountant) -> f64 {
    SubsampledGaussian {
        noise_multiplier: p.sigma,
        sampling_rate: p.q,
        steps: p.steps,
    }
    .epsilon(p.delta, accountant)
    .expect("valid parameters")
}

/// §4.1: RDP within 1e-6 relative of dp-accounting on every grid point.
#[test]
fn rdp_matches_dp_accounting_to_one_part_in_a_million() {
    let f = fixtures();
    assert!(f.rdp.len() >= 252);
    let mut worst = 0.0f64;
    for p in &f.rdp {
        let got = ours(p, Accountant::Rdp);
        let rel = if p.epsilon == 0.0 {
            got.abs()
        } else {
            ((got - p.epsilon) / p.epsilon).abs()
        };
        worst = worst.max(rel);
        assert!(
            rel <= 1e-6,
            "σ={} q={} T={} δ={}: ours {got}, dp-accounting {}",
            p.sigma,
            p.q,
            p.steps,
            p.delta,
            p.epsilon
        );
    }
    eprintln!("worst relative RDP difference: {worst:e}");
}

/// §4.2: PLD within 2e-3 of dp-accounting at its default discretisation
/// (relative, and absolute below ε = 1), and never below the exact value
/// where one exists (q = 1).
#[test]
fn pld_matches_dp_accounting_and_upper_bounds_the_exact_value() {
    let f = fixtures();
    assert!(f.pld.len() >= 252);
    assert!(f.pld.iter().any(|p| p.delta == 1e-8));
    let mut worst = 0.0f64;
    for p in &f.pld {
        let got = ours(p, Accountant::Pld);
        let diff = (got - p.epsilon).abs() / p.epsilon.max(1.0);
        worst = worst.max(diff);
        assert!(
            diff <= 2e-3,
            "σ={} q={} T={} δ={}: ours {got}, dp-accounting {}",
            p.sigma,
            p.q,
            p.steps,
            p.delta,
            p.epsilon
        );
        if p.q == 1.0 {
            let exact = pld::gaussian_exact_epsilon(p.sigma, p.steps, p.delta);
            assert!(
                got >= exact * (1.0 - 1e-12),
                "σ={} T={}: PLD {got} below the exact {exact}",
                p.sigma,
                p.steps
            );
        }
    }
    eprintln!("worst PLD difference (relative, absolute below ε = 1): {worst:e}");
}

/// The PLD accountant is tighter than RDP (design §2's sanity point:
/// σ=1.1, q=0.01, T=1000, δ=1e-5: RDP ≈ 1.71, PLD ≈ 1.52).
#[test]
fn pld_is_tighter_than_rdp() {
    let m = SubsampledGaussian {
        noise_multiplier: 1.1,
        sampling_rate: 0.01,
        steps: 1000,
    };
    let rdp = m.epsilon(1e-5, Accountant::Rdp).unwrap();
    let pld = m.epsilon(1e-5, Accountant::Pld).unwrap();
    assert!((rdp - 1.71).abs() < 0.01, "{rdp}");
    assert!((pld - 1.52).abs() < 0.01, "{pld}");
    assert!(pld < rdp);
}
