//! Offsite-tuning (Xiao, Lin and Han 2023), as FederatedScope-LLM
//! integrates it, with the emulator distillation FS-LLM left out.
//!
//! The model owner splits its model: the bottom `l` and top `r` decoder
//! layers are the *adapter*, which clients tune; the middle layers are
//! replaced by an *emulator*, a uniform layer-drop of them (FS-LLM's stride
//! rule, [`layer_drop`]), optionally distilled to imitate the layers it
//! replaces ([`distill`]). A client receives a [`Bundle`]: the embeddings,
//! the final norm and output projection, the adapter layers and the
//! emulator, never a dropped middle layer. The adapter it trains addresses
//! layers by their ids in the full model, so the owner plugs the aggregated
//! adapter straight back into the full model ("plug-in").

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::config::LlamaConfig;
use crate::load::{weights_from_map, weights_to_map};
use crate::model::{Layer, Linear, Llama, Mode, Weights};
use crate::peft::{Adapter, FullConfig, LoraConfig, PeftConfig};
use crate::train::{Batch, Example, OptimConfig, Optimizer, batch_nll, batches_by_length};
use crate::{ModelError, Result};

/// How the model is split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffsiteConfig {
    /// Adapter layers at the bottom (`l`).
    pub adapter_bottom: usize,
    /// Adapter layers at the top (`r`).
    pub adapter_top: usize,
    /// The share of the middle layers the emulator drops.
    pub drop_ratio: f64,
}

/// Which layers of the full model go where, by id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Layers in the full model.
    pub total_layers: usize,
    /// The adapter's bottom layers, `0..l`.
    pub bottom: Vec<usize>,
    /// The middle layers the emulator keeps.
    pub kept: Vec<usize>,
    /// The adapter's top layers, `L − r..L`.
    pub top: Vec<usize>,
}

/// Python's `round` (half to even), which FS-LLM's layer count uses.
fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    };
    r.max(0.0) as usize
}

/// FS-LLM's uniform layer-drop of `n` layers: keep
/// `k = round(n · (1 − drop_ratio))` of them (at least one), at indices
/// `⌊i · (n − 1)/(k − 1)⌋`.
pub fn layer_drop(n: usize, drop_ratio: f64) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let k = round_half_even(n as f64 * (1.0 - drop_ratio)).clamp(1, n);
    if k == 1 {
        return vec![0];
    }
    let stride = (n - 1) as f64 / (k - 1) as f64;
    (0..k).map(|i| (i as f64 * stride) as usize).collect()
}

impl Layout {
    /// The split of a model of `total_layers` layers.
    pub fn new(total_layers: usize, c: &OffsiteConfig) -> Result<Layout> {
        if !(c.drop_ratio.is_finite() && (0.0..1.0).contains(&c.drop_ratio)) {
            return Err(ModelError::Config(format!(
                "drop_ratio must be in [0, 1), got {}",
                c.drop_ratio
            )));
        }
        if c.adapter_bottom + c.adapter_top == 0 {
            return Err(ModelError::Config(
                "the adapter needs at least one layer (adapter_bottom + adapter_top ≥ 1)".into(),
            ));
        }
        if c.adapter_bottom + c.adapter_top >= total_layers {
            return Err(ModelError::Config(format!(
                "adapter_bottom {} + adapter_top {} leave none of the model's {total_layers} \
                 layers for the emulator",
                c.adapter_bottom, c.adapter_top
            )));
        }
        let middle = c.adapter_bottom..total_layers - c.adapter_top;
        let kept = layer_drop(middle.len(), c.drop_ratio)
            .into_iter()
            .map(|i| middle.start + i)
            .collect();
        Ok(Layout {
            total_layers,
            bottom: (0..c.adapter_bottom).collect(),
            kept,
            top: (middle.end..total_layers).collect(),
        })
    }

    /// The adapter's layer ids, bottom then top.
    pub fn adapter_layers(&self) -> Vec<usize> {
        self.bottom.iter().chain(&self.top).copied().collect()
    }

