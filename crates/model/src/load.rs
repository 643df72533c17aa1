//! Loading a model and its tokenizer: a Hugging Face directory
//! (`config.json`, `model.safetensors` or a sharded index, `tokenizer.json`)
//! or a single GGUF file (dequantised to f32, or its blocks kept or
//! quantised on load, crate::quant; the tokenizer rebuilt from the file's
//! metadata).

use std::collections::{BTreeSet, HashMap};
use std::io::Seek;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::config::LlamaConfig;
use crate::model::{Layer, Linear, Llama, Module, Weights};
use crate::model::{SANDWICH_NORM_NAMES, pre_mlp_norm_name};
use crate::quant::{QuantFormat, QuantMatrix, Quantize, Weight};
use crate::{ModelError, Result};

/// A model with the tokenizer that goes with it.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// Where it came from, for messages and adapter configs.
    pub source: String,
}

/// The name of the default model, [`crate::fetch::SMOLLM2_135M`].
pub const DEFAULT_MODEL: &str = "smollm2";

/// A task's model: `spec` is a GGUF file or a Hugging Face directory, or
/// [`DEFAULT_MODEL`] (also what `None` means), fetched once into fedveil's
/// cache ([`crate::fetch::cache_dir`]). It is loaded onto `device` in the
/// dtype the device computes in ([`crate::compute_dtype`]). `progress`
/// hears about a fetch.
pub fn load_model(
    spec: Option<&str>,
    device: &Device,
    quantize: Quantize,
    progress: &mut dyn FnMut(&str),
) -> Result<Loaded> {
    let path = match spec {
        None | Some(DEFAULT_MODEL) => {
            let cache = crate::fetch::cache_dir()?;
            crate::fetch::ensure(&crate::fetch::SMOLLM2_135M, &cache, progress)?
        }
        Some(p) => PathBuf::from(p),
    };
    let mut loaded = load_with(&path, device, quantize)?;
    if quantize == Quantize::None {
        loaded.model = loaded.model.to_dtype(crate::compute_dtype(device))?;
    }
    Ok(loaded)
}

/// Loads a GGUF file, or a Hugging Face model directory, onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<Loaded> {
    load_with(path, device, Quantize::None)
}

/// Like [`load`], with the frozen weights held as `quantize` says: kept
/// in a GGUF file's blocks, or quantised on load (a quantised base
/// computes in f32 on the CPU). Unquantised, the model is read straight
/// into the dtype `device` computes in ([`crate::compute_dtype`]: bf16 on
/// a GPU), one tensor at a time.
pub fn load_with(path: &Path, device: &Device, quantize: Quantize) -> Result<Loaded> {
    load_with_dtype(path, device, quantize, crate::compute_dtype(device))
}

/// [`load_with`] into `dtype` (f32 where `quantize` keeps a quantised
/// base).
pub fn load_with_dtype(
    path: &Path,
    device: &Device,
    quantize: Quantize,
    dtype: DType,
) -> Result<Loaded> {
    if quantize != Quantize::None && !device.is_cpu() {
        return Err(ModelError::Config(format!(
            "quantize = {:?}: a quantised base runs on the CPU only in this version",
            quantize.name()
        )));
    }
    let loaded = if !path.exists() {
        return Err(ModelError::file(path, "no such file or directory"));
    } else if path.is_dir() {
        if quantize == Quantize::Gguf {
            return Err(ModelError::file(
                path,
                "quantize = \"gguf\" keeps a GGUF file's blocks, and this is a Hugging Face \
                 directory (quantise it on load with \"q4_k\", \"q5_k\", \"q6_k\" or \"q8_0\")",
            ));
        }
        let format = match quantize {
            Quantize::To(format) => Some(format),
            _ => None,
        };
        load_hf_dir_as(path, device, format, dtype)?
    } else if path.extension().is_some_and(|e| e == "gguf") {
        load_gguf_as(path, device, quantize, dtype)?
    } else {
        return Err(ModelError::file(
            path,
            "neither a .gguf file nor a model directory (config.json, model.safetensors, tokenizer.json)",
        ));
    };
    Ok(loaded)
}

/// A Hugging Face `LlamaForCausalLM` or `Qwen2ForCausalLM` directory.
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<Loaded> {
    load_hf_dir_with(dir, device, None)
}

/// Like [`load_hf_dir`], with the projections, the embedding and the
/// output matrix quantised to `quantize` as each is read (on the CPU). The
/// tensors are read from the files one at a time, each straight to f32 (or
/// its blocks), so loading never holds the checkpoint and the model at once.
pub fn load_hf_dir_with(
    dir: &Path,
    device: &Device,
    quantize: Option<QuantFormat>,
) -> Result<Loaded> {
    load_hf_dir_as(dir, device, quantize, DType::F32)
}

/// [`load_hf_dir_with`], the dense tensors taken in `dtype` as they are
/// read (bf16 for a GPU: never an f32 copy of the model on it).
fn load_hf_dir_as(
    dir: &Path,
    device: &Device,
    quantize: Option<QuantFormat>,
    dtype: DType,
) -> Result<Loaded> {
    let config_path = dir.join("config.json");
    let json = crate::files::read_json(&config_path)?;
    let config = LlamaConfig::from_hf_json(&json).map_err(|e| ModelError::file(&config_path, e))?;
    if quantize.is_some() && !device.is_cpu() {
        return Err(ModelError::Config(
            "a quantised base runs on the CPU only in this version".into(),
        ));
    }
    let mut tensors = SafetensorFiles::open(dir, device)?;
    tensors.dtype = if quantize.is_some() {
        DType::F32
    } else {
        dtype
    };
    if json.get("model_type").and_then(|t| t.as_str()) == Some("gemma3") {
        tensors
            .take_gemma3_language_model()
            .map_err(|why| ModelError::file(dir, why))?;
    }
    if json.get("model_type").and_then(|t| t.as_str()) == Some("phi3") {
        unfuse_phi3(&config, &mut tensors).map_err(|why| ModelError::file(dir, why))?;
    }
    let weights = weights_from(&config, &mut tensors, config.num_hidden_layers, quantize)
        .map_err(|why| ModelError::file(dir, why))?;
    // A tensor fedveil did not read is a part of the model it does not
    // compute. Two kinds are safe to leave: a tied checkpoint's copy of the
    // embedding as `lm_head.weight` (checked above to equal it) and the
    // rotary frequencies old checkpoints stored (recomputed from the config).
    let names = tensors.names();
    let mut left: Vec<&String> = names
        .iter()
        .filter(|n| {
            let tied_copy = n.as_str() == "lm_head.weight" && config.tie_word_embeddings;
            !(tied_copy || n.ends_with("self_attn.rotary_emb.inv_freq"))
        })
        .collect();
    left.sort();
    if let Some(first) = left.first() {
        return Err(ModelError::file(
            dir,
            format!(
                "{} tensor(s) that fedveil's decoder does not use, {first} first: the checkpoint \
                 has parts this implementation would ignore",
                left.len()
            ),
        ));
    }
    let model = Llama::new(config, weights).map_err(|e| ModelError::file(dir, e))?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer =
        Tokenizer::from_file(&tokenizer_path).map_err(|e| ModelError::file(&tokenizer_path, e))?;
    Ok(Loaded {
        model,
        tokenizer,
        source: dir.display().to_string(),
    })
}

