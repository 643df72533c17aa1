//! A llama-family decoder with a forward pass that training can
//! differentiate.
//!
//! Several of candle's fused kernels (`ops::rms_norm`,
//! `ops::softmax_last_dim`, the `rope` family) have no backward pass, and
//! gradients upstream of them silently vanish; candle-transformers' llama
//! uses them and is inference-only for that reason. Every operation here is
//! built from differentiable primitives instead: RMSNorm as
//! `x / sqrt(mean(x²) + ε) · w`, softmax as `exp(x − max) / Σ`, rotary embeddings by
//! `rotate_half`. The base weights are plain tensors, never variables, so
//! backpropagation only reaches an adapter's parameters; they are shared
//! (reference-counted), never copied, between the adapters of many clients.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, D, DType, Device, Layout, Shape, Storage, Tensor,
};
use rand_core::RngCore;

use crate::config::LlamaConfig;
use crate::peft::Adapter;
use crate::per_example::Tape;
use crate::quant::Weight;
use crate::{ModelError, Result};

/// A linear layer `y = x Wᵀ + b` with `W` stored `(out, in)`, as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: impl Into<Weight>, bias: Option<Tensor>) -> Linear {
        Linear {
            weight: weight.into(),
            bias,
        }
    }

    /// `x` is `(…, in)`. A frozen weight multiplies through
    /// [`frozen_matmul`] (or the quantised product,
    /// [`crate::quant::quantized_matmul`], `exact` in a training pass); a
    /// trainable one (an adapter's variable, f32, cast to the input's
    /// dtype) through candle's matmul, which also gives the weight's
    /// gradient.
    fn forward(&self, x: &Tensor, exact: bool) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Quantized(q) => crate::quant::quantized_matmul(x, q, exact)?,
            Weight::Dense(w) if !w.is_variable() => frozen_matmul(x, w)?,
            Weight::Dense(w) => {
                let w = w.to_dtype(x.dtype())?;
                let dims = x.dims();
                let k = dims.last().copied().unwrap_or(0);
                let mut shape = dims[..dims.len().saturating_sub(1)].to_vec();
                shape.push(w.dim(0)?);
                x.contiguous()?
                    .reshape(((), k))?
                    .matmul(&w.t()?)?
                    .reshape(shape)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }
}

/// The projections a LoRA adapter can target, by their Hugging Face names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// `q_proj`, `gate_proj`, ...
    pub fn name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// The submodule that holds it: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            Module::Gate | Module::Up | Module::Down => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Layer {
    pub input_norm: Tensor,
    /// Qwen3's per-head norms of the queries and keys (`head_dim` wide).
    pub qk_norm: Option<(Tensor, Tensor)>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// The norm before the MLP (Llama's `post_attention_layernorm`,
    /// Gemma's `pre_feedforward_layernorm`).
    pub post_norm: Tensor,
    /// Gemma-2's and Gemma-3's norms on the attention's output and on the
    /// MLP's (`post_attention_layernorm`, `post_feedforward_layernorm`).
    pub sandwich_norms: Option<(Tensor, Tensor)>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// The Hugging Face name of a layer's norm before its MLP: Llama's
/// `post_attention_layernorm`, or Gemma's `pre_feedforward_layernorm` in
/// a layer with sandwich norms (where `post_attention_layernorm` is the
/// norm on the attention's output).
pub fn pre_mlp_norm_name(sandwich: bool) -> &'static str {
    if sandwich {
        "pre_feedforward_layernorm"
    } else {
        "post_attention_layernorm"
    }
}

/// The Hugging Face names of a Gemma layer's sandwich norms.
pub const SANDWICH_NORM_NAMES: [&str; 2] =
    ["post_attention_layernorm", "post_feedforward_layernorm"];

impl Layer {
    pub fn linear(&self, module: Module) -> &Linear {
        match module {
            Module::Q => &self.q,
            Module::K => &self.k,
            Module::V => &self.v,
            Module::O => &self.o,
            Module::Gate => &self.gate,
            Module::Up => &self.up,
            Module::Down => &self.down,
        }
    }
}

/// The weights of a llama-family model, in the layout of Hugging Face's
/// `LlamaForCausalLM` (rotary embeddings in the "rotate half" layout).
#[derive(Clone, Debug)]
pub struct Weights {
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when the output projection is the embedding matrix.
    pub lm_head: Option<Weight>,
}

/// Per-layer keys and values of the tokens seen so far, for generation.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Key/value slots held per layer: the prefix's and every token's.
    position: usize,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Key/value slots held per layer (the next token's position).
    pub fn position(&self) -> usize {
        self.position
    }

    /// The cache of a batch of one, repeated for a batch of `n`: a shared
    /// prompt that `n` continuations then follow.
    pub fn repeat_batch(&self, n: usize) -> Result<KvCache> {
        let repeat = |t: &Tensor| -> Result<Tensor> {
            if t.dim(0)? != 1 {
                return Err(ModelError::Input(format!(
                    "only a cache of one sequence can be repeated, not of {}",
                    t.dim(0)?
                )));
            }
            Ok(t.repeat((n, 1, 1, 1))?)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| Ok((repeat(k)?, repeat(v)?)))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            position: self.position,
        })
    }
}

/// How a forward pass runs: inference, or training with the adapter's
/// dropout drawn from `rng`.
pub enum Mode<'a> {
    Eval,
    Train(&'a mut dyn RngCore),
    /// Training that records, on the tape, what per-example gradients need
    /// (crate::per_example): the adapter's parameters enter as constants,
    /// and a zero probe joins each place they act on the batch.
    Record(&'a mut dyn RngCore, &'a Tape),
}

impl Mode<'_> {
    fn rng(&mut self) -> Option<&mut dyn RngCore> {
        match self {
            Mode::Eval => None,
            Mode::Train(rng) | Mode::Record(rng, _) => Some(&mut **rng),
        }
    }

    /// `shared` (the same for every example, without a batch dimension)
    /// broadcast to a batch of `b`; when recording, detached from the
    /// adapter and with a probe whose gradient is each example's own.
    fn per_batch(&mut self, shared: &Tensor, b: usize) -> Result<Tensor> {
        let mut dims = vec![b];
        dims.extend_from_slice(shared.dims());
        match self {
            Mode::Record(_, tape) => tape.shared(&shared.detach(), &dims),
            _ => Ok(shared.unsqueeze(0)?.broadcast_as(dims)?.contiguous()?),
        }
    }
}