    /// The emulator model's layer ids: bottom, kept, top.
    pub fn emulator_layers(&self) -> Vec<usize> {
        self.bottom
            .iter()
            .chain(&self.kept)
            .chain(&self.top)
            .copied()
            .collect()
    }

    /// The middle layers the emulator drops.
    pub fn dropped(&self) -> Vec<usize> {
        let start = self.bottom.len();
        let end = self.total_layers - self.top.len();
        (start..end).filter(|i| !self.kept.contains(i)).collect()
    }

    /// Checks the layout against the model it describes.
    fn check(&self, model_layers: usize) -> Result<()> {
        let ids = self.emulator_layers();
        let sane = self.total_layers == model_layers
            && ids.windows(2).all(|w| w[0] < w[1])
            && ids.last().is_some_and(|&i| i < self.total_layers)
            && !self.kept.is_empty();
        if !sane {
            return Err(ModelError::Config(format!(
                "an offsite layout for {} layers does not fit a model of {model_layers}",
                self.total_layers
            )));
        }
        Ok(())
    }
}

/// How the adapter layers are tuned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "tuning", rename_all = "snake_case")]
pub enum Tuning {
    /// Every weight of the adapter layers (offsite-tuning's default).
    #[default]
    Full,
    /// LoRA on the adapter layers only.
    Lora(LoraConfig),
}

/// The adapter a federation trains for `layout`: full tuning of the
/// adapter layers (with the final norm and the embeddings when asked), or
/// LoRA restricted to them.
pub fn adapter_config(
    layout: &Layout,
    tuning: &Tuning,
    train_norm: bool,
    train_embeddings: bool,
) -> Result<PeftConfig> {
    match tuning {
        Tuning::Full => Ok(PeftConfig::Full(FullConfig {
            layers: layout.adapter_layers(),
            norm: train_norm,
            embeddings: train_embeddings,
        })),
        Tuning::Lora(lora) => {
            if train_norm || train_embeddings {
                return Err(ModelError::Config(
                    "training the norm or the embeddings needs full tuning, not LoRA".into(),
                ));
            }
            Ok(PeftConfig::Lora(LoraConfig {
                layers_to_transform: Some(layout.adapter_layers()),
                ..lora.clone()
            }))
        }
    }
}

/// The emulator of `full` under `layout`: its bottom, kept and top layers,
/// the embeddings, final norm and output projection. The tensors are
/// shared with `full`, not copied.
pub fn emulator(full: &Llama, layout: &Layout) -> Result<Llama> {
    if full.layer_ids().len() != layout.total_layers
        || full.layer_ids().iter().enumerate().any(|(i, &id)| i != id)
    {
        return Err(ModelError::Config(
            "an emulator is cut from a whole model".into(),
        ));
    }
    layout.check(full.layer_ids().len())?;
    let ids = layout.emulator_layers();
    let w = full.weights();
    let weights = Weights {
        embed: w.embed.clone(),
        layers: ids.iter().map(|&i| w.layers[i].clone()).collect(),
        norm: w.norm.clone(),
        lm_head: w.lm_head.clone(),
    };
    let config = LlamaConfig {
        num_hidden_layers: ids.len(),
        // The kept layers' own attention (Gemma's sliding and full layers).
        layer_types: full
            .config()
            .layer_types
            .as_ref()
            .map(|t| ids.iter().map(|&i| t[i]).collect()),
        ..full.config().clone()
    };
    Llama::with_layer_ids(config, weights, ids)
}

