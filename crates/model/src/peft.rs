//! Parameter-efficient fine-tuning: LoRA, prefix-tuning, prompt-tuning and
//! P-tuning.
//!
//! An [`Adapter`] is an ordered set of named f32 variables, the only
//! trainable parameters; the base model stays frozen and shared. It
//! flattens to one `f32` vector (the order is fixed by the method and the
//! model's shape, so every client of a federation agrees on it) and back,
//! and that vector is what a federation aggregates.
//!
//! The names follow Hugging Face PEFT: LoRA's are exactly the keys PEFT
//! saves (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`),
//! so a LoRA adapter exports to and imports from PEFT's format
//! ([`crate::interop`]).

use candle_core::{DType, Tensor, Var};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use crate::model::{Layer, Linear, Llama, Module};
use crate::{ModelError, Result, random};

/// Which method, and its hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum PeftConfig {
    Lora(LoraConfig),
    Prefix(PrefixConfig),
    Prompt(PromptConfig),
    PTuning(PTuningConfig),
    Full(FullConfig),
}

/// LoRA (Hu et al. 2021): `W x + (α/r) B A dropout(x)` on the target
/// projections, `A` `(r, in)` drawn like PyTorch's default (Kaiming uniform,
/// `a = √5`), `B` `(out, r)` zero.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default = "defaults::lora_r")]
    pub r: usize,
    #[serde(default = "defaults::lora_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f32,
    /// Hugging Face module names: `q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj`.
    #[serde(default = "defaults::lora_targets")]
    pub target_modules: Vec<String>,
    /// Only the layers with these ids (PEFT's `layers_to_transform`);
    /// every layer when absent.
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
}

/// Prefix-tuning (Li and Liang 2021): learned keys and values that every
/// layer's attention sees before the sequence. With `projection`, the
/// prefixes come from a two-layer tanh MLP of that hidden width over a
/// smaller embedding (the reparameterisation the paper trains with).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixConfig {
    #[serde(default = "defaults::virtual_tokens")]
    pub num_virtual_tokens: usize,
    #[serde(default)]
    pub projection: Option<usize>,
}

/// Prompt-tuning (Lester et al. 2021): soft prompt embeddings before the
/// input, initialised from randomly chosen vocabulary embeddings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    #[serde(default = "defaults::virtual_tokens")]
    pub num_virtual_tokens: usize,
}

/// P-tuning (Liu et al. 2021): a soft prompt produced by a prompt encoder,
/// an MLP (`hidden → encoder_hidden_size → encoder_hidden_size → hidden`
/// with ReLUs) over learned embeddings, as PEFT's `PromptEncoder`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PTuningConfig {
    #[serde(default = "defaults::virtual_tokens")]
    pub num_virtual_tokens: usize,
    #[serde(default = "defaults::encoder_hidden")]
    pub encoder_hidden_size: usize,
}

/// Full tuning of whole layers (offsite-tuning's adapter): every weight
/// of the layers with these ids becomes trainable, initialised from the
/// model's; optionally the final norm and the embeddings (with the output
/// projection) too. Not a PEFT method: saved with fedveil's own
/// configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullConfig {
    pub layers: Vec<usize>,
    /// Train the final RMSNorm's weight.
    #[serde(default)]
    pub norm: bool,
    /// Train the token embeddings and the output projection (one matrix
    /// when they are tied).
    #[serde(default)]
    pub embeddings: bool,
}

mod defaults {
    pub fn lora_r() -> usize {
        8
    }
    pub fn lora_alpha() -> f64 {
        16.0
    }
    pub fn lora_targets() -> Vec<String> {
        vec!["q_proj".into(), "v_proj".into()]
    }
    pub fn virtual_tokens() -> usize {
        20
    }
    pub fn encoder_hidden() -> usize {
        128
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: defaults::lora_r(),
            alpha: defaults::lora_alpha(),
            dropout: 0.0,
            target_modules: defaults::lora_targets(),
            layers_to_transform: None,
        }
    }
}

