//! The exact discrete Gaussian sampler (protocols/dp.md §3.4): goodness of
//! fit against the exact pmf, and agreement with opendp's reference sampler.

use dashu::integer::{IBig, UBig};
use dashu::rational::RBig;
use fedveil_dp::sampler::DiscreteGaussian;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Pearson's statistic on (observed, expected) bins, as a Wilson–Hilferty
/// z-score for the chi-square distribution with `bins - 1 - fitted` degrees
/// of freedom. |z| beyond 4.5 has probability below 1e-5.
fn chi_square_z(bins: &[(f64, f64)], fitted: usize) -> f64 {
    let chi: f64 = bins.iter().map(|(o, e)| (o - e) * (o - e) / e).sum();
    let k = (bins.len() - 1 - fitted) as f64;
    let a = 2.0 / (9.0 * k);
    ((chi / k).cbrt() - (1.0 - a)) / a.sqrt()
}

/// Groups consecutive cells until each expected count is at least 5.
fn group(cells: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut acc = (0.0, 0.0);
    for (o, e) in cells {
        acc.0 += o;
        acc.1 += e;
        if acc.1 >= 5.0 {
            out.push(acc);
            acc = (0.0, 0.0);
        }
    }
    if let Some(last) = out.last_mut() {
        last.0 += acc.0;
        last.1 += acc.1;
    }
    out
}

fn fit(sigma: f64, n: usize, seed: u64) -> f64 {
    fit_with(sigma, n, seed, false)
}

/// [`fit`] for the fast sampler, or for the integer-only reference.
fn fit_with(sigma: f64, n: usize, seed: u64, integer: bool) -> f64 {
    let g = DiscreteGaussian::new(sigma).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut samples = vec![0; n];
    if integer {
        g.fill_integer(&mut rng, &mut samples).unwrap();
    } else {
        g.fill(&mut rng, &mut samples).unwrap();
    }
    let bound = (12.0 * sigma).ceil() as i64 + 2;
    let pmf = g.pmf_table(bound);
    let mut counts = vec![0.0; pmf.len()];
    for s in &samples {
        assert!(s.abs() <= bound, "sample {s} beyond 12 sigma");
        counts[(s + bound) as usize] += 1.0;
    }
    let cells = counts
        .into_iter()
        .zip(pmf)
        .map(|(o, p)| (o, p * n as f64))
        .collect();
    let z = chi_square_z(&group(cells), 0);
    // The sample variance is within 5 standard errors of the exact one.
    let exact_var: f64 = g
        .pmf_table(bound)
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let x = i as f64 - bound as f64;
            p * x * x
        })
        .sum();
    let var = samples
        .iter()
        .map(|&s| (s as f64) * (s as f64))
        .sum::<f64>()
        / n as f64;
    let se = exact_var * (2.0 / n as f64).sqrt();
    assert!(
        (var - exact_var).abs() < 5.0 * se,
        "σ={sigma}: variance {var} vs {exact_var}"
    );
    z
}

/// §3.4: the samples follow the exact pmf at small, medium and large scale.
#[test]
fn samples_fit_the_exact_pmf() {
    for (sigma, seed) in [(0.75, 1), (3.0, 2), (25.0, 3), (1000.0, 4)] {
        let z = fit(sigma, 200_000, seed);
        assert!(z.abs() < 4.5, "σ={sigma}: chi-square z = {z}");
    }
}

/// §3.4: the integer-only implementation, which the fast one must match,
/// fits the same pmf.
#[test]
fn the_integer_reference_fits_the_exact_pmf() {
    for (sigma, seed) in [(0.75, 11), (25.0, 12), (1000.0, 13)] {
        let z = fit_with(sigma, 100_000, seed, true);
        assert!(z.abs() < 4.5, "σ={sigma}: chi-square z = {z}");
    }
}

/// The statistic detects a sampler with the wrong scale: the test can fail.
#[test]
fn the_fit_test_rejects_the_wrong_variance() {
    let g = DiscreteGaussian::new(3.3).unwrap();
    let n = 200_000;
    let samples = g.sample(&mut ChaCha20Rng::seed_from_u64(9), n).unwrap();
    let reference = DiscreteGaussian::new(3.0).unwrap();
    let bound = 40;
    let pmf = reference.pmf_table(bound);
    let mut counts = vec![0.0; pmf.len()];
    for s in &samples {
        counts[(s + bound) as usize] += 1.0;
    }
    let cells = counts
        .into_iter()
        .zip(pmf)
        .map(|(o, p)| (o, p * n as f64))
        .collect();
    assert!(chi_square_z(&group(cells), 0) > 10.0);
}

/// §3.4: the same distribution as opendp's CKS20 sampler (two-sample test).
#[test]
fn samples_agree_with_opendp() {
    for (num, den, seed) in [(3u32, 1u32, 5u64), (3, 4, 6)] {
        let sigma = f64::from(num) / f64::from(den);
        let n = 60_000;
        let ours = DiscreteGaussian::new(sigma)
            .unwrap()
            .sample(&mut ChaCha20Rng::seed_from_u64(seed), n)
            .unwrap();
        let scale = RBig::from_parts(IBig::from(num), UBig::from(den));
        let theirs: Vec<i64> = (0..n)
            .map(|_| {
                let v = opendp::traits::samplers::sample_discrete_gaussian(scale.clone()).unwrap();
                i64::try_from(v).unwrap()
            })
            .collect();
        let bound = (12.0 * sigma).ceil() as i64 + 1;
        let mut a = vec![0.0; (2 * bound + 1) as usize];
        let mut b = a.clone();
        for (s, t) in ours.iter().zip(&theirs) {
            a[(s.clamp(&-bound, &bound) + bound) as usize] += 1.0;
            b[(t.clamp(&-bound, &bound) + bound) as usize] += 1.0;
        }
        // Two-sample homogeneity with equal sizes: expected = pooled / 2 each.
        let mut cells = Vec::new();
        for (x, y) in a.iter().zip(&b) {
            let e = (x + y) / 2.0;
            cells.push((*x, e));
            cells.push((*y, e));
        }
        // Pair up the two samples' cells after grouping by expected count.
        let mut grouped = Vec::new();
        let (mut ox, mut oy, mut e) = (0.0, 0.0, 0.0);
        for pair in cells.chunks(2) {
            ox += pair[0].0;
            oy += pair[1].0;
            e += pair[0].1;
            if e >= 5.0 {
                grouped.push((ox, e));
                grouped.push((oy, e));
                (ox, oy, e) = (0.0, 0.0, 0.0);
            }
        }
        let dof_bins = grouped.len() / 2;
        let chi: f64 = grouped.iter().map(|(o, e)| (o - e) * (o - e) / e).sum();
        let k = (dof_bins - 1) as f64;
        let a2 = 2.0 / (9.0 * k);
        let z = ((chi / k).cbrt() - (1.0 - a2)) / a2.sqrt();
        assert!(z.abs() < 4.5, "σ={sigma}: two-sample z = {z}");
    }
}

#[test]
fn seeded_streams_are_reproducible_and_distinct() {
    let g = DiscreteGaussian::new(10.0).unwrap();
    let a = g.sample(&mut ChaCha20Rng::seed_from_u64(1), 1000).unwrap();
    let b = g.sample(&mut ChaCha20Rng::seed_from_u64(1), 1000).unwrap();
    let c = g.sample(&mut ChaCha20Rng::seed_from_u64(2), 1000).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
}