/// A llama-family decoder.
#[derive(Clone, Debug)]
pub struct Llama {
    config: LlamaConfig,
    weights: Weights,
    /// Each layer's index in the model it was taken from: `0..n` for a
    /// whole model, the kept indices for an offsite-tuning emulator.
    /// Adapters address layers by these ids, so one adapter fits both.
    layer_ids: Vec<usize>,
    dtype: DType,
    device: Device,
    /// `(max_position_embeddings, head_dim / 2)` rotary tables, in `dtype`.
    cos: Tensor,
    sin: Tensor,
    /// Gemma-3's sliding layers' tables, from their own base.
    local_rope: Option<(Tensor, Tensor)>,
}

/// What every layer of one forward pass shares: the rotary tables of the
/// new positions and the masks of the attention.
struct Positions {
    cos: Tensor,
    sin: Tensor,
    local: Option<(Tensor, Tensor)>,
    /// New positions and the key slots before them.
    t: usize,
    past: usize,
    /// Additive masks for the unfused attention: causal, and causal within
    /// the sliding window (where a layer slides).
    mask: Option<Tensor>,
    window_mask: Option<Tensor>,
}

impl Llama {
    /// Assembles a model from its weights, checking every shape against
    /// `config`. The compute dtype is the embedding's.
    pub fn new(config: LlamaConfig, weights: Weights) -> Result<Llama> {
        let ids = (0..weights.layers.len()).collect();
        Llama::with_layer_ids(config, weights, ids)
    }

