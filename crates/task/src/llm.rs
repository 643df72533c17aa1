//! The language-model task (`[task] kind = "llm"`): a client fine-tunes an
//! adapter on its own instruction data, the server evaluates the global
//! adapter on held-out data, and with `[offsite] enabled = true` clients
//! receive only offsite-tuning's emulator (protocols/offsite-tuning.md).
//!
//! This is glue between `fedveil-fed`'s `Trainer`/`Evaluator` traits and
//! `fedveil-model`, which do not know each other. `[task]` is read once
//! into [`LlmTask`], `[offsite]` into [`OffsiteSection`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use fedveil_data::{Record, Splitter, Template};
use fedveil_fed::FedError;
use fedveil_fed::trainer::{
    Evaluation, Evaluator, LocalUpdate, RecordSteps, TrainError, Trainer, TrainingConfig,
};
use fedveil_model::choice::{Accuracy, Question, accuracy};
use fedveil_model::eval::{
    Limits, Verdict, gsm8k_exact_match, pass_at_k, run_python, test_program,
};
use fedveil_model::federated::{LocalTraining, RoundSettings};
use fedveil_model::generate::{GenerateOptions, Sampling, generate};
use fedveil_model::load::Loaded;
use fedveil_model::offsite::{self, Bundle, DistillConfig, Layout, OffsiteConfig, Tuning};
use fedveil_model::train::{EvalResult, Example, OptimConfig, evaluate};
use fedveil_model::{Adapter, Llama, LoraConfig, PeftConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, SeedableRng};

use crate::{OnProgress, Progress};
use serde::Deserialize;
use tokenizers::Tokenizer;

/// `[task]` for `kind = "llm"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmTask {
    pub kind: String,
    /// A GGUF file or a Hugging Face model directory (relative to the
    /// config file), or `"smollm2"`, the default: SmolLM2-135M-Instruct,
    /// fetched once into fedveil's cache. An offsite-tuning client has no
    /// model: it receives the emulator from the server.
    #[serde(default)]
    pub model: Option<String>,
    /// How the frozen base is held: `"none"` (f32, the default), `"gguf"`
    /// (a GGUF model's quantised blocks kept as stored), or `"q4_k"`,
    /// `"q5_k"`, `"q6_k"`, `"q8_0"` (quantised on load). A quantised base
    /// runs on the CPU; adapters stay f32.
    #[serde(default)]
    pub quantize: Option<String>,
    /// Training records in FS-LLM's format (JSON or JSONL files, or
    /// built-in datasets; one or a list): a client's own, or, for
    /// `fedveil run`, the whole set that `split` deals out.
    #[serde(default, deserialize_with = "one_or_many")]
    pub data: Vec<PathBuf>,
    /// The server's held-out records (one source or a list).
    #[serde(default, deserialize_with = "one_or_many")]
    pub eval_data: Vec<PathBuf>,
    /// For `fedveil run` without `eval_data`: the share of each source of
    /// `data` held out (its last records) for the server's evaluation.
    #[serde(default = "defaults::eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default)]
    pub template: Template,
    /// Tokens per example (longer ones are cut).
    #[serde(default = "defaults::max_len")]
    pub max_len: usize,
    /// Use at most this many records of each source of `data` (0: all).
    #[serde(default)]
    pub max_records: usize,
    /// Evaluate on at most this many held-out records.
    #[serde(default = "defaults::eval_examples")]
    pub eval_examples: usize,
    #[serde(default = "defaults::eval_batch_size")]
    pub eval_batch_size: usize,
    /// GSM8K-style exact match on this many held-out records (0: off):
    /// greedy generation from the prompt, then the final number of the
    /// answer against the reference's. Slow, so measured on the model a run
    /// starts from and the one it ends with only.
    #[serde(default)]
    pub exact_match: usize,
    /// Tokens generated per exact-match or pass@k answer.
    #[serde(default = "defaults::max_new_tokens")]
    pub max_new_tokens: usize,
    /// pass@k on held-out records that carry tests (HumanEval, MBPP).
    #[serde(default)]
    pub pass_at_k: Option<PassAtK>,
    /// How `data` is dealt out (`fedveil run`, or a client with `shard`).
    #[serde(default)]
    pub split: Option<Splitter>,
    /// Seeds the split and the adapter's initial values.
    #[serde(default)]
    pub seed: u64,
    /// A client's part of a split `data` file (0-based), with `shards`
    /// parts in all.
    #[serde(default)]
    pub shard: Option<u32>,
    #[serde(default)]
    pub shards: Option<u32>,
    /// The adapter (default: LoRA r = 8, α = 16 on q_proj and v_proj).
    #[serde(default)]
    pub peft: Option<PeftConfig>,
    /// An adapter directory in PEFT's layout (fedveil's or Python peft's)
    /// the server's global adapter starts from instead of a fresh one. Its
    /// own configuration is the federation's: `[task.peft]` is then not
    /// given (a separate `fedveil client` gives the same one).
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// Where the server writes the global adapter in PEFT's layout:
    /// `round-<n>/` after every `save_every` rounds, and `final/` after
    /// the last round.
    #[serde(default)]
    pub save_adapter: Option<PathBuf>,
    /// Rounds between saved adapters (0: the final one only).
    #[serde(default)]
    pub save_every: u64,
    #[serde(default)]
    pub optim: ClientOptim,
}

/// `[task.pass_at_k]`: code generated for held-out problems runs against
/// their tests in a sandboxed `python3` (`fedveil_model::eval`), on the
/// model a run starts from and the one it ends with.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassAtK {
    /// Held-out records with tests to generate for.
    pub problems: usize,
    /// Generations per problem (n); 1 is greedy decoding.
    #[serde(default = "defaults::one")]
    pub samples: usize,
    /// The k of each pass@k reported (each at most `samples`).
    #[serde(default = "defaults::ks")]
    pub k: Vec<usize>,
    /// Sampling temperature when `samples` > 1.
    #[serde(default = "defaults::temperature")]
    pub temperature: f64,
    #[serde(default = "defaults::top_p")]
    pub top_p: f64,
    /// Wall-clock and CPU seconds per program.
    #[serde(default = "defaults::timeout_s")]
    pub timeout_s: u64,
    /// Address space per program.
    #[serde(default = "defaults::memory_mib")]
    pub memory_mib: u64,
    /// Run generated code even where the system cannot isolate it (no user
    /// namespaces): it can then read what this process can read. Off by
    /// default, and pass@k refuses to run.
    #[serde(default)]
    pub allow_unsandboxed: bool,
}

