//! Loading a model and its tokenizer: a Hugging Face directory
//! (`config.json`, `model.safetensors` or a sharded index, `tokenizer.json`)
//! or a single GGUF file (dequantised to f32, the tokenizer rebuilt from the
//! file's metadata).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::config::LlamaConfig;
use crate::model::{Layer, Linear, Llama, Module, Weights};
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
    progress: &mut dyn FnMut(&str),
) -> Result<Loaded> {
    let path = match spec {
        None | Some(DEFAULT_MODEL) => {
            let cache = crate::fetch::cache_dir()?;
            crate::fetch::ensure(&crate::fetch::SMOLLM2_135M, &cache, progress)?
        }
        Some(p) => PathBuf::from(p),
    };
    let mut loaded = load(&path, device)?;
    loaded.model = loaded.model.to_dtype(crate::compute_dtype(device))?;
    Ok(loaded)
}

/// Loads a GGUF file, or a Hugging Face model directory, onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<Loaded> {
    if !path.exists() {
        Err(ModelError::file(path, "no such file or directory"))
    } else if path.is_dir() {
        load_hf_dir(path, device)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        load_gguf(path, device)
    } else {
        Err(ModelError::file(
            path,
            "neither a .gguf file nor a model directory (config.json, model.safetensors, tokenizer.json)",
        ))
    }
}

/// A Hugging Face `LlamaForCausalLM` or `Qwen2ForCausalLM` directory.
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<Loaded> {
    let config_path = dir.join("config.json");
    let json = crate::files::read_json(&config_path)?;
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("llama");
    let mut config: LlamaConfig =
        serde_json::from_value(json.clone()).map_err(|e| ModelError::file(&config_path, e))?;
    match model_type {
        "llama" | "mistral" => {}
        // Qwen2 always has the q/k/v bias and says so nowhere.
        "qwen2" => config.attention_bias = true,
        other => {
            return Err(ModelError::file(
                &config_path,
                format!("model_type {other:?} is not a llama-family decoder this loader knows"),
            ));
        }
    }
    config
        .validate()
        .map_err(|e| ModelError::file(&config_path, e))?;
    let mut tensors = read_safetensors(dir, device)?;
    let weights = weights_from_map(&config, &mut tensors, config.num_hidden_layers)
        .map_err(|why| ModelError::file(dir, why))?;
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

/// Takes a model's weights out of `tensors`, by their Hugging Face names
/// (`model.layers.{i}.self_attn.q_proj.weight`, ...), as f32, for `layers`
/// layers numbered from 0. The error names the missing tensor.
pub(crate) fn weights_from_map(
    config: &LlamaConfig,
    tensors: &mut HashMap<String, Tensor>,
    layers: usize,
) -> Result<Weights, String> {
    let mut take = |name: &str| -> Result<Tensor, String> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| format!("the weights have no tensor {name}"))?;
        t.to_dtype(DType::F32).map_err(|e| format!("{name}: {e}"))
    };
    let mut out = Vec::with_capacity(layers);
    for i in 0..layers {
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
        let o = linear(Module::O, false)?;
        let gate = linear(Module::Gate, false)?;
        let up = linear(Module::Up, false)?;
        let down = linear(Module::Down, false)?;
        out.push(Layer {
            input_norm: take(&format!("{p}.input_layernorm.weight"))?,
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
        embed,
        layers: out,
        norm,
        lm_head,
    })
}

