//! Record-level DP-SGD's step against the non-private step, side by side,
//! on SmolLM2-135M-Instruct on the CPU (issue 19's goal: at most 1.3×).
//!
//!     cargo bench --bench dpsgd
//!     FEDVEIL_BENCH_BATCH=8 cargo bench --bench dpsgd
//!
//! Both steps: LoRA r = 8, α = 16, dropout 0.05 on q_proj and v_proj, the
//! same batch of `FEDVEIL_BENCH_BATCH` (default 4) sequences of 256 random
//! token ids, AdamW. The non-private step is `AdapterTrainer::step` on the
//! batch. The DP-SGD step is what `LocalTraining::private_round` does per
//! step: every example's gradient from one batched pass
//! (`per_example_gradients`), each clipped, rounded onto the grid and
//! summed exactly, the exact discrete Gaussian noise
//! (`dp::dpsgd::GridGaussian`, ChaCha20), and the AdamW step
//! (`apply_gradient`). After criterion's groups, the two alternate five
//! times and the ratio of their medians is printed.

#[path = "common/mod.rs"]
mod common;
use common::{median, peak_rss_bytes};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[path = "../src/tuning.rs"]
mod tuning;

use std::time::Instant;

use candle_core::Device;
use criterion::{Criterion, criterion_group};
use fedveil_fed::dp::dpsgd::GridGaussian;
use fedveil_model::fetch::{SMOLLM2_135M, cache_dir, ensure};
use fedveil_model::{
    Adapter, AdapterTrainer, Batch, Example, Llama, LoraConfig, OptimConfig, PeftConfig,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

const SEQ: usize = 256;

fn batch_size() -> usize {
    std::env::var("FEDVEIL_BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
}

fn trainer(model: &Llama) -> AdapterTrainer {
    let mut rng = ChaCha20Rng::from_seed([1; 32]);
    let adapter = Adapter::new(
        PeftConfig::Lora(LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            layers_to_transform: None,
        }),
        model,
        &mut rng,
    )
    .expect("adapter");
    let optim = OptimConfig {
        learning_rate: 1e-4,
        ..OptimConfig::default()
    };
    AdapterTrainer::new(model, adapter, optim).expect("trainer")
}

fn plain_step(t: &mut AdapterTrainer, refs: &[&Example], rng: &mut ChaCha20Rng) {
    let batch = Batch::new(refs, SEQ, 0, &Device::Cpu).expect("batch");
    t.step(&[batch], rng).expect("step");
}

fn private_step(
    t: &mut AdapterTrainer,
    refs: &[&Example],
    noise: &GridGaussian,
    rng: &mut ChaCha20Rng,
) {
    let per = t
        .per_example_gradients(refs, SEQ, 0, rng)
        .expect("per-example gradients");
    let mut sum = noise.sum(per.dim());
    for i in 0..per.len() {
        noise.add_example(&mut sum, per.row(i)).expect("clip");
    }
    let released = noise.release(sum, rng).expect("noise");
    let expected = refs.len() as f64;
    let gradient: Vec<f32> = released.iter().map(|v| (v / expected) as f32).collect();
    t.apply_gradient(&gradient).expect("step");
}

fn bench(c: &mut Criterion) {
    tuning::tune();
    let cache = cache_dir().expect("a cache directory");
    let path = ensure(&SMOLLM2_135M, &cache, &mut |m| eprintln!("{m}")).expect("the model");
    let model = fedveil_model::load::load(&path, &Device::Cpu)
        .expect("load")
        .model;
    let b = batch_size();
    let mut data_rng = ChaCha20Rng::from_seed([2; 32]);
    let vocab = model.config().vocab_size as u32;
    let data: Vec<Example> = (0..b)
        .map(|_| Example::text((0..SEQ).map(|_| data_rng.next_u32() % vocab).collect()))
        .collect();
    let refs: Vec<&Example> = data.iter().collect();
    let noise = GridGaussian::new(1.0, 1.0).expect("mechanism");
    let mut plain = trainer(&model);
    let mut private = trainer(&model);
    let mut rng = ChaCha20Rng::from_seed([3; 32]);

    let mut group = c.benchmark_group("dpsgd");
    group.sample_size(10);
    group.throughput(criterion::Throughput::Elements((b * SEQ) as u64));
    group.bench_function(
        format!("plain_step_smollm2_135m_seq{SEQ}_batch{b}"),
        |bench| bench.iter(|| plain_step(&mut plain, &refs, &mut rng)),
    );
    group.bench_function(
        format!("dpsgd_step_smollm2_135m_seq{SEQ}_batch{b}"),
        |bench| bench.iter(|| private_step(&mut private, &refs, &noise, &mut rng)),
    );
    group.finish();

    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let start = Instant::now();
        plain_step(&mut plain, &refs, &mut rng);
        base.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        private_step(&mut private, &refs, &noise, &mut rng);
        ours.push(start.elapsed().as_secs_f64());
    }
    let (p, d) = (median(&mut base), median(&mut ours));
    println!("LoRA step, SmolLM2-135M, batch {b} x {SEQ} tokens, CPU, alternated 5 times:");
    println!("  steps (s): plain {base:?}, DP-SGD {ours:?}");
    println!(
        "  median plain {p:.3} s, DP-SGD {d:.3} s: DP-SGD / plain {:.2}x",
        d / p
    );
    println!(
        "  peak RSS of the process: {:.0} MiB",
        peak_rss_bytes() as f64 / 1048576.0
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