    /// Like [`Llama::new`], for layers taken from a larger model:
    /// `layer_ids[i]` is layer `i`'s index there (strictly increasing).
    pub fn with_layer_ids(
        config: LlamaConfig,
        weights: Weights,
        layer_ids: Vec<usize>,
    ) -> Result<Llama> {
        config.validate()?;
        check_shapes(&config, &weights)?;
        if layer_ids.len() != weights.layers.len() || layer_ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ModelError::Config(format!(
                "layer ids {layer_ids:?} must be strictly increasing, one per layer ({})",
                weights.layers.len()
            )));
        }
        let dtype = weights.embed.dtype();
        let device = weights.layers.first().map_or_else(
            || weights.norm.device().clone(),
            |l| l.input_norm.device().clone(),
        );
        let (cos, sin) = rotary_tables(&config, &config.inv_freq(), &device, dtype)?;
        let local_rope = match config.local_inv_freq() {
            Some(inv) => Some(rotary_tables(&config, &inv, &device, dtype)?),
            None => None,
        };
        Ok(Llama {
            config,
            weights,
            layer_ids,
            dtype,
            device,
            cos,
            sin,
            local_rope,
        })
    }

    /// A model with random weights (for tests and benchmarks), drawn from
    /// `rng`: every projection normal with standard deviation `1/√in`, so
    /// that attention and MLP outputs keep the residual stream's scale even
    /// in a narrow model; the embedding with standard deviation `1/√hidden`,
    /// so that the (tied) output layer can express confident predictions;
    /// norms at one.
    pub fn random(config: LlamaConfig, device: &Device, rng: &mut dyn RngCore) -> Result<Llama> {
        config.validate()?;
        let h = config.hidden_size;
        let qd = config.q_dim();
        let kv = config.kv_dim();
        let ff = config.intermediate_size;
        let mut normal = |rows: usize, cols: usize| -> Result<Tensor> {
            let std = 1.0 / (cols as f64).sqrt();
            let values = crate::random::normal_vec(rng, rows * cols, std);
            Ok(Tensor::from_vec(values, (rows, cols), device)?)
        };
        // A norm's weight that multiplies by one: Gemma's stores `w` of `1 + w`.
        let unit = if config.norm_unit_offset { 0.0 } else { 1.0 };
        let norm = |n: usize| -> Result<Tensor> { Ok(Tensor::full(unit as f32, n, device)?) };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            let bias = |n: usize| -> Result<Option<Tensor>> {
                Ok(if config.attention_bias {
                    Some(Tensor::zeros(n, DType::F32, device)?)
                } else {
                    None
                })
            };
            layers.push(Layer {
                input_norm: norm(h)?,
                qk_norm: if config.qk_norm {
                    let hd = config.head_dim();
                    Some((norm(hd)?, norm(hd)?))
                } else {
                    None
                },
                q: Linear::new(normal(qd, h)?, bias(qd)?),
                k: Linear::new(normal(kv, h)?, bias(kv)?),
                v: Linear::new(normal(kv, h)?, bias(kv)?),
                o: Linear::new(normal(h, qd)?, None),
                post_norm: norm(h)?,
                sandwich_norms: if config.sandwich_norms {
                    Some((norm(h)?, norm(h)?))
                } else {
                    None
                },
                gate: Linear::new(normal(ff, h)?, None),
                up: Linear::new(normal(ff, h)?, None),
                down: Linear::new(normal(h, ff)?, None),
            });
        }
        let embed_std = 1.0 / (h as f64).sqrt();
        let embed = Tensor::from_vec(
            crate::random::normal_vec(rng, config.vocab_size * h, embed_std),
            (config.vocab_size, h),
            device,
        )?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Tensor::from_vec(
                crate::random::normal_vec(rng, config.vocab_size * h, embed_std),
                (config.vocab_size, h),
                device,
            )?)
        };
        let weights = Weights {
            embed: embed.into(),
            layers,
            norm: norm(h)?,
            lm_head: lm_head.map(Weight::from),
        };
        Llama::new(config, weights)
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Each layer's index in the model it came from (`0..n` for a whole
    /// model).
    pub fn layer_ids(&self) -> &[usize] {
        &self.layer_ids
    }

    /// The position of the layer with id `id`, if this model has it.
    pub fn layer_position(&self, id: usize) -> Option<usize> {
        self.layer_ids.binary_search(&id).ok()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The same model computing in `dtype` (bf16 on a GPU, say). Adapters
    /// keep their own f32 parameters and are cast on the way in.
    pub fn to_dtype(&self, dtype: DType) -> Result<Llama> {
        self.to_device(&self.device.clone(), dtype)
    }

    /// The same model on `device`, computing in `dtype`: each tensor cast
    /// where it is, then copied (a GPU never holds it in f32 when `dtype`
    /// is bf16). A quantised base stays on the CPU in f32 and is refused
    /// elsewhere.
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<Llama> {
        if dtype == self.dtype && device.same_device(&self.device) {
            return Ok(self.clone());
        }
        let cast = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
        let linear = |l: &Linear| -> Result<Linear> {
            Ok(Linear::new(
                l.weight.to_device(device, dtype)?,
                l.bias.as_ref().map(cast).transpose()?,
            ))
        };
        let layers = self
            .weights
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    input_norm: cast(&l.input_norm)?,
                    qk_norm: match &l.qk_norm {
                        Some((q, k)) => Some((cast(q)?, cast(k)?)),
                        None => None,
                    },
                    q: linear(&l.q)?,
                    k: linear(&l.k)?,
                    v: linear(&l.v)?,
                    o: linear(&l.o)?,
                    post_norm: cast(&l.post_norm)?,
                    sandwich_norms: match &l.sandwich_norms {
                        Some((a, m)) => Some((cast(a)?, cast(m)?)),
                        None => None,
                    },
                    gate: linear(&l.gate)?,
                    up: linear(&l.up)?,
                    down: linear(&l.down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = Weights {
            embed: self.weights.embed.to_device(device, dtype)?,
            layers,
            norm: cast(&self.weights.norm)?,
            lm_head: self
                .weights
                .lm_head
                .as_ref()
                .map(|w| w.to_device(device, dtype))
                .transpose()?,
        };
        Llama::with_layer_ids(self.config.clone(), weights, self.layer_ids.clone())
    }

    /// The same model with every projection, the embedding and the output
    /// matrix quantised to `format` (the norms and biases stay f32). A
    /// weight already quantised stays as it is.
    pub fn quantize(&self, format: crate::quant::QuantFormat) -> Result<Llama> {
        if self.dtype != DType::F32 || !self.device.is_cpu() {
            return Err(ModelError::Config(format!(
                "quantize = {:?}: a quantised base is built from an f32 model on the CPU",
                format.name()
            )));
        }
        let quantize = |w: &Weight| -> Result<Weight> { w.quantize(format) };
        let w = &self.weights;
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            let mut l = l.clone();
            for linear in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                linear.weight = quantize(&linear.weight)?;
            }
            layers.push(l);
        }
        let weights = Weights {
            embed: quantize(&w.embed)?,
            layers,
            norm: w.norm.clone(),
            lm_head: w.lm_head.as_ref().map(quantize).transpose()?,
        };
        Llama::with_layer_ids(self.config.clone(), weights, self.layer_ids.clone())
    }

    /// Bytes the frozen weights occupy.
    pub fn weight_bytes(&self) -> usize {
        let w = &self.weights;
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut total = w.embed.storage_bytes()
            + dense(&w.norm)
            + w.lm_head.as_ref().map_or(0, Weight::storage_bytes);
        for l in &w.layers {
            total += dense(&l.input_norm) + dense(&l.post_norm);
            for (a, b) in l.qk_norm.iter().chain(&l.sandwich_norms) {
                total += dense(a) + dense(b);
            }
            for m in Module::ALL {
                let linear = l.linear(m);
                total += linear.weight.storage_bytes() + linear.bias.as_ref().map_or(0, dense);
            }
        }
        total
    }

    /// The block formats of the quantised weights, by name, sorted.
    pub fn quantized_formats(&self) -> Vec<String> {
        let w = &self.weights;
        let mut formats = std::collections::BTreeSet::new();
        let all = w
            .layers
            .iter()
            .flat_map(|l| Module::ALL.map(|m| &l.linear(m).weight))
            .chain([&w.embed])
            .chain(w.lm_head.as_ref());
        for weight in all {
            if let Some(q) = weight.quantized() {
                formats.insert(q.format().name().to_string());
            }
        }
        formats.into_iter().collect()
    }

    /// The token embedding matrix `(vocab, hidden)`.
    pub fn embeddings(&self) -> &Weight {
        &self.weights.embed
    }

    /// Logits `(batch, virtual + seq, vocab)` in f32 for token ids
    /// `(batch, seq)`. With a prompt- or P-tuning adapter the first
    /// `adapter.virtual_tokens()` positions are the soft prompt's.
    pub fn forward(&self, ids: &Tensor, adapter: Option<&Adapter>, mode: Mode) -> Result<Tensor> {
        self.run(ids, adapter, mode, None, false)
    }

    /// Like [`Llama::forward`], continuing from (and extending) `cache`. The
    /// soft prompt and the prefix enter on the first call only.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        adapter: Option<&Adapter>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.run(ids, adapter, Mode::Eval, Some(cache), false)
    }

    /// Like [`Llama::forward_cached`], returning the logits of the last
    /// position only, `(batch, 1, vocab)`: all that generation needs, at
    /// a fraction of the output projection's cost for a long prompt.
    pub fn forward_cached_last(
        &self,
        ids: &Tensor,
        adapter: Option<&Adapter>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.run(ids, adapter, Mode::Eval, Some(cache), true)
    }

    fn run(
        &self,
        ids: &Tensor,
        adapter: Option<&Adapter>,
        mut mode: Mode,
        mut cache: Option<&mut KvCache>,
        last_only: bool,
    ) -> Result<Tensor> {
        let b = ids.dim(0)?;
        let first = cache.as_ref().is_none_or(|c| c.layers.is_empty());
        let h = self.config.hidden_size;
        let mut x = self.embed(ids, adapter)?;
        // (The CPU's generator is not drawn from here: its passes stay as
        // they were.)
        if !self.device.is_cpu()
            && let Some(rng) = mode.rng()
        {
            self.seed_device_dropout(rng.next_u64())?;
        }
        if first
            && let Some(adapter) = adapter
            && let Some(soft) = adapter.soft_prompt(mode.rng())?
        {
            let soft = mode.per_batch(&soft.to_dtype(self.dtype)?, b)?;
            debug_assert_eq!(soft.dim(2)?, h);
            x = Tensor::cat(&[soft, x], 1)?;
        }
        let t = x.dim(1)?;
        let prefix = match (first, adapter) {
            (true, Some(adapter)) => adapter.prefix(mode.rng())?,
            _ => None,
        };
        let prefix_len = match &prefix {
            Some(kv) => kv.first().map_or(0, |(k, _)| k.dim(1).unwrap_or(0)),
            None => 0,
        };
        // Positions follow Hugging Face: the tokens after a prefix start at
        // the prefix's length, so a token's position is the number of key
        // slots before it.
        let position = match cache.as_deref() {
            Some(c) if !first => c.position,
            _ => prefix_len,
        };
        let pos = self.positions(position, t)?;
        if let Some(c) = cache.as_deref_mut()
            && first
        {
            c.layers = vec![None; self.config.num_hidden_layers];
            c.position = prefix_len;
        }
        for i in 0..self.weights.layers.len() {
            let layer_prefix = prefix.as_ref().map(|kv| &kv[i]);
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.layer_forward(i, x, &pos, layer_prefix, slot, adapter, &mut mode)?;
        }
        if let Some(c) = cache {
            c.position += t;
        }
        if last_only {
            x = x.narrow(1, t - 1, 1)?;
        }
        self.head(&x, adapter)
    }

    /// The gradients of `loss_of(logits)` with respect to `params` (an
    /// adapter's variables), with gradient checkpointing: the forward pass
    /// keeps each layer's input and nothing else of the layer, and the
    /// backward pass recomputes one layer at a time from its input,
    /// backpropagates the gradient of its output through it, and moves on
    /// to the layer below. Memory holds every layer's input and one layer's
    /// activations instead of every layer's; the price is a second forward
    /// pass through the layers.
    ///
    /// The loss and gradients are those of [`Llama::forward`] in training
    /// mode, except that each layer's dropout masks come from a generator
    /// seeded from `rng` for that layer (both passes through a layer must
    /// draw the same masks), so with dropout they are other draws of the
    /// same distribution. Returns the loss and the gradients, summed over
    /// every place a parameter acts.
    pub fn checkpointed_gradients(
        &self,
        ids: &Tensor,
        adapter: Option<&Adapter>,
        params: &[Tensor],
        rng: &mut dyn RngCore,
        loss_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, candle_core::backprop::GradStore)> {
        use rand_chacha::ChaCha20Rng;
        use rand_core::SeedableRng;

        let mut out = candle_core::backprop::GradStore::default();
        // Moves the gradients of `params` from a backward pass into `out`.
        let mut keep = |mut grads: candle_core::backprop::GradStore| -> Result<()> {
            for p in params {
                if let Some(g) = grads.remove(p) {
                    let sum = match out.remove(p) {
                        Some(acc) => (acc + g)?,
                        None => g,
                    };
                    out.insert(p, sum);
                }
            }
            Ok(())
        };
        let b = ids.dim(0)?;
        let mut mode = Mode::Train(rng);
        // The embedding, soft prompt and prefix keep their (small) graphs
        // for the last backward pass.
        let mut x0 = self.embed(ids, adapter)?;
        if let Some(adapter) = adapter
            && let Some(soft) = adapter.soft_prompt(mode.rng())?
        {
            let soft = mode.per_batch(&soft.to_dtype(self.dtype)?, b)?;
            x0 = Tensor::cat(&[soft, x0], 1)?;
        }
        let t = x0.dim(1)?;
        let prefix = match adapter {
            Some(adapter) => adapter.prefix(mode.rng())?,
            None => None,
        };
        let prefix_len = match &prefix {
            Some(kv) => kv.first().map_or(0, |(k, _)| k.dim(1).unwrap_or(0)),
            None => 0,
        };
        let pos = self.positions(prefix_len, t)?;
        let n = self.weights.layers.len();
        let seeds: Vec<[u8; 32]> = (0..n)
            .map(|_| {
                let mut seed = [0u8; 32];
                if let Some(r) = mode.rng() {
                    r.fill_bytes(&mut seed);
                }
                seed
            })
            .collect();
        // Each layer's prefix as a fresh variable: its gradient is collected
        // per layer and sent into the prefix encoder at the end.
        let prefix_vars: Option<Vec<(candle_core::Var, candle_core::Var)>> = prefix
            .as_ref()
            .map(|kv| {
                kv.iter()
                    .map(|(k, v)| {
                        Ok((
                            candle_core::Var::from_tensor(&k.detach())?,
                            candle_core::Var::from_tensor(&v.detach())?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let layer_prefix = |i: usize| {
            prefix_vars
                .as_ref()
                .map(|kv| (kv[i].0.as_tensor().clone(), kv[i].1.as_tensor().clone()))
        };
        // Forward: the layers' inputs only.
        let mut inputs = Vec::with_capacity(n);
        let mut x = x0.detach();
        // On a GPU the layer's dropout masks come from the device's
        // generator, seeded per layer alike in both passes.
        let device_seed = |seed: &[u8; 32]| {
            let mut first = [0u8; 8];
            first.copy_from_slice(&seed[..8]);
            self.seed_device_dropout(u64::from_le_bytes(first))
        };
        for (i, seed) in seeds.iter().enumerate() {
            inputs.push(x.clone());
            device_seed(seed)?;
            let mut layer_rng = ChaCha20Rng::from_seed(*seed);
            let p = layer_prefix(i).map(|(k, v)| (k.detach(), v.detach()));
            x = self
                .layer_forward(
                    i,
                    x,
                    &pos,
                    p.as_ref(),
                    None,
                    adapter,
                    &mut Mode::Train(&mut layer_rng),
                )?
                .detach();
        }
        // The head and the loss, then the layers from the top.
        let top = candle_core::Var::from_tensor(&x)?;
        drop(x);
        let loss = loss_of(&self.head(top.as_tensor(), adapter)?)?;
        let mut grads = loss.backward()?;
        // The loss's graph holds the logits: let it go.
        let loss = loss.detach();
        let mut g = grads.remove(top.as_tensor()).ok_or_else(|| {
            ModelError::Numerical("no gradient reached the last layer's output".into())
        })?;
        keep(grads)?;
        let mut prefix_grads: Vec<Option<(Tensor, Tensor)>> = vec![None; n];
        for i in (0..n).rev() {
            let input = candle_core::Var::from_tensor(&inputs[i])?;
            inputs[i] = input.as_tensor().clone();
            device_seed(&seeds[i])?;
            let mut layer_rng = ChaCha20Rng::from_seed(seeds[i]);
            let p = layer_prefix(i);
            let y = self.layer_forward(
                i,
                input.as_tensor().clone(),
                &pos,
                p.as_ref(),
                None,
                adapter,
                &mut Mode::Train(&mut layer_rng),
            )?;
            let mut grads = (y * &g)?.sum_all()?.backward()?;
            g = grads.remove(input.as_tensor()).ok_or_else(|| {
                ModelError::Numerical(format!("no gradient reached layer {i}'s input"))
            })?;
            if let Some((k, v)) = &p {
                let zero = |t: &Tensor| t.zeros_like();
                let gk = grads.remove(k).map_or_else(|| zero(k), Ok)?;
                let gv = grads.remove(v).map_or_else(|| zero(v), Ok)?;
                prefix_grads[i] = Some((gk, gv));
            }
            keep(grads)?;
            // The layer's input is not needed again.
            inputs.truncate(i);
        }
        // The embedding, soft prompt and prefix encoder, through the graphs
        // kept from the start.
        let mut surrogate = (x0 * &g)?.sum_all()?;
        if let Some(kv) = &prefix {
            for ((k, v), grads) in kv.iter().zip(&prefix_grads) {
                if let Some((gk, gv)) = grads {
                    surrogate = (surrogate + (k * gk)?.sum_all()? + (v * gv)?.sum_all()?)?;
                }
            }
        }
        keep(surrogate.backward()?)?;
        Ok((loss, out))
    }

    /// The rotary tables and masks for `t` new positions after `position`
    /// earlier ones.
    fn positions(&self, position: usize, t: usize) -> Result<Positions> {
        if position + t > self.config.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "{} positions exceed the model's maximum of {}",
                position + t,
                self.config.max_position_embeddings
            )));
        }
        let narrow = |(cos, sin): (&Tensor, &Tensor)| -> Result<(Tensor, Tensor)> {
            Ok((cos.narrow(0, position, t)?, sin.narrow(0, position, t)?))
        };
        let (cos, sin) = narrow((&self.cos, &self.sin))?;
        let local = match &self.local_rope {
            Some((c, s)) => Some(narrow((c, s))?),
            None => None,
        };
        // The fused attention masks as it goes; the masks are for the rest.
        let window = (0..self.weights.layers.len()).find_map(|i| self.config.window(i));
        let mask = causal_mask(t, position, None, &self.device, self.dtype)?;
        let window_mask = match window {
            Some(w) => causal_mask(t, position, Some(w), &self.device, self.dtype)?,
            None => None,
        };
        Ok(Positions {
            cos,
            sin,
            local,
            t,
            past: position,
            mask,
            window_mask,
        })
    }

    /// `x · √hidden_size`, the factor rounded to the compute dtype as
    /// transformers rounds it.
    pub(crate) fn scale_embeddings(&self, x: &Tensor) -> Result<Tensor> {
        let factor = Tensor::new((self.config.hidden_size as f64).sqrt() as f32, x.device())?
            .to_dtype(x.dtype())?;
        Ok(x.broadcast_mul(&factor)?)
    }

    /// Seeds the generator a GPU draws LoRA's dropout masks from
    /// (crate::random::device_dropout_mask): once per training pass, and
    /// per layer under gradient checkpointing, so that a recomputed layer
    /// draws its masks again. The CPU draws its masks from the pass's own
    /// generator, and nothing is done there.
    fn seed_device_dropout(&self, seed: u64) -> Result<()> {
        if !self.device.is_cpu() {
            self.device.set_seed(seed)?;
        }
        Ok(())
    }

    /// The token embeddings `(batch, seq, hidden)` of ids `(batch, seq)`:
    /// the adapter's trainable copy when it has one.
    pub fn embed(&self, ids: &Tensor, adapter: Option<&Adapter>) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        // A GPU's gather does not check its indices: an id outside the
        // vocabulary would read whatever memory lies there. One small
        // reduction checks them all, on every device alike.
        if b * s > 0 {
            let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
            if max as usize >= self.config.vocab_size {
                return Err(ModelError::Input(format!(
                    "token id {max} is outside the model's vocabulary of {}",
                    self.config.vocab_size
                )));
            }
        }
        let rows = match adapter.and_then(Adapter::embeddings) {
            Some(table) => table.index_select(&ids.flatten_all()?, 0)?,
            None => self.weights.embed.select_rows(ids)?,
        };
        let x = rows
            .to_dtype(self.dtype)?
            .reshape((b, s, self.config.hidden_size))?;
        if self.config.embed_scale {
            self.scale_embeddings(&x)
        } else {
            Ok(x)
        }
    }

    /// Runs the layers at positions `range` over hidden states `x`
    /// `(batch, seq, hidden)` of a sequence that starts at position 0 (no
    /// cache, no prefix): the pieces of a forward pass that offsite-tuning's
    /// distillation compares.
    pub fn run_layers(
        &self,
        x: &Tensor,
        range: std::ops::Range<usize>,
        adapter: Option<&Adapter>,
        mut mode: Mode,
    ) -> Result<Tensor> {
        if range.end > self.weights.layers.len() {
            return Err(ModelError::Input(format!(
                "layers {range:?} of a model with {}",
                self.weights.layers.len()
            )));
        }
        let pos = self.positions(0, x.dim(1)?)?;
        let mut x = x.clone();
        for i in range {
            x = self.layer_forward(i, x, &pos, None, None, adapter, &mut mode)?;
        }
        Ok(x)
    }

    /// The final norm and the output projection: f32 logits
    /// `(batch, seq, vocab)` of hidden states `(batch, seq, hidden)`.
    pub fn head(&self, x: &Tensor, adapter: Option<&Adapter>) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let norm = adapter
            .and_then(Adapter::final_norm)
            .unwrap_or(&self.weights.norm);
        let x = self.norm(x, norm)?;
        let head = match adapter.and_then(Adapter::output) {
            Some(w) => Weight::Dense(w.clone()),
            None => self
                .weights
                .lm_head
                .as_ref()
                .unwrap_or(&self.weights.embed)
                .clone(),
        };
        // Exact where a gradient will pass through (any trainable parameter
        // upstream).
        let logits = Linear::new(head, None).forward(&x.reshape((b * t, h))?, x.track_op())?;
        let logits = logits
            .reshape((b, t, self.config.vocab_size))?
            .to_dtype(DType::F32)?;
        match self.config.final_logit_softcapping {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// RMSNorm with the model's epsilon, times `w` or (Gemma) `1 + w`.
    fn norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if !self.config.norm_unit_offset {
            return rms_norm(x, weight, eps);
        }
        let scale = (weight.to_dtype(DType::F32)? + 1.0)?;
        if x.dtype() == DType::F32 {
            return rms_norm(x, &scale, eps);
        }
        // Gemma multiplies in f32 and rounds once, as transformers does
        // (`(x̂ · (1 + w)).to(dtype)`), where Llama rounds `x̂` and `w` first.
        Ok(normalized_f32(x, eps)?
            .broadcast_mul(&scale)?
            .to_dtype(x.dtype())?)
    }

    /// Layer `i` (a position): its own weights, or the adapter's trainable
    /// copy of them.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        i: usize,
        x: Tensor,
        pos: &Positions,
        prefix: Option<&(Tensor, Tensor)>,
        slot: Option<&mut Option<(Tensor, Tensor)>>,
        adapter: Option<&Adapter>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let id = self.layer_ids[i];
        let layer = adapter
            .and_then(|a| a.layer(id))
            .unwrap_or(&self.weights.layers[i]);
        let normed = self.norm(&x, &layer.input_norm)?;
        let attn = self.attention(i, layer, &normed, pos, prefix, slot, adapter, mode)?;
        let attn = match &layer.sandwich_norms {
            Some((after_attention, _)) => self.norm(&attn, after_attention)?,
            None => attn,
        };
        let x = (x + attn)?;
        let normed = self.norm(&x, &layer.post_norm)?;
        let mlp = self.mlp(id, layer, &normed, adapter, mode)?;
        let mlp = match &layer.sandwich_norms {
            Some((_, after_mlp)) => self.norm(&mlp, after_mlp)?,
            None => mlp,
        };
        Ok((x + mlp)?)
    }

    /// A projection of `x` `(batch, seq, in)`, with the adapter's LoRA branch
    /// when it targets this module of the layer with id `layer`.
    fn project(
        &self,
        layer: usize,
        module: Module,
        linear: &Linear,
        x: &Tensor,
        adapter: Option<&Adapter>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        // The frozen product takes `x` as it is: a reshape would be one more
        // node for backpropagation to fill with zeros and accumulate into.
        // A training pass takes the exact product (crate::quant).
        let exact = !matches!(mode, Mode::Eval) || x.track_op();
        let y = linear.forward(x, exact)?;
        match adapter.and_then(|a| a.lora(layer, module)) {
            Some(lora) => {
                let (b, s, input) = x.dims3()?;
                let flat = x.reshape((b * s, input))?;
                let delta = match mode {
                    Mode::Record(rng, tape) => {
                        let (branch, used) =
                            lora.forward_traced(&flat, self.dtype, Some(&mut **rng))?;
                        tape.lora(layer, module, &used, &branch)?
                    }
                    _ => lora.forward(&flat, self.dtype, mode.rng())?,
                };
                let delta = delta.reshape(y.shape())?;
                Ok((y + delta)?)
            }
            None => Ok(y),
        }
    }

    /// Layer `i`'s (a position) attention.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        i: usize,
        layer: &Layer,
        x: &Tensor,
        pos: &Positions,
        prefix: Option<&(Tensor, Tensor)>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        adapter: Option<&Adapter>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let id = self.layer_ids[i];
        let (cos, sin) = match (&pos.local, self.config.local_rope(i)) {
            (Some((c, s)), true) => (c, s),
            _ => (&pos.cos, &pos.sin),
        };
        let window = self.config.window(i);
        let (b, t, _) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let kv_heads = self.config.kv_heads();
        let hd = self.config.head_dim();
        let split = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split(
            self.project(id, Module::Q, &layer.q, x, adapter, mode)?,
            heads,
        )?;
        let k = split(
            self.project(id, Module::K, &layer.k, x, adapter, mode)?,
            kv_heads,
        )?;
        let v = split(
            self.project(id, Module::V, &layer.v, x, adapter, mode)?,
            kv_heads,
        )?;
        let (q, k) = match &layer.qk_norm {
            Some((qn, kn)) => (self.norm(&q, qn)?, self.norm(&k, kn)?),
            None => (q, k),
        };
        let q = rope(&q, cos, sin)?;
        let mut k = rope(&k, cos, sin)?;
        let mut v = v;
        match cache {
            Some(slot) => {
                if let Some((past_k, past_v)) = slot.as_ref() {
                    k = Tensor::cat(&[past_k, &k], 2)?;
                    v = Tensor::cat(&[past_v, &v], 2)?;
                } else if let Some((pk, pv)) = prefix {
                    k = Tensor::cat(&[&self.batch_prefix(pk, b, mode)?, &k], 2)?;
                    v = Tensor::cat(&[&self.batch_prefix(pv, b, mode)?, &v], 2)?;
                }
                *slot = Some((k.clone(), v.clone()));
            }
            None => {
                if let Some((pk, pv)) = prefix {
                    k = Tensor::cat(&[&self.batch_prefix(pk, b, mode)?, &k], 2)?;
                    v = Tensor::cat(&[&self.batch_prefix(pv, b, mode)?, &v], 2)?;
                }
            }
        }
        let scale = self.config.attention_scale();
        let cap = self.config.attn_logit_softcapping;
        debug_assert_eq!(pos.t, t);
        if crate::fused::applies(&q) {
            // Each key/value head serves `rep` consecutive query heads: fold
            // them into the query rows, so keys and values are never copied,
            // and mask, scale and normalise in one kernel.
            let rep = heads / kv_heads;
            let past = k.dim(2)? - t;
            let q = q.reshape((b, kv_heads, rep * t, hd))?;
            let scores = q.matmul(&k.t()?)?;
            let probs = match cap {
                // Gemma-2: `c·tanh(scale·s/c)` before the mask and softmax.
                Some(cap) => {
                    let capped = softcap(&(scores * scale)?, cap)?;
                    crate::fused::causal_softmax(&capped, 1.0, t, past, window)?
                }
                None => crate::fused::causal_softmax(&scores, scale, t, past, window)?,
            };
            let out = probs.matmul(&v.contiguous()?)?.reshape((b, heads, t, hd))?;
            let out = out.transpose(1, 2)?.reshape((b, t, heads * hd))?;
            return self.project(id, Module::O, &layer.o, &out, adapter, mode);
        }
        let k = repeat_kv(&k, heads / kv_heads)?;
        let v = repeat_kv(&v, heads / kv_heads)?;
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match cap {
            Some(cap) => softcap(&scores, cap)?,
            None => scores,
        };
        debug_assert_eq!(k.dim(2)?, pos.past + t);
        let mask = if window.is_some() {
            pos.window_mask.as_ref()
        } else {
            pos.mask.as_ref()
        };
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = softmax_last(&scores.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v.contiguous()?)?;
        let out = out.transpose(1, 2)?.reshape((b, t, heads * hd))?;
        self.project(id, Module::O, &layer.o, &out, adapter, mode)
    }

    /// A `(kv_heads, p, head_dim)` prefix as `(batch, kv_heads, p, head_dim)`.
    fn batch_prefix(&self, prefix: &Tensor, b: usize, mode: &mut Mode) -> Result<Tensor> {
        prefix.dims3()?;
        mode.per_batch(&prefix.to_dtype(self.dtype)?, b)
    }

    fn mlp(
        &self,
        id: usize,
        layer: &Layer,
        x: &Tensor,
        adapter: Option<&Adapter>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let gate = self.project(id, Module::Gate, &layer.gate, x, adapter, mode)?;
        let up = self.project(id, Module::Up, &layer.up, x, adapter, mode)?;
        let hidden = match self.config.hidden_act {
            crate::config::Activation::Silu => swiglu(&gate, &up)?,
            // GELU in f32 whatever the dtype, rounded once, as PyTorch's
            // kernel computes it (candle's bf16 GELU rounds every step).
            crate::config::Activation::GeluTanh => {
                let act = gate.to_dtype(DType::F32)?.gelu()?.to_dtype(gate.dtype())?;
                (act * up)?
            }
        };
        self.project(id, Module::Down, &layer.down, &hidden, adapter, mode)
    }
}