impl PassAtK {
    fn validate(&self) -> Result<(), FedError> {
        let bad = |m: String| Err(config_error("task.pass_at_k", m));
        if self.problems == 0 || self.samples == 0 {
            return bad("problems and samples must be positive".into());
        }
        if self.k.is_empty() || self.k.iter().any(|&k| k == 0 || k > self.samples) {
            return bad(format!(
                "every k must be in 1..={} (samples), got {:?}",
                self.samples, self.k
            ));
        }
        if self.samples > 1 && !(self.temperature > 0.0 && self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("sampling needs temperature > 0 and top_p in (0, 1]".into());
        }
        if self.timeout_s == 0 || self.memory_mib < 16 {
            return bad("timeout_s must be positive and memory_mib at least 16".into());
        }
        Ok(())
    }

    fn sampling(&self) -> Sampling {
        if self.samples == 1 {
            Sampling::Greedy
        } else {
            Sampling::TopP {
                temperature: self.temperature,
                top_p: self.top_p,
            }
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            timeout: std::time::Duration::from_secs(self.timeout_s),
            memory_bytes: self.memory_mib << 20,
            cpu_seconds: self.timeout_s,
            allow_unsandboxed: self.allow_unsandboxed,
            ..Limits::default()
        }
    }
}

/// A dataset or file, or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a dataset name or file, or a list of them")]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

/// `[task.optim]`: the client optimiser's settings beyond the round's
/// learning rate.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientOptim {
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Cosine decay over each round's local steps.
    #[serde(default)]
    pub cosine: bool,
    /// Micro-batches per optimiser step.
    #[serde(default)]
    pub grad_accum: Option<usize>,
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Recompute each layer's activations in the backward pass instead of
    /// keeping them: less memory for long sequences and large models, a
    /// second forward pass through the layers.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

/// `[offsite]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffsiteSection {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "defaults::adapter_layers")]
    pub adapter_bottom: usize,
    #[serde(default = "defaults::adapter_layers")]
    pub adapter_top: usize,
    #[serde(default = "defaults::drop_ratio")]
    pub drop_ratio: f64,
    /// `"full"` (every weight of the adapter layers) or `"lora"` (LoRA on
    /// them, with `[task.peft]`'s settings).
    #[serde(default = "defaults::tuning")]
    pub tuning: String,
    /// Also train the final norm (full tuning only).
    #[serde(default)]
    pub train_norm: bool,
    /// Also train the embeddings and output projection (full tuning only).
    #[serde(default)]
    pub train_embeddings: bool,
    #[serde(default)]
    pub distill: DistillSection,
}

/// `[offsite.distill]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    #[serde(default)]
    pub steps: usize,
    #[serde(default)]
    pub kd_weight: Option<f64>,
    #[serde(default)]
    pub lm_weight: Option<f64>,
    #[serde(default)]
    pub learning_rate: Option<f64>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Records the model owner holds for distillation (JSON or JSONL).
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// Use at most this many of them (0: all).
    #[serde(default)]
    pub max_records: usize,
}

mod defaults {
    pub fn eval_fraction() -> f64 {
        0.1
    }
    pub fn max_len() -> usize {
        256
    }
    pub fn eval_examples() -> usize {
        64
    }
    pub fn eval_batch_size() -> usize {
        8
    }
    pub fn max_new_tokens() -> usize {
        192
    }
    pub fn one() -> usize {
        1
    }
    pub fn ks() -> Vec<usize> {
        vec![1]
    }
    pub fn temperature() -> f64 {
        0.8
    }
    pub fn top_p() -> f64 {
        0.95
    }
    pub fn timeout_s() -> u64 {
        10
    }
    pub fn memory_mib() -> u64 {
        1024
    }
    pub fn adapter_layers() -> usize {
        2
    }
    pub fn drop_ratio() -> f64 {
        0.5
    }
    pub fn tuning() -> String {
        "full".into()
    }
}

fn config_error(key: &str, reason: impl std::fmt::Display) -> FedError {
    FedError::Config {
        path: key.to_string(),
        reason: reason.to_string(),
    }
}

fn train_error(e: impl std::fmt::Display) -> TrainError {
    TrainError(e.to_string())
}