impl PeftConfig {
    /// `lora`, `prefix`, `prompt` or `p_tuning`.
    pub fn method(&self) -> &'static str {
        match self {
            PeftConfig::Lora(_) => "lora",
            PeftConfig::Prefix(_) => "prefix",
            PeftConfig::Prompt(_) => "prompt",
            PeftConfig::PTuning(_) => "p_tuning",
            PeftConfig::Full(_) => "full",
        }
    }

    /// Checks the hyper-parameters; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(ModelError::Config(why));
        match self {
            PeftConfig::Lora(c) => {
                if c.r == 0 || c.r > 4096 {
                    return bad(format!("lora r must be in 1..=4096, got {}", c.r));
                }
                if !(c.alpha.is_finite() && c.alpha > 0.0) {
                    return bad(format!("lora alpha must be positive, got {}", c.alpha));
                }
                if !(c.dropout.is_finite() && (0.0..1.0).contains(&c.dropout)) {
                    return bad(format!("lora dropout must be in [0, 1), got {}", c.dropout));
                }
                if c.target_modules.is_empty() {
                    return bad("lora target_modules is empty".into());
                }
                lora_targets(&c.target_modules)?;
                if let Some(layers) = &c.layers_to_transform {
                    layer_list("lora layers_to_transform", layers)?;
                }
            }
            PeftConfig::Prefix(c) => {
                virtual_tokens(c.num_virtual_tokens)?;
                if c.projection == Some(0) {
                    return bad("prefix projection width must be positive".into());
                }
            }
            PeftConfig::Prompt(c) => virtual_tokens(c.num_virtual_tokens)?,
            PeftConfig::PTuning(c) => {
                virtual_tokens(c.num_virtual_tokens)?;
                if c.encoder_hidden_size == 0 {
                    return bad("p_tuning encoder_hidden_size must be positive".into());
                }
            }
            PeftConfig::Full(c) => {
                if c.layers.is_empty() && !c.norm && !c.embeddings {
                    return bad("full tuning of nothing: no layers, norm or embeddings".into());
                }
                if !c.layers.is_empty() {
                    layer_list("full layers", &c.layers)?;
                }
            }
        }
        Ok(())
    }
}

/// A non-empty list of distinct layer ids.
fn layer_list(what: &str, layers: &[usize]) -> Result<()> {
    if layers.is_empty() {
        return Err(ModelError::Config(format!("{what} is empty")));
    }
    let mut sorted = layers.to_vec();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(ModelError::Config(format!(
            "{what} {layers:?} names a layer twice"
        )));
    }
    Ok(())
}

/// Each id of `layers` must be one of the model's.
fn check_layers_exist(what: &str, layers: &[usize], model: &Llama) -> Result<()> {
    for &id in layers {
        if model.layer_position(id).is_none() {
            return Err(ModelError::Config(format!(
                "{what} names layer {id}, which this model does not have (its layers: {:?})",
                model.layer_ids()
            )));
        }
    }
    Ok(())
}

fn virtual_tokens(n: usize) -> Result<()> {
    if n == 0 || n > 4096 {
        return Err(ModelError::Config(format!(
            "num_virtual_tokens must be in 1..=4096, got {n}"
        )));
    }
    Ok(())
}

/// The modules named, in the canonical order. `all-linear` means all seven.
pub(crate) fn lora_targets(names: &[String]) -> Result<Vec<Module>> {
    if names.len() == 1 && names[0] == "all-linear" {
        return Ok(Module::ALL.to_vec());
    }
    let mut modules = Vec::new();
    for name in names {
        let module = Module::from_name(name).ok_or_else(|| {
            ModelError::Config(format!(
                "unknown LoRA target module {name:?}; expected one of q_proj, k_proj, \
                 v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear"
            ))
        })?;
        if !modules.contains(&module) {
            modules.push(module);
        }
    }
    modules.sort();
    Ok(modules)
}

/// One LoRA pair on one projection.
#[derive(Clone, Debug)]
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
    scale: f64,
    dropout: f32,
}