fn check_shapes(config: &LlamaConfig, w: &Weights) -> Result<()> {
    let h = config.hidden_size;
    let qd = config.q_dim();
    let kv = config.kv_dim();
    let ff = config.intermediate_size;
    let expect_dims = |name: String, got: &[usize], dims: &[usize]| -> Result<()> {
        if got != dims {
            return Err(ModelError::Config(format!(
                "{name} has shape {got:?}, the config needs {dims:?}"
            )));
        }
        Ok(())
    };
    let expect = |name: String, t: &Tensor, dims: &[usize]| expect_dims(name, t.dims(), dims);
    let expect_weight =
        |name: String, w: &Weight, dims: &[usize]| expect_dims(name, &w.dims(), dims);
    expect_weight("embed_tokens".into(), &w.embed, &[config.vocab_size, h])?;
    expect("norm".into(), &w.norm, &[h])?;
    match (&w.lm_head, config.tie_word_embeddings) {
        (Some(head), _) => expect_weight("lm_head".into(), head, &[config.vocab_size, h])?,
        (None, false) => {
            return Err(ModelError::Config(
                "the config has untied embeddings but no lm_head weight was given".into(),
            ));
        }
        (None, true) => {}
    }
    if w.layers.len() != config.num_hidden_layers {
        return Err(ModelError::Config(format!(
            "{} layers given, the config has {}",
            w.layers.len(),
            config.num_hidden_layers
        )));
    }
    for (i, l) in w.layers.iter().enumerate() {
        let name = |m: &str| format!("layers.{i}.{m}");
        expect(name("input_layernorm"), &l.input_norm, &[h])?;
        expect(
            name(pre_mlp_norm_name(config.sandwich_norms)),
            &l.post_norm,
            &[h],
        )?;
        // A pair of norms the config says the layer has, or has not.
        let pair = |what: &str,
                    got: &Option<(Tensor, Tensor)>,
                    needed: bool,
                    names: [&str; 2],
                    width: usize|
         -> Result<()> {
            match (got, needed) {
                (Some((a, b)), true) => {
                    expect(name(names[0]), a, &[width])?;
                    expect(name(names[1]), b, &[width])
                }
                (None, false) => Ok(()),
                _ => Err(ModelError::Config(format!(
                    "layer {i}: the config {} {what}, the weights {}",
                    if needed { "has" } else { "has no" },
                    if needed { "have none" } else { "have them" }
                ))),
            }
        };
        pair(
            "norms after attention and the MLP",
            &l.sandwich_norms,
            config.sandwich_norms,
            SANDWICH_NORM_NAMES,
            h,
        )?;
        pair(
            "q/k norms",
            &l.qk_norm,
            config.qk_norm,
            ["self_attn.q_norm.weight", "self_attn.k_norm.weight"],
            config.head_dim(),
        )?;
        for (module, out, input) in [
            (Module::Q, qd, h),
            (Module::K, kv, h),
            (Module::V, kv, h),
            (Module::O, h, qd),
            (Module::Gate, ff, h),
            (Module::Up, ff, h),
            (Module::Down, h, ff),
        ] {
            let linear = l.linear(module);
            let path = name(&format!("{}.{}", module.parent(), module.name()));
            expect_weight(format!("{path}.weight"), &linear.weight, &[out, input])?;
            if let Some(bias) = &linear.bias {
                expect(format!("{path}.bias"), bias, &[out])?;
            }
        }
    }
    Ok(())
}

