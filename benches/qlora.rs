//! LoRA over a quantised frozen base (issue 20), on the CPU:
//!
//!     cargo bench --bench qlora                        # SmolLM2-135M, f32 against Q4 and Q8 bases
//!     cargo bench --bench qlora -- --shape llama3-8b   # an 8B model at Q4_K: memory and step time
//!
//! SmolLM2-135M-Instruct (the pinned GGUF) with its frozen weights held
//! four ways: `none` (dequantised to f32), `gguf` (the file's own blocks),
//! and quantised on load to `q4_0` and `q8_0` from those f32 values
//! (its 576-wide rows are not whole K-quant super-blocks of 256).
//! 1. criterion: one LoRA step (r = 8, α = 16 on q_proj and v_proj; one
//!    sequence of 256 tokens; backward; AdamW) on each base, side by side;
//! 2. each base in a fresh process (this benchmark re-run as a child):
//!    peak resident memory, the median step time and the held-out GSM8K
//!    loss before and after `FEDVEIL_QLORA_STEPS` (default 40) steps of
//!    4 GSM8K examples, the same examples and order for every base.
//!
//! With `--long`, SmolLM2 (its file's blocks) trains on one sequence of
//! `FEDVEIL_QLORA_SEQ` (default 2,048) tokens without and with gradient
//! checkpointing, each in a fresh process: peak resident memory, step
//! times and losses (LoRA without dropout, so the losses must agree).
//!
//! With `--shape llama3-8b` it writes (once, into fedveil's cache) a GGUF
//! of Llama-3-8B's shape with random weights, every matrix Q4_K but the
//! output layer (Q6_K, as llama.cpp's Q4_K files have it), then in a
//! child process loads it with `quantize = "gguf"` and takes
//! `FEDVEIL_QLORA_STEPS` (default 3) LoRA steps on one sequence of 256
//! tokens, printing each step's time and the peak resident memory;
//! `FEDVEIL_QLORA_CHECKPOINTING=1` turns gradient checkpointing on.
//!
//!     cargo bench --bench qlora -- --long
//!     FEDVEIL_QLORA_CHECKPOINTING=1 cargo bench --bench qlora -- --shape llama3-8b
//!
//! With `--hf-load` it writes (once, into fedveil's cache) a Hugging Face
//! directory of Llama-3.2-1B's shape with random bf16 weights in two
//! safetensors shards, then loads it in a fresh process for each of
//! `quantize = "none"` (f32), straight into bf16 (as on a GPU), `"q8_0"`
//! and `"q4_k"`: load time, the weights held, and the peak resident memory
//! against them.
//!
//!     cargo bench --bench qlora -- --hf-load

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[path = "../src/tuning.rs"]
mod tuning;

#[path = "common/mod.rs"]
mod common;
use common::{median, peak_rss_bytes};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group};
use fedveil_model::fetch::{SMOLLM2_135M, cache_dir, ensure};
use fedveil_model::load::{Loaded, load_with};
use fedveil_model::quant::QuantMatrix;
use fedveil_model::train::evaluate;
use fedveil_model::{
    Adapter, AdapterTrainer, Batch, Example, Llama, LoraConfig, OptimConfig, PeftConfig,
    QuantFormat, Quantize,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;

const SEQ: usize = 256;
const CHILD: &str = "FEDVEIL_QLORA_CHILD";
const BASES: [&str; 4] = ["none", "gguf", "q4_0", "q8_0"];

fn model_path() -> PathBuf {
    let cache = cache_dir().expect("a cache directory");
    ensure(&SMOLLM2_135M, &cache, &mut |m| eprintln!("{m}")).expect("the default model")
}

fn load(path: &Path, base: &str) -> Loaded {
    let quantize = Quantize::parse(base).expect("a base");
    load_with(path, &Device::Cpu, quantize).expect("load")
}

fn trainer(model: &Llama) -> AdapterTrainer {
    trainer_with(model, 0.05, false)
}

fn trainer_with(model: &Llama, dropout: f32, checkpointing: bool) -> AdapterTrainer {
    let mut rng = ChaCha20Rng::from_seed([1; 32]);
    let adapter = Adapter::new(
        PeftConfig::Lora(LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            layers_to_transform: None,
        }),
        model,
        &mut rng,
    )
    .expect("adapter");
    let optim = OptimConfig {
        learning_rate: 1e-3,
        gradient_checkpointing: checkpointing,
        ..OptimConfig::default()
    };
    AdapterTrainer::new(model, adapter, optim).expect("trainer")
}