impl LlmTask {
    /// Reads `[task]`, resolving paths against the config file `base`.
    pub fn from_table(table: &toml::Table, base: &Path) -> Result<LlmTask, FedError> {
        let mut t: LlmTask = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| config_error("task", e.message()))?;
        if t.kind != "llm" {
            return Err(config_error(
                "task.kind",
                format!("expected \"llm\", got \"{}\"", t.kind),
            ));
        }
        for p in t.data.iter_mut().chain(t.eval_data.iter_mut()) {
            *p = data_path(base, p);
        }
        if let Some(p) = &t.pass_at_k {
            p.validate()?;
        }
        let rel = |p: &Path| fedveil_fed::config::relative_to(base, p);
        if let Some(m) = &t.model
            && m != fedveil_model::load::DEFAULT_MODEL
        {
            t.model = Some(rel(Path::new(m)).display().to_string());
        }
        if let Some(q) = &t.quantize {
            fedveil_model::Quantize::parse(q).map_err(|e| config_error("task.quantize", e))?;
        }
        if t.max_len < 2 || t.max_len > 1 << 16 {
            return Err(config_error(
                "task.max_len",
                format!("must be in 2..=65536, got {}", t.max_len),
            ));
        }
        if !(0.0..1.0).contains(&t.eval_fraction) {
            return Err(config_error(
                "task.eval_fraction",
                format!("must be in [0, 1), got {}", t.eval_fraction),
            ));
        }
        if t.eval_examples == 0 || t.eval_batch_size == 0 {
            return Err(config_error(
                "task.eval_examples",
                "eval_examples and eval_batch_size must be positive",
            ));
        }
        if let Some(p) = &t.peft {
            p.validate().map_err(|e| config_error("task.peft", e))?;
        }
        if t.adapter.is_some() && t.peft.is_some() {
            return Err(config_error(
                "task.peft",
                "task.adapter brings its own configuration: remove [task.peft]",
            ));
        }
        if t.save_every > 0 && t.save_adapter.is_none() {
            return Err(config_error(
                "task.save_every",
                "says how often to write task.save_adapter, which is not given",
            ));
        }
        t.adapter = t.adapter.as_deref().map(rel);
        t.save_adapter = t.save_adapter.as_deref().map(rel);
        Ok(t)
    }

    fn peft(&self) -> PeftConfig {
        self.peft
            .clone()
            .unwrap_or_else(|| PeftConfig::Lora(LoraConfig::default()))
    }

    fn optim(&self) -> Result<OptimConfig, FedError> {
        let o = &self.optim;
        let c = OptimConfig {
            weight_decay: o.weight_decay,
            warmup_steps: o.warmup_steps,
            // LocalTraining sets the horizon to each round's steps.
            total_steps: usize::from(o.cosine),
            grad_accum: o.grad_accum.unwrap_or(1),
            max_grad_norm: o.max_grad_norm,
            gradient_checkpointing: o.gradient_checkpointing,
            ..OptimConfig::default()
        };
        c.validate().map_err(|e| config_error("task.optim", e))?;
        Ok(c)
    }

    /// The records of each source in `paths` (`max_records` of each, for
    /// `task.data`).
    fn sources(&self, key: &str, paths: &[PathBuf]) -> Result<Vec<Vec<Record>>, FedError> {
        if paths.is_empty() {
            return Err(config_error(key, "is required"));
        }
        paths
            .iter()
            .map(|path| {
                let mut records = crate::datasets::load(path)
                    .map_err(|e| config_error(key, format!("{}: {e}", path.display())))?;
                if self.max_records > 0 && key == "task.data" {
                    records.truncate(self.max_records);
                }
                if records.is_empty() {
                    return Err(config_error(
                        key,
                        format!("{} holds no records", path.display()),
                    ));
                }
                Ok(records)
            })
            .collect()
    }

    /// The records of every source, one after another.
    fn records(&self, key: &str, paths: &[PathBuf]) -> Result<Vec<Record>, FedError> {
        Ok(self.sources(key, paths)?.concat())
    }

    /// A client's own records: all of `data`, or its shard of a split.
    fn client_records(&self) -> Result<Vec<Record>, FedError> {
        let records = self.records("task.data", &self.data)?;
        match (self.shard, self.shards) {
            (None, None) => Ok(records),
            (Some(shard), Some(shards)) if shard < shards => {
                let split = self
                    .splitter()
                    .split(&records, shards as usize, self.seed)
                    .map_err(|e| config_error("task.split", e))?;
                Ok(split
                    .records(&records, shard as usize)
                    .into_iter()
                    .cloned()
                    .collect())
            }
            (Some(shard), Some(shards)) => Err(config_error(
                "task.shard",
                format!("{shard} is not below task.shards = {shards}"),
            )),
            _ => Err(config_error(
                "task.shard",
                "shard and shards go together (this client's part of a split file)",
            )),
        }
    }

    fn splitter(&self) -> Splitter {
        self.split.clone().unwrap_or(Splitter::Iid)
    }
}

impl OffsiteSection {
    pub fn from_table(table: &toml::Table) -> Result<OffsiteSection, FedError> {
        toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| config_error("offsite", e.message()))
    }

    fn split(&self) -> OffsiteConfig {
        OffsiteConfig {
            adapter_bottom: self.adapter_bottom,
            adapter_top: self.adapter_top,
            drop_ratio: self.drop_ratio,
        }
    }

    fn tuning(&self, task: &LlmTask) -> Result<Tuning, FedError> {
        match self.tuning.as_str() {
            "full" => {
                if task.peft.is_some() {
                    return Err(config_error(
                        "task.peft",
                        "offsite.tuning = \"full\" trains the adapter layers themselves; \
                         remove [task.peft] or set offsite.tuning = \"lora\"",
                    ));
                }
                Ok(Tuning::Full)
            }
            "lora" => match task.peft() {
                PeftConfig::Lora(l) => Ok(Tuning::Lora(l)),
                other => Err(config_error(
                    "task.peft",
                    format!(
                        "offsite.tuning = \"lora\" needs a LoRA adapter, not {}",
                        other.method()
                    ),
                )),
            },
            other => Err(config_error(
                "offsite.tuning",
                format!("expected \"full\" or \"lora\", got \"{other}\""),
            )),
        }
    }

    fn distill(&self) -> Result<DistillConfig, FedError> {
        let d = DistillConfig::default();
        let s = &self.distill;
        let c = DistillConfig {
            steps: s.steps,
            kd_weight: s.kd_weight.unwrap_or(d.kd_weight),
            lm_weight: s.lm_weight.unwrap_or(d.lm_weight),
            learning_rate: s.learning_rate.unwrap_or(d.learning_rate),
            batch_size: s.batch_size.unwrap_or(d.batch_size),
            max_len: d.max_len,
        };
        c.validate()
            .map_err(|e| config_error("offsite.distill", e))?;
        Ok(c)
    }
}

/// A data file relative to the config file, or a built-in dataset's name.
fn data_path(base: &Path, p: &Path) -> PathBuf {
    if crate::datasets::is_builtin(p) {
        p.to_path_buf()
    } else {
        fedveil_fed::config::relative_to(base, p)
    }
}

/// The offsite section if it is enabled.
pub(crate) fn offsite_of(
    offsite: Option<&toml::Table>,
    base: &Path,
) -> Result<Option<OffsiteSection>, FedError> {
    let Some(table) = offsite else {
        return Ok(None);
    };
    let mut s = OffsiteSection::from_table(table)?;
    s.distill.data = s.distill.data.as_deref().map(|p| data_path(base, p));
    Ok(s.enabled.then_some(s))
}

// ------------------------------------------------------------ models