/// Phi-3 keeps each layer's query, key and value projections in one
/// `qkv_proj` (rows in that order) and the MLP's gate and up projections in
/// one `gate_up_proj` (gate first): split into Llama's names, which compute
/// the same.
fn unfuse_phi3(config: &LlamaConfig, tensors: &mut impl TensorSource) -> Result<(), String> {
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (fused, parts, names) in [
            (
                format!("{p}.self_attn.qkv_proj.weight"),
                vec![config.q_dim(), config.kv_dim(), config.kv_dim()],
                vec!["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ),
            (
                format!("{p}.mlp.gate_up_proj.weight"),
                vec![config.intermediate_size; 2],
                vec!["mlp.gate_proj", "mlp.up_proj"],
            ),
        ] {
            let names: Vec<String> = names.iter().map(|n| format!("{p}.{n}.weight")).collect();
            tensors.split_rows(&fused, &parts, &names)?;
        }
    }
    Ok(())
}

/// The row ranges `(start, len)` of a fused matrix's parts, in order; an
/// error naming the matrix when its height is not their sum.
fn row_parts(
    name: &str,
    rows: usize,
    parts: &[usize],
    needs: &str,
) -> Result<Vec<(usize, usize)>, String> {
    if rows != parts.iter().sum::<usize>() {
        let sum: Vec<String> = parts.iter().map(|n| n.to_string()).collect();
        return Err(format!(
            "{name} has {rows} rows, {needs} needs {}",
            sum.join(" + ")
        ));
    }
    let starts = parts.iter().scan(0, |at, &n| {
        let start = *at;
        *at += n;
        Some((start, n))
    });
    Ok(starts.collect())
}

/// Takes a model's weights out of `tensors`, by their Hugging Face names
/// (`model.layers.{i}.self_attn.q_proj.weight`, ...), as f32, for `layers`
/// layers numbered from 0. The error names the missing tensor.
pub(crate) fn weights_from_map(
    config: &LlamaConfig,
    tensors: &mut HashMap<String, Tensor>,
    layers: usize,
) -> Result<Weights, String> {
    weights_from(config, tensors, layers, None)
}

/// [`weights_from_map`] from any [`TensorSource`], each matrix quantised to
/// `quantize` as soon as it is read.
fn weights_from(
    config: &LlamaConfig,
    tensors: &mut impl TensorSource,
    layers: usize,
    quantize: Option<QuantFormat>,
) -> Result<Weights, String> {
    // A tied checkpoint may also store the embedding as `lm_head.weight`;
    // one whose stored head differs contradicts its config, and reading it
    // either way would be a guess (transformers warns and unties). Checked
    // before any layer is read.
    const EMBED: &str = "model.embed_tokens.weight";
    const HEAD: &str = "lm_head.weight";
    if config.tie_word_embeddings && tensors.has(HEAD) && !tensors.same_values(HEAD, EMBED)? {
        return Err(format!(
            "the config says tie_word_embeddings = true, but the checkpoint's {HEAD} differs \
             from {EMBED}: the checkpoint contradicts its config (set tie_word_embeddings to \
             false to use {HEAD} as the output layer, or remove {HEAD})"
        ));
    }
    // Llama's `attention_bias` also puts a bias on the output projection;
    // Qwen2's bias is on q, k and v only.
    let o_bias: Vec<bool> = (0..layers)
        .map(|i| tensors.has(&format!("model.layers.{i}.self_attn.o_proj.bias")))
        .collect();
    let mut out = Vec::with_capacity(layers);
    for (i, o_bias) in o_bias.into_iter().enumerate() {
        let p = format!("model.layers.{i}");
        let mut linear = |module: Module, bias: bool| -> Result<Linear, String> {
            let path = format!("{p}.{}.{}", module.parent(), module.name());
            let weight = tensors.take_matrix(&format!("{path}.weight"), quantize)?;
            let bias = if bias {
                Some(tensors.take_dense(&format!("{path}.bias"))?)
            } else {
                None
            };
            Ok(Linear::new(weight, bias))
        };
        let qkv_bias = config.attention_bias;
        let q = linear(Module::Q, qkv_bias)?;
        let k = linear(Module::K, qkv_bias)?;
        let v = linear(Module::V, qkv_bias)?;
        let o = linear(Module::O, o_bias)?;
        let gate = linear(Module::Gate, false)?;
        let up = linear(Module::Up, false)?;
        let down = linear(Module::Down, false)?;
        out.push(Layer {
            input_norm: tensors.take_dense(&format!("{p}.input_layernorm.weight"))?,
            qk_norm: if config.qk_norm {
                Some((
                    tensors.take_dense(&format!("{p}.self_attn.q_norm.weight"))?,
                    tensors.take_dense(&format!("{p}.self_attn.k_norm.weight"))?,
                ))
            } else {
                None
            },
            q,
            k,
            v,
            o,
            post_norm: tensors.take_dense(&format!(
                "{p}.{}.weight",
                pre_mlp_norm_name(config.sandwich_norms)
            ))?,
            sandwich_norms: if config.sandwich_norms {
                let [a, m] = SANDWICH_NORM_NAMES;
                Some((
                    tensors.take_dense(&format!("{p}.{a}.weight"))?,
                    tensors.take_dense(&format!("{p}.{m}.weight"))?,
                ))
            } else {
                None
            },
            gate,
            up,
            down,
        });
    }
    let embed = tensors.take_matrix(EMBED, quantize)?;
    let norm = tensors.take_dense("model.norm.weight")?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(tensors.take_matrix(HEAD, quantize)?)
    };
    Ok(Weights {
        embed,
        layers: out,
        norm,
        lm_head,
    })
}

/// A model's weights under their Hugging Face names (the inverse of
/// [`weights_from_map`]), layers numbered by position.
pub(crate) fn weights_to_map(weights: &Weights) -> Vec<(String, Weight)> {
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        weights.embed.clone(),
    )];
    for (i, l) in weights.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push((
            format!("{p}.input_layernorm.weight"),
            Weight::Dense(l.input_norm.clone()),
        ));
        if let Some((q, k)) = &l.qk_norm {
            out.push((
                format!("{p}.self_attn.q_norm.weight"),
                Weight::Dense(q.clone()),
            ));
            out.push((
                format!("{p}.self_attn.k_norm.weight"),
                Weight::Dense(k.clone()),
            ));
        }
        for module in Module::ALL {
            let linear = l.linear(module);
            let path = format!("{p}.{}.{}", module.parent(), module.name());
            out.push((format!("{path}.weight"), linear.weight.clone()));
            if let Some(b) = &linear.bias {
                out.push((format!("{path}.bias"), Weight::Dense(b.clone())));
            }
        }
        let sandwich = l.sandwich_norms.is_some();
        out.push((
            format!("{p}.{}.weight", pre_mlp_norm_name(sandwich)),
            Weight::Dense(l.post_norm.clone()),
        ));
        if let Some((a, m)) = &l.sandwich_norms {
            for (name, t) in SANDWICH_NORM_NAMES.iter().zip([a, m]) {
                out.push((format!("{p}.{name}.weight"), Weight::Dense(t.clone())));
            }
        }
    }
    out.push((
        "model.norm.weight".to_string(),
        Weight::Dense(weights.norm.clone()),
    ));
    if let Some(head) = &weights.lm_head {
        out.push(("lm_head.weight".to_string(), head.clone()));
    }
    out
}