impl LoraPair {
    /// `(α/r) · dropout(x) Aᵀ Bᵀ` for `x` `(n, in)`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        dtype: DType,
        rng: Option<&mut dyn RngCore>,
    ) -> Result<Tensor> {
        let x = self.apply_dropout(x, dtype, rng)?;
        // The scale applies to A (r × in), not to the (n, out) product.
        let a = (self.a.as_tensor() * self.scale)?.to_dtype(dtype)?;
        let b = self.b.as_tensor().to_dtype(dtype)?;
        Ok(x.matmul(&a.t()?)?.matmul(&b.t()?)?)
    }

    /// [`LoraPair::forward`] with `A` and `B` as constants (no gradient
    /// reaches them; crate::per_example computes theirs from the branch's
    /// input and output gradient). Returns the branch and its input after
    /// dropout.
    pub(crate) fn forward_traced(
        &self,
        x: &Tensor,
        dtype: DType,
        rng: Option<&mut dyn RngCore>,
    ) -> Result<(Tensor, Tensor)> {
        let x = self.apply_dropout(x, dtype, rng)?;
        let a = (self.a.as_tensor().detach() * self.scale)?.to_dtype(dtype)?;
        let b = self.b.as_tensor().detach().to_dtype(dtype)?;
        let branch = x.matmul(&a.t()?)?.matmul(&b.t()?)?;
        Ok((branch, x))
    }

    /// `x` with LoRA's dropout applied when training (`rng` given).
    fn apply_dropout(
        &self,
        x: &Tensor,
        dtype: DType,
        rng: Option<&mut dyn RngCore>,
    ) -> Result<Tensor> {
        Ok(match rng {
            Some(rng) if self.dropout > 0.0 && x.device().is_cpu() => {
                let mask = random::dropout_mask(rng, x.elem_count(), self.dropout);
                let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(dtype)?;
                (x * mask)?
            }
            // A GPU draws its own mask (its generator seeded by the model).
            Some(_) if self.dropout > 0.0 => {
                (x * random::device_dropout_mask(x.device(), x.shape(), self.dropout, dtype)?)?
            }
            _ => x.clone(),
        })
    }

    /// `α/r`.
    pub(crate) fn scale(&self) -> f64 {
        self.scale
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    pub(crate) layers: Vec<(Var, Var)>,
}

impl Mlp {
    /// `(weight (out, in), bias (out))` layers with PyTorch's default
    /// initialisation, U(−1/√in, 1/√in).
    fn new(widths: &[usize], device: &candle_core::Device, rng: &mut dyn RngCore) -> Result<Mlp> {
        let mut layers = Vec::new();
        for pair in widths.windows(2) {
            let (input, out) = (pair[0], pair[1]);
            let bound = 1.0 / (input as f64).sqrt();
            let w = random::uniform_vec(rng, out * input, bound);
            let b = random::uniform_vec(rng, out, bound);
            layers.push((
                Var::from_vec(w, (out, input), device)?,
                Var::from_vec(b, out, device)?,
            ));
        }
        Ok(Mlp { layers })
    }