/// Loads the task's model: a path, or the default one (fetched once),
/// its frozen weights held as `task.quantize` says.
fn load_model(task: &LlmTask, model: Option<&str>) -> Result<Loaded, FedError> {
    let quantize = fedveil_model::Quantize::parse(task.quantize.as_deref().unwrap_or("none"))
        .map_err(|e| config_error("task.quantize", e))?;
    // A quantised base runs on the CPU, also where a GPU is present.
    fedveil_model::load::load_model(model, &quantize.device(), quantize, &mut |m| {
        tracing::info!("{m}")
    })
    .map_err(|e| config_error("task.model", e))
}

/// Tokenises records with the template: the prompt is context, the
/// completion and the end-of-sequence token are the targets. Records with
/// nothing to predict within `max_len` tokens are left out.
pub fn encode(
    tokenizer: &Tokenizer,
    template: Template,
    records: &[Record],
    eos: Option<u32>,
    max_len: usize,
) -> Result<Vec<Example>, TrainError> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let prompt = template.prompt(r);
        let completion = template.completion(r);
        if let Some(e) =
            Example::prompted(tokenizer, &prompt, &completion, eos, max_len).map_err(train_error)?
        {
            out.push(e);
        }
    }
    Ok(out)
}

/// The end-of-sequence token: the model's, else the tokenizer's `<|endoftext|>`
/// or `</s>`.
pub fn eos_of(model: &Llama, tokenizer: &Tokenizer) -> Option<u32> {
    model
        .config()
        .eos_token_id
        .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
        .or_else(|| tokenizer.token_to_id("</s>"))
}

// ------------------------------------------------------------ the client

/// A client's trainer: its records, and the model once it has one.
pub struct LlmTrainer {
    records: Vec<Record>,
    template: Template,
    max_len: usize,
    optim: OptimConfig,
    /// How a bundle's emulator is held (quantised on install, or f32).
    quantize: fedveil_model::Quantize,
    /// The adapter (from the config, or from the server's bundle).
    local: Option<LocalTraining>,
    from_bundle: bool,
    /// Shared by the trainers of one process (`fedveil run`): one trains
    /// at a time.
    turns: Option<Arc<Mutex<()>>>,
}

impl std::fmt::Debug for LlmTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmTrainer")
            .field("records", &self.records.len())
            .field("from_bundle", &self.from_bundle)
            .finish_non_exhaustive()
    }
}

impl LlmTrainer {
    /// A trainer on `model` (shared, not copied) with `peft`.
    fn with_model(
        task: &LlmTask,
        records: Vec<Record>,
        model: &Loaded,
        peft: PeftConfig,
    ) -> Result<LlmTrainer, FedError> {
        let mut t = LlmTrainer::new(task, records)?;
        t.from_bundle = false;
        t.build(&model.model, &model.tokenizer, peft)
            .map_err(|e| config_error("task", e))?;
        Ok(t)
    }

    /// A trainer that waits for the server's bundle.
    fn waiting(task: &LlmTask, records: Vec<Record>) -> Result<LlmTrainer, FedError> {
        let t = LlmTrainer::new(task, records)?;
        if t.quantize == fedveil_model::Quantize::Gguf {
            return Err(config_error(
                "task.quantize",
                "\"gguf\" keeps a GGUF file's blocks, and an offsite client has no model file: \
                 it receives the emulator in f32 (quantise it on arrival with \"q4_0\", \
                 \"q8_0\", \"q4_k\", ...)",
            ));
        }
        Ok(t)
    }

    /// A trainer without a model yet.
    fn new(task: &LlmTask, records: Vec<Record>) -> Result<LlmTrainer, FedError> {
        let quantize = fedveil_model::Quantize::parse(task.quantize.as_deref().unwrap_or("none"))
            .map_err(|e| config_error("task.quantize", e))?;
        Ok(LlmTrainer {
            records,
            template: task.template,
            max_len: task.max_len,
            optim: task.optim()?,
            quantize,
            local: None,
            from_bundle: true,
            turns: None,
        })
    }

    fn build(
        &mut self,
        model: &Llama,
        tokenizer: &Tokenizer,
        peft: PeftConfig,
    ) -> Result<(), TrainError> {
        let examples = encode(
            tokenizer,
            self.template,
            &self.records,
            eos_of(model, tokenizer),
            self.max_len,
        )?;
        let local = LocalTraining::new(
            model,
            peft,
            self.optim.clone(),
            examples,
            self.max_len,
            &mut OsRng,
        )
        .map_err(train_error)?;
        self.local = Some(local);
        Ok(())
    }
}

impl Trainer for LlmTrainer {
    fn dim(&self) -> usize {
        self.local.as_ref().map_or(0, LocalTraining::dim)
    }

    fn train(
        &mut self,
        global: &[f32],
        config: &TrainingConfig,
        rng: &mut dyn rand_core::RngCore,
    ) -> Result<LocalUpdate, TrainError> {
        let local = self
            .local
            .as_mut()
            .ok_or_else(|| train_error("no model yet (the server's bundle has not arrived)"))?;
        // In one process the clients share the cores: together they would
        // finish no sooner, and hold every client's activations at once.
        let _turn = self
            .turns
            .as_ref()
            .map(|t| t.lock().unwrap_or_else(PoisonError::into_inner));
        let settings = RoundSettings {
            local_steps: config.local_steps,
            batch_size: config.batch_size,
            learning_rate: f64::from(config.learning_rate),
            proximal_mu: f64::from(config.proximal_mu),
        };
        let Some(dp) = &config.record_dp else {
            let u = local.round(global, &settings, rng).map_err(train_error)?;
            return Ok(LocalUpdate {
                delta: u.delta,
                samples: u.samples,
                loss: u.loss,
                record_steps: None,
            });
        };
        let mut mechanism =
            crate::record::GridNoise::new(local.dim(), dp, crate::record::csprng(rng))
                .map_err(train_error)?;
        let (u, spent) = local
            .private_round(global, &settings, &mut mechanism, rng)
            .map_err(train_error)?;
        Ok(LocalUpdate {
            delta: u.delta,
            samples: u.samples,
            loss: u.loss,
            record_steps: Some(RecordSteps {
                noise_multiplier: dp.noise_multiplier,
                sampling_rate: spent.sampling_rate,
                steps: spent.steps,
            }),
        })
    }