/// A copy of `model` with the trained weights of a full-tuning `adapter`
/// in place of its own (detached from the adapter, in the model's dtype):
/// a distilled emulator, or a full model with a federation's adapter
/// plugged in for good.
pub fn bake(model: &Llama, adapter: &Adapter) -> Result<Llama> {
    let dtype = model.dtype();
    let fixed = |t: &Tensor| -> Result<Tensor> { Ok(t.detach().to_dtype(dtype)?.copy()?) };
    let linear = |l: &Linear| -> Result<Linear> {
        Ok(Linear::new(
            fixed(&l.weight.dense()?)?,
            l.bias.as_ref().map(fixed).transpose()?,
        ))
    };
    let w = model.weights();
    let mut layers = Vec::with_capacity(w.layers.len());
    for (&id, base) in model.layer_ids().iter().zip(&w.layers) {
        layers.push(match adapter.layer(id) {
            Some(l) => Layer {
                input_norm: fixed(&l.input_norm)?,
                qk_norm: match &l.qk_norm {
                    Some((q, k)) => Some((fixed(q)?, fixed(k)?)),
                    None => None,
                },
                q: linear(&l.q)?,
                k: linear(&l.k)?,
                v: linear(&l.v)?,
                o: linear(&l.o)?,
                post_norm: fixed(&l.post_norm)?,
                sandwich_norms: match &l.sandwich_norms {
                    Some((a, m)) => Some((fixed(a)?, fixed(m)?)),
                    None => None,
                },
                gate: linear(&l.gate)?,
                up: linear(&l.up)?,
                down: linear(&l.down)?,
            },
            None => base.clone(),
        });
    }
    let embed = match adapter.embeddings() {
        Some(e) => fixed(e)?.into(),
        None => w.embed.clone(),
    };
    let lm_head = match (&w.lm_head, adapter.output()) {
        (Some(_), Some(head)) => Some(fixed(head)?.into()),
        (head, _) => head.clone(),
    };
    let weights = Weights {
        embed,
        layers,
        norm: match adapter.final_norm() {
            Some(n) => fixed(n)?,
            None => w.norm.clone(),
        },
        lm_head,
    };
    Llama::with_layer_ids(model.config().clone(), weights, model.layer_ids().to_vec())
}

// ------------------------------------------------------------ distillation

/// `[offsite.distill]`: aligning the emulator with the layers it replaces
/// on data the model owner holds, with loss `kd_weight · KD + lm_weight ·
/// LM`. KD is the mean over tokens of `mean(((teacher − student) /
/// rms(teacher))²)` between the hidden states after the original middle
/// layers (teacher) and after the emulator's (student), both fed the
/// original bottom layers' output; LM is the language-modelling loss of the
/// emulator model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// Optimiser steps (0: no distillation).
    #[serde(default)]
    pub steps: usize,
    #[serde(default = "defaults::kd_weight")]
    pub kd_weight: f64,
    #[serde(default = "defaults::lm_weight")]
    pub lm_weight: f64,
    #[serde(default = "defaults::learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[serde(default = "defaults::max_len")]
    pub max_len: usize,
}

mod defaults {
    // FS-LLM's emulator alignment weights.
    pub fn kd_weight() -> f64 {
        0.9
    }
    pub fn lm_weight() -> f64 {
        0.1
    }
    pub fn learning_rate() -> f64 {
        1e-4
    }
    pub fn batch_size() -> usize {
        4
    }
    pub fn max_len() -> usize {
        256
    }
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            steps: 0,
            kd_weight: defaults::kd_weight(),
            lm_weight: defaults::lm_weight(),
            learning_rate: defaults::learning_rate(),
            batch_size: defaults::batch_size(),
            max_len: defaults::max_len(),
        }
    }
}

impl DistillConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(ModelError::Config(why));
        for (name, w) in [("kd_weight", self.kd_weight), ("lm_weight", self.lm_weight)] {
            if !(w.is_finite() && w >= 0.0) {
                return bad(format!("distill.{name} must be non-negative, got {w}"));
            }
        }
        if self.steps > 0 && self.kd_weight == 0.0 && self.lm_weight == 0.0 {
            return bad("distill.kd_weight and distill.lm_weight are both 0".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "distill.learning_rate must be positive, got {}",
                self.learning_rate
            ));
        }
        if self.batch_size == 0 || self.max_len < 2 {
            return bad("distill.batch_size must be positive and max_len at least 2".into());
        }
        Ok(())
    }
}

/// What a distillation did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillReport {
    pub steps: usize,
    /// The held-out KD gap (mean normalised squared error of the hidden
    /// states) before and after.
    pub gap_before: f64,
    pub gap_after: f64,
    /// The training loss of each step.
    pub losses: Vec<f64>,
}

