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
/// computes in f32 on the CPU).
pub fn load_with(path: &Path, device: &Device, quantize: Quantize) -> Result<Loaded> {
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
        let mut loaded = load_hf_dir(path, device)?;
        if let Quantize::To(format) = quantize {
            loaded.model = loaded.model.quantize(format)?;
        }
        loaded
    } else if path.extension().is_some_and(|e| e == "gguf") {
        load_gguf_with(path, device, quantize)?
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
    let config_path = dir.join("config.json");
    let json = crate::files::read_json(&config_path)?;
    let config = LlamaConfig::from_hf_json(&json).map_err(|e| ModelError::file(&config_path, e))?;
    let mut tensors = read_safetensors(dir, device)?;
    if json.get("model_type").and_then(|t| t.as_str()) == Some("phi3") {
        unfuse_phi3(&config, &mut tensors).map_err(|why| ModelError::file(dir, why))?;
    }
    let weights = weights_from_map(&config, &mut tensors, config.num_hidden_layers)
        .map_err(|why| ModelError::file(dir, why))?;
    // A tensor fedveil did not read is a part of the model it does not
    // compute. Two kinds are safe to leave: a tied checkpoint's copy of the
    // embedding as `lm_head.weight` (transformers ties over it too) and the
    // rotary frequencies old checkpoints stored (recomputed from the config).
    let mut left: Vec<&String> = tensors
        .keys()
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
fn unfuse_phi3(config: &LlamaConfig, tensors: &mut HashMap<String, Tensor>) -> Result<(), String> {
    let split = |t: &Tensor, name: &str, parts: &[usize]| -> Result<Vec<Tensor>, String> {
        let rows = t.dim(0).map_err(|e| format!("{name}: {e}"))?;
        let mut out = Vec::with_capacity(parts.len());
        for (at, n) in row_parts(name, rows, parts, "the config")? {
            out.push(t.narrow(0, at, n).map_err(|e| format!("{name}: {e}"))?);
        }
        Ok(out)
    };
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
            let t = tensors
                .remove(&fused)
                .ok_or_else(|| format!("the weights have no tensor {fused}"))?;
            for (part, name) in split(&t, &fused, &parts)?.into_iter().zip(names) {
                tensors.insert(format!("{p}.{name}.weight"), part);
            }
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
    // Llama's `attention_bias` also puts a bias on the output projection;
    // Qwen2's bias is on q, k and v only.
    let o_bias: Vec<bool> = (0..layers)
        .map(|i| tensors.contains_key(&format!("model.layers.{i}.self_attn.o_proj.bias")))
        .collect();
    let mut take = |name: &str| -> Result<Tensor, String> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| format!("the weights have no tensor {name}"))?;
        t.to_dtype(DType::F32).map_err(|e| format!("{name}: {e}"))
    };
    let mut out = Vec::with_capacity(layers);
    for (i, o_bias) in o_bias.into_iter().enumerate() {
        let p = format!("model.layers.{i}");
        let mut linear = |module: Module, bias: bool| -> Result<Linear, String> {
            let path = format!("{p}.{}.{}", module.parent(), module.name());
            let weight = take(&format!("{path}.weight"))?;
            let bias = if bias {
                Some(take(&format!("{path}.bias"))?)
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
            input_norm: take(&format!("{p}.input_layernorm.weight"))?,
            qk_norm: if config.qk_norm {
                Some((
                    take(&format!("{p}.self_attn.q_norm.weight"))?,
                    take(&format!("{p}.self_attn.k_norm.weight"))?,
                ))
            } else {
                None
            },
            q,
            k,
            v,
            o,
            post_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            gate,
            up,
            down,
        });
    }
    let embed = take("model.embed_tokens.weight")?;
    let norm = take("model.norm.weight")?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(take("lm_head.weight")?)
    };
    Ok(Weights {
        embed: embed.into(),
        layers: out,
        norm,
        lm_head: lm_head.map(Weight::from),
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
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            Weight::Dense(l.post_norm.clone()),
        ));
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
    let (model_type, architecture) = if model.config().qk_norm {
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
        o.remove("qk_norm");
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

/// Every tensor of `model.safetensors`, or of the shards that
/// `model.safetensors.index.json` lists.
fn read_safetensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let json = crate::files::read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::file(&index, "no weight_map object"))?;
        let mut shards = BTreeSet::new();
        for file in map.values() {
            let name = file
                .as_str()
                .ok_or_else(|| ModelError::file(&index, "a weight_map entry is not a file name"))?;
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
    let mut tensors = HashMap::new();
    for file in files {
        let part = candle_core::safetensors::load(&file, device)
            .map_err(|e| ModelError::file(&file, e))?;
        tensors.extend(part);
    }
    Ok(tensors)
}

/// A GGUF file of a `llama` or `qwen2` model, dequantised to f32.
pub fn load_gguf(path: &Path, device: &Device) -> Result<Loaded> {
    load_gguf_with(path, device, Quantize::None)
}

/// Like [`load_gguf`]; with [`Quantize::Gguf`] the projections, the
/// embedding and the output matrix stay in the blocks the file stores
/// them in, with [`Quantize::To`] each is quantised as it is read.
pub fn load_gguf_with(path: &Path, device: &Device, quantize: Quantize) -> Result<Loaded> {
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
    if !matches!(arch.as_str(), "llama" | "qwen2" | "qwen3" | "phi3") {
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
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    for key in keys {
        if let Some(rest) = key.strip_prefix(&format!("{arch}."))
            && !KNOWN.contains(&rest)
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
    let tensor = |file: &mut std::fs::File, name: &str| -> Result<Tensor> {
        let q = content
            .tensor(file, name, device)
            .map_err(|e| ModelError::file(path, format!("tensor {name}: {e}")))?;
        Ok(q.dequantize(device)?.to_dtype(DType::F32)?)
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
    let config = LlamaConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: int("feed_forward_length")?,
        num_hidden_layers: int("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: float("rope.freq_base", 10_000.0)?,
        max_position_embeddings: int("context_length").unwrap_or(2048),
        tie_word_embeddings: tied,
        attention_bias: arch == "qwen2",
        qk_norm: arch == "qwen3",
        bos_token_id: meta("tokenizer.ggml.bos_token_id")
            .ok()
            .and_then(|v| v.to_u32().ok()),
        eos_token_id: meta("tokenizer.ggml.eos_token_id")
            .ok()
            .and_then(|v| v.to_u32().ok()),
        head_dim: opt_int("attention.key_length")?,
        rope_scaling,
        // Phi-4 writes 0 for "no window".
        sliding_window: opt_int("attention.sliding_window")?.filter(|&w| w > 0),
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
        layers.push(Layer {
            input_norm: tensor(&mut file, &format!("{p}.attn_norm.weight"))?,
            qk_norm: if arch == "qwen3" {
                Some((
                    tensor(&mut file, &format!("{p}.attn_q_norm.weight"))?,
                    tensor(&mut file, &format!("{p}.attn_k_norm.weight"))?,
                ))
            } else {
                None
            },
            q,
            k,
            v,
            o,
            post_norm: tensor(&mut file, &format!("{p}.ffn_norm.weight"))?,
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
                || (arch == "qwen3" && matches!(rest, "attn_q_norm.weight" | "attn_k_norm.weight"))
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
    let norm = tensor(&mut file, "output_norm.weight")?;
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
