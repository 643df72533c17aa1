//! Differential privacy through secure aggregation, end to end
//! (protocols/dp.md §3, protocols/secagg-plus.md §6): clients privatise their
//! updates, SecAgg+ sums the ring vectors with some clients dropping out,
//! the server decodes, and the result must be the survivors' clipped sum plus
//! noise of exactly the promised variance.

use fedveil_dp::DpError;
use fedveil_dp::clip::clip_l2;
use fedveil_dp::mechanism::{ClientPrivatizer, NoiseConfig, Placement, ServerDecoder};
use fedveil_dp::zcdp::{self, ZcdpLedger};
use fedveil_secagg::sim::CohortSpec;
use fedveil_secagg::{ClientId, Stage};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

const N: u32 = 40;
const DIM: usize = 1000;

/// Updates of norms between 0.3 and 3 (so about half get clipped).
fn updates(seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..N)
        .map(|_| {
            let mut v: Vec<f32> = (0..DIM)
                .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0)
                .collect();
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            let target = 0.3 + 2.7 * (rng.next_u32() as f32 / u32::MAX as f32);
            v.iter_mut().for_each(|a| *a *= target / norm);
            v
        })
        .collect()
}

fn config(placement: Placement, min_survivors: u32) -> NoiseConfig {
    let mut c = NoiseConfig {
        placement,
        dim: DIM,
        clip: 1.0,
        noise_multiplier: 0.8,
        granularity: 1.0,
        beta: (-0.5f64).exp(),
        bits: 20,
        min_survivors,
    };
    // The most precise grid on which the sum of N clients stays 8 standard
    // deviations inside the 20-bit ring.
    c.granularity = c.finest_safe_granularity(N, 8.0).unwrap();
    assert!(c.overflow_probability(N) < 1e-9);
    c
}

struct Outcome {
    errors: Vec<f64>,
    survivors: u32,
}

/// One round: privatise, aggregate with 3 clients dropping before masked
/// input, decode, and return decoded − exact clipped sum per coordinate.
fn round(placement: Placement, min_survivors: u32, seed: u64) -> Outcome {
    let cfg = config(placement, min_survivors);
    let round_seed = [seed as u8; 32];
    let client = ClientPrivatizer::new(cfg.clone(), round_seed).unwrap();
    let xs = updates(seed);
    let mut rng = ChaCha20Rng::seed_from_u64(seed + 100);
    let ring: Vec<Vec<u32>> = xs
        .iter()
        .map(|x| client.privatize(x, &mut rng).unwrap().into_ring())
        .collect();
    let spec = CohortSpec {
        clients: N,
        degree: 10,
        threshold: 6,
        dim: cfg.padded_dim() as u32,
        bits: cfg.bits,
        seed,
        context: [3; 32],
        min_survivors,
    };
    let mut cohort = spec.build_with_inputs(ring, |_| None).unwrap();
    cohort.drop_plan.insert(
        Stage::MaskedInput,
        [ClientId(2), ClientId(17), ClientId(31)].into(),
    );
    let agg = cohort.run().unwrap().expect("the round completes");
    assert_eq!(agg.survivors.len(), N as usize - 3);
    let server = ServerDecoder::new(cfg.clone(), round_seed).unwrap();
    let decoded = server.decode(&agg.sum, &mut rng).unwrap();
    let mut exact = vec![0.0f64; DIM];
    for s in &agg.survivors {
        let mut v: Vec<f64> = xs[s.0 as usize].iter().map(|&a| f64::from(a)).collect();
        clip_l2(&mut v, cfg.clip);
        for (e, a) in exact.iter_mut().zip(&v) {
            *e += a;
        }
    }
    Outcome {
        errors: decoded.iter().zip(&exact).map(|(d, e)| d - e).collect(),
        survivors: agg.survivors.len() as u32,
    }
}

/// The errors are noise of variance `want_var`: the sample variance is within
/// six standard errors, the mean within five, no coordinate beyond 5.5 σ.
fn assert_noise(errors: &[f64], want_var: f64, what: &str) {
    let n = errors.len() as f64;
    let mean = errors.iter().sum::<f64>() / n;
    let var = errors.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / (n - 1.0);
    let se = want_var * (2.0 / (n - 1.0)).sqrt();
    assert!(
        (var - want_var).abs() < 6.0 * se,
        "{what}: variance {var}, promised {want_var}"
    );
    assert!(
        mean.abs() < 5.0 * (want_var / n).sqrt(),
        "{what}: mean {mean}"
    );
    let max = errors.iter().fold(0.0f64, |m, e| m.max(e.abs()));
    assert!(max < 5.5 * want_var.sqrt(), "{what}: max error {max}");
}

/// §3: distributed discrete Gaussian through SecAgg+ with dropouts decodes
/// to the survivors' clipped sum plus noise of variance n·σ²/n_min.
#[test]
fn distributed_dp_through_secagg_decodes_to_the_clipped_sum_plus_promised_noise() {
    let n_min = 36;
    let out = round(Placement::Distributed, n_min, 1);
    let zc = 0.8 * 1.0;
    // Each survivor added (zc)²/n_min; rounding adds O(γ²) per client.
    let want = zc * zc * f64::from(out.survivors) / f64::from(n_min);
    assert_noise(&out.errors, want, "distributed");
    // The accountant uses the survivors that were really there.
    let cfg = config(Placement::Distributed, n_min);
    let mut ledger = ZcdpLedger::default();
    let rho = ledger.record(&cfg, out.survivors).unwrap();
    assert!(rho < zcdp::round_rho(&cfg, n_min).unwrap());
    let eps = ledger.epsilon(1e-5).unwrap();
    assert!(eps.is_finite() && eps > 0.0);
    // Fewer survivors than the noise was calibrated for must not be released.
    assert_eq!(
        ledger.record(&cfg, n_min - 1),
        Err(DpError::TooFewSurvivors {
            have: n_min - 1,
            need: n_min
        })
    );
}

/// §3: central noise is added once, by the server.
#[test]
fn central_dp_adds_the_noise_once_at_the_server() {
    let out = round(Placement::Central, 1, 2);
    assert_noise(&out.errors, 0.8 * 0.8, "central");
}

/// §3: local noise is added by every client, in full.
#[test]
fn local_dp_adds_full_noise_per_client() {
    let out = round(Placement::Local, 1, 3);
    assert_noise(&out.errors, 0.8 * 0.8 * f64::from(out.survivors), "local");
}

/// The check can fail: the distributed round's noise is not the central
/// variance when fewer clients are assumed.
#[test]
fn the_noise_check_tells_placements_apart() {
    let out = round(Placement::Local, 1, 4);
    let errors = out.errors;
    let n = errors.len() as f64;
    let var = errors.iter().map(|e| e * e).sum::<f64>() / n;
    assert!(
        var > 10.0 * 0.8 * 0.8,
        "local noise {var} looks like central noise"
    );
}