fn random_sequence(vocab: usize) -> Vec<Example> {
    random_sequence_of(vocab, SEQ)
}

fn random_sequence_of(vocab: usize, len: usize) -> Vec<Example> {
    let mut rng = ChaCha20Rng::from_seed([2; 32]);
    vec![Example::text(
        (0..len).map(|_| rng.next_u32() % vocab as u32).collect(),
    )]
}

fn checkpointing() -> bool {
    std::env::var("FEDVEIL_QLORA_CHECKPOINTING").is_ok_and(|v| v == "1")
}

fn env_steps(default: usize) -> usize {
    std::env::var("FEDVEIL_QLORA_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn bench(c: &mut Criterion) {
    let path = model_path();
    let mut group = c.benchmark_group("qlora");
    group.sample_size(10);
    group.throughput(criterion::Throughput::Elements(SEQ as u64));
    for base in BASES {
        let model = load(&path, base).model;
        let data = random_sequence(model.config().vocab_size);
        let refs: Vec<&Example> = data.iter().collect();
        let mut t = trainer(&model);
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        group.bench_function(format!("smollm2_135m_seq{SEQ}_base_{base}"), |bench| {
            bench.iter(|| {
                let batch = Batch::new(&refs, SEQ, 0, &Device::Cpu).expect("batch");
                t.step(&[batch], &mut rng).expect("step")
            })
        });
    }
    group.finish();
}

/// In a child: one base's memory, step time and held-out loss, as a JSON
/// line.
fn child_smollm2(base: &str, data: &Path) {
    let loaded = load(&model_path(), base);
    let records = fedveil_data::load(data).expect("the prepared records");
    let examples = common::encode_alpaca(&loaded, &records, SEQ);
    let (train, rest) = examples.split_at(examples.len() - 200);
    let held_out = &rest[..64];
    let model = &loaded.model;
    let before = evaluate(model, None, held_out, 8, SEQ).expect("eval").loss;
    let mut t = trainer(model);
    let mut rng = ChaCha20Rng::from_seed([5; 32]);
    let mut order_rng = ChaCha20Rng::from_seed([6; 32]);
    let mut order = fedveil_model::train::batches_by_length(train, 4, &mut order_rng);
    let mut times = Vec::new();
    for _ in 0..env_steps(40) {
        if order.is_empty() {
            order = fedveil_model::train::batches_by_length(train, 4, &mut order_rng);
        }
        let idx = order.pop().expect("a batch");
        let refs: Vec<&Example> = idx.iter().map(|&i| &train[i]).collect();
        let batch = Batch::new(&refs, SEQ, 0, &Device::Cpu).expect("batch");
        let start = Instant::now();
        t.step(&[batch], &mut rng).expect("step");
        times.push(start.elapsed().as_secs_f64());
    }
    let after = evaluate(model, Some(t.adapter()), held_out, 8, SEQ)
        .expect("eval")
        .loss;
    println!(
        "{}",
        serde_json::json!({
            "base": base,
            "formats": model.quantized_formats(),
            "weight_bytes": model.weight_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            "step_s": median(&mut times),
            "steps": times.len(),
            "loss_before": before,
            "loss_after": after,
        })
    );
}

fn run_child(spec: &str, extra: &[(&str, &Path)]) -> serde_json::Value {
    let exe = std::env::current_exe().expect("this benchmark");
    let mut cmd = Command::new(exe);
    cmd.env(CHILD, spec);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the child");
    assert!(
        out.status.success(),
        "child {spec} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).expect("the child's JSON line")
}

fn quality() {
    let dir = std::env::temp_dir().join(format!("fedveil-qlora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let data = common::prepare_gsm8k(&dir);
    let steps = env_steps(40);
    println!(
        "qlora: SmolLM2-135M, LoRA r = 8 on q_proj and v_proj, {steps} steps of 4 GSM8K examples \
         (<= {SEQ} tokens), held-out loss on 64"
    );
    println!(
        "  {:<6} {:<12} {:>12} {:>14} {:>10} {:>12} {:>11}",
        "base", "formats", "weights MiB", "peak RSS MiB", "s/step", "loss before", "loss after"
    );
    let mib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / 1048576.0;
    let mut reference = None;
    for base in BASES {
        let r = run_child(base, &[("FEDVEIL_QLORA_DATA", &data)]);
        let after = r["loss_after"].as_f64().unwrap_or(f64::NAN);
        let vs = match reference {
            None => {
                reference = Some(after);
                String::new()
            }
            Some(f) => format!("  ({:+.2} % of f32's)", 100.0 * (after - f) / f),
        };
        println!(
            "  {:<6} {:<12} {:>12.1} {:>14.0} {:>10.3} {:>12.4} {:>11.4}{vs}",
            base,
            r["formats"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join("+"))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "f32".into()),
            mib(&r["weight_bytes"]),
            mib(&r["peak_rss_bytes"]),
            r["step_s"].as_f64().unwrap_or(f64::NAN),
            r["loss_before"].as_f64().unwrap_or(f64::NAN),
            after,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------ 8B

/// Llama-3-8B's shape.
struct Shape {
    vocab: usize,
    hidden: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
}

const LLAMA3_8B: Shape = Shape {
    vocab: 128_256,
    hidden: 4096,
    ffn: 14_336,
    layers: 32,
    heads: 32,
    kv_heads: 8,
};

/// `rows × cols` uniform values with standard deviation `1/√cols`, rows
/// drawn in parallel from seeds.
fn random_values(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let bound = (3.0 / cols as f64).sqrt() as f32;
    let mut values = vec![0f32; rows * cols];
    values
        .par_chunks_mut(cols * 64)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut s = [0u8; 32];
            s[..8].copy_from_slice(&seed.to_le_bytes());
            s[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            let mut rng = ChaCha20Rng::from_seed(s);
            for v in chunk {
                *v = (rng.next_u32() as f32 / u32::MAX as f32 * 2.0 - 1.0) * bound;
            }
        });
    values
}

/// A random `(rows, cols)` matrix ([`random_values`]) quantised to `format`.
fn random_matrix(rows: usize, cols: usize, format: QuantFormat, seed: u64) -> QTensor {
    let values = random_values(rows, cols, seed);
    let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("tensor");
    QuantMatrix::quantize(&t, format)
        .expect("quantise")
        .to_qtensor()
        .expect("qtensor")
}

/// Writes the shape as a GGUF file: random weights, Q4_K matrices, a Q6_K
/// output layer, f32 norms, a byte-level tokenizer padded to the
/// vocabulary with reserved tokens.
fn write_8b(path: &Path, s: &Shape) {
    let started = Instant::now();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).expect("ones"),
            GgmlDType::F32,
        )
        .expect("f32")
    };
    let head_dim = s.hidden / s.heads;
    let mut seed = 0u64;
    let mut next = || {
        seed += 1;
        seed
    };
    tensors.push((
        "token_embd.weight".into(),
        random_matrix(s.vocab, s.hidden, QuantFormat::Q4K, next()),
    ));
    tensors.push((
        "output.weight".into(),
        random_matrix(s.vocab, s.hidden, QuantFormat::Q6K, next()),
    ));
    tensors.push(("output_norm.weight".into(), ones(s.hidden)));
    for i in 0..s.layers {
        let p = format!("blk.{i}");
        tensors.push((format!("{p}.attn_norm.weight"), ones(s.hidden)));
        tensors.push((format!("{p}.ffn_norm.weight"), ones(s.hidden)));
        for (name, rows, cols) in [
            ("attn_q", s.heads * head_dim, s.hidden),
            ("attn_k", s.kv_heads * head_dim, s.hidden),
            ("attn_v", s.kv_heads * head_dim, s.hidden),
            ("attn_output", s.hidden, s.heads * head_dim),
            ("ffn_gate", s.ffn, s.hidden),
            ("ffn_up", s.ffn, s.hidden),
            ("ffn_down", s.hidden, s.ffn),
        ] {
            tensors.push((
                format!("{p}.{name}.weight"),
                random_matrix(rows, cols, QuantFormat::Q4K, next()),
            ));
        }
        eprintln!("wrote layer {i} of {}", s.layers);
    }
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort();
    let mut tokens: Vec<Value> = vec![Value::String("<|endoftext|>".into())];
    tokens.extend(alphabet.iter().map(|c| Value::String(c.to_string())));
    while tokens.len() < s.vocab {
        tokens.push(Value::String(format!("<|reserved_{}|>", tokens.len())));
    }
    let mut types = vec![Value::I32(1); tokens.len()];
    for t in types.iter_mut().skip(257) {
        *t = Value::I32(3);
    }
    types[0] = Value::I32(3);
    let a = |k: &str| format!("llama.{k}");
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (a("block_count"), Value::U32(s.layers as u32)),
        (a("embedding_length"), Value::U32(s.hidden as u32)),
        (a("feed_forward_length"), Value::U32(s.ffn as u32)),
        (a("attention.head_count"), Value::U32(s.heads as u32)),
        (a("attention.head_count_kv"), Value::U32(s.kv_heads as u32)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (a("rope.freq_base"), Value::F32(500_000.0)),
        (a("context_length"), Value::U32(8192)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
    ];
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let tmp = path.with_extension("partial");
    let mut file = std::fs::File::create(&tmp).expect("create the GGUF");
    gguf_file::write(&mut file, &meta, &refs).expect("write the GGUF");
    drop(file);
    std::fs::rename(&tmp, path).expect("rename the GGUF");
    eprintln!(
        "wrote {} in {:.0} s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    println!("{{}}");
}

fn child_8b(path: &Path) {
    let started = Instant::now();
    let loaded = load(path, "gguf");
    let load_s = started.elapsed().as_secs_f64();
    let load_rss = peak_rss_bytes();
    let model = &loaded.model;
    let data = random_sequence(model.config().vocab_size);
    let refs: Vec<&Example> = data.iter().collect();
    let mut t = trainer_with(model, 0.05, checkpointing());
    let mut rng = ChaCha20Rng::from_seed([3; 32]);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 0..env_steps(3) {
        let batch = Batch::new(&refs, SEQ, 0, &Device::Cpu).expect("batch");
        let start = Instant::now();
        let stats = t.step(&[batch], &mut rng).expect("step");
        let s = start.elapsed().as_secs_f64();
        eprintln!("step {step}: {s:.1} s, loss {:.4}", stats.loss);
        times.push(s);
        losses.push(stats.loss);
    }
    println!(
        "{}",
        serde_json::json!({
            "formats": model.quantized_formats(),
            "weight_bytes": model.weight_bytes(),
            "load_s": load_s,
            "load_peak_rss_bytes": load_rss,
            "peak_rss_bytes": peak_rss_bytes(),
            "step_s": times,
            "losses": losses,
        })
    );
}

fn eight_b() {
    let cache = cache_dir().expect("a cache directory");
    let dir = cache.join("bench");
    std::fs::create_dir_all(&dir).expect("the cache");
    let path = dir.join("llama3-8b-shape-random-q4_k.gguf");
    if !path.exists() {
        // In a child of its own, so that the memory it took goes back.
        run_child("write-8b", &[("FEDVEIL_QLORA_GGUF", &path)]);
    }
    let r = run_child("8b", &[("FEDVEIL_QLORA_GGUF", &path)]);
    let ckpt = if checkpointing() {
        "with gradient checkpointing"
    } else {
        "without gradient checkpointing"
    };
    let gib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "qlora 8B: Llama-3-8B shape (random weights, {}), LoRA r = 8 on q_proj and v_proj, \
         1 x {SEQ} tokens, {ckpt}, CPU, {threads} threads",
        r["formats"]
    );
    println!("  weights          {:.2} GiB", gib(&r["weight_bytes"]));
    println!(
        "  load             {:.0} s, peak RSS {:.2} GiB",
        r["load_s"].as_f64().unwrap_or(f64::NAN),
        gib(&r["load_peak_rss_bytes"])
    );
    println!("  step times (s)   {}", r["step_s"]);
    println!("  losses           {}", r["losses"]);
    println!("  peak RSS         {:.2} GiB", gib(&r["peak_rss_bytes"]));
}

// ------------------------------------------------ loading a checkpoint

/// Llama-3.2-1B's shape (tied embeddings).
const LLAMA32_1B: Shape = Shape {
    vocab: 128_256,
    hidden: 2048,
    ffn: 8192,
    layers: 16,
    heads: 32,
    kv_heads: 8,
};

/// Writes the shape as a Hugging Face directory: random bf16 weights in two
/// shards with their index, a config.json and a byte-level tokenizer.
fn write_hf(dir: &Path, s: &Shape) {
    use candle_core::DType;
    let started = Instant::now();
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("the directory");
    let head_dim = s.hidden / s.heads;
    let mut seed = 0u64;
    let mut matrix = |rows: usize, cols: usize| {
        seed += 1;
        let values = random_values(rows, cols, seed);
        Tensor::from_vec(values, (rows, cols), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("a bf16 matrix")
    };
    let ones = |n: usize| Tensor::ones(n, DType::BF16, &Device::Cpu).expect("ones");
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new(), Vec::new()];
    shards[0].push((
        "model.embed_tokens.weight".into(),
        matrix(s.vocab, s.hidden),
    ));
    shards[1].push(("model.norm.weight".into(), ones(s.hidden)));
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        let shard = &mut shards[usize::from(i >= s.layers / 2)];
        shard.push((format!("{p}.input_layernorm.weight"), ones(s.hidden)));
        shard.push((
            format!("{p}.post_attention_layernorm.weight"),
            ones(s.hidden),
        ));
        for (name, rows, cols) in [
            ("self_attn.q_proj", s.heads * head_dim, s.hidden),
            ("self_attn.k_proj", s.kv_heads * head_dim, s.hidden),
            ("self_attn.v_proj", s.kv_heads * head_dim, s.hidden),
            ("self_attn.o_proj", s.hidden, s.heads * head_dim),
            ("mlp.gate_proj", s.ffn, s.hidden),
            ("mlp.up_proj", s.ffn, s.hidden),
            ("mlp.down_proj", s.hidden, s.ffn),
        ] {
            shard.push((format!("{p}.{name}.weight"), matrix(rows, cols)));
        }
    }
    let mut map = serde_json::Map::new();
    for (k, shard) in shards.into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        for (name, _) in &shard {
            map.insert(name.clone(), file.clone().into());
        }
        candle_core::safetensors::save(
            &shard
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
            tmp.join(&file),
        )
        .expect("write a shard");
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(tmp.join("model.safetensors.index.json"), index.to_string()).expect("index");
    let config = serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": true,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
    });
    std::fs::write(tmp.join("config.json"), config.to_string()).expect("config");
    fedveil_model::tiny::byte_tokenizer()
        .expect("a tokenizer")
        .save(tmp.join("tokenizer.json"), false)
        .expect("tokenizer.json");
    std::fs::rename(&tmp, dir).expect("rename the directory");
    eprintln!(
        "wrote {} in {:.0} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    println!("{{}}");
}

fn child_hf_load(dir: &Path, base: &str) {
    let started = Instant::now();
    // "bf16": read straight into bf16, as for a GPU.
    let loaded = if base == "bf16" {
        fedveil_model::load::load_with_dtype(dir, &Device::Cpu, Quantize::None, DType::BF16)
            .expect("load")
    } else {
        load(dir, base)
    };
    let load_s = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "formats": loaded.model.quantized_formats(),
            "weight_bytes": loaded.model.weight_bytes(),
            "load_s": load_s,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    );
}

