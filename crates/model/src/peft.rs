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

use crate::model::{Llama, Module};
use crate::{ModelError, Result, random};

/// Which method, and its hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum PeftConfig {
    Lora(LoraConfig),
    Prefix(PrefixConfig),
    Prompt(PromptConfig),
    PTuning(PTuningConfig),
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
        }
        Ok(())
    }
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
        let x = match rng {
            Some(rng) if self.dropout > 0.0 => {
                let mask = random::dropout_mask(rng, x.elem_count(), self.dropout);
                let mask = Tensor::from_vec(mask, x.shape(), &candle_core::Device::Cpu)?
                    .to_device(x.device())?
                    .to_dtype(dtype)?;
                (x * mask)?
            }
            _ => x.clone(),
        };
        let a = self.a.as_tensor().to_dtype(dtype)?;
        let b = self.b.as_tensor().to_dtype(dtype)?;
        Ok((x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?)
    }
}

#[derive(Clone, Debug)]
struct Mlp {
    layers: Vec<(Var, Var)>,
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
enum Kind {
    /// `pairs[layer][module]`.
    Lora(Vec<Vec<(Module, LoraPair)>>),
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
}

/// A trainable adapter for one model shape.
#[derive(Clone, Debug)]
pub struct Adapter {
    config: PeftConfig,
    params: Vec<(String, Var)>,
    kind: Kind,
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
                let mut layers = Vec::with_capacity(mc.num_hidden_layers);
                for (i, layer) in model.weights().layers.iter().enumerate() {
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
                    layers.push(pairs);
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
                .get(layer)?
                .iter()
                .find(|(m, _)| *m == module)
                .map(|(_, pair)| pair),
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

/// `n` rows of the model's embedding matrix chosen uniformly at random, as
/// f32 (PEFT's "sample vocabulary" initialisation).
fn sample_vocab(model: &Llama, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
    let vocab = model.config().vocab_size as u64;
    let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, n, model.device())?;
    Ok(model
        .embeddings()
        .index_select(&ids, 0)?
        .to_dtype(DType::F32)?
        .contiguous()?)
}