/// Writes `loaded` as a Hugging Face directory (`config.json`,
/// `model.safetensors`, `tokenizer.json`) that [`load_hf_dir`] reads back.
pub fn save_hf_dir(loaded: &Loaded, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::file(dir, e))?;
    let model = &loaded.model;
    let mut config = serde_json::to_value(model.config())
        .map_err(|e| ModelError::Config(format!("cannot encode the config: {e}")))?;
    // Qwen2 has a bias on q, k and v; Llama's `attention_bias` on o too;
    // Qwen3 has q/k norms.
    let qwen2 =
        model.config().attention_bias && model.weights().layers.iter().all(|l| l.o.bias.is_none());
    let c = model.config();
    let (model_type, architecture) = if c.sandwich_norms {
        // Gemma's conventions come together: (1 + w) norms, sandwich
        // norms, scaled token embeddings, GeGLU.
        if !(c.norm_unit_offset && c.embed_scale && !c.attention_bias)
            || c.hidden_act != crate::config::Activation::GeluTanh
        {
            return Err(ModelError::Config(
                "a model with sandwich norms but not Gemma's other conventions has no Hugging \
                 Face model type"
                    .into(),
            ));
        }
        if c.qk_norm {
            ("gemma3_text", "Gemma3ForCausalLM")
        } else {
            ("gemma2", "Gemma2ForCausalLM")
        }
    } else if c.norm_unit_offset
        || c.embed_scale
        || c.query_pre_attn_scalar.is_some()
        || c.attn_logit_softcapping.is_some()
        || c.final_logit_softcapping.is_some()
        || c.layer_types.is_some()
        || c.rope_local_base_freq.is_some()
    {
        return Err(ModelError::Config(
            "a model with Gemma's settings but no sandwich norms has no Hugging Face model type"
                .into(),
        ));
    } else if model.config().qk_norm {
        if qwen2 {
            return Err(ModelError::Config(
                "a model with q/k norms and a bias on q, k and v only has no Hugging Face model type"
                    .into(),
            ));
        }
        ("qwen3", "Qwen3ForCausalLM")
    } else if qwen2 {
        ("qwen2", "Qwen2ForCausalLM")
    } else {
        ("llama", "LlamaForCausalLM")
    };
    config["model_type"] = model_type.into();
    config["architectures"] = serde_json::json!([architecture]);
    if let Some(o) = config.as_object_mut() {
        for internal in [
            "qk_norm",
            "norm_unit_offset",
            "sandwich_norms",
            "embed_scale",
        ] {
            o.remove(internal);
        }
        if c.sandwich_norms {
            // transformers' Gemma defaults differ from Llama's: say every
            // value, absent ones as null.
            o.remove("hidden_act");
            o.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
            o.insert("head_dim".into(), c.head_dim().into());
            // transformers types it a whole number.
            let scalar = c.query_pre_attn_scalar.map(|x| {
                if x.fract() == 0.0 && x < u32::MAX as f64 {
                    serde_json::Value::from(x as u64)
                } else {
                    serde_json::Value::from(x)
                }
            });
            o.insert("query_pre_attn_scalar".into(), scalar.into());
            for (key, value) in [
                ("attn_logit_softcapping", c.attn_logit_softcapping),
                ("final_logit_softcapping", c.final_logit_softcapping),
            ] {
                o.insert(key.into(), value.into());
            }
            o.insert("sliding_window".into(), c.sliding_window.into());
            if model_type == "gemma2" {
                o.remove("rope_local_base_freq");
            }
        }
    }
    crate::files::write_atomically(&dir.join("config.json"), config.to_string().as_bytes())?;
    let tensors: HashMap<String, Tensor> = weights_to_map(model.weights())
        .into_iter()
        .map(|(n, w)| Ok((n, w.dense()?.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| ModelError::file(&path, e))?;
    let path = dir.join("tokenizer.json");
    loaded
        .tokenizer
        .save(&path, false)
        .map_err(|e| ModelError::file(&path, e))
}

/// Where a model's tensors are taken from, by their Hugging Face names.
pub(crate) trait TensorSource {
    fn has(&self, name: &str) -> bool;
    /// Takes `name` out, dense, in the source's dtype (f32 for a map, the
    /// compute dtype for checkpoint files); an error naming it when it is
    /// not there.
    fn take_dense(&mut self, name: &str) -> Result<Tensor, String>;
    /// Takes the matrix `name` out, as f32 or quantised to `quantize`.
    fn take_matrix(&mut self, name: &str, quantize: Option<QuantFormat>) -> Result<Weight, String> {
        let w = Weight::Dense(self.take_dense(name)?);
        match quantize {
            None => Ok(w),
            Some(format) => w.quantize(format).map_err(|e| format!("{name}: {e}")),
        }
    }
    /// Replaces the fused matrix `fused` by its consecutive row ranges of
    /// heights `parts`, named `names`.
    fn split_rows(&mut self, fused: &str, parts: &[usize], names: &[String]) -> Result<(), String>;
    /// The names not taken yet.
    fn names(&self) -> Vec<String>;
    /// Whether tensors `a` and `b`, both still there, have the same shape
    /// and values (bit for bit in f32; nothing is taken).
    fn same_values(&self, a: &str, b: &str) -> Result<bool, String>;
}

impl TensorSource for HashMap<String, Tensor> {
    fn has(&self, name: &str) -> bool {
        self.contains_key(name)
    }
    fn take_dense(&mut self, name: &str) -> Result<Tensor, String> {
        let t = self
            .remove(name)
            .ok_or_else(|| format!("the weights have no tensor {name}"))?;
        t.to_dtype(DType::F32).map_err(|e| format!("{name}: {e}"))
    }
    fn split_rows(&mut self, fused: &str, parts: &[usize], names: &[String]) -> Result<(), String> {
        let t = self
            .remove(fused)
            .ok_or_else(|| format!("the weights have no tensor {fused}"))?;
        let rows = t.dim(0).map_err(|e| format!("{fused}: {e}"))?;
        for ((at, n), name) in row_parts(fused, rows, parts, "the config")?
            .into_iter()
            .zip(names)
        {
            let part = t.narrow(0, at, n).map_err(|e| format!("{fused}: {e}"))?;
            self.insert(name.clone(), part);
        }
        Ok(())
    }
    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
    fn same_values(&self, a: &str, b: &str) -> Result<bool, String> {
        let get = |name: &str| {
            self.get(name)
                .ok_or_else(|| format!("the weights have no tensor {name}"))
        };
        let (x, y) = (get(a)?, get(b)?);
        if x.dims() != y.dims() {
            return Ok(false);
        }
        same_bits(x, y).map_err(|e| format!("{a}, {b}: {e}"))
    }
}

/// Whether two tensors of one shape hold the same values, bit for bit in
/// f32 (a copy holding a NaN is still a copy).
fn same_bits(x: &Tensor, y: &Tensor) -> candle_core::Result<bool> {
    let bits = |t: &Tensor| -> candle_core::Result<Vec<u32>> {
        Ok(t.to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect())
    };
    Ok(bits(x)? == bits(y)?)
}

/// The largest safetensors header read (the format's own limit).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// One tensor in a safetensors file: where its bytes are and what they hold.
#[derive(Clone, Debug)]
struct StoredTensor {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Offset of its first byte in the file.
    start: u64,
}

/// A Hugging Face checkpoint's safetensors files (one, or the shards an
/// index names), read one tensor at a time: only the headers are read up
/// front, and each tensor's bytes when it is taken, straight to f32 (or
/// the dtype the model computes in, where that is not f32).
pub(crate) struct SafetensorFiles {
    paths: Vec<PathBuf>,
    files: Vec<std::fs::File>,
    tensors: HashMap<String, StoredTensor>,
    device: Device,
    /// The dtype dense tensors are taken in.
    dtype: DType,
    /// About how many values a band read at a time holds.
    band_elems: usize,
}

impl SafetensorFiles {
    pub(crate) fn open(dir: &Path, device: &Device) -> Result<SafetensorFiles> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let json = crate::files::read_json(&index)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::file(&index, "no weight_map object"))?;
            let mut shards = BTreeSet::new();
            for file in map.values() {
                let name = file.as_str().ok_or_else(|| {
                    ModelError::file(&index, "a weight_map entry is not a file name")
                })?;
                // Shards live next to the index, nowhere else.
                if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                    return Err(ModelError::file(
                        &index,
                        format!("shard name {name:?} is not a plain file name"),
                    ));
                }
                shards.insert(dir.join(name));
            }
            shards.into_iter().collect()
        } else {
            return Err(ModelError::file(
                dir,
                "neither model.safetensors nor model.safetensors.index.json",
            ));
        };
        let mut out = SafetensorFiles {
            paths: Vec::new(),
            files: Vec::new(),
            tensors: HashMap::new(),
            device: device.clone(),
            dtype: DType::F32,
            band_elems: crate::quant::BAND_ELEMS,
        };
        for path in paths {
            let file = std::fs::File::open(&path).map_err(|e| ModelError::file(&path, e))?;
            let header = read_safetensors_header(&file, out.files.len())
                .map_err(|why| ModelError::file(&path, why))?;
            for (name, t) in header {
                if out.tensors.insert(name.clone(), t).is_some() {
                    return Err(ModelError::file(
                        &path,
                        format!("tensor {name} is in more than one file"),
                    ));
                }
            }
            out.files.push(file);
            out.paths.push(path);
        }
        Ok(out)
    }
}

