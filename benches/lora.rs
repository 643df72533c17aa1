//! LoRA training throughput on SmolLM2-135M-Instruct at sequence length 256
//! on the CPU, and a side-by-side run against PyTorch + transformers + peft.
//!
//!     cargo bench --bench lora
//!     FEDVEIL_TORCH_PYTHON=../.venv-torch/bin/python cargo bench --bench lora
//!
//! The model comes from the pinned package (fetched once, see README.md).
//! The step: LoRA r = 8, α = 16, dropout 0.05 on q_proj and v_proj, one
//! sequence of 256 random token ids (`FEDVEIL_BENCH_BATCH` sequences), the
//! loss on every token, backward, AdamW. With `FEDVEIL_TORCH_PYTHON` set,
//! `benches/lora_torch.py` runs the same step in PyTorch, alternating with
//! fedveil three times, and the medians, their ratio and both processes'
//! peak resident memory are printed.

use std::process::Command;

#[path = "common/mod.rs"]
mod common;
use common::{median, peak_rss_bytes};

// As the fedveil binary does (src/tuning.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[path = "../src/tuning.rs"]
mod tuning;

use std::time::Instant;

use candle_core::Device;
use criterion::{Criterion, criterion_group};
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
        .unwrap_or(1)
}

fn model_path() -> std::path::PathBuf {
    let cache = cache_dir().expect("a cache directory");
    ensure(&SMOLLM2_135M, &cache, &mut |m| eprintln!("{m}")).expect("the default model")
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

fn examples(vocab: usize, n: usize) -> Vec<Example> {
    let mut rng = ChaCha20Rng::from_seed([2; 32]);
    (0..n)
        .map(|_| Example::text((0..SEQ).map(|_| rng.next_u32() % vocab as u32).collect()))
        .collect()
}

fn bench(c: &mut Criterion) {
    tuning::tune();
    let path = model_path();
    let loaded = fedveil_model::load::load(&path, &Device::Cpu).expect("load");
    let model = loaded.model;
    let b = batch_size();
    let data = examples(model.config().vocab_size, b);
    let refs: Vec<&Example> = data.iter().collect();
    let mut t = trainer(&model);
    let mut rng = ChaCha20Rng::from_seed([3; 32]);
    let mut group = c.benchmark_group("lora");
    group.sample_size(10);
    group.throughput(criterion::Throughput::Elements((b * SEQ) as u64));
    group.bench_function(format!("smollm2_135m_seq{SEQ}_batch{b}"), |bench| {
        bench.iter(|| {
            let batch = Batch::new(&refs, SEQ, 0, &Device::Cpu).expect("batch");
            t.step(&[batch], &mut rng).expect("step")
        })
    });
    group.finish();

    let Ok(python) = std::env::var("FEDVEIL_TORCH_PYTHON") else {
        eprintln!(
            "set FEDVEIL_TORCH_PYTHON to a Python with torch, transformers and peft to compare"
        );
        return;
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut torch_rss = 0u64;
    for _ in 0..3 {
        // fedveil: 2 warm-up steps, 5 timed, as the PyTorch script does.
        let mut times = Vec::new();
        for step in 0..7 {
            let batch = Batch::new(&refs, SEQ, 0, &Device::Cpu).expect("batch");
            let start = Instant::now();
            t.step(&[batch], &mut rng).expect("step");
            if step >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        ours.push(median(&mut times));
        let out = Command::new(&python)
            .arg("benches/lora_torch.py")
            .arg("--gguf")
            .arg(&path)
            .args(["--batch", &b.to_string(), "--seq", &SEQ.to_string()])
            .args(["--threads", &threads.to_string()])
            .output()
            .expect("run the PyTorch baseline");
        assert!(
            out.status.success(),
            "PyTorch baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value =
            serde_json::from_str(line.lines().last().unwrap_or("")).expect("its JSON line");
        theirs.push(report["step_s"].as_f64().expect("step_s"));
        torch_rss = torch_rss.max(report["peak_rss_bytes"].as_u64().unwrap_or(0));
    }
    let ours_s = median(&mut ours);
    let theirs_s = median(&mut theirs);
    let tokens = (b * SEQ) as f64;
    let rss = peak_rss_bytes();
    println!("LoRA training step, SmolLM2-135M, batch {b} x {SEQ} tokens, CPU, {threads} threads");
    println!("  runs (s/step): fedveil {ours:?}, PyTorch {theirs:?}");
    println!(
        "  fedveil  {ours_s:.3} s/step  {:.0} tokens/s  peak RSS {:.0} MiB",
        tokens / ours_s,
        rss as f64 / 1048576.0
    );
    println!(
        "  PyTorch  {theirs_s:.3} s/step  {:.0} tokens/s  peak RSS {:.0} MiB",
        tokens / theirs_s,
        torch_rss as f64 / 1048576.0
    );
    println!("  fedveil / PyTorch throughput: {:.2}x", theirs_s / ours_s);
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
