//! Differential privacy benchmarks. Figures and commands: BENCHMARKS.md.
//!
//!     cargo bench --bench dp

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use dashu::integer::{IBig, UBig};
use dashu::rational::RBig;
use fedveil_dp::mechanism::{ClientPrivatizer, NoiseConfig, Placement, ServerDecoder};
use fedveil_dp::sampler::DiscreteGaussian;
use fedveil_secagg::crypto::prg::KeystreamRng;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use zeroize::Zeroizing;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const D: usize = 1_000_000;

fn noise(c: &mut Criterion) {
    let mut g = c.benchmark_group("noise");
    g.sample_size(10).warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(D as u64));
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut out = vec![0i64; D];
    for sigma in [10.0, 1e3, 1e5] {
        let s = DiscreteGaussian::new(sigma).unwrap();
        g.bench_function(
            format!("fedveil exact discrete Gaussian, sigma={sigma}, d=10^6"),
            |b| b.iter(|| s.fill(&mut rng, &mut out).unwrap()),
        );
        let mut keystream = KeystreamRng::from_key(&Zeroizing::new([4; 16])).unwrap();
        g.bench_function(
            format!("fedveil exact discrete Gaussian, AES-CTR generator, sigma={sigma}, d=10^6"),
            |b| b.iter(|| s.fill(&mut keystream, &mut out).unwrap()),
        );
        g.bench_function(
            format!("fedveil exact discrete Gaussian, integer only, sigma={sigma}, d=10^6"),
            |b| b.iter(|| s.fill_integer(&mut rng, &mut out).unwrap()),
        );
    }
    g.finish();
    // opendp's sampler is ~50x slower: time 10^4 samples and compare per sample.
    let mut g = c.benchmark_group("noise-opendp");
    g.sample_size(10).warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(10_000));
    for sigma in [10u32, 1000, 100_000] {
        let scale = RBig::from_parts(IBig::from(sigma), UBig::from(1u8));
        g.bench_function(
            format!("opendp sample_discrete_gaussian, sigma={sigma}, 10^4 samples"),
            |b| {
                b.iter(|| {
                    for _ in 0..10_000 {
                        std::hint::black_box(
                            opendp::traits::samplers::sample_discrete_gaussian(scale.clone())
                                .unwrap(),
                        );
                    }
                })
            },
        );
    }
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("privatise");
    g.sample_size(10).warm_up_time(Duration::from_secs(1));
    let mut cfg = NoiseConfig {
        placement: Placement::Distributed,
        dim: D,
        clip: 1.0,
        noise_multiplier: 1.0,
        granularity: 1.0,
        beta: (-0.5f64).exp(),
        bits: 20,
        min_survivors: 10,
    };
    cfg.granularity = cfg.finest_safe_granularity(10, 6.0).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let update: Vec<f32> = (0..D)
        .map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 0.01)
        .collect();
    let client = ClientPrivatizer::new(cfg.clone(), [9; 32]).unwrap();
    g.bench_function(
        "client: clip, rotate, round, noise, wrap; distributed, d=10^6, b=20",
        |b| b.iter(|| client.privatize(&update, &mut rng).unwrap()),
    );
    // The runtime draws from the mask PRG's AES-CTR keystream instead.
    let mut keystream = KeystreamRng::from_key(&Zeroizing::new([3; 16])).unwrap();
    g.bench_function(
        "client, with the runtime's AES-CTR generator; distributed, d=10^6, b=20",
        |b| b.iter(|| client.privatize(&update, &mut keystream).unwrap()),
    );
    let ring = client.privatize(&update, &mut rng).unwrap().into_ring();
    let mut central = cfg.clone();
    central.placement = Placement::Central;
    let server = ServerDecoder::new(central, [9; 32]).unwrap();
    g.bench_function(
        "server: central noise, lift, unscale, inverse rotation; d=10^6",
        |b| {
            b.iter_batched(
                || ring.clone(),
                |s| server.decode(&s, &mut rng).unwrap(),
                BatchSize::LargeInput,
            )
        },
    );
    g.finish();
}

criterion_group!(benches, noise, pipeline);
criterion_main!(benches);