/// The teacher's hidden states after the middle layers and the bottom
/// layers' output that both sides start from, for a batch.
fn teacher(full: &Llama, layout: &Layout, ids: &Tensor) -> Result<(Tensor, Tensor)> {
    let l = layout.bottom.len();
    let end = layout.total_layers - layout.top.len();
    let x = full.embed(ids, None)?;
    let below = full.run_layers(&x, 0..l, None, Mode::Eval)?.detach();
    let target = full.run_layers(&below, l..end, None, Mode::Eval)?.detach();
    Ok((below, target))
}

/// The KD term for a batch: the mean over real tokens of the mean over the
/// hidden dimension of `((teacher − student)/rms(teacher))²`, and the
/// number of tokens.
fn kd_loss(target: &Tensor, student: &Tensor, valid: &Tensor) -> Result<(Tensor, f64)> {
    let t = target.to_dtype(DType::F32)?;
    let s = student.to_dtype(DType::F32)?;
    let rms = (t.sqr()?.mean_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    let per_token = (t - s)?.broadcast_div(&rms)?.sqr()?.mean(D::Minus1)?;
    let count = f64::from(valid.sum_all()?.to_scalar::<f32>()?);
    let total = (per_token * valid)?.sum_all()?;
    Ok(((total / count.max(1.0))?, count))
}

/// The held-out gap between the emulator's middle and the full model's:
/// the KD term over `examples` (mean per real token).
pub fn hidden_gap(
    full: &Llama,
    emulator: &Llama,
    layout: &Layout,
    examples: &[Example],
    batch_size: usize,
    max_len: usize,
) -> Result<f64> {
    let (l, k) = (layout.bottom.len(), layout.kept.len());
    let mut sum = 0.0;
    let mut count = 0.0;
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = Batch::new(&refs, max_len, 0, full.device())?;
        let (below, target) = teacher(full, layout, batch.ids())?;
        let student = emulator.run_layers(&below, l..l + k, None, Mode::Eval)?;
        let (loss, n) = kd_loss(&target, &student, batch.valid())?;
        sum += f64::from(loss.to_scalar::<f32>()?) * n;
        count += n;
    }
    if count == 0.0 {
        return Err(ModelError::Input("no tokens to measure the gap on".into()));
    }
    Ok(sum / count)
}

/// The data a distillation uses: it trains on `train` and measures the
/// gap on `held_out`.
#[derive(Clone, Copy, Debug)]
pub struct DistillData<'a> {
    pub train: &'a [Example],
    pub held_out: &'a [Example],
}