    fn wants_bundle(&self) -> bool {
        self.from_bundle
    }

    fn install_bundle(&mut self, bytes: &[u8]) -> Result<(), TrainError> {
        let device = self.quantize.device();
        let bundle = Bundle::from_bytes(bytes, &device).map_err(train_error)?;
        let tokenizer = bundle
            .tokenizer
            .as_ref()
            .ok_or_else(|| train_error("the bundle has no tokenizer"))?;
        let mut model = bundle
            .model
            .to_dtype(fedveil_model::compute_dtype(&device))
            .map_err(train_error)?;
        if let fedveil_model::Quantize::To(format) = self.quantize {
            model = model.quantize(format).map_err(train_error)?;
        }
        tracing::info!(
            layers = model.config().num_hidden_layers,
            of = bundle.layout.total_layers,
            "the emulator of {}",
            bundle.source
        );
        self.build(&model, tokenizer, bundle.adapter.clone())
    }
}

// ------------------------------------------------------------ the server

/// The server's evaluator: the full model with the global adapter
/// ("plug-in"), and with offsite-tuning also the emulator with it.
pub struct LlmEvaluator {
    full: Llama,
    adapter: Adapter,
    emulator: Option<(Llama, Adapter)>,
    eval: Vec<Example>,
    /// The held-out multiple-choice questions (when the held-out records
    /// are), scored for accuracy at every evaluation.
    questions: Vec<Question>,
    /// Prompts and reference answers for exact match.
    generate: Vec<(Vec<u32>, String)>,
    /// Prompts, instructions and tests for pass@k.
    code: Vec<(Vec<u32>, Record)>,
    pass_at_k: Option<PassAtK>,
    seed: u64,
    tokenizer: Tokenizer,
    max_new_tokens: usize,
    initial: Vec<f32>,
    bundle: Option<Vec<u8>>,
    batch_size: usize,
    max_len: usize,
    /// Where and how often the global adapter is written, and the base
    /// model's name for its configuration.
    save_adapter: Option<PathBuf>,
    save_every: u64,
    base_model: String,
}

impl std::fmt::Debug for LlmEvaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmEvaluator")
            .field("eval", &self.eval.len())
            .field("offsite", &self.emulator.is_some())
            .finish_non_exhaustive()
    }
}

fn scores(prefix: &str, r: &EvalResult, out: &mut Evaluation) {
    out.metrics.insert(format!("{prefix}loss"), r.loss);
    out.metrics
        .insert(format!("{prefix}perplexity"), r.perplexity);
}

/// `accuracy`, `accuracy_norm` and their standard errors, prefixed.
fn accuracies(prefix: &str, a: &Accuracy, out: &mut Evaluation) {
    for (key, value) in [
        ("accuracy", a.accuracy),
        ("accuracy_stderr", a.accuracy_stderr),
        ("accuracy_norm", a.accuracy_norm),
        ("accuracy_norm_stderr", a.accuracy_norm_stderr),
    ] {
        out.metrics.insert(format!("{prefix}{key}"), value);
    }
}

impl Evaluator for LlmEvaluator {
    fn dim(&self) -> usize {
        self.adapter.num_parameters()
    }

    fn initial_params(&mut self) -> Result<Vec<f32>, TrainError> {
        Ok(self.initial.clone())
    }

    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, TrainError> {
        self.adapter.set_from_slice(params).map_err(train_error)?;
        let full = evaluate(
            &self.full,
            Some(&self.adapter),
            &self.eval,
            self.batch_size,
            self.max_len,
        )
        .map_err(train_error)?;
        let mut out = Evaluation {
            loss: full.loss,
            ..Evaluation::default()
        };
        out.metrics.insert("perplexity".into(), full.perplexity);
        if !self.questions.is_empty() {
            let a = self.accuracy(&self.full, &self.adapter)?;
            accuracies("", &a, &mut out);
        }
        if let Some((emulator, adapter)) = &self.emulator {
            scores("plugin_", &full, &mut out);
            adapter.set_from_slice(params).map_err(train_error)?;
            let emu = evaluate(
                emulator,
                Some(adapter),
                &self.eval,
                self.batch_size,
                self.max_len,
            )
            .map_err(train_error)?;
            scores("emulator_", &emu, &mut out);
            if !self.questions.is_empty() {
                let a = self.accuracy(emulator, adapter)?;
                accuracies("emulator_", &a, &mut out);
            }
        }
        Ok(out)
    }

    fn evaluate_final(&mut self, params: &[f32]) -> Result<Evaluation, TrainError> {
        let mut out = self.evaluate(params)?;
        // `evaluate` left the adapter set to `params`.
        if !self.generate.is_empty() {
            let mut hits = 0usize;
            for (prompt, reference) in &self.generate {
                let text = self.answer(prompt, Sampling::Greedy, &mut OsRng)?;
                hits += usize::from(gsm8k_exact_match(&text, reference));
            }
            let n = self.generate.len();
            tracing::info!(hits, of = n, "exact match");
            out.metrics
                .insert("exact_match".into(), hits as f64 / n as f64);
        }
        if let Some(cfg) = &self.pass_at_k {
            // The same samples before and after training, for a given seed.
            let mut rng = ChaCha20Rng::seed_from_u64(self.seed);
            let limits = cfg.limits();
            let mut sums = vec![0.0; cfg.k.len()];
            let mut passed = 0usize;
            for (prompt, record) in &self.code {
                let mut correct = 0usize;
                for _ in 0..cfg.samples {
                    let text = self.answer(prompt, cfg.sampling(), &mut rng)?;
                    let program = test_program(&record.instruction, &text, &record.test);
                    let outcome = run_python(&program, &limits).map_err(train_error)?;
                    tracing::debug!(%program, ?outcome, "pass@k sample");
                    correct += usize::from(outcome == Verdict::Passed);
                }
                passed += correct;
                for (sum, &k) in sums.iter_mut().zip(&cfg.k) {
                    *sum += pass_at_k(cfg.samples, correct, k).map_err(train_error)?;
                }
            }
            let n = self.code.len();
            tracing::info!(passed, of = n * cfg.samples, "pass@k programs");
            for (sum, k) in sums.iter().zip(&cfg.k) {
                out.metrics.insert(format!("pass@{k}"), sum / n as f64);
            }
        }
        Ok(out)
    }