/// `x Wᵀ` for `x` `(n, in)` and a frozen `W` `(out, in)`.
///
/// A plain matmul would also backpropagate into `W`: candle computes both
/// operands' gradients whether or not anything needs them, a third of the
/// training step's arithmetic and a full model's worth of gradient memory
/// spent on weights that never change. As a custom op, backpropagation
/// gets `∂x = ∂y W` and nothing else.
fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if weight.dtype() != x.dtype() {
        return Err(ModelError::Input(format!(
            "a {:?} input against {:?} weights",
            x.dtype(),
            weight.dtype()
        )));
    }
    Ok(x.contiguous()?.apply_op1(FrozenLinear {
        weight: weight.clone(),
    })?)
}

struct FrozenLinear {
    weight: Tensor,
}

impl FrozenLinear {
    /// The rows `n` of the input `(…, k)` (every leading dimension), `k`,
    /// the output width, the transposed weight's layout and the output's
    /// shape `(…, out)`.
    fn shapes(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize, Layout, Shape)> {
        let dims = layout.shape().dims();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("frozen linear: a scalar input");
        };
        if lead.is_empty() {
            candle_core::bail!("frozen linear: a vector input, not (…, {k})");
        }
        let (out, k2) = self.weight.dims2()?;
        if k != k2 {
            candle_core::bail!(
                "frozen linear: input width {k}, weight {:?}",
                self.weight.dims()
            );
        }
        let n = lead.iter().product();
        let mut shape = lead.to_vec();
        shape.push(out);
        let x2 = Layout::contiguous_with_offset((n, k), layout.start_offset());
        Ok((n, k, out, x2, Shape::from(shape)))
    }

    fn run<S: BackendStorage>(
        &self,
        x: &S,
        layout: &Layout,
        weight: &S,
    ) -> candle_core::Result<(S, Shape)> {
        if !layout.is_contiguous() {
            candle_core::bail!("frozen linear: a strided input");
        }
        let (n, k, out, x2, shape) = self.shapes(layout)?;
        let wt = self.weight.layout().transpose(0, 1)?;
        let y = x.matmul(weight, (1, n, out, k), &x2, &wt)?;
        Ok((y, shape))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (storage, _) = self.weight.storage_and_layout();
        match &*storage {
            Storage::Cpu(w) => self.run(x, layout, w),
            _ => candle_core::bail!("frozen linear: the input is on the CPU, the weight is not"),
        }
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (storage, _) = self.weight.storage_and_layout();
        match &*storage {
            Storage::Cuda(w) => self.run(x, layout, w),
            _ => candle_core::bail!("frozen linear: the input is on a GPU, the weight is not"),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let out = self.weight.dim(0)?;
        let rows = grad.elem_count() / out.max(1);
        let g = grad.contiguous()?.reshape((rows, out))?;
        Ok(Some(g.matmul(&self.weight)?.reshape(x.shape())?))
    }
}