/// Distils `emulator`'s kept middle layers towards `full`'s middle, and
/// returns the distilled emulator; the gap is measured before and after.
/// `progress` hears each step's loss.
pub fn distill(
    full: &Llama,
    emulator: &Llama,
    layout: &Layout,
    data: DistillData,
    config: &DistillConfig,
    rng: &mut dyn RngCore,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<(Llama, DistillReport)> {
    config.validate()?;
    let DistillData { train, held_out } = data;
    layout.check(full.config().num_hidden_layers)?;
    let usable: Vec<Example> = train
        .iter()
        .filter(|e| e.targets(config.max_len) > 0)
        .cloned()
        .collect();
    if usable.is_empty() {
        return Err(ModelError::Input(
            "no distillation example has a token to predict".into(),
        ));
    }
    let gap = |model: &Llama| {
        hidden_gap(
            full,
            model,
            layout,
            held_out,
            config.batch_size,
            config.max_len,
        )
    };
    let gap_before = gap(emulator)?;
    let (l, k, r) = (layout.bottom.len(), layout.kept.len(), layout.top.len());
    let student_layers = PeftConfig::Full(FullConfig {
        layers: layout.kept.clone(),
        norm: false,
        embeddings: false,
    });
    let adapter = Adapter::new(student_layers, emulator, rng)?;
    let mut optimizer = Optimizer::new(
        &adapter,
        OptimConfig {
            learning_rate: config.learning_rate,
            total_steps: config.steps,
            warmup_steps: (config.steps / 10).min(100),
            min_lr_ratio: 0.1,
            max_grad_norm: Some(1.0),
            ..OptimConfig::default()
        },
    )?;
    let mut queue: Vec<Vec<usize>> = Vec::new();
    let mut losses = Vec::with_capacity(config.steps);
    for step in 0..config.steps {
        if queue.is_empty() {
            queue = batches_by_length(&usable, config.batch_size, rng);
        }
        let Some(indices) = queue.pop() else {
            break;
        };
        let refs: Vec<&Example> = indices.iter().map(|&i| &usable[i]).collect();
        let batch = Batch::new(&refs, config.max_len, 0, full.device())?;
        let (below, target) = teacher(full, layout, batch.ids())?;
        let student = emulator.run_layers(&below, l..l + k, Some(&adapter), Mode::Eval)?;
        let mut loss = Tensor::zeros((), DType::F32, full.device())?;
        if config.kd_weight > 0.0 {
            let (kd, _) = kd_loss(&target, &student, batch.valid())?;
            loss = (loss + (kd * config.kd_weight)?)?;
        }
        if config.lm_weight > 0.0 && batch.tokens() > 0 {
            let top = emulator.run_layers(&student, l + k..l + k + r, None, Mode::Eval)?;
            let logits = emulator.head(&top, None)?;
            let lm = (batch_nll(&logits, &batch, 0)? / batch.tokens() as f64)?;
            loss = (loss + (lm * config.lm_weight)?)?;
        }
        let value = f64::from(loss.to_scalar::<f32>()?);
        if !value.is_finite() {
            return Err(ModelError::Numerical(format!(
                "the distillation loss is {value} at step {step}"
            )));
        }
        let grads = loss.backward()?;
        optimizer.step(&adapter, &grads)?;
        losses.push(value);
        progress(step, value);
    }
    let distilled = bake(emulator, &adapter)?;
    let gap_after = gap(&distilled)?;
    Ok((
        distilled,
        DistillReport {
            steps: losses.len(),
            gap_before,
            gap_after,
            losses,
        },
    ))
}

/// [`distill`], once per teacher, layout, settings and training data: the
/// result is kept in the directory `cache` under a SHA-256 of all four
/// (the weights' digests, the layout, `config` and the encoded `train`
/// examples) and read from there on later calls, so a server that restarts
/// does not distil again. The report is `None` when the emulator came from
/// the cache. A cache entry that does not read back, or holds another
/// layout, is distilled afresh and replaced; failing to write the cache
/// only warns.
#[allow(clippy::too_many_arguments)]
pub fn distill_cached(
    cache: &std::path::Path,
    full: &Llama,
    emulator: &Llama,
    layout: &Layout,
    data: DistillData,
    config: &DistillConfig,
    source: &str,
    rng: &mut dyn RngCore,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<(Llama, Option<DistillReport>)> {
    let mut key = Sha256::new();
    key.update(b"fedveil/offsite/distill/v2\0");
    for (name, digest) in weight_digests(full)? {
        key.update(name.as_bytes());
        key.update(digest);
    }
    let json = |e: serde_json::Error| ModelError::Input(format!("the distillation key: {e}"));
    key.update(serde_json::to_vec(layout).map_err(json)?);
    key.update(serde_json::to_vec(config).map_err(json)?);
    for e in data.train {
        key.update((e.prompt_len as u64).to_le_bytes());
        key.update((e.ids.len() as u64).to_le_bytes());
        for id in &e.ids {
            key.update(id.to_le_bytes());
        }
    }
    let path = cache.join(format!("{}.bundle", hex::encode(key.finalize())));
    if let Ok(bytes) = std::fs::read(&path) {
        match Bundle::from_bytes(&bytes, full.device()) {
            Ok(b) if b.layout == *layout => {
                let model = b.model.to_dtype(emulator.dtype())?;
                return Ok((model, None));
            }
            _ => tracing::warn!("ignoring an unreadable cached emulator {}", path.display()),
        }
    }
    let (model, report) = distill(full, emulator, layout, data, config, rng, progress)?;
    let bytes = Bundle {
        model: model.clone(),
        tokenizer: None,
        layout: layout.clone(),
        adapter: PeftConfig::Lora(LoraConfig::default()),
        source: source.to_string(),
    }
    .to_bytes()?;
    if let Err(e) = std::fs::create_dir_all(cache)
        .map_err(|e| ModelError::file(cache, e))
        .and_then(|()| crate::files::write_atomically(&path, &bytes))
    {
        tracing::warn!("could not cache the distilled emulator: {e}");
    }
    Ok((model, Some(report)))
}

// ------------------------------------------------------------ the bundle

/// What a client receives once: the emulator model (with the adapter
/// layers' base weights), its tokenizer, the layout and the adapter the
/// federation trains.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub model: Llama,
    pub tokenizer: Option<Tokenizer>,
    pub layout: Layout,
    pub adapter: PeftConfig,
    /// Where the full model came from (for messages).
    pub source: String,
}

const META_KIND: &str = "fedveil.kind";
const KIND: &str = "offsite-bundle/1";

/// The largest bundle header accepted (safetensors' own limit is 100 MB).
const MAX_HEADER: usize = 100 << 20;

impl Bundle {
    /// The bundle as one safetensors file: the emulator's tensors in f32
    /// under Hugging Face names (layers numbered by position), the rest in
    /// the header's metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut meta: HashMap<String, String> = HashMap::new();
        meta.insert("format".into(), "pt".into());
        meta.insert(META_KIND.into(), KIND.into());
        meta.insert(
            "fedveil.config".into(),
            json("config", self.model.config())?,
        );
        meta.insert("fedveil.layout".into(), json("layout", &self.layout)?);
        meta.insert("fedveil.adapter".into(), json("adapter", &self.adapter)?);
        meta.insert("fedveil.source".into(), self.source.clone());
        if let Some(t) = &self.tokenizer {
            let text = t
                .to_string(false)
                .map_err(|e| ModelError::Config(format!("cannot encode the tokenizer: {e}")))?;
            meta.insert("fedveil.tokenizer".into(), text);
        }
        let tensors: Vec<(String, Tensor)> = weights_to_map(self.model.weights())
            .into_iter()
            .map(|(n, w)| {
                Ok((
                    n,
                    w.dense()?
                        .to_dtype(DType::F32)?
                        .to_device(&Device::Cpu)?
                        .contiguous()?,
                ))
            })
            .collect::<Result<_>>()?;
        safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
            .map_err(|e| ModelError::Config(format!("cannot write the bundle: {e}")))
    }

    /// Reads a bundle onto `device`, checking every tensor against the
    /// configuration and the layout; nothing else may be in it.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Bundle> {
        let bad = |why: String| ModelError::Input(format!("the offsite bundle: {why}"));
        let (header, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        if header > MAX_HEADER {
            return Err(bad(format!("a {header}-byte header")));
        }
        let meta = meta
            .metadata()
            .clone()
            .ok_or_else(|| bad("no metadata".into()))?;
        if meta.get(META_KIND).map(String::as_str) != Some(KIND) {
            return Err(bad(format!("its kind is not {KIND}")));
        }
        let field = |key: &str| -> Result<&String> {
            meta.get(key)
                .ok_or_else(|| bad(format!("no {key} in the metadata")))
        };
        let config: LlamaConfig = serde_json::from_str(field("fedveil.config")?)
            .map_err(|e| bad(format!("fedveil.config: {e}")))?;
        let layout: Layout = serde_json::from_str(field("fedveil.layout")?)
            .map_err(|e| bad(format!("fedveil.layout: {e}")))?;
        let adapter: PeftConfig = serde_json::from_str(field("fedveil.adapter")?)
            .map_err(|e| bad(format!("fedveil.adapter: {e}")))?;
        config.validate()?;
        layout.check(layout.total_layers)?;
        let ids = layout.emulator_layers();
        if ids.len() != config.num_hidden_layers {
            return Err(bad(format!(
                "the layout has {} layers, the config {}",
                ids.len(),
                config.num_hidden_layers
            )));
        }
        let tokenizer = match meta.get("fedveil.tokenizer") {
            Some(text) => Some(
                text.parse::<Tokenizer>()
                    .map_err(|e| bad(format!("the tokenizer: {e}")))?,
            ),
            None => None,
        };
        let mut tensors =
            candle_core::safetensors::load_buffer(bytes, device).map_err(|e| bad(e.to_string()))?;
        let weights = weights_from_map(&config, &mut tensors, ids.len()).map_err(bad)?;
        if let Some(extra) = tensors.keys().min() {
            return Err(bad(format!("an unexpected tensor {extra}")));
        }
        let model = Llama::with_layer_ids(config, weights, ids)?;
        Ok(Bundle {
            model,
            tokenizer,
            layout,
            adapter,
            source: meta.get("fedveil.source").cloned().unwrap_or_default(),
        })
    }
}