    fn client_bundle(&mut self) -> Result<Option<Vec<u8>>, TrainError> {
        Ok(self.bundle.take())
    }

    fn save(
        &mut self,
        params: &[f32],
        completed: u64,
        last: bool,
    ) -> Result<Option<PathBuf>, TrainError> {
        let Some(dir) = &self.save_adapter else {
            return Ok(None);
        };
        let mut names = Vec::new();
        if self.save_every > 0 && completed.is_multiple_of(self.save_every) {
            names.push(format!("round-{completed}"));
        }
        if last {
            names.push("final".to_string());
        }
        if names.is_empty() {
            return Ok(None);
        }
        self.adapter.set_from_slice(params).map_err(train_error)?;
        let mut path = None;
        for name in names {
            let p = dir.join(name);
            fedveil_model::interop::save_adapter(&self.adapter, &p, &self.base_model)
                .map_err(train_error)?;
            path = Some(p);
        }
        Ok(path)
    }
}

impl LlmEvaluator {
    /// Multiple-choice accuracy on the held-out questions.
    fn accuracy(&self, model: &Llama, adapter: &Adapter) -> Result<Accuracy, TrainError> {
        accuracy(
            model,
            Some(adapter),
            &self.tokenizer,
            &self.questions,
            self.batch_size,
            self.max_len,
        )
        .map_err(train_error)
    }

    /// The full model's answer (with the adapter as last set) to a prompt.
    fn answer(
        &self,
        prompt: &[u32],
        sampling: Sampling,
        rng: &mut dyn rand_core::RngCore,
    ) -> Result<String, TrainError> {
        let options = GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling,
            stop: self.full.config().eos_token_id.into_iter().collect(),
        };
        let ids = generate(&self.full, Some(&self.adapter), prompt, &options, rng)
            .map_err(train_error)?;
        self.tokenizer.decode(&ids, true).map_err(train_error)
    }
}

/// What the server's side is built from.
struct ServerSide {
    loaded: Loaded,
    eval: Vec<Example>,
    eval_records: Vec<Record>,
    peft: PeftConfig,
    offsite: Option<(OffsiteSection, Layout)>,
    /// The adapter the federation starts from, if not a fresh one.
    start: Option<Adapter>,
}

/// The evaluator, distilling the emulator first when asked.
fn build_evaluator(
    progress: OnProgress<'_>,
    task: &LlmTask,
    side: ServerSide,
) -> Result<LlmEvaluator, FedError> {
    let ServerSide {
        loaded,
        eval,
        eval_records,
        peft,
        offsite,
        start,
    } = side;
    if eval.is_empty() {
        return Err(config_error(
            "task.eval_data",
            format!(
                "no held-out record has a token to predict within max_len = {}",
                task.max_len
            ),
        ));
    }
    let full = loaded.model.clone();
    let mut rng = ChaCha20Rng::seed_from_u64(task.seed);
    let adapter = match start {
        Some(a) => a,
        None => {
            Adapter::new(peft.clone(), &full, &mut rng).map_err(|e| config_error("task.peft", e))?
        }
    };
    let initial = adapter.to_vec().map_err(|e| config_error("task.peft", e))?;
    let (emulator, bundle) = match offsite {
        None => (None, None),
        Some((section, layout)) => {
            let emulator =
                offsite::emulator(&full, &layout).map_err(|e| config_error("offsite", e))?;
            let emulator = distilled(progress, task, &section, &loaded, &layout, emulator, &eval)?;
            let bundle = Bundle {
                model: emulator.clone(),
                tokenizer: Some(loaded.tokenizer.clone()),
                layout: layout.clone(),
                adapter: peft.clone(),
                source: loaded.source.clone(),
            }
            .to_bytes()
            .map_err(|e| config_error("offsite", e))?;
            let emu_adapter = Adapter::new(peft.clone(), &emulator, &mut rng)
                .map_err(|e| config_error("offsite", e))?;
            tracing::info!(
                emulator_layers = layout.emulator_layers().len(),
                of = layout.total_layers,
                dropped = ?layout.dropped(),
                bundle_bytes = bundle.len(),
                "offsite-tuning: clients receive the emulator"
            );
            (Some((emulator, emu_adapter)), Some(bundle))
        }
    };
    let prompt = |r: &Record, key: &str| {
        loaded
            .tokenizer
            .encode(task.template.prompt(r), true)
            .map(|p| p.get_ids().to_vec())
            .map_err(|e| config_error(key, e))
    };
    // A directory the adapters cannot be written to is found now, not
    // after the first round.
    if let Some(dir) = &task.save_adapter {
        std::fs::create_dir_all(dir)
            .map_err(|e| config_error("task.save_adapter", format!("{}: {e}", dir.display())))?;
    }
    let cap = eval_records.len().min(task.eval_examples);
    let questions = crate::score::questions(&eval_records[..cap], task.template)
        .map_err(|e| config_error("task.eval_data", e))?
        .unwrap_or_default();
    let generate = eval_records
        .iter()
        .take(task.exact_match)
        .map(|r| Ok((prompt(r, "task.exact_match")?, r.output.clone())))
        .collect::<Result<Vec<_>, FedError>>()?;
    let code = match &task.pass_at_k {
        None => Vec::new(),
        Some(cfg) => {
            let code = eval_records
                .iter()
                .filter(|r| !r.test.is_empty())
                .take(cfg.problems)
                .map(|r| Ok((prompt(r, "task.pass_at_k")?, r.clone())))
                .collect::<Result<Vec<_>, FedError>>()?;
            if code.is_empty() {
                return Err(config_error(
                    "task.pass_at_k",
                    "no held-out record has tests (a \"test\" key, as mbpp and humaneval have)",
                ));
            }
            code
        }
    };
    Ok(LlmEvaluator {
        full,
        adapter,
        emulator,
        eval,
        questions,
        generate,
        code,
        pass_at_k: task.pass_at_k.clone(),
        seed: task.seed,
        tokenizer: loaded.tokenizer.clone(),
        max_new_tokens: task.max_new_tokens,
        initial,
        bundle,
        batch_size: task.eval_batch_size,
        max_len: task.max_len,
        save_adapter: task.save_adapter.clone(),
        save_every: task.save_every,
        base_model: task.model.clone().unwrap_or_else(|| loaded.source.clone()),
    })
}