/// The tensors a safetensors file's header lists (file number `file`),
/// each checked to lie within the file.
fn read_safetensors_header(
    mut file: &std::fs::File,
    number: usize,
) -> Result<Vec<(String, StoredTensor)>, String> {
    use std::io::Read;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|e| format!("cannot read the header's length: {e}"))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_SAFETENSORS_HEADER || n.saturating_add(8) > len {
        return Err(format!(
            "a header of {n} bytes does not fit the file's {len} (or the format's limit)"
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("cannot read the header: {e}"))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("the header is not JSON: {e}"))?;
    let data = 8 + n;
    let mut out = Vec::with_capacity(json.len());
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match v.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some(other) => {
                return Err(format!(
                    "tensor {name} is stored as {other}; fedveil reads F32, F16 and BF16"
                ));
            }
            None => return Err(format!("tensor {name} has no dtype")),
        };
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or(format!("tensor {name} has no shape"))?;
        // An empty dimension would let any other be as large as it liked
        // (the byte count below is then 0): no checkpoint has one.
        if shape.contains(&0) {
            return Err(format!("tensor {name} has an empty dimension: {shape:?}"));
        }
        let offsets: Vec<u64> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect())
            .filter(|o: &Vec<u64>| o.len() == 2)
            .ok_or(format!("tensor {name} has no data_offsets"))?;
        let bytes = shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |a, &d| {
                a.checked_mul(d as u64)
            });
        let fits = offsets[0]
            .checked_add(data)
            .zip(offsets[1].checked_add(data))
            .is_some_and(|(s, e)| s <= e && e <= len && Some(e - s) == bytes);
        if !fits {
            return Err(format!(
                "tensor {name}: bytes {}..{} do not hold its shape {shape:?} of {dtype:?} within \
                 the file's {len}",
                offsets[0], offsets[1]
            ));
        }
        out.push((
            name,
            StoredTensor {
                file: number,
                dtype,
                shape,
                start: data + offsets[0],
            },
        ));
    }
    Ok(out)
}

impl SafetensorFiles {
    /// A multimodal Gemma-3 checkpoint's language model under the names of
    /// a text-only one: transformers 4's `language_model.model.*` and 5's
    /// `model.language_model.*` become `model.*`. The vision tower and its
    /// projector are set aside (text never reaches them); anything else is
    /// left for the unread-tensor check to name.
    fn take_gemma3_language_model(&mut self) -> Result<(), String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        for name in names {
            let renamed = if let Some(rest) = name
                .strip_prefix("language_model.model.")
                .or_else(|| name.strip_prefix("model.language_model."))
            {
                Some(format!("model.{rest}"))
            } else if matches!(
                name.as_str(),
                "language_model.lm_head.weight" | "lm_head.weight"
            ) {
                Some("lm_head.weight".to_string())
            } else if [
                "vision_tower.",
                "multi_modal_projector.",
                "model.vision_tower.",
                "model.multi_modal_projector.",
            ]
            .iter()
            .any(|p| name.starts_with(p))
            {
                None
            } else {
                continue;
            };
            if let Some(t) = self.tensors.remove(&name)
                && let Some(new) = renamed
                && self.tensors.insert(new.clone(), t).is_some()
            {
                return Err(format!("tensor {name} and another are both {new}"));
            }
        }
        Ok(())
    }

    /// Takes `name`'s entry out.
    fn entry(&mut self, name: &str) -> Result<StoredTensor, String> {
        self.tensors
            .remove(name)
            .ok_or_else(|| format!("the weights have no tensor {name}"))
    }

    /// Rows `start..start + n` of `t` (its first dimension), as an f32
    /// tensor on the CPU.
    fn read_rows(
        &self,
        name: &str,
        t: &StoredTensor,
        start: usize,
        n: usize,
    ) -> Result<Tensor, String> {
        use std::io::Read;
        let row: usize = t.shape.iter().skip(1).product();
        let size = t.dtype.size_in_bytes();
        let path = self.paths[t.file].display().to_string();
        let bad = |e: &dyn std::fmt::Display| format!("{path}: tensor {name}: {e}");
        let mut file = &self.files[t.file];
        file.seek(std::io::SeekFrom::Start(
            t.start + (start * row * size) as u64,
        ))
        .map_err(|e| bad(&e))?;
        let mut buf = vec![0u8; n * row * size];
        file.read_exact(&mut buf).map_err(|e| bad(&e))?;
        let mut shape = t.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = n;
        }
        Tensor::from_raw_buffer(&buf, t.dtype, &shape, &Device::Cpu)
            .and_then(|x| x.to_dtype(DType::F32))
            .map_err(|e| bad(&e))
    }

    /// The row bands `t` is read in: about [`crate::quant::BAND_ELEMS`]
    /// values each, so that converting it never holds a second copy.
    fn bands(&self, t: &StoredTensor) -> Vec<(usize, usize)> {
        let Some((&rows, rest)) = t.shape.split_first() else {
            return vec![(0, 1)];
        };
        let per = (self.band_elems / rest.iter().product::<usize>().max(1)).max(1);
        (0..rows)
            .step_by(per)
            .map(|at| (at, per.min(rows - at)))
            .collect()
    }
}