/// SHA-256 of each tensor's little-endian f32 bytes in a bundle, by name:
/// what a client received, for comparing against [`weight_digests`].
pub fn bundle_digests(bytes: &[u8]) -> Result<Vec<(String, [u8; 32])>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::Input(format!("the offsite bundle: {e}")))?;
    let mut out: Vec<(String, [u8; 32])> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, Sha256::digest(view.data()).into()))
        .collect();
    out.sort();
    Ok(out)
}

/// SHA-256 of each of `model`'s tensors as little-endian f32 bytes, under
/// Hugging Face names with the layers' ids (their indices in the full
/// model).
pub fn weight_digests(model: &Llama) -> Result<Vec<(String, [u8; 32])>> {
    let ids = model.layer_ids();
    let mut out = Vec::new();
    for (name, w) in weights_to_map(model.weights()) {
        let t = w.dense()?;
        let name = match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (pos, tail) = rest.split_once('.').unwrap_or((rest, ""));
                let id = pos
                    .parse::<usize>()
                    .ok()
                    .and_then(|p| ids.get(p))
                    .copied()
                    .unwrap_or(usize::MAX);
                format!("model.layers.{id}.{tail}")
            }
            None => name,
        };
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut h = Sha256::new();
        for v in values {
            h.update(v.to_le_bytes());
        }
        out.push((name, h.finalize().into()));
    }
    Ok(out)
}