fn hf_load() {
    let cache = cache_dir().expect("a cache directory");
    let dir = cache.join("bench").join("llama3.2-1b-shape-random-bf16");
    if !dir.exists() {
        // In a child of its own, so that the memory it took goes back.
        run_child("write-hf", &[("FEDVEIL_QLORA_HF", &dir)]);
    }
    let on_disk: u64 = std::fs::read_dir(&dir)
        .expect("the directory")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let gib = |v: f64| v / (1u64 << 30) as f64;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "hf load: Llama-3.2-1B shape (random bf16 weights, 2 shards, {:.2} GiB on disk), CPU, \
         {threads} threads, each in a fresh process",
        gib(on_disk as f64)
    );
    println!("| quantize | load | weights held | peak RSS | peak / weights |");
    println!("|---|---|---|---|---|");
    for base in ["none", "bf16", "q8_0", "q4_k"] {
        let r = run_child(&format!("hf-{base}"), &[("FEDVEIL_QLORA_HF", &dir)]);
        let w = r["weight_bytes"].as_f64().unwrap_or(f64::NAN);
        let peak = r["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {base} | {:.1} s | {:.2} GiB | {:.2} GiB | {:.2}x |",
            r["load_s"].as_f64().unwrap_or(f64::NAN),
            gib(w),
            gib(peak),
            peak / w
        );
    }
}