impl TensorSource for SafetensorFiles {
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn take_dense(&mut self, name: &str) -> Result<Tensor, String> {
        let t = self.entry(name)?;
        if t.shape.is_empty() {
            return self.read_rows(name, &t, 0, 1).and_then(|x| {
                x.to_dtype(self.dtype)
                    .and_then(|x| x.to_device(&self.device))
                    .map_err(|e| format!("tensor {name}: {e}"))
            });
        }
        if self.dtype != DType::F32 {
            // Each band in the compute dtype as read: the host never holds
            // the tensor in f32, the device only in its own dtype.
            let bad = |e: candle_core::Error| format!("tensor {name}: {e}");
            let whole = Tensor::zeros(t.shape.as_slice(), self.dtype, &Device::Cpu).map_err(bad)?;
            for (at, n) in self.bands(&t) {
                let band = self.read_rows(name, &t, at, n)?;
                whole
                    .slice_set(&band.to_dtype(self.dtype).map_err(bad)?, 0, at)
                    .map_err(bad)?;
            }
            return whole.to_device(&self.device).map_err(bad);
        }
        let mut values: Vec<f32> = Vec::with_capacity(t.shape.iter().product());
        for (at, n) in self.bands(&t) {
            let band = self.read_rows(name, &t, at, n)?;
            values.extend(
                band.flatten_all()
                    .and_then(|b| b.to_vec1::<f32>())
                    .map_err(|e| format!("tensor {name}: {e}"))?,
            );
        }
        Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu)
            .and_then(|x| x.to_device(&self.device))
            .map_err(|e| format!("tensor {name}: {e}"))
    }
    fn take_matrix(&mut self, name: &str, quantize: Option<QuantFormat>) -> Result<Weight, String> {
        let Some(format) = quantize else {
            return Ok(Weight::Dense(self.take_dense(name)?));
        };
        let t = self.entry(name)?;
        if t.shape.len() != 2 {
            return Err(format!(
                "tensor {name} of shape {:?} is not a matrix",
                t.shape
            ));
        }
        // Each band quantised as read: blocks never span rows, so this is
        // the matrix quantised whole.
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let band_rows = (self.band_elems / cols.max(1)).max(1);
        let m = QuantMatrix::quantize_in_bands(format, rows, cols, band_rows, &mut |at, n| {
            self.read_rows(name, &t, at, n)?
                .flatten_all()
                .and_then(|b| b.to_vec1::<f32>())
                .map_err(|e| format!("tensor {name}: {e}"))
        })
        .map_err(|e| format!("{name}: {e}"))?;
        Ok(Weight::Quantized(Arc::new(m)))
    }
    fn split_rows(&mut self, fused: &str, parts: &[usize], names: &[String]) -> Result<(), String> {
        // Rows are consecutive in the file: each part is a tensor of its own
        // at an offset into the fused one's bytes; nothing is read here.
        let t = self
            .tensors
            .remove(fused)
            .ok_or_else(|| format!("the weights have no tensor {fused}"))?;
        let (&rows, rest) = t
            .shape
            .split_first()
            .ok_or(format!("{fused} is a scalar"))?;
        let row_bytes = (rest.iter().product::<usize>() * t.dtype.size_in_bytes()) as u64;
        for ((at, n), name) in row_parts(fused, rows, parts, "the config")?
            .into_iter()
            .zip(names)
        {
            let mut shape = t.shape.clone();
            shape[0] = n;
            let part = StoredTensor {
                shape,
                start: t.start + at as u64 * row_bytes,
                ..t.clone()
            };
            self.tensors.insert(name.clone(), part);
        }
        Ok(())
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn same_values(&self, a: &str, b: &str) -> Result<bool, String> {
        let get = |name: &str| {
            self.tensors
                .get(name)
                .ok_or_else(|| format!("the weights have no tensor {name}"))
        };
        let (x, y) = (get(a)?, get(b)?);
        if x.shape != y.shape {
            return Ok(false);
        }
        // Band by band, as a tensor is read: never a whole copy of either.
        for (at, n) in self.bands(x) {
            let (u, v) = (self.read_rows(a, x, at, n)?, self.read_rows(b, y, at, n)?);
            if !same_bits(&u, &v).map_err(|e| format!("{a}, {b}: {e}"))? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A GGUF file of a `llama` or `qwen2` model, dequantised to f32.
pub fn load_gguf(path: &Path, device: &Device) -> Result<Loaded> {
    load_gguf_with(path, device, Quantize::None)
}

/// Like [`load_gguf`]; with [`Quantize::Gguf`] the projections, the
/// embedding and the output matrix stay in the blocks the file stores
/// them in, with [`Quantize::To`] each is quantised as it is read.
pub fn load_gguf_with(path: &Path, device: &Device, quantize: Quantize) -> Result<Loaded> {
    load_gguf_as(path, device, quantize, DType::F32)
}

/// [`load_gguf_with`], the dense tensors cast to `dtype` one at a time as
/// they are read (unless `quantize` keeps a quantised base, in f32).
fn load_gguf_as(path: &Path, device: &Device, quantize: Quantize, dtype: DType) -> Result<Loaded> {
    let dtype = if quantize == Quantize::None {
        dtype
    } else {
        DType::F32
    };
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::file(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::file(path, e))?;
    let meta = |key: &str| -> Result<&Value> {
        content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::file(path, format!("no {key} in the metadata")))
    };
    let arch = meta("general.architecture")?
        .to_string()
        .map_err(|e| ModelError::file(path, e))?
        .clone();
    if !matches!(
        arch.as_str(),
        "llama" | "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3"
    ) {
        return Err(ModelError::file(
            path,
            format!("architecture {arch:?} is not a llama-family decoder this loader knows"),
        ));
    }
    // Every key of the architecture is read below or refused here by
    // name: a key fedveil ignored could change what the model computes.
    const KNOWN: &[&str] = &[
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "vocab_size",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.layer_norm_rms_epsilon",
        "attention.key_length",
        "attention.value_length",
        "rope.freq_base",
        "rope.dimension_count",
        "rope.scaling.type",
        "rope.scaling.factor",
        "rope.scaling.original_context_length",
        "rope.scaling.finetuned",
        "attention.sliding_window",
        "expert_count",
        "expert_used_count",
    ];
    // Gemma's, read as llama.cpp reads them.
    let gemma_known: &[&str] = match arch.as_str() {
        "gemma2" => &[
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "attention.sliding_window_pattern",
        ],
        "gemma3" => &["attention.sliding_window_pattern", "rope.freq_base_swa"],
        _ => &[],
    };
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    for key in keys {
        if let Some(rest) = key.strip_prefix(&format!("{arch}."))
            && !KNOWN.contains(&rest)
            && !gemma_known.contains(&rest)
        {
            return Err(ModelError::file(
                path,
                format!(
                    "metadata key {key} is not implemented by fedveil's {arch} decoder; it is \
                     refused rather than ignored, since it may change what the model computes"
                ),
            ));
        }
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(ModelError::file(
            path,
            "tensor rope_freqs.weight: per-frequency rotary factors (llama.cpp's form of \
             Llama-3.1's rope_scaling) are not implemented for GGUF files; load the Hugging \
             Face directory instead",
        ));
    }
    let int = |key: &str| -> Result<usize> {
        let v = meta(&format!("{arch}.{key}"))?;
        Ok(v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .map_err(|e| ModelError::file(path, format!("{arch}.{key}: {e}")))? as usize)
    };
    let float = |key: &str, default: f64| -> Result<f64> {
        match content.metadata.get(&format!("{arch}.{key}")) {
            None => Ok(default),
            Some(v) => {
                Ok(f64::from(v.to_f32().map_err(|e| {
                    ModelError::file(path, format!("{arch}.{key}: {e}"))
                })?))
            }
        }
    };
    let named = |name: &str| {
        let name = name.to_string();
        move |e: candle_core::Error| ModelError::file(path, format!("tensor {name}: {e}"))
    };
    let tensor_f32 = |file: &mut std::fs::File, name: &str| -> Result<Tensor> {
        let q = content.tensor(file, name, device).map_err(named(name))?;
        q.dequantize(device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(named(name))
    };
    // In the dtype the model computes in, one tensor at a time (each
    // dequantised to f32 first, one at a time).
    let tensor = |file: &mut std::fs::File, name: &str| -> Result<Tensor> {
        tensor_f32(file, name)?.to_dtype(dtype).map_err(named(name))
    };
    // A projection, embedding or output matrix: kept in its blocks when
    // asked to, else dequantised like every other tensor.
    let weight = |file: &mut std::fs::File, name: &str| -> Result<Weight> {
        match quantize {
            Quantize::None => return Ok(Weight::Dense(tensor(file, name)?)),
            Quantize::To(format) => {
                return Weight::Dense(tensor(file, name)?)
                    .quantize(format)
                    .map_err(|e| ModelError::file(path, format!("tensor {name}: {e}")));
            }
            Quantize::Gguf => {}
        }
        let Some(info) = content.tensor_infos.get(name) else {
            return Err(ModelError::file(path, format!("no tensor {name}")));
        };
        match info.ggml_dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Ok(Weight::Dense(tensor(file, name)?))
            }
            dtype => match QuantFormat::from_ggml(dtype) {
                // Straight from the file into the blocks kept.
                Some(format) => {
                    let bad = |e: &dyn std::fmt::Display| {
                        ModelError::file(path, format!("tensor {name}: {e}"))
                    };
                    let (rows, cols) = info.shape.dims2().map_err(|e| bad(&e))?;
                    // The bytes the header promises must be in the file
                    // before anything is allocated for them.
                    let (_, bytes) = QuantMatrix::size(format, rows, cols).map_err(|e| bad(&e))?;
                    let len = file.metadata().map_err(|e| bad(&e))?.len();
                    let start = content
                        .tensor_data_offset
                        .checked_add(info.offset)
                        .filter(|s| s.checked_add(bytes as u64).is_some_and(|end| end <= len))
                        .ok_or_else(|| {
                            bad(&format!(
                                "its {bytes} bytes at offset {} are not within the file's {len}",
                                info.offset
                            ))
                        })?;
                    file.seek(std::io::SeekFrom::Start(start))
                        .map_err(|e| bad(&e))?;
                    Ok(Weight::Quantized(Arc::new(
                        QuantMatrix::read_from(format, rows, cols, file).map_err(|e| bad(&e))?,
                    )))
                }
                None => Err(ModelError::file(
                    path,
                    format!(
                        "tensor {name} is stored as {dtype:?}, which quantize = \"gguf\" does \
                         not keep (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K are kept; \
                         quantize = \"none\" dequantises it)"
                    ),
                )),
            },
        }
    };
    let opt_int = |key: &str| -> Result<Option<usize>> {
        if content.metadata.contains_key(&format!("{arch}.{key}")) {
            int(key).map(Some)
        } else {
            Ok(None)
        }
    };
    for key in ["expert_count", "expert_used_count"] {
        if opt_int(key)?.is_some_and(|n| n > 0) {
            return Err(ModelError::file(
                path,
                format!("{arch}.{key}: mixture-of-experts layers are not implemented"),
            ));
        }
    }
    let rope_scaling = match content.metadata.get(&format!("{arch}.rope.scaling.type")) {
        None => None,
        Some(v) => match v
            .to_string()
            .map_err(|e| ModelError::file(path, e))?
            .as_str()
        {
            "none" => None,
            "linear" => Some(crate::config::RopeScaling::Linear {
                factor: float("rope.scaling.factor", f64::NAN)?,
            }),
            other => {
                return Err(ModelError::file(
                    path,
                    format!(
                        "{arch}.rope.scaling.type {other:?} is not implemented (fedveil \
                         implements \"linear\")"
                    ),
                ));
            }
        },
    };
    let heads = int("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
    let hidden = int("embedding_length")?;
    let embed = weight(&mut file, "token_embd.weight")?;
    let vocab_size = embed.dims2()?.0;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let layers = int("block_count")?;
    let gemma = gemma_gguf(&arch, &content.metadata, layers, hidden, heads)
        .map_err(|e| ModelError::file(path, e))?;
    let config = LlamaConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: int("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: float(
            "rope.freq_base",
            if arch == "gemma3" { 1e6 } else { 10_000.0 },
        )?,
        max_position_embeddings: int("context_length").unwrap_or(2048),
        tie_word_embeddings: tied,
        attention_bias: arch == "qwen2",
        qk_norm: matches!(arch.as_str(), "qwen3" | "gemma3"),
        bos_token_id: meta("tokenizer.ggml.bos_token_id")
            .ok()
            .and_then(|v| v.to_u32().ok()),
        eos_token_id: meta("tokenizer.ggml.eos_token_id")
            .ok()
            .and_then(|v| v.to_u32().ok()),
        head_dim: opt_int("attention.key_length")?,
        rope_scaling,
        // Phi-4 writes 0 for "no window"; Gemma-2's is 4096 unless said.
        sliding_window: match opt_int("attention.sliding_window")? {
            None if arch == "gemma2" => Some(4096),
            w => w.filter(|&w| w > 0),
        },
        hidden_act: if gemma.is_some() {
            crate::config::Activation::GeluTanh
        } else {
            crate::config::Activation::Silu
        },
        norm_unit_offset: gemma.is_some(),
        sandwich_norms: gemma.is_some(),
        embed_scale: gemma.is_some(),
        layer_types: gemma.as_ref().map(|g| g.layer_types.clone()),
        rope_local_base_freq: gemma.as_ref().and_then(|g| g.rope_local_base_freq),
        query_pre_attn_scalar: gemma.as_ref().map(|g| g.query_pre_attn_scalar),
        attn_logit_softcapping: gemma.as_ref().and_then(|g| g.attn_logit_softcapping),
        final_logit_softcapping: gemma.as_ref().and_then(|g| g.final_logit_softcapping),
    }
    .canonical();
    config.validate().map_err(|e| ModelError::file(path, e))?;
    if let Some(v) = opt_int("attention.value_length")?
        && v != config.head_dim()
    {
        return Err(ModelError::file(
            path,
            format!(
                "{arch}.attention.value_length {v} differs from the key width {}: not implemented",
                config.head_dim()
            ),
        ));
    }
    if let Some(d) = opt_int("rope.dimension_count")?
        && d != config.head_dim()
    {
        return Err(ModelError::file(
            path,
            format!(
                "{arch}.rope.dimension_count {d}: rotary embeddings on part of the {}-wide head \
                 are not implemented",
                config.head_dim()
            ),
        ));
    }
    if let Some(v) = opt_int("vocab_size")?
        && v != config.vocab_size
    {
        return Err(ModelError::file(
            path,
            format!(
                "{arch}.vocab_size {v} differs from token_embd.weight's {} rows",
                config.vocab_size
            ),
        ));
    }
    let head_dim = config.head_dim();
    // llama.cpp stores llama's Q and K rows interleaved for its rope kernel;
    // undo that to get Hugging Face's "rotate half" layout. Qwen2 is stored
    // unpermuted.
    let unpermute = |t: Tensor, n: usize| -> Result<Tensor> {
        if arch != "llama" {
            return Ok(t);
        }
        let dims = t.dims().to_vec();
        let rest: usize = dims[1..].iter().product();
        Ok(t.reshape((n, head_dim / 2, 2, rest))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape(dims)?)
    };
    // The same on whole rows of a quantised matrix: row `i` of the result
    // is row `order[i]` of the file's.
    let unpermute_weight = |w: Weight, n: usize| -> Result<Weight> {
        match w {
            Weight::Dense(t) => Ok(Weight::Dense(unpermute(t, n)?)),
            Weight::Quantized(q) if arch == "llama" => {
                let rows = q.rows() as u32;
                let order =
                    unpermute(Tensor::arange(0u32, rows, &Device::Cpu)?, n)?.to_vec1::<u32>()?;
                Ok(Weight::Quantized(Arc::new(q.permute_rows(&order)?)))
            }
            w => Ok(w),
        }
    };
    // llama.cpp's converter stores Gemma's norms as the `1 + w` they
    // multiply by; fedveil keeps `w`, as Hugging Face's checkpoints do.
    let norm = |file: &mut std::fs::File, name: &str| -> Result<Tensor> {
        let t = tensor_f32(file, name)?;
        let t = if config.norm_unit_offset {
            (t - 1.0).map_err(named(name))?
        } else {
            t
        };
        t.to_dtype(dtype).map_err(named(name))
    };
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("blk.{i}");
        let linear =
            |file: &mut std::fs::File, name: &str, permute: Option<usize>| -> Result<Linear> {
                let w = weight(file, &format!("{p}.{name}.weight"))?;
                let bias_name = format!("{p}.{name}.bias");
                let b = if content.tensor_infos.contains_key(&bias_name) {
                    Some(tensor(file, &bias_name)?)
                } else {
                    None
                };
                Ok(match permute {
                    Some(n) => Linear::new(
                        unpermute_weight(w, n)?,
                        b.map(|b| unpermute(b, n)).transpose()?,
                    ),
                    None => Linear::new(w, b),
                })
            };
        // Phi-3 keeps Q, K and V in one `attn_qkv` (rows in that order)
        // and the gate and up projections in one `ffn_up` (gate first), as
        // its Hugging Face checkpoint does: split into rows of their own.
        let fused =
            |file: &mut std::fs::File, name: &str, parts: &[usize]| -> Result<Vec<Linear>> {
                let l = linear(file, name, None)?;
                let rows = l.weight.dims2()?.0;
                if let Some(b) = &l.bias
                    && b.dims1()? != rows
                {
                    return Err(ModelError::file(
                        path,
                        format!("tensor {p}.{name}.bias does not have the matrix's {rows} rows"),
                    ));
                }
                let name = format!("tensor {p}.{name}.weight");
                let ranges = row_parts(&name, rows, parts, "the metadata")
                    .map_err(|e| ModelError::file(path, e))?;
                let mut out = Vec::with_capacity(parts.len());
                for (at, n) in ranges {
                    let w = match &l.weight {
                        Weight::Dense(t) => Weight::Dense(t.narrow(0, at, n)?.contiguous()?),
                        Weight::Quantized(q) => Weight::Quantized(Arc::new(q.row_range(at, n)?)),
                    };
                    let b = l.bias.as_ref().map(|b| b.narrow(0, at, n)).transpose()?;
                    out.push(Linear::new(w, b));
                }
                Ok(out)
            };
        let (q, k, v, gate, up) = if arch == "phi3" {
            let split = |parts: Vec<Linear>| {
                ModelError::file(
                    path,
                    format!("{p}: a fused projection split into {}", parts.len()),
                )
            };
            let [q, k, v] = <[Linear; 3]>::try_from(fused(
                &mut file,
                "attn_qkv",
                &[config.q_dim(), config.kv_dim(), config.kv_dim()],
            )?)
            .map_err(split)?;
            let [gate, up] = <[Linear; 2]>::try_from(fused(
                &mut file,
                "ffn_up",
                &[config.intermediate_size; 2],
            )?)
            .map_err(split)?;
            (q, k, v, gate, up)
        } else {
            (
                linear(&mut file, "attn_q", Some(heads))?,
                linear(&mut file, "attn_k", Some(kv_heads))?,
                linear(&mut file, "attn_v", None)?,
                linear(&mut file, "ffn_gate", None)?,
                linear(&mut file, "ffn_up", None)?,
            )
        };
        let o = linear(&mut file, "attn_output", None)?;
        let down = linear(&mut file, "ffn_down", None)?;
        let mut norm = |name: &str| norm(&mut file, &format!("{p}.{name}.weight"));
        layers.push(Layer {
            input_norm: norm("attn_norm")?,
            qk_norm: if config.qk_norm {
                Some((norm("attn_q_norm")?, norm("attn_k_norm")?))
            } else {
                None
            },
            q,
            k,
            v,
            o,
            post_norm: norm("ffn_norm")?,
            sandwich_norms: if config.sandwich_norms {
                Some((norm("post_attention_norm")?, norm("post_ffw_norm")?))
            } else {
                None
            },
            gate,
            up,
            down,
        });
    }
    // A tensor not read above is a part of the model fedveil would ignore.
    let read = |name: &str| -> bool {
        if matches!(
            name,
            "token_embd.weight" | "output_norm.weight" | "output.weight"
        ) {
            return true;
        }
        let Some((layer, rest)) = name.strip_prefix("blk.").and_then(|r| r.split_once('.')) else {
            return false;
        };
        layer
            .parse::<usize>()
            .is_ok_and(|i| i < config.num_hidden_layers)
            && (matches!(rest, "attn_norm.weight" | "ffn_norm.weight")
                || (config.qk_norm && matches!(rest, "attn_q_norm.weight" | "attn_k_norm.weight"))
                || (config.sandwich_norms
                    && matches!(rest, "post_attention_norm.weight" | "post_ffw_norm.weight"))
                || rest.rsplit_once('.').is_some_and(|(module, kind)| {
                    matches!(kind, "weight" | "bias")
                        && if arch == "phi3" {
                            matches!(module, "attn_qkv" | "attn_output" | "ffn_up" | "ffn_down")
                        } else {
                            matches!(
                                module,
                                "attn_q"
                                    | "attn_k"
                                    | "attn_v"
                                    | "attn_output"
                                    | "ffn_gate"
                                    | "ffn_up"
                                    | "ffn_down"
                            )
                        }
                }))
    };
    let mut unread: Vec<&String> = content.tensor_infos.keys().filter(|n| !read(n)).collect();
    unread.sort();
    if let Some(first) = unread.first() {
        return Err(ModelError::file(
            path,
            format!(
                "{} tensor(s) that fedveil's {arch} decoder does not use, {first} first: the \
                 file has parts this implementation would ignore",
                unread.len()
            ),
        ));
    }
    let norm = norm(&mut file, "output_norm.weight")?;
    let lm_head = if tied {
        None
    } else {
        Some(weight(&mut file, "output.weight")?)
    };
    let tokenizer = gguf_tokenizer(&content).map_err(|why| ModelError::file(path, why))?;
    let model = Llama::new(
        config,
        Weights {
            embed,
            layers,
            norm,
            lm_head,
        },
    )
    .map_err(|e| ModelError::file(path, e))?;
    Ok(Loaded {
        model,
        tokenizer,
        source: path.display().to_string(),
    })
}