    fn forward(
        &self,
        x: &Tensor,
        activation: fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        let last = self.layers.len().saturating_sub(1);
        for (i, (w, b)) in self.layers.iter().enumerate() {
            x = x
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            if i < last {
                x = activation(&x)?;
            }
        }
        Ok(x)
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Kind {
    /// Per layer id, the pairs on its target modules.
    Lora(Vec<(usize, Vec<(Module, LoraPair)>)>),
    Prefix {
        embedding: Var,
        transform: Option<Mlp>,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    Prompt {
        embedding: Var,
    },
    PTuning {
        embedding: Var,
        encoder: Mlp,
    },
    /// Trainable copies: layers by id, built from the variables.
    Full {
        layers: Vec<(usize, Layer)>,
        norm: Option<Tensor>,
        embed: Option<Tensor>,
        /// The untied output projection (with tied embeddings, `embed`).
        output: Option<Tensor>,
    },
}

/// A trainable adapter for one model shape.
#[derive(Clone, Debug)]
pub struct Adapter {
    config: PeftConfig,
    params: Vec<(String, Var)>,
    pub(crate) kind: Kind,
}

const LORA_PREFIX: &str = "base_model.model.model.layers";

/// PEFT's key for a LoRA matrix (`which` is `A` or `B`).
pub fn lora_key(layer: usize, module: Module, which: char) -> String {
    format!(
        "{LORA_PREFIX}.{layer}.{}.{}.lora_{which}.weight",
        module.parent(),
        module.name()
    )
}

impl Adapter {
    /// A freshly initialised adapter for `model`, drawing from `rng`.
    pub fn new(mut config: PeftConfig, model: &Llama, rng: &mut dyn RngCore) -> Result<Adapter> {
        config.validate()?;
        // Targets are kept as the explicit, ordered list of module names.
        if let PeftConfig::Lora(c) = &mut config {
            c.target_modules = lora_targets(&c.target_modules)?
                .into_iter()
                .map(|m| m.name().to_string())
                .collect();
        }
        let mc = model.config();
        let device = model.device();
        let h = mc.hidden_size;
        let mut params = Vec::new();
        let kind = match &config {
            PeftConfig::Lora(c) => {
                let targets = lora_targets(&c.target_modules)?;
                let scale = c.alpha / c.r as f64;
                if let Some(only) = &c.layers_to_transform {
                    check_layers_exist("lora layers_to_transform", only, model)?;
                }
                let mut layers = Vec::with_capacity(mc.num_hidden_layers);
                for (&i, layer) in model.layer_ids().iter().zip(&model.weights().layers) {
                    if c.layers_to_transform
                        .as_ref()
                        .is_some_and(|only| !only.contains(&i))
                    {
                        continue;
                    }
                    let mut pairs = Vec::new();
                    for &module in &targets {
                        let (out, input) = layer.linear(module).weight.dims2()?;
                        let bound = 1.0 / (input as f64).sqrt();
                        let a = Var::from_vec(
                            random::uniform_vec(rng, c.r * input, bound),
                            (c.r, input),
                            device,
                        )?;
                        let b = Var::zeros((out, c.r), DType::F32, device)?;
                        params.push((lora_key(i, module, 'A'), a.clone()));
                        params.push((lora_key(i, module, 'B'), b.clone()));
                        pairs.push((
                            module,
                            LoraPair {
                                a,
                                b,
                                scale,
                                dropout: c.dropout,
                            },
                        ));
                    }
                    layers.push((i, pairs));
                }
                Kind::Lora(layers)
            }
            PeftConfig::Prefix(c) => {
                let p = c.num_virtual_tokens;
                let width = mc.num_hidden_layers * 2 * mc.kv_dim();
                let (embedding, transform) = match c.projection {
                    None => {
                        let e = Var::from_vec(
                            random::normal_vec(rng, p * width, 1.0),
                            (p, width),
                            device,
                        )?;
                        (e, None)
                    }
                    Some(hidden) => {
                        let e = Var::from_vec(random::normal_vec(rng, p * h, 1.0), (p, h), device)?;
                        (e, Some(Mlp::new(&[h, hidden, width], device, rng)?))
                    }
                };
                params.push(("prefix_encoder.embedding.weight".into(), embedding.clone()));
                if let Some(mlp) = &transform {
                    for (j, (w, b)) in mlp.layers.iter().enumerate() {
                        params.push((
                            format!("prefix_encoder.transform.{}.weight", 2 * j),
                            w.clone(),
                        ));
                        params.push((
                            format!("prefix_encoder.transform.{}.bias", 2 * j),
                            b.clone(),
                        ));
                    }
                }
                Kind::Prefix {
                    embedding,
                    transform,
                    layers: mc.num_hidden_layers,
                    kv_heads: mc.kv_heads(),
                    head_dim: mc.head_dim(),
                }
            }
            PeftConfig::Prompt(c) => {
                let embedding = Var::from_tensor(&sample_vocab(model, c.num_virtual_tokens, rng)?)?;
                params.push(("prompt_encoder.embedding.weight".into(), embedding.clone()));
                Kind::Prompt { embedding }
            }
            PeftConfig::PTuning(c) => {
                let embedding = Var::from_tensor(&sample_vocab(model, c.num_virtual_tokens, rng)?)?;
                let hidden = c.encoder_hidden_size;
                let encoder = Mlp::new(&[h, hidden, hidden, h], device, rng)?;
                params.push(("prompt_encoder.embedding.weight".into(), embedding.clone()));
                for (j, (w, b)) in encoder.layers.iter().enumerate() {
                    params.push((
                        format!("prompt_encoder.mlp_head.{}.weight", 2 * j),
                        w.clone(),
                    ));
                    params.push((format!("prompt_encoder.mlp_head.{}.bias", 2 * j), b.clone()));
                }
                Kind::PTuning { embedding, encoder }
            }
            PeftConfig::Full(c) => full(c, model, &mut params)?,
        };
        Ok(Adapter {
            config,
            params,
            kind,
        })
    }

    pub fn config(&self) -> &PeftConfig {
        &self.config
    }

    /// The named parameters in their canonical order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The number of trainable values.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// How many positions the soft prompt adds in front of the input
    /// (prompt- and P-tuning), else 0.
    pub fn virtual_tokens(&self) -> usize {
        match &self.config {
            PeftConfig::Prompt(c) => c.num_virtual_tokens,
            PeftConfig::PTuning(c) => c.num_virtual_tokens,
            _ => 0,
        }
    }

    /// The LoRA pair on `module` of `layer`, if the adapter has one.
    pub fn lora(&self, layer: usize, module: Module) -> Option<&LoraPair> {
        match &self.kind {
            Kind::Lora(layers) => layers
                .iter()
                .find(|(id, _)| *id == layer)?
                .1
                .iter()
                .find(|(m, _)| *m == module)
                .map(|(_, pair)| pair),
            _ => None,
        }
    }

    /// The trainable copy of the layer with id `id`, for full tuning.
    pub fn layer(&self, id: usize) -> Option<&Layer> {
        match &self.kind {
            Kind::Full { layers, .. } => layers.iter().find(|(i, _)| *i == id).map(|(_, l)| l),
            _ => None,
        }
    }

    /// The trainable final-norm weight, for full tuning with `norm`.
    pub fn final_norm(&self) -> Option<&Tensor> {
        match &self.kind {
            Kind::Full { norm, .. } => norm.as_ref(),
            _ => None,
        }
    }

    /// The trainable token embeddings, for full tuning with `embeddings`.
    pub fn embeddings(&self) -> Option<&Tensor> {
        match &self.kind {
            Kind::Full { embed, .. } => embed.as_ref(),
            _ => None,
        }
    }

    /// The trainable output projection, for full tuning with `embeddings`
    /// (the embeddings themselves when the model ties them).
    pub fn output(&self) -> Option<&Tensor> {
        match &self.kind {
            Kind::Full { output, .. } => output.as_ref(),
            _ => None,
        }
    }

    /// The soft prompt `(p, hidden)`, for prompt- and P-tuning.
    pub fn soft_prompt(&self, _rng: Option<&mut dyn RngCore>) -> Result<Option<Tensor>> {
        Ok(match &self.kind {
            Kind::Prompt { embedding } => Some(embedding.as_tensor().clone()),
            Kind::PTuning { embedding, encoder } => {
                Some(encoder.forward(embedding.as_tensor(), |x| x.relu())?)
            }
            _ => None,
        })
    }

    /// Per layer, the prefix keys and values, each `(kv_heads, p, head_dim)`.
    pub fn prefix(&self, _rng: Option<&mut dyn RngCore>) -> Result<Option<Vec<(Tensor, Tensor)>>> {
        let Kind::Prefix {
            embedding,
            transform,
            layers,
            kv_heads,
            head_dim,
        } = &self.kind
        else {
            return Ok(None);
        };
        let flat = match transform {
            Some(mlp) => mlp.forward(embedding.as_tensor(), |x| x.tanh())?,
            None => embedding.as_tensor().clone(),
        };
        let p = flat.dim(0)?;
        // (p, layers·2·kv_dim) → (layers·2, kv_heads, p, head_dim), as PEFT
        // splits its past_key_values: even rows keys, odd rows values.
        let kv = flat
            .reshape((p, layers * 2, *kv_heads, *head_dim))?
            .permute((1, 2, 0, 3))?
            .contiguous()?;
        let mut out = Vec::with_capacity(*layers);
        for l in 0..*layers {
            out.push((kv.get(2 * l)?, kv.get(2 * l + 1)?));
        }
        Ok(Some(out))
    }

    /// Every parameter, flattened and concatenated in the canonical order.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.num_parameters());
        for (_, var) in &self.params {
            out.extend(
                var.as_tensor()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }

    /// Sets every parameter from a vector made by [`Adapter::to_vec`].
    pub fn set_from_slice(&self, values: &[f32]) -> Result<()> {
        if values.len() != self.num_parameters() {
            return Err(ModelError::Input(format!(
                "the vector has {} values, the {} adapter has {}",
                values.len(),
                self.config.method(),
                self.num_parameters()
            )));
        }
        let mut at = 0;
        for (_, var) in &self.params {
            let n = var.elem_count();
            let t = Tensor::from_slice(&values[at..at + n], var.shape(), var.device())?;
            var.set(&t)?;
            at += n;
        }
        Ok(())
    }

    /// A parameter by name.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// A trainable f32 copy of `t`, registered under `name`.
fn trainable(name: String, t: &Tensor, params: &mut Vec<(String, Var)>) -> Result<Tensor> {
    let var = Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?;
    let tensor = var.as_tensor().clone();
    params.push((name, var));
    Ok(tensor)
}

/// Full tuning's variables, in a fixed order: the layers by increasing id
/// (each in Hugging Face's order of its weights), the final norm, the
/// embeddings, the untied output projection.
fn full(c: &FullConfig, model: &Llama, params: &mut Vec<(String, Var)>) -> Result<Kind> {
    check_layers_exist("full layers", &c.layers, model)?;
    let mut ids = c.layers.clone();
    ids.sort_unstable();
    let mut layers = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(pos) = model.layer_position(id) else {
            continue;
        };
        let base = &model.weights().layers[pos];
        let root = format!("model.layers.{id}");
        let linear = |module: Module, params: &mut Vec<(String, Var)>| -> Result<Linear> {
            let l = base.linear(module);
            let path = format!("{root}.{}.{}", module.parent(), module.name());
            let weight = trainable(format!("{path}.weight"), &l.weight.dense()?, params)?;
            let bias = match &l.bias {
                Some(b) => Some(trainable(format!("{path}.bias"), b, params)?),
                None => None,
            };
            Ok(Linear::new(weight, bias))
        };
        let input_norm = trainable(
            format!("{root}.input_layernorm.weight"),
            &base.input_norm,
            params,
        )?;
        let qk_norm = match &base.qk_norm {
            Some((q, k)) => Some((
                trainable(format!("{root}.self_attn.q_norm.weight"), q, params)?,
                trainable(format!("{root}.self_attn.k_norm.weight"), k, params)?,
            )),
            None => None,
        };
        let q = linear(Module::Q, params)?;
        let k = linear(Module::K, params)?;
        let v = linear(Module::V, params)?;
        let o = linear(Module::O, params)?;
        let post_norm = trainable(
            format!(
                "{root}.{}.weight",
                crate::model::pre_mlp_norm_name(base.sandwich_norms.is_some())
            ),
            &base.post_norm,
            params,
        )?;
        let sandwich_norms = match &base.sandwich_norms {
            Some((a, m)) => {
                let [an, mn] = crate::model::SANDWICH_NORM_NAMES;
                Some((
                    trainable(format!("{root}.{an}.weight"), a, params)?,
                    trainable(format!("{root}.{mn}.weight"), m, params)?,
                ))
            }
            None => None,
        };
        let gate = linear(Module::Gate, params)?;
        let up = linear(Module::Up, params)?;
        let down = linear(Module::Down, params)?;
        layers.push((
            id,
            Layer {
                input_norm,
                qk_norm,
                q,
                k,
                v,
                o,
                post_norm,
                sandwich_norms,
                gate,
                up,
                down,
            },
        ));
    }
    let w = model.weights();
    let norm = if c.norm {
        Some(trainable("model.norm.weight".into(), &w.norm, params)?)
    } else {
        None
    };
    let (embed, output) = if c.embeddings {
        let embed = trainable(
            "model.embed_tokens.weight".into(),
            &w.embed.dense()?,
            params,
        )?;
        let output = match &w.lm_head {
            Some(head) => trainable("lm_head.weight".into(), &head.dense()?, params)?,
            None => embed.clone(),
        };
        (Some(embed), Some(output))
    } else {
        (None, None)
    };
    Ok(Kind::Full {
        layers,
        norm,
        embed,
        output,
    })
}

/// `n` rows of the model's embedding matrix chosen uniformly at random, as
/// f32 (PEFT's "sample vocabulary" initialisation).
fn sample_vocab(model: &Llama, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
    let vocab = model.config().vocab_size as u64;
    let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, n, model.device())?;
    let rows = model
        .embeddings()
        .select_rows(&ids)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    // The embeddings the model gives those tokens: Gemma scales its table.
    if model.config().embed_scale {
        Ok(model.scale_embeddings(&rows)?)
    } else {
        Ok(rows)
    }
}
