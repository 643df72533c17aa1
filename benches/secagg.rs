//! Secure aggregation benchmarks. Figures and the commands that produced them
//! are in BENCHMARKS.md.
//!
//!     cargo bench --bench secagg

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fedveil_secagg::crypto::prg::{self, MaskStream, Sign};
use fedveil_secagg::messages::{ClientMessage, ServerMessage};
use fedveil_secagg::sim::{self, Cohort, CohortSpec, SimConfig};
use fedveil_secagg::{ClientId, Stage};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use zeroize::Zeroizing;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A cohort of `n` clients with random 32-bit inputs of length `dim`.
fn cohort(n: u32, degree: u32, threshold: u32, dim: u32, seed: u64) -> Cohort {
    let spec = CohortSpec {
        clients: n,
        degree,
        threshold,
        dim,
        bits: 32,
        seed,
        context: [0; 32],
        min_survivors: 1,
    };
    spec.build(|_| None).expect("valid").0
}

/// Keystream generation into an L1-resident 16 KiB buffer, as masking uses it
/// (writing megabytes to memory would measure memory bandwidth instead).
fn prg(c: &mut Criterion) {
    const CHUNKS: usize = 1024; // 16 MiB of keystream per iteration
    let mut g = c.benchmark_group("prg");
    g.throughput(Throughput::Bytes((CHUNKS * prg::CHUNK_WORDS * 4) as u64));
    let key = Zeroizing::new([7u8; 16]);
    let stream = MaskStream::new(&key, Sign::Add).unwrap();
    let mut words = vec![0u32; prg::CHUNK_WORDS];
    g.bench_function("fedveil mask PRG (aws-lc AES-128, GCM counter path)", |b| {
        b.iter(|| {
            for i in 0..CHUNKS {
                stream.keystream(i * prg::CHUNK_WORDS, &mut words).unwrap();
            }
        })
    });
    let mut buf = vec![0u8; prg::CHUNK_WORDS * 4];
    {
        use aws_lc_rs::cipher::{AES_128, EncryptingKey, EncryptionContext, UnboundCipherKey};
        use aws_lc_rs::iv::FixedLength;
        let k = EncryptingKey::ctr(UnboundCipherKey::new(&AES_128, &[7u8; 16]).unwrap()).unwrap();
        g.bench_function("aws-lc AES-128-CTR", |b| {
            b.iter(|| {
                for i in 0..CHUNKS {
                    buf.fill(0);
                    let iv = FixedLength::from(((i * 1024) as u128).to_be_bytes());
                    k.less_safe_encrypt(&mut buf, EncryptionContext::Iv128(iv))
                        .unwrap();
                }
            })
        });
    }
    {
        use aes::cipher::{KeyIvInit, StreamCipher};
        g.bench_function("RustCrypto aes + ctr (Ctr128BE<Aes128>)", |b| {
            b.iter(|| {
                let mut c = ctr::Ctr128BE::<aes::Aes128>::new(&[7u8; 16].into(), &[0u8; 16].into());
                for _ in 0..CHUNKS {
                    buf.fill(0);
                    c.apply_keystream(&mut buf);
                }
            })
        });
    }
    g.finish();
}

fn client(c: &mut Criterion) {
    const D: u32 = 1_000_000;
    let mut g = c.benchmark_group("client");
    g.sample_size(10).warm_up_time(Duration::from_secs(1));
    // The masking core: one self mask and 30 pairwise masks over 10^6 words.
    let streams: Vec<MaskStream> = (0..31u8)
        .map(|i| {
            MaskStream::new(
                &Zeroizing::new([i; 16]),
                if i % 2 == 0 { Sign::Add } else { Sign::Sub },
            )
            .unwrap()
        })
        .collect();
    let mut acc = vec![0u32; D as usize];
    g.throughput(Throughput::Bytes(31 * 4 * u64::from(D)));
    g.bench_function("mask core, 31 streams, d=10^6, one thread", |b| {
        b.iter(|| prg::apply(&mut acc, 0, &streams).unwrap())
    });
    // The whole R2 step of a real client: open 30 envelopes, derive 31 masks,
    // mask 10^6 elements in place, pack them.
    g.bench_function("masked input (R2), k=30, d=10^6", |b| {
        b.iter_batched(
            || {
                let mut co = cohort(31, 30, 16, D, 1);
                let relays = co.run_until(Stage::MaskedInput).unwrap();
                let (to, relay) = relays.into_iter().next().unwrap();
                (co, to, relay)
            },
            |(mut co, to, relay)| {
                let out = co.handle(to, relay).unwrap();
                assert!(matches!(out, Some(ClientMessage::MaskedInput(_))));
                (co, out)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn server(c: &mut Criterion) {
    const N: u32 = 100;
    const D: u32 = 100_000;
    let mut g = c.benchmark_group("server");
    g.sample_size(10).warm_up_time(Duration::from_secs(1));
    for dropped in [0u32, 10] {
        // R4 on the server: take 100 answers, reconstruct 90-100 self-mask
        // seeds and 0-10 mask seeds, remove every mask, publish the sum.
        let name = format!("unmask, n=100, k=30, d=10^5, {dropped}% dropped");
        g.bench_function(&name, |b| {
            b.iter_batched(
                || {
                    let mut co = cohort(N, 30, 16, D, 2);
                    co.drop_plan.insert(
                        Stage::MaskedInput,
                        (0..dropped).map(|i| ClientId(i * 7)).collect(),
                    );
                    let requests = co.run_until(Stage::Unmasking).unwrap();
                    let answers: Vec<(ClientId, ClientMessage)> = requests
                        .into_iter()
                        .filter_map(|(to, m): (ClientId, ServerMessage)| {
                            co.handle(to, m).ok().flatten().map(|a| (to, a))
                        })
                        .collect();
                    (co, answers)
                },
                |(mut co, answers)| {
                    let now = co.now;
                    for (from, a) in answers {
                        co.server.handle_message(now, from, a).unwrap();
                    }
                    let agg = co.server.take_outcome().unwrap().unwrap();
                    assert_eq!(agg.survivors.len() as u32, N - dropped);
                    agg
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn round(c: &mut Criterion) {
    let mut g = c.benchmark_group("round");
    g.sample_size(10).warm_up_time(Duration::from_secs(1));
    for (name, n, degree, threshold) in [
        ("N=50 k=7 t=4 d=10^5", 50, Some(7), Some(4)),
        (
            "N=50 k=6 t=4 d=10^5 (Flower's num_shares=7)",
            50,
            Some(6),
            Some(4),
        ),
        ("N=50 complete t=25 d=10^5", 50, None, None),
        ("N=10 complete t=6 d=10^5", 10, None, None),
    ] {
        let mut config = SimConfig::new(n, 100_000, degree, 32);
        config.threshold = threshold;
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        g.bench_function(name, |b| {
            b.iter_batched(
                || sim::prepare(&config, &mut rng).unwrap(),
                |p| {
                    let (round, _) = p.round().unwrap();
                    assert!(round.outcome.is_ok());
                    round
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, prg, client, server, round);
criterion_main!(benches);
