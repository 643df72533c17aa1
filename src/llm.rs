//! The language-model task (`[task] kind = "llm"`): a client fine-tunes an
//! adapter on its own instruction data, the server evaluates the global
//! adapter on held-out data, and with `[offsite] enabled = true` clients
//! receive only offsite-tuning's emulator (protocols/offsite-tuning.md).
//!
//! This is glue between `fedveil-fed`'s `Trainer`/`Evaluator` traits and
//! `fedveil-model`, which do not know each other.

use std::path::{Path, PathBuf};

use candle_core::Device;
use fedveil_data::{Record, Splitter, Template};
use fedveil_fed::FedError;
use fedveil_fed::trainer::{
    Evaluation, Evaluator, LocalUpdate, TrainError, Trainer, TrainingConfig,
};
use fedveil_model::eval::gsm8k_exact_match;
use fedveil_model::federated::{LocalTraining, RoundSettings};
use fedveil_model::generate::{GenerateOptions, Sampling, generate};
use fedveil_model::load::Loaded;
use fedveil_model::offsite::{self, Bundle, DistillConfig, Layout, OffsiteConfig, Tuning};
use fedveil_model::train::{EvalResult, Example, OptimConfig, evaluate};
use fedveil_model::{Adapter, Llama, LoraConfig, PeftConfig};
use indicatif::MultiProgress;
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, SeedableRng};
use serde::Deserialize;
use sha2::{Digest, Sha256};
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
    /// Training records in FS-LLM's format (JSON or JSONL): a client's own,
    /// or, for `fedveil run`, the whole set that `split` deals out.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// The server's held-out records.
    #[serde(default)]
    pub eval_data: Option<PathBuf>,
    /// For `fedveil run` without `eval_data`: the share of `data` held out
    /// for the server's evaluation.
    #[serde(default = "defaults::eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default)]
    pub template: Template,
    /// Tokens per example (longer ones are cut).
    #[serde(default = "defaults::max_len")]
    pub max_len: usize,
    /// Use at most this many records of `data` (0: all).
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
    /// Tokens generated per exact-match answer.
    #[serde(default = "defaults::max_new_tokens")]
    pub max_new_tokens: usize,
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
    #[serde(default)]
    pub optim: ClientOptim,
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
        t.data = t.data.as_deref().map(|p| data_path(base, p));
        t.eval_data = t.eval_data.as_deref().map(|p| data_path(base, p));
        let rel = |p: &Path| fedveil_fed::config::relative_to(base, p);
        if let Some(m) = &t.model
            && m != "smollm2"
        {
            t.model = Some(rel(Path::new(m)).display().to_string());
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
            ..OptimConfig::default()
        };
        c.validate().map_err(|e| config_error("task.optim", e))?;
        Ok(c)
    }

    fn records(&self, key: &str, path: Option<&Path>) -> Result<Vec<Record>, FedError> {
        let path = path.ok_or_else(|| config_error(key, "is required"))?;
        let mut records =
            crate::datasets::load(path).map_err(|e| config_error(key, format!("{e:#}")))?;
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
    }

    /// A client's own records: all of `data`, or its shard of a split.
    fn client_records(&self) -> Result<Vec<Record>, FedError> {
        let records = self.records("task.data", self.data.as_deref())?;
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
pub fn offsite_of(
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

fn device() -> Device {
    fedveil_model::default_device()
}

/// Loads the task's model: a path, or the default one (fetched once).
fn load_model(model: Option<&str>) -> Result<Loaded, FedError> {
    let path = match model {
        None | Some("smollm2") => {
            let cache =
                fedveil_model::fetch::cache_dir().map_err(|e| config_error("task.model", e))?;
            fedveil_model::fetch::ensure(&fedveil_model::fetch::SMOLLM2_135M, &cache, &mut |m| {
                tracing::info!("{m}")
            })
            .map_err(|e| config_error("task.model", e))?
        }
        Some(p) => PathBuf::from(p),
    };
    let device = device();
    let mut loaded =
        fedveil_model::load::load(&path, &device).map_err(|e| config_error("task.model", e))?;
    loaded.model = loaded
        .model
        .to_dtype(fedveil_model::compute_dtype(&device))
        .map_err(|e| config_error("task.model", e))?;
    Ok(loaded)
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

fn eos_of(model: &Llama, tokenizer: &Tokenizer) -> Option<u32> {
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
    /// The adapter (from the config, or from the server's bundle).
    local: Option<LocalTraining>,
    from_bundle: bool,
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
        let mut t = LlmTrainer::waiting(task, records)?;
        t.from_bundle = false;
        t.build(&model.model, &model.tokenizer, peft)
            .map_err(|e| config_error("task", e))?;
        Ok(t)
    }

    /// A trainer that waits for the server's bundle.
    fn waiting(task: &LlmTask, records: Vec<Record>) -> Result<LlmTrainer, FedError> {
        Ok(LlmTrainer {
            records,
            template: task.template,
            max_len: task.max_len,
            optim: task.optim()?,
            local: None,
            from_bundle: true,
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
        let settings = RoundSettings {
            local_steps: config.local_steps,
            batch_size: config.batch_size,
            learning_rate: f64::from(config.learning_rate),
            proximal_mu: f64::from(config.proximal_mu),
        };
        let u = local.round(global, &settings, rng).map_err(train_error)?;
        Ok(LocalUpdate {
            delta: u.delta,
            samples: u.samples,
            loss: u.loss,
        })
    }

    fn wants_bundle(&self) -> bool {
        self.from_bundle
    }

    fn install_bundle(&mut self, bytes: &[u8]) -> Result<(), TrainError> {
        let bundle = Bundle::from_bytes(bytes, &device()).map_err(train_error)?;
        let tokenizer = bundle
            .tokenizer
            .as_ref()
            .ok_or_else(|| train_error("the bundle has no tokenizer"))?;
        let model = bundle
            .model
            .to_dtype(fedveil_model::compute_dtype(&device()))
            .map_err(train_error)?;
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
    /// Prompts and reference answers for exact match.
    generate: Vec<(Vec<u32>, String)>,
    tokenizer: Tokenizer,
    max_new_tokens: usize,
    initial: Vec<f32>,
    bundle: Option<Vec<u8>>,
    batch_size: usize,
    max_len: usize,
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
        }
        Ok(out)
    }

    fn evaluate_final(&mut self, params: &[f32]) -> Result<Evaluation, TrainError> {
        let mut out = self.evaluate(params)?;
        if !self.generate.is_empty() {
            // `evaluate` left the adapter set to `params`.
            let options = GenerateOptions {
                max_new_tokens: self.max_new_tokens,
                sampling: Sampling::Greedy,
                stop: self.full.config().eos_token_id.into_iter().collect(),
            };
            let mut hits = 0usize;
            for (prompt, reference) in &self.generate {
                let ids = generate(
                    &self.full,
                    Some(&self.adapter),
                    prompt,
                    &options,
                    &mut OsRng,
                )
                .map_err(train_error)?;
                let text = self.tokenizer.decode(&ids, true).map_err(train_error)?;
                hits += usize::from(gsm8k_exact_match(&text, reference));
            }
            let n = self.generate.len();
            tracing::info!(hits, of = n, "exact match");
            out.metrics
                .insert("exact_match".into(), hits as f64 / n as f64);
        }
        Ok(out)
    }

    fn client_bundle(&mut self) -> Result<Option<Vec<u8>>, TrainError> {
        Ok(self.bundle.take())
    }
}

/// What the server's side is built from.
struct ServerSide {
    loaded: Loaded,
    eval: Vec<Example>,
    eval_records: Vec<Record>,
    peft: PeftConfig,
    offsite: Option<(OffsiteSection, Layout)>,
}

/// The evaluator, distilling the emulator first when asked.
fn build_evaluator(
    bars: &MultiProgress,
    task: &LlmTask,
    side: ServerSide,
) -> Result<LlmEvaluator, FedError> {
    let ServerSide {
        loaded,
        eval,
        eval_records,
        peft,
        offsite,
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
    let adapter =
        Adapter::new(peft.clone(), &full, &mut rng).map_err(|e| config_error("task.peft", e))?;
    let initial = adapter.to_vec().map_err(|e| config_error("task.peft", e))?;
    let (emulator, bundle) = match offsite {
        None => (None, None),
        Some((section, layout)) => {
            let emulator =
                offsite::emulator(&full, &layout).map_err(|e| config_error("offsite", e))?;
            let emulator = distilled(bars, task, &section, &loaded, &layout, emulator, &eval)?;
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
    let generate = eval_records
        .iter()
        .take(task.exact_match)
        .map(|r| {
            let prompt = loaded
                .tokenizer
                .encode(task.template.prompt(r), true)
                .map_err(|e| config_error("task.exact_match", e))?;
            Ok((prompt.get_ids().to_vec(), r.output.clone()))
        })
        .collect::<Result<Vec<_>, FedError>>()?;
    Ok(LlmEvaluator {
        full,
        adapter,
        emulator,
        eval,
        generate,
        tokenizer: loaded.tokenizer.clone(),
        max_new_tokens: task.max_new_tokens,
        initial,
        bundle,
        batch_size: task.eval_batch_size,
        max_len: task.max_len,
    })
}

/// The emulator, distilled when `[offsite.distill]` asks for steps: once
/// per model, layout, settings and data, then read from the cache.
fn distilled(
    bars: &MultiProgress,
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
    let mut records = crate::datasets::load(data_path)
        .map_err(|e| config_error("offsite.distill.data", format!("{e:#}")))?;
    if section.distill.max_records > 0 {
        records.truncate(section.distill.max_records);
    }
    let config = DistillConfig {
        max_len: task.max_len,
        ..config
    };
    let mut key = Sha256::new();
    key.update(b"fedveil/offsite/distill/v1\0");
    for (name, digest) in
        offsite::weight_digests(&loaded.model).map_err(|e| config_error("offsite", e))?
    {
        key.update(name.as_bytes());
        key.update(digest);
    }
    key.update(serde_json::to_vec(layout).unwrap_or_default());
    key.update(serde_json::to_vec(&config).unwrap_or_default());
    key.update(format!("{:?}", task.template).as_bytes());
    for r in &records {
        key.update(serde_json::to_vec(r).unwrap_or_default());
    }
    let hex: String = key.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let cache = fedveil_model::fetch::cache_dir()
        .map_err(|e| config_error("offsite.distill", e))?
        .join("emulators");
    let path = cache.join(format!("{hex}.bundle"));
    if let Ok(bytes) = std::fs::read(&path) {
        match Bundle::from_bytes(&bytes, &device()) {
            Ok(b) if b.layout == *layout => {
                tracing::info!("the distilled emulator from {}", path.display());
                return b
                    .model
                    .to_dtype(emulator.dtype())
                    .map_err(|e| config_error("offsite.distill", e));
            }
            _ => tracing::warn!("ignoring an unreadable cached emulator {}", path.display()),
        }
    }
    let train = encode(
        &loaded.tokenizer,
        task.template,
        &records,
        eos_of(&loaded.model, &loaded.tokenizer),
        task.max_len,
    )
    .map_err(|e| config_error("offsite.distill.data", e))?;
    tracing::info!(
        steps = config.steps,
        records = train.len(),
        "distilling the emulator"
    );
    let started = std::time::Instant::now();
    let bar = crate::display::phase(bars, config.steps as u64, "distil");
    let (model, report) = offsite::distill(
        &loaded.model,
        &emulator,
        layout,
        offsite::DistillData {
            train: &train,
            held_out,
        },
        &config,
        &mut OsRng,
        &mut |step, loss| {
            bar.set_position(step as u64 + 1);
            bar.set_message(format!("emulator steps, loss {loss:.4}"));
            if step % 10 == 0 {
                tracing::info!(step, loss, "distillation");
            }
        },
    )
    .map_err(|e| config_error("offsite.distill", e))?;
    bar.finish_and_clear();
    tracing::info!(
        gap_before = report.gap_before,
        gap_after = report.gap_after,
        seconds = started.elapsed().as_secs_f64(),
        "distilled the emulator"
    );
    let bytes = Bundle {
        model: model.clone(),
        tokenizer: None,
        layout: layout.clone(),
        adapter: PeftConfig::Lora(LoraConfig::default()),
        source: loaded.source.clone(),
    }
    .to_bytes()
    .map_err(|e| config_error("offsite.distill", e))?;
    if let Err(e) = std::fs::create_dir_all(&cache)
        .and_then(|()| std::fs::write(path.with_extension("tmp"), &bytes))
        .and_then(|()| std::fs::rename(path.with_extension("tmp"), &path))
    {
        tracing::warn!("could not cache the distilled emulator: {e}");
    }
    Ok(model)
}

/// The adapter and layout for the server's plan.
fn plan_adapter(
    task: &LlmTask,
    offsite: Option<OffsiteSection>,
    model: &Llama,
) -> Result<(PeftConfig, Option<(OffsiteSection, Layout)>), FedError> {
    match offsite {
        None => Ok((task.peft(), None)),
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
            Ok((peft, Some((section, layout))))
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

/// `fedveil server`'s evaluator.
pub fn server_evaluator(
    bars: &MultiProgress,
    table: &toml::Table,
    offsite: Option<&toml::Table>,
    base: &Path,
) -> Result<Box<dyn Evaluator>, FedError> {
    let task = LlmTask::from_table(table, base)?;
    if task.data.is_some() || task.shard.is_some() {
        return Err(config_error(
            "task.data",
            "a server holds no client's data; give it eval_data only",
        ));
    }
    let offsite = offsite_of(offsite, base)?;
    let loaded = load_model(task.model.as_deref())?;
    let records = task.records("task.eval_data", task.eval_data.as_deref())?;
    let eval = held_out(&task, &loaded, &records)?;
    let (peft, offsite) = plan_adapter(&task, offsite, &loaded.model)?;
    Ok(Box::new(build_evaluator(
        bars,
        &task,
        ServerSide {
            loaded,
            eval,
            eval_records: records,
            peft,
            offsite,
        },
    )?))
}

/// `fedveil client`'s trainer: on its own model, or waiting for the
/// server's emulator when the config names no model.
pub fn client_trainer(table: &toml::Table, base: &Path) -> Result<Box<dyn Trainer>, FedError> {
    let task = LlmTask::from_table(table, base)?;
    let records = task.client_records()?;
    match &task.model {
        None => Ok(Box::new(LlmTrainer::waiting(&task, records)?)),
        Some(m) => {
            let loaded = load_model(Some(m))?;
            let peft = task.peft();
            Ok(Box::new(LlmTrainer::with_model(
                &task, records, &loaded, peft,
            )?))
        }
    }
}

/// `fedveil run`: the evaluator and the trainers of `clients` clients,
/// client `i` holding part `i` of the split data. The model is loaded
/// once and shared by everyone in the process.
pub fn local(
    bars: &MultiProgress,
    table: &toml::Table,
    offsite: Option<&toml::Table>,
    clients: u32,
    base: &Path,
) -> Result<(Box<dyn Evaluator>, fedveil_fed::local::TrainerFactory), FedError> {
    let task = LlmTask::from_table(table, base)?;
    if task.shard.is_some() || task.shards.is_some() {
        return Err(config_error(
            "task.shard",
            "'fedveil run' gives client i part i of the split; remove shard and shards",
        ));
    }
    let offsite = offsite_of(offsite, base)?;
    let loaded = load_model(task.model.as_deref())?;
    let mut records = task.records("task.data", task.data.as_deref())?;
    let eval_records = match &task.eval_data {
        Some(p) => task.records("task.eval_data", Some(p))?,
        None => {
            let held = ((records.len() as f64 * task.eval_fraction).round() as usize)
                .clamp(1, records.len().saturating_sub(clients as usize).max(1));
            if records.len() <= held {
                return Err(config_error(
                    "task.data",
                    "too few records to hold some out for evaluation; give eval_data",
                ));
            }
            records.split_off(records.len() - held)
        }
    };
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
    let eval = held_out(&task, &loaded, &eval_records)?;
    let (peft, offsite) = plan_adapter(&task, offsite, &loaded.model)?;
    let parts: Vec<Vec<Record>> = (0..clients as usize)
        .map(|i| split.records(&records, i).into_iter().cloned().collect())
        .collect();
    // Offsite-tuning clients get their model from the server's bundle.
    let client_model = offsite.is_none().then(|| loaded.clone());
    let shared = std::sync::Arc::new((task.clone(), parts, client_model, peft.clone()));
    let evaluator = build_evaluator(
        bars,
        &task,
        ServerSide {
            loaded,
            eval,
            eval_records,
            peft,
            offsite,
        },
    )?;
    let factory: fedveil_fed::local::TrainerFactory = Box::new(move |i| {
        let (task, parts, loaded, peft) = &*shared;
        let records = parts
            .get(i as usize)
            .cloned()
            .ok_or_else(|| FedError::Internal(format!("no data for client {i}")))?;
        let t = match loaded {
            None => LlmTrainer::waiting(task, records)?,
            Some(loaded) => LlmTrainer::with_model(task, records, loaded, peft.clone())?,
        };
        Ok(Box::new(t) as Box<dyn Trainer>)
    });
    Ok((Box::new(evaluator), factory))
}