/// `cos` and `sin` of `position · f` for the inverse frequencies `inv`
/// (`θ^(−2i/d)`, rescaled by the config's `rope_scaling`),
/// `(max_positions, d/2)`.
fn rotary_tables(
    config: &LlamaConfig,
    inv: &[f64],
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let half = config.head_dim() / 2;
    let n = config.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in inv {
            let angle = p as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// An additive mask `(t, past + t)`: query `i` sees keys up to `past + i`,
/// and within a sliding `window` only the last `window` of them. `None`
/// when nothing is hidden (a single new token within the window).
fn causal_mask(
    t: usize,
    past: usize,
    window: Option<usize>,
    device: &Device,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let width = past + t;
    let hides_early = window.is_some_and(|w| width > w);
    if t <= 1 && !hides_early {
        return Ok(None);
    }
    let mut mask = vec![0f32; t * width];
    for i in 0..t {
        let row = &mut mask[i * width..(i + 1) * width];
        let (start, end) = crate::fused::visible_keys(past + i, window);
        for (j, value) in row.iter_mut().enumerate() {
            if j < start || j >= end {
                *value = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(
        Tensor::from_vec(mask, (t, width), device)?.to_dtype(dtype)?,
    ))
}

/// Gemma's soft cap `c · tanh(x / c)`.
fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(((x / cap)?.tanh()? * cap)?)
}

/// RMSNorm: the fused kernel where it applies, else differentiable
/// primitives computing in f32.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    // The fused kernel treats the weight as frozen: a trainable one, or
    // one computed from a trainable one (Gemma's `1 + w`), takes the
    // primitives.
    if crate::fused::applies(x) && !weight.track_op() {
        return Ok(crate::fused::rms_norm(x, weight, eps)?);
    }
    rms_norm_composite(x, weight, eps)
}

pub(crate) fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    Ok(normalized_f32(x, eps)?
        .to_dtype(dtype)?
        .broadcast_mul(&weight.to_dtype(dtype)?)?)
}

/// `x / sqrt(mean(x²) + ε)` over the last dimension, in f32.
fn normalized_f32(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let mean_square = x32.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x32.broadcast_div(&(mean_square + eps)?.sqrt()?)?)
}

/// Softmax over the last dimension.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if crate::fused::applies(x) {
        return Ok(crate::fused::softmax(x)?);
    }
    softmax_composite(x)
}

pub(crate) fn softmax_composite(x: &Tensor) -> Result<Tensor> {
    // Softmax does not depend on the shift, so no gradient goes through it:
    // detached, the backward pass skips the max's branch.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// Rotary embedding in the "rotate half" layout: `x·cos + rotate_half(x)·sin`
/// with `x` `(batch, heads, seq, head_dim)` and the tables `(seq, head_dim/2)`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::fused::applies(x) {
        return Ok(crate::fused::rope(x, cos, sin)?);
    }
    rope_composite(x, cos, sin)
}

pub(crate) fn rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?
        .unsqueeze(0)?
        .unsqueeze(0)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?
        .unsqueeze(0)?
        .unsqueeze(0)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// `silu(gate) · up`.
fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::fused::applies(gate) {
        return Ok(crate::fused::swiglu(gate, up)?);
    }
    swiglu_composite(gate, up)
}

pub(crate) fn swiglu_composite(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// Grouped-query attention: each key/value head serves `n` query heads.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, hd))?
        .reshape((b, kv * n, t, hd))?)
}