// ------------------------------------------------------- checkpointing

/// In a child: LoRA steps on one long sequence, with or without gradient
/// checkpointing, on SmolLM2's file as stored.
fn child_long(len: usize) {
    let loaded = load(&model_path(), "gguf");
    let model = &loaded.model;
    let data = random_sequence_of(model.config().vocab_size, len);
    let refs: Vec<&Example> = data.iter().collect();
    // No dropout: both runs then compute the same losses.
    let mut t = trainer_with(model, 0.0, checkpointing());
    let mut rng = ChaCha20Rng::from_seed([3; 32]);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..env_steps(3) {
        let batch = Batch::new(&refs, len, 0, &Device::Cpu).expect("batch");
        let start = Instant::now();
        let stats = t.step(&[batch], &mut rng).expect("step");
        times.push(start.elapsed().as_secs_f64());
        losses.push(stats.loss);
    }
    println!(
        "{}",
        serde_json::json!({
            "peak_rss_bytes": peak_rss_bytes(),
            "step_s": times,
            "losses": losses,
        })
    );
}

fn long_sequences() {
    let len: usize = std::env::var("FEDVEIL_QLORA_SEQ")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2048);
    println!(
        "qlora checkpointing: SmolLM2-135M (its Q4_1 file as stored), LoRA r = 8 on q_proj and \
         v_proj without dropout, 1 x {len} tokens, {} steps",
        env_steps(3)
    );
    let dir = std::env::temp_dir();
    for on in ["0", "1"] {
        let exe = std::env::current_exe().expect("this benchmark");
        let out = Command::new(exe)
            .env(CHILD, format!("long-{len}"))
            .env("FEDVEIL_QLORA_CHECKPOINTING", on)
            .current_dir(&dir)
            .output()
            .expect("run the child");
        let name = if on == "1" { "with" } else { "without" };
        if !out.status.success() {
            println!(
                "  {name:<8} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let r: serde_json::Value =
            serde_json::from_str(text.lines().last().unwrap_or("")).expect("the child's JSON");
        println!(
            "  {name:<8} peak RSS {:>7.0} MiB  step times (s) {}  losses {}",
            r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            r["step_s"],
            r["losses"]
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    tuning::tune();
    if let Ok(spec) = std::env::var(CHILD) {
        match spec.as_str() {
            "8b" => child_8b(Path::new(
                &std::env::var("FEDVEIL_QLORA_GGUF").expect("the GGUF"),
            )),
            long if long.starts_with("long-") => {
                child_long(long["long-".len()..].parse().expect("a length"))
            }
            "write-hf" => write_hf(
                Path::new(&std::env::var("FEDVEIL_QLORA_HF").expect("the directory")),
                &LLAMA32_1B,
            ),
            hf if hf.starts_with("hf-") => child_hf_load(
                Path::new(&std::env::var("FEDVEIL_QLORA_HF").expect("the directory")),
                &hf["hf-".len()..],
            ),
            "write-8b" => write_8b(
                Path::new(&std::env::var("FEDVEIL_QLORA_GGUF").expect("the GGUF")),
                &LLAMA3_8B,
            ),
            base => child_smollm2(
                base,
                Path::new(&std::env::var("FEDVEIL_QLORA_DATA").expect("the data")),
            ),
        }
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--hf-load") {
        hf_load();
        return;
    }
    if args.iter().any(|a| a == "--long") {
        long_sequences();
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--shape") {
        match args.get(i + 1).map(String::as_str) {
            Some("llama3-8b") => eight_b(),
            other => panic!("--shape {other:?}: the shape is llama3-8b"),
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    quality();
}