pub use crate::gguf_tokenizer::gguf_tokenizer;

/// What a Gemma GGUF file leaves to the reader, as llama.cpp fills it in.
struct GemmaGguf {
    layer_types: Vec<crate::config::LayerType>,
    rope_local_base_freq: Option<f64>,
    query_pre_attn_scalar: f64,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
}

/// Gemma's settings from a `gemma2` or `gemma3` file's metadata (`None` for
/// other architectures), with llama.cpp's rules where the file says
/// nothing: sliding layers in a pattern of 2 (Gemma-2) or 6 (Gemma-3),
/// every pattern-th layer full; Gemma-2's soft caps 50 and 30; Gemma-3's
/// sliding layers on a rotary base of 10,000; and, since the converter
/// does not write `query_pre_attn_scalar`, llama.cpp's rule for it:
/// `hidden / heads` for the 27B models (46 layers for Gemma-2, 62 for
/// Gemma-3), the key width otherwise.
fn gemma_gguf(
    arch: &str,
    metadata: &HashMap<String, Value>,
    layers: usize,
    hidden: usize,
    heads: usize,
) -> std::result::Result<Option<GemmaGguf>, String> {
    use crate::config::LayerType;
    if !matches!(arch, "gemma2" | "gemma3") {
        return Ok(None);
    }
    if layers > crate::config::MAX_LAYERS {
        return Err(format!(
            "{arch}.block_count {layers} is more than {}",
            crate::config::MAX_LAYERS
        ));
    }
    let get = |key: &str| metadata.get(&format!("{arch}.{key}"));
    let float = |key: &str| -> std::result::Result<Option<f64>, String> {
        get(key)
            .map(|v| {
                v.to_f32()
                    .map(f64::from)
                    .map_err(|e| format!("{arch}.{key}: {e}"))
            })
            .transpose()
    };
    let pattern_key = format!("{arch}.attention.sliding_window_pattern");
    let layer_types = match get("attention.sliding_window_pattern") {
        None => LayerType::pattern(layers, if arch == "gemma2" { 2 } else { 6 }),
        // Newer converters write one flag per layer (true: sliding).
        Some(Value::Array(flags)) => {
            let flags: Vec<bool> = flags
                .iter()
                .map(|f| f.to_bool().map_err(|e| format!("{pattern_key}: {e}")))
                .collect::<std::result::Result<_, _>>()?;
            if flags.len() != layers {
                return Err(format!(
                    "{pattern_key} has {} entries for {layers} layers",
                    flags.len()
                ));
            }
            flags
                .into_iter()
                .map(|s| {
                    if s {
                        LayerType::Sliding
                    } else {
                        LayerType::Full
                    }
                })
                .collect()
        }
        Some(v) => {
            let pattern = v.to_u32().map_err(|e| format!("{pattern_key}: {e}"))? as usize;
            if pattern == 0 {
                return Err(format!("{pattern_key} must be positive"));
            }
            LayerType::pattern(layers, pattern)
        }
    };
    let head_dim = match get("attention.key_length") {
        Some(v) => v
            .to_u32()
            .map_err(|e| format!("{arch}.attention.key_length: {e}"))? as usize,
        None => hidden / heads.max(1),
    };
    let big = (arch == "gemma2" && layers == 46) || (arch == "gemma3" && layers == 62);
    let query_pre_attn_scalar = if big {
        (hidden / heads.max(1)) as f64
    } else {
        head_dim as f64
    };
    Ok(Some(if arch == "gemma2" {
        GemmaGguf {
            layer_types,
            rope_local_base_freq: None,
            query_pre_attn_scalar,
            attn_logit_softcapping: Some(float("attn_logit_softcapping")?.unwrap_or(50.0)),
            final_logit_softcapping: Some(float("final_logit_softcapping")?.unwrap_or(30.0)),
        }
    } else {
        GemmaGguf {
            layer_types,
            rope_local_base_freq: Some(float("rope.freq_base_swa")?.unwrap_or(10_000.0)),
            query_pre_attn_scalar,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_read_in_bands_is_the_tensor_read_whole() {
        let dir = std::env::temp_dir().join(format!("fedveil-bands-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values: Vec<f32> = (0..300 * 64)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let whole = Tensor::from_vec(values, (300, 64), &Device::Cpu).unwrap();
        let stored = whole.to_dtype(DType::BF16).unwrap();
        let tensors: HashMap<String, Tensor> = [
            ("m".to_string(), stored.clone()),
            ("v".to_string(), stored.get(3).unwrap()),
        ]
        .into();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        let mut files = SafetensorFiles::open(&dir, &Device::Cpu).unwrap();
        // 7 rows a band: 42 bands of 7 and one of 6.
        files.band_elems = 7 * 64;
        assert_eq!(files.bands(&files.tensors["m"]).len(), 43);
        let want = stored.to_dtype(DType::F32).unwrap();
        let got = files.take_dense("m").unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&got), flat(&want));
        assert_eq!(
            flat(&files.take_dense("v").unwrap()),
            flat(&want.get(3).unwrap())
        );
        // Compared band by band: equal, and a difference in the last band
        // found.
        let mut changed = want.to_vec2::<f32>().unwrap();
        changed[299][63] += 0.25;
        let changed = Tensor::new(changed, &Device::Cpu).unwrap();
        let pair: HashMap<String, Tensor> = [
            ("m".to_string(), stored.clone()),
            ("same".to_string(), stored.clone()),
            ("other".to_string(), changed.to_dtype(DType::BF16).unwrap()),
            ("short".to_string(), stored.narrow(0, 0, 299).unwrap()),
        ]
        .into();
        let cmp = dir.join("cmp");
        std::fs::create_dir_all(&cmp).unwrap();
        candle_core::safetensors::save(&pair, cmp.join("model.safetensors")).unwrap();
        let mut files = SafetensorFiles::open(&cmp, &Device::Cpu).unwrap();
        files.band_elems = 7 * 64;
        assert!(files.same_values("m", "same").unwrap());
        assert!(!files.same_values("m", "other").unwrap());
        assert!(!files.same_values("m", "short").unwrap());
        assert!(files.same_values("m", "nothing").is_err());
        // In bf16, band by band: the stored values, exactly.
        let mut files = SafetensorFiles::open(&dir, &Device::Cpu).unwrap();
        files.band_elems = 7 * 64;
        files.dtype = DType::BF16;
        let got = files.take_dense("m").unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(flat(&got.to_dtype(DType::F32).unwrap()), flat(&want));
        // Quantised band by band: the blocks of the whole matrix quantised.
        let mut files = SafetensorFiles::open(&dir, &Device::Cpu).unwrap();
        files.band_elems = 7 * 64;
        let Weight::Quantized(q) = files.take_matrix("m", Some(QuantFormat::Q8_0)).unwrap() else {
            panic!("a quantised matrix");
        };
        let whole_q = QuantMatrix::quantize(&want, QuantFormat::Q8_0).unwrap();
        assert_eq!((q.rows(), q.cols()), (300, 64));
        assert_eq!(q.row_data(0, 300), whole_q.row_data(0, 300));
        assert!(files.take_dense("m").unwrap_err().contains("no tensor m"));
        // A header whose shape has an empty dimension beside a huge one
        // (0 bytes, so the byte count alone would pass) is refused.
        let header =
            br#"{"x":{"dtype":"F32","shape":[4611686018427387904,0],"data_offsets":[0,0]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        let err = SafetensorFiles::open(&dir, &Device::Cpu)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("tensor x has an empty dimension"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