/// A model's weights under their Hugging Face names (the inverse of
/// [`weights_from_map`]), layers numbered by position.
pub(crate) fn weights_to_map(weights: &Weights) -> Vec<(String, Tensor)> {
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        weights.embed.clone(),
    )];
    for (i, l) in weights.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), l.input_norm.clone()));
        for module in Module::ALL {
            let linear = l.linear(module);
            let path = format!("{p}.{}.{}", module.parent(), module.name());
            out.push((format!("{path}.weight"), linear.weight.clone()));
            if let Some(b) = &linear.bias {
                out.push((format!("{path}.bias"), b.clone()));
            }
        }
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            l.post_norm.clone(),
        ));
    }
    out.push(("model.norm.weight".to_string(), weights.norm.clone()));
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
    config["model_type"] = if model.config().attention_bias {
        "qwen2"
    } else {
        "llama"
    }
    .into();
    config["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    crate::files::write_atomically(&dir.join("config.json"), config.to_string().as_bytes())?;
    let tensors: HashMap<String, Tensor> = weights_to_map(model.weights())
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.contiguous()?)))
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
    if arch != "llama" && arch != "qwen2" {
        return Err(ModelError::file(
            path,
            format!("architecture {arch:?} is not a llama-family decoder this loader knows"),
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
    let heads = int("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
    let hidden = int("embedding_length")?;
    let embed = tensor(&mut file, "token_embd.weight")?;
    let vocab_size = embed.dim(0)?;
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
        bos_token_id: meta("tokenizer.ggml.bos_token_id")
            .ok()
            .and_then(|v| v.to_u32().ok()),
        eos_token_id: meta("tokenizer.ggml.eos_token_id")
            .ok()
            .and_then(|v| v.to_u32().ok()),
    };
    config.validate().map_err(|e| ModelError::file(path, e))?;
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
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("blk.{i}");
        let linear = |file: &mut std::fs::File,
                      name: &str,
                      permute: Option<usize>|
         -> Result<Linear> {
            let w = tensor(file, &format!("{p}.{name}.weight"))?;
            let bias_name = format!("{p}.{name}.bias");
            let b = if content.tensor_infos.contains_key(&bias_name) {
                Some(tensor(file, &bias_name)?)
            } else {
                None
            };
            Ok(match permute {
                Some(n) => Linear::new(unpermute(w, n)?, b.map(|b| unpermute(b, n)).transpose()?),
                None => Linear::new(w, b),
            })
        };
        let q = linear(&mut file, "attn_q", Some(heads))?;
        let k = linear(&mut file, "attn_k", Some(kv_heads))?;
        let v = linear(&mut file, "attn_v", None)?;
        let o = linear(&mut file, "attn_output", None)?;
        let gate = linear(&mut file, "ffn_gate", None)?;
        let up = linear(&mut file, "ffn_up", None)?;
        let down = linear(&mut file, "ffn_down", None)?;
        layers.push(Layer {
            input_norm: tensor(&mut file, &format!("{p}.attn_norm.weight"))?,
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
    let norm = tensor(&mut file, "output_norm.weight")?;
    let lm_head = if tied {
        None
    } else {
        Some(tensor(&mut file, "output.weight")?)
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

/// The byte-level BPE tokenizer that a GGUF file's `tokenizer.ggml.*`
/// metadata describes (`model = "gpt2"`): the vocabulary and merges, the
/// pre-tokenizer GPT-2-style BPE models use (digits split one by one, then
/// byte-level without a prefix space), and its control tokens as special
/// tokens. candle's own GGUF tokenizer falls back to GPT-2's defaults for
/// SmolLM2 and produces different ids.
pub fn gguf_tokenizer(content: &gguf_file::Content) -> Result<Tokenizer, String> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::{AddedToken, PreTokenizerWrapper};

    let get = |key: &str| {
        content
            .metadata
            .get(key)
            .ok_or(format!("no {key} in the metadata"))
    };
    let model = get("tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| e.to_string())?;
    if model != "gpt2" {
        return Err(format!(
            "tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
        ));
    }
    let strings = |key: &str| -> Result<Vec<String>, String> {
        get(key)?
            .to_vec()
            .map_err(|e| format!("{key}: {e}"))?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| format!("{key}: {e}")))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|t| t.to_i32().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or(format!("merge {m:?} is not two tokens"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("cannot build the BPE model: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // Token type 3 is a control token (llama.cpp's LLAMA_TOKEN_TYPE_CONTROL).
    let special: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == 3)
        .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| format!("cannot add the control tokens: {e}"))?;
    Ok(tokenizer)
}