/// The emulator, distilled when `[offsite.distill]` asks for steps: once
/// per model, layout, settings and data, then read from the cache
/// ([`offsite::distill_cached`]).
fn distilled(
    progress: OnProgress<'_>,
    task: &LlmTask,
    section: &OffsiteSection,
    loaded: &Loaded,
    layout: &Layout,
    emulator: Llama,
    held_out: &[Example],
) -> Result<Llama, FedError> {
    let config = section.distill()?;
    if config.steps == 0 {
        return Ok(emulator);
    }
    let data_path = section
        .distill
        .data
        .as_deref()
        .ok_or_else(|| config_error("offsite.distill.data", "is required when steps > 0"))?;
    let mut records =
        crate::datasets::load(data_path).map_err(|e| config_error("offsite.distill.data", e))?;
    if section.distill.max_records > 0 {
        records.truncate(section.distill.max_records);
    }
    let config = DistillConfig {
        max_len: task.max_len,
        ..config
    };
    let train = encode(
        &loaded.tokenizer,
        task.template,
        &records,
        eos_of(&loaded.model, &loaded.tokenizer),
        task.max_len,
    )
    .map_err(|e| config_error("offsite.distill.data", e))?;
    let cache = fedveil_model::fetch::cache_dir()
        .map_err(|e| config_error("offsite.distill", e))?
        .join("emulators");
    let started = std::time::Instant::now();
    let total = config.steps as u64;
    let (model, report) = offsite::distill_cached(
        &cache,
        &loaded.model,
        &emulator,
        layout,
        offsite::DistillData {
            train: &train,
            held_out,
        },
        &config,
        &loaded.source,
        &mut OsRng,
        &mut |step, loss| {
            if step == 0 {
                tracing::info!(
                    steps = total,
                    records = train.len(),
                    "distilling the emulator"
                );
            }
            progress(Progress {
                phase: "distil",
                done: step as u64 + 1,
                total,
                message: &format!("emulator steps, loss {loss:.4}"),
            });
            if step % 10 == 0 {
                tracing::info!(step, loss, "distillation");
            }
        },
    )
    .map_err(|e| config_error("offsite.distill", e))?;
    match report {
        None => tracing::info!(
            "the distilled emulator from the cache in {}",
            cache.display()
        ),
        Some(report) => tracing::info!(
            gap_before = report.gap_before,
            gap_after = report.gap_after,
            seconds = started.elapsed().as_secs_f64(),
            "distilled the emulator"
        ),
    }
    Ok(model)
}

/// The federation's adapter: its configuration, offsite-tuning's layout,
/// and the adapter it starts from when `task.adapter` names one.
struct AdapterPlan {
    peft: PeftConfig,
    offsite: Option<(OffsiteSection, Layout)>,
    start: Option<Adapter>,
}

fn plan_adapter(
    task: &LlmTask,
    offsite: Option<OffsiteSection>,
    model: &Llama,
) -> Result<AdapterPlan, FedError> {
    if let Some(dir) = &task.adapter {
        if offsite.is_some() {
            return Err(config_error(
                "task.adapter",
                "starting from an adapter is not implemented with offsite-tuning",
            ));
        }
        let adapter = fedveil_model::interop::load_adapter(dir, model)
            .map_err(|e| config_error("task.adapter", e))?;
        return Ok(AdapterPlan {
            peft: adapter.config().clone(),
            offsite: None,
            start: Some(adapter),
        });
    }
    match offsite {
        None => Ok(AdapterPlan {
            peft: task.peft(),
            offsite: None,
            start: None,
        }),
        Some(section) => {
            let layout = Layout::new(model.config().num_hidden_layers, &section.split())
                .map_err(|e| config_error("offsite", e))?;
            let peft = offsite::adapter_config(
                &layout,
                &section.tuning(task)?,
                section.train_norm,
                section.train_embeddings,
            )
            .map_err(|e| config_error("offsite", e))?;
            Ok(AdapterPlan {
                peft,
                offsite: Some((section, layout)),
                start: None,
            })
        }
    }
}

fn held_out(task: &LlmTask, loaded: &Loaded, records: &[Record]) -> Result<Vec<Example>, FedError> {
    let cap = records.len().min(task.eval_examples);
    encode(
        &loaded.tokenizer,
        task.template,
        &records[..cap],
        eos_of(&loaded.model, &loaded.tokenizer),
        task.max_len,
    )
    .map_err(|e| config_error("task.eval_data", e))
}

/// Held-out records taken from each source in turn, so that the first
/// `eval_examples` (or pass@k problems) cover every source; one source
/// keeps its order.
fn interleave(sources: Vec<Vec<Record>>) -> Vec<Record> {
    let mut iters: Vec<_> = sources.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::new();
    loop {
        let before = out.len();
        out.extend(iters.iter_mut().filter_map(Iterator::next));
        if out.len() == before {
            return out;
        }
    }
}

/// `fedveil server`'s evaluator.
pub(crate) fn server_evaluator(
    task: &LlmTask,
    offsite: Option<OffsiteSection>,
    progress: OnProgress<'_>,
) -> Result<Box<dyn Evaluator>, FedError> {
    if !task.data.is_empty() || task.shard.is_some() {
        return Err(config_error(
            "task.data",
            "a server holds no client's data; give it eval_data only",
        ));
    }
    let loaded = load_model(task, task.model.as_deref())?;
    let records = interleave(task.sources("task.eval_data", &task.eval_data)?);
    let eval = held_out(task, &loaded, &records)?;
    let AdapterPlan {
        peft,
        offsite,
        start,
    } = plan_adapter(task, offsite, &loaded.model)?;
    Ok(Box::new(build_evaluator(
        progress,
        task,
        ServerSide {
            loaded,
            eval,
            eval_records: records,
            peft,
            offsite,
            start,
        },
    )?))
}