/// A metadata value of the bundle.
fn json<T: Serialize>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v)
        .map_err(|e| ModelError::Config(format!("cannot encode the bundle's {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_drop_follows_fs_llm() {
        // FS-LLM: round(len·(1−ratio)) layers at int(i·(len−1)/(k−1)).
        assert_eq!(
            layer_drop(26, 0.5),
            vec![0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 25]
        );
        assert_eq!(layer_drop(10, 0.0), (0..10).collect::<Vec<_>>());
        assert_eq!(layer_drop(5, 0.5), vec![0, 4]); // round(2.5) = 2
        assert_eq!(layer_drop(7, 0.5), vec![0, 2, 4, 6]); // round(3.5) = 4
        assert_eq!(layer_drop(4, 0.9), vec![0]);
        assert_eq!(layer_drop(3, 0.4), vec![0, 2]); // round(1.8) = 2
    }

    #[test]
    fn layouts_partition_the_layers() {
        let c = OffsiteConfig {
            adapter_bottom: 2,
            adapter_top: 2,
            drop_ratio: 0.5,
        };
        let l = Layout::new(30, &c).unwrap();
        assert_eq!(l.bottom, vec![0, 1]);
        assert_eq!(l.top, vec![28, 29]);
        assert_eq!(l.kept.len(), 13);
        assert_eq!(l.kept.len() + l.dropped().len(), 26);
        assert_eq!(l.emulator_layers().len(), 17);
        assert!(Layout::new(4, &c).is_err());
        let e = Layout::new(
            30,
            &OffsiteConfig {
                drop_ratio: 1.0,
                ..c.clone()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("drop_ratio"), "{e}");
    }
}