/// `fedveil client`'s trainer: on its own model, or waiting for the
/// server's emulator when the config names no model.
pub(crate) fn client_trainer(task: &LlmTask) -> Result<Box<dyn Trainer>, FedError> {
    for (key, given) in [
        ("task.adapter", task.adapter.is_some()),
        ("task.save_adapter", task.save_adapter.is_some()),
    ] {
        if given {
            return Err(config_error(
                key,
                "is the server's: a client trains the global adapter it receives",
            ));
        }
    }
    let records = task.client_records()?;
    match &task.model {
        None => Ok(Box::new(LlmTrainer::waiting(task, records)?)),
        Some(m) => {
            let loaded = load_model(task, Some(m))?;
            let peft = task.peft();
            Ok(Box::new(LlmTrainer::with_model(
                task, records, &loaded, peft,
            )?))
        }
    }
}

/// The parts of a run in one process: the server's evaluator, and what a
/// trainer is made of.
struct Prepared {
    evaluator: LlmEvaluator,
    /// Part `i` of the split for client `i`.
    parts: Vec<Vec<Record>>,
    /// The base model a trainer starts from (none with offsite-tuning:
    /// trainers get the emulator from the server's bundle).
    client_model: Option<Loaded>,
    peft: PeftConfig,
}

/// The evaluator and every client's records of a federation of `clients`
/// clients, as `fedveil run` and the runs without a federation set beside
/// it deal them out. The model is loaded once.
fn prepare(
    task: &LlmTask,
    offsite: Option<OffsiteSection>,
    clients: u32,
    progress: OnProgress<'_>,
) -> Result<Prepared, FedError> {
    if task.shard.is_some() || task.shards.is_some() {
        return Err(config_error(
            "task.shard",
            "'fedveil run' gives client i part i of the split; remove shard and shards",
        ));
    }
    let loaded = load_model(task, task.model.as_deref())?;
    let mut sources = task.sources("task.data", &task.data)?;
    let eval_records = if task.eval_data.is_empty() {
        let mut held_out = Vec::new();
        for records in &mut sources {
            let held = ((records.len() as f64 * task.eval_fraction).round() as usize)
                .clamp(1, records.len().saturating_sub(clients as usize).max(1));
            if records.len() <= held {
                return Err(config_error(
                    "task.data",
                    "too few records to hold some out for evaluation; give eval_data",
                ));
            }
            held_out.push(records.split_off(records.len() - held));
        }
        interleave(held_out)
    } else {
        interleave(task.sources("task.eval_data", &task.eval_data)?)
    };
    let records = sources.concat();
    let split = task
        .splitter()
        .split(&records, clients as usize, task.seed)
        .map_err(|e| config_error("task.split", e))?;
    tracing::info!(
        "{} split of {} records:\n{}",
        task.splitter().name(),
        records.len(),
        split.report(&records)
    );
    let eval = held_out(task, &loaded, &eval_records)?;
    let AdapterPlan {
        peft,
        offsite,
        start,
    } = plan_adapter(task, offsite, &loaded.model)?;
    let parts: Vec<Vec<Record>> = (0..clients as usize)
        .map(|i| split.records(&records, i).into_iter().cloned().collect())
        .collect();
    let client_model = offsite.is_none().then(|| loaded.clone());
    let evaluator = build_evaluator(
        progress,
        task,
        ServerSide {
            loaded,
            eval,
            eval_records,
            peft: peft.clone(),
            offsite,
            start,
        },
    )?;
    Ok(Prepared {
        evaluator,
        parts,
        client_model,
        peft,
    })
}

/// `fedveil run`: the evaluator and the trainers of `clients` clients,
/// client `i` holding part `i` of the split data. The model is loaded
/// once and shared by everyone in the process.
pub(crate) fn in_process(
    task: &LlmTask,
    offsite: Option<OffsiteSection>,
    clients: u32,
    progress: OnProgress<'_>,
) -> Result<(Box<dyn Evaluator>, fedveil_fed::in_process::TrainerFactory), FedError> {
    let Prepared {
        evaluator,
        parts,
        client_model,
        peft,
    } = prepare(task, offsite, clients, progress)?;
    let shared = Arc::new((task.clone(), parts, client_model, peft));
    // The process's clients train one at a time.
    let turns = Arc::new(Mutex::new(()));
    let factory: fedveil_fed::in_process::TrainerFactory = Box::new(move |i| {
        let (task, parts, loaded, peft) = &*shared;
        let records = parts
            .get(i as usize)
            .cloned()
            .ok_or_else(|| FedError::Internal(format!("no data for client {i}")))?;
        let mut t = match loaded {
            None => LlmTrainer::waiting(task, records)?,
            Some(loaded) => LlmTrainer::with_model(task, records, loaded, peft.clone())?,
        };
        t.turns = Some(Arc::clone(&turns));
        Ok(Box::new(t) as Box<dyn Trainer>)
    });
    Ok((Box::new(evaluator), factory))
}

/// A run without a federation beside one of `population` clients
/// ([`crate::TaskConfig::one_party`]): the federation's evaluator, and one
/// trainer holding every client's records (Global) or client `i`'s.
pub(crate) fn one_party(
    task: &LlmTask,
    offsite: Option<OffsiteSection>,
    population: u32,
    party: crate::Party,
    progress: OnProgress<'_>,
) -> Result<crate::OneParty, FedError> {
    let Prepared {
        evaluator,
        parts,
        client_model,
        peft,
    } = prepare(task, offsite, population, progress)?;
    let all: usize = parts.iter().map(Vec::len).sum();
    let records: Vec<Record> = match party {
        crate::Party::Pooled => parts.concat(),
        crate::Party::Client(i) => parts
            .into_iter()
            .nth(i as usize)
            .ok_or_else(|| FedError::Internal(format!("no data for client {i}")))?,
    };
    tracing::info!(
        "one party holding {} of the {all} records the {population} clients hold",
        records.len()
    );
    let trainer = match &client_model {
        None => LlmTrainer::waiting(task, records)?,
        Some(loaded) => LlmTrainer::with_model(task, records, loaded, peft)?,
    };
    Ok((Box::new(evaluator), Box::new(trainer)))
}
