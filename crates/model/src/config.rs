//! The architecture of a llama-family decoder.
//!
//! The fields and their names follow Hugging Face's `config.json` for
//! `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
//! `Qwen3ForCausalLM`, `Phi3ForCausalLM`, `Gemma2ForCausalLM` and
//! `Gemma3ForCausalLM`, which differ from Llama's by settings this one
//! decoder implements (biases, q/k norms, GeGLU, Gemma's norms, scales,
//! soft caps and sliding layers). [`LlamaConfig::from_hf_json`] reads a model directory's
//! `config.json` and refuses every key it does not implement, by name: a key
//! that would change the computation is never ignored.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ModelError;

/// The shape of a llama-family model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: the number of key/value heads (defaults to
    /// `num_attention_heads`, plain multi-head attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// The output projection is the token embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Qwen2-style bias on the query, key and value projections.
    #[serde(default, alias = "qkv_bias")]
    pub attention_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Some configs list several end-of-sequence ids; the first is kept.
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Option<u32>,
    /// The width of one attention head, where it is not
    /// `hidden_size / num_attention_heads` (Llama-3.2, Mistral-Nemo, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// How the rotary frequencies are rescaled for long contexts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Sliding-window attention: each query sees at most this many keys,
    /// itself and those just before it (Mistral's, in every layer; Gemma's,
    /// in the layers `layer_types` calls sliding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen3's and Gemma-3's RMSNorm on each query and key head, before the
    /// rotary embedding.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qk_norm: bool,
    /// The MLP's activation: SwiGLU's `silu` or GeGLU's
    /// `gelu_pytorch_tanh` (Gemma's `hidden_activation`).
    #[serde(default, skip_serializing_if = "Activation::is_silu")]
    pub hidden_act: Activation,
    /// Each layer's attention, where layers differ (Gemma): a sliding layer
    /// sees at most `sliding_window` keys. `None`: every layer is the same,
    /// sliding when `sliding_window` is set (Mistral).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<LayerType>>,
    /// Gemma-3's rotary base for its sliding layers (unscaled); the full
    /// layers take `rope_theta` and `rope_scaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma's attention scale `query_pre_attn_scalar^(-1/2)` in place of
    /// `head_dim^(-1/2)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma-2's soft cap on the attention scores: `c·tanh(s/c)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma-2's soft cap on the output logits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma's RMSNorm: the normalised input times `1 + w`, where Llama's
    /// times `w`. The weights are kept as the checkpoint stores them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub norm_unit_offset: bool,
    /// Gemma-2's and Gemma-3's extra norms on the attention's and the MLP's
    /// outputs, before each joins the residual stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sandwich_norms: bool,
    /// Gemma's token embeddings times `√hidden_size` (the table's rows,
    /// not a soft prompt's: transformers scales in the embedding module).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub embed_scale: bool,
}

/// The MLP's activation, by Hugging Face's name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `silu(gate) · up` (SwiGLU).
    #[default]
    #[serde(rename = "silu")]
    Silu,
    /// `gelu_tanh(gate) · up` (GeGLU), GELU's tanh approximation as
    /// PyTorch's `gelu(approximate="tanh")` computes it.
    #[serde(rename = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl Activation {
    fn is_silu(&self) -> bool {
        *self == Activation::Silu
    }

    /// The activation a Hugging Face name means; other names are errors.
    pub fn from_name(name: &str) -> Result<Activation, String> {
        match name {
            "silu" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => Err(format!(
                "activation {other:?} is not implemented (fedveil implements \"silu\" and \
                 \"gelu_pytorch_tanh\")"
            )),
        }
    }
}

/// A layer's attention (Hugging Face's `layer_types`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerType {
    #[serde(rename = "full_attention")]
    Full,
    #[serde(rename = "sliding_attention")]
    Sliding,
}

impl LayerType {
    /// Gemma's pattern: of every `pattern` layers the last is full, the
    /// others slide (transformers' `sliding_window_pattern`, llama.cpp's
    /// swa pattern).
    pub fn pattern(layers: usize, pattern: usize) -> Vec<LayerType> {
        (0..layers)
            .map(|i| {
                if (i + 1) % pattern.max(1) == 0 {
                    LayerType::Full
                } else {
                    LayerType::Sliding
                }
            })
            .collect()
    }
}

/// `rope_scaling`: the rescalings of the rotary frequencies fedveil
/// implements, as Hugging Face's `modeling_rope_utils` computes them. Any
/// other `rope_type` (dynamic, yarn, longrope, ...) is refused by name.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama-3.1's: long wavelengths divided by `factor`, short ones kept,
    /// a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// Reads a `rope_scaling` object; an unknown type or key is an error
    /// that names it.
    pub fn from_json(v: &Value) -> Result<RopeScaling, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| format!("rope_scaling must be an object, got {v}"))?;
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .ok_or("rope_scaling has no rope_type")?;
        if let (Some(a), Some(b)) = (obj.get("rope_type"), obj.get("type"))
            && a != b
        {
            return Err(format!("rope_scaling says rope_type {a} and type {b}"));
        }
        let allowed: &[&str] = match kind {
            "linear" => &["factor"],
            "llama3" => &[
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ],
            "default" => &[],
            other => {
                return Err(format!(
                    "rope_scaling rope_type {other:?} is not implemented (fedveil implements \
                     \"linear\" and \"llama3\")"
                ));
            }
        };
        for key in obj.keys() {
            if key != "rope_type" && key != "type" && !allowed.contains(&key.as_str()) {
                return Err(format!(
                    "rope_scaling key {key:?} is not implemented for rope_type {kind:?}"
                ));
            }
        }
        let num = |key: &str| -> Result<f64, String> {
            let x = obj
                .get(key)
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("rope_scaling ({kind}) needs a number {key}"))?;
            if x.is_finite() && x > 0.0 {
                Ok(x)
            } else {
                Err(format!("rope_scaling {key} must be positive, got {x}"))
            }
        };
        match kind {
            "linear" => Ok(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(format!(
                        "rope_scaling high_freq_factor {high} must exceed low_freq_factor {low}"
                    ));
                }
                let original = num("original_max_position_embeddings")?;
                if original.fract() != 0.0 {
                    return Err(format!(
                        "rope_scaling original_max_position_embeddings {original} is not a whole number"
                    ));
                }
                Ok(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original as usize,
                })
            }
            // "default" with no parameters is no scaling at all; the caller
            // maps it to `None`.
            _ => Err("rope_scaling rope_type \"default\" is no scaling".into()),
        }
    }

    fn to_json(&self) -> Value {
        match *self {
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        }
    }

    /// Rescales the inverse frequencies `θ^(-2i/d)`, as
    /// `_compute_linear_scaling_rope_parameters` and
    /// `_compute_llama3_parameters` do (both leave the attention scale at 1).
    pub fn apply(&self, inv_freq: &mut [f64]) {
        match *self {
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
    }
}

impl Serialize for RopeScaling {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for RopeScaling {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RopeScaling, D::Error> {
        RopeScaling::from_json(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// `config.json` keys that do not change what the model computes: names,
/// versions, the stored dtype (fedveil computes in its own), generation
/// defaults and Hugging Face's bookkeeping.
const INERT_KEYS: &[&str] = &[
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "is_llama_config",
    "transformers.js_config",
    "tokenizer_class",
    "id2label",
    "label2id",
    "problem_type",
    "finetuning_task",
    "task_specific_params",
    "prefix",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "is_decoder",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    // Splits the matrix products into slices in some transformers versions:
    // the same products.
    "pretraining_tp",
    // Feed-forward chunking computes the same values in pieces.
    "chunk_size_feed_forward",
    // Gemma's choice of key/value cache for generation.
    "cache_implementation",
];

/// Keys only Gemma's families implement: on another family's config they
/// are refused, since that family's transformers model would ignore them.
const GEMMA_KEYS: &[&str] = &[
    "hidden_activation",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "rope_local_base_freq",
    "sliding_window_pattern",
    // Written by transformers 5 beside `layer_types`, never read back.
    "_sliding_window_pattern",
    // Gemma-2-9B's and 27B's config.json repeat the window under this
    // name, which transformers does not read; it must agree.
    "sliding_window_size",
    "layer_types",
];

/// More layers than any model has: a config saying so is refused before
/// anything is allocated per layer.
pub const MAX_LAYERS: usize = 1024;

/// The `config.json` defaults transformers gives a Gemma family's keys
/// that change the computation, filled in where a file leaves them out
/// (fedveil's own defaults are Llama's).
fn gemma_defaults(model_type: &str) -> Vec<(&'static str, Value)> {
    use serde_json::json;
    // Gemma-3's multimodal checkpoints leave most of `text_config` to these.
    let mut d = vec![
        ("hidden_size", json!(2304)),
        ("intermediate_size", json!(9216)),
        ("num_hidden_layers", json!(26)),
        ("num_attention_heads", json!(8)),
        ("num_key_value_heads", json!(4)),
        ("hidden_activation", json!("gelu_pytorch_tanh")),
        ("query_pre_attn_scalar", json!(256)),
        ("sliding_window", json!(4096)),
        ("rms_norm_eps", json!(1e-6)),
        ("head_dim", json!(256)),
        ("tie_word_embeddings", json!(true)),
    ];
    if model_type == "gemma2" {
        d.extend([
            ("vocab_size", json!(256_000)),
            ("attn_logit_softcapping", json!(50.0)),
            ("final_logit_softcapping", json!(30.0)),
            ("rope_theta", json!(10_000.0)),
            ("max_position_embeddings", json!(8192)),
        ]);
    } else {
        d.extend([
            ("vocab_size", json!(262_208)),
            ("attn_logit_softcapping", Value::Null),
            ("final_logit_softcapping", Value::Null),
            ("rope_theta", json!(1_000_000.0)),
            ("rope_local_base_freq", json!(10_000.0)),
            ("max_position_embeddings", json!(131_072)),
        ]);
    }
    d
}

/// The keys [`LlamaConfig`]'s own fields read.
const IMPLEMENTED_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "qkv_bias",
    "bos_token_id",
    "eos_token_id",
    "head_dim",
    "rope_scaling",
    // transformers 5's form of `rope_theta` and `rope_scaling` together.
    "rope_parameters",
    "sliding_window",
];

mod defaults {
    pub fn rms_norm_eps() -> f64 {
        1e-5
    }
    pub fn rope_theta() -> f64 {
        10_000.0
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(id)) => Some(id),
        Some(OneOrMany::Many(ids)) => ids.first().copied(),
    })
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` of a `llama`, `mistral` or `qwen2`
    /// model. Every key is implemented, known not to change the computation,
    /// or refused with an error that names it; so are the values fedveil
    /// does not implement of keys it knows (`hidden_act` other than `silu`,
    /// `mlp_bias`, attention dropout, Qwen2's `use_sliding_window`, ...).
    pub fn from_hf_json(json: &Value) -> Result<LlamaConfig, ModelError> {
        let fail = |why: String| Err(ModelError::Config(why));
        let obj = match json.as_object() {
            Some(o) => o,
            None => return fail("config.json is not a JSON object".into()),
        };
        let model_type = match obj.get("model_type") {
            None => "llama",
            Some(v) => match v.as_str() {
                Some(t) => t,
                None => return fail(format!("model_type must be a string, got {v}")),
            },
        };
        match model_type {
            "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3_text" => {}
            "gemma3" => return LlamaConfig::from_gemma3_multimodal(obj),
            other => {
                return fail(format!(
                    "model_type {other:?} is not a decoder fedveil implements (llama, mistral, \
                     qwen2, qwen3, phi3, gemma2, gemma3_text)"
                ));
            }
        }
        let gemma = matches!(model_type, "gemma2" | "gemma3_text");
        let mut filled = obj.clone();
        if gemma {
            for (key, value) in gemma_defaults(model_type) {
                // transformers 5's `rope_parameters` carries the base.
                if key == "rope_theta" && obj.contains_key("rope_parameters") {
                    continue;
                }
                filled.entry(key).or_insert(value);
            }
        }
        let obj = &filled;
        if let Some(n) = obj.get("num_hidden_layers").and_then(Value::as_u64)
            && n > MAX_LAYERS as u64
        {
            return fail(format!(
                "config.json num_hidden_layers = {n}: more than {MAX_LAYERS} layers is refused"
            ));
        }
        if gemma
            && let Some(size) = obj.get("sliding_window_size")
            && obj.get("sliding_window") != Some(size)
        {
            return fail(format!(
                "config.json sliding_window_size = {size} disagrees with sliding_window = {}",
                obj.get("sliding_window").unwrap_or(&Value::Null)
            ));
        }
        let is = |key: &str, ok: &dyn Fn(&Value) -> bool| obj.get(key).is_none_or(ok);
        let zero = |v: &Value| v.is_null() || v.as_f64() == Some(0.0);
        let false_ = |v: &Value| v.is_null() || v.as_bool() == Some(false);
        let null = |v: &Value| v.is_null();
        // Keys fedveil knows, with the values it implements.
        let full = |v: &Value| {
            v.is_null()
                || v.as_array()
                    .is_some_and(|a| a.iter().all(|t| t.as_str() == Some("full_attention")))
        };
        let softcap = |v: &Value| gemma && (v.is_null() || v.as_f64().is_some_and(|c| c > 0.0));
        type Check<'a> = (&'a str, &'a dyn Fn(&Value) -> bool, &'a str);
        let checked: [Check; 16] = [
            (
                "hidden_act",
                &|v| v.as_str().is_some_and(|n| Activation::from_name(n).is_ok()),
                "only \"silu\" (SwiGLU) and \"gelu_pytorch_tanh\" (GeGLU) are implemented",
            ),
            (
                "mlp_bias",
                &false_,
                "biases on the MLP projections are not implemented",
            ),
            (
                "attention_dropout",
                &zero,
                "dropout in attention is not implemented",
            ),
            (
                "rope_interleaved",
                &false_,
                "interleaved rotary embeddings are not implemented",
            ),
            (
                "use_sliding_window",
                &false_,
                "Qwen2's per-layer sliding window is not implemented",
            ),
            // Read only when `use_sliding_window` is on, which is refused.
            ("max_window_layers", &|_| true, ""),
            (
                "attn_logit_softcapping",
                &|v| null(v) || softcap(v),
                "attention soft-capping is implemented for Gemma only, with a positive cap",
            ),
            (
                "final_logit_softcapping",
                &|v| null(v) || softcap(v),
                "logit soft-capping is implemented for Gemma only, with a positive cap",
            ),
            (
                "use_bidirectional_attention",
                &false_,
                "bidirectional attention is not implemented",
            ),
            (
                "is_encoder_decoder",
                &false_,
                "encoder-decoder models are not implemented",
            ),
            (
                "add_cross_attention",
                &false_,
                "cross-attention is not implemented",
            ),
            // transformers 5 lists each layer's attention; Gemma's alternate.
            (
                "layer_types",
                &|v| {
                    full(v)
                        || (gemma
                            && v.as_array().is_some_and(|a| {
                                a.iter().all(|t| {
                                    matches!(
                                        t.as_str(),
                                        Some("full_attention" | "sliding_attention")
                                    )
                                })
                            }))
                },
                "only full attention in every layer (and Gemma's sliding and full layers) is \
                 implemented",
            ),
            // Phi-3's dropout on the residual stream and the embeddings.
            (
                "resid_pdrop",
                &zero,
                "dropout on the residual stream is not implemented",
            ),
            (
                "embd_pdrop",
                &zero,
                "dropout on the embeddings is not implemented",
            ),
            (
                "partial_rotary_factor",
                &|v| v.is_null() || v.as_f64() == Some(1.0),
                "rotary embeddings on part of each head are not implemented",
            ),
            // Read only by Phi-3's longrope scaling, which is refused.
            ("original_max_position_embeddings", &|_| true, ""),
        ];
        for (key, ok, why) in &checked {
            if !is(key, ok) {
                return fail(format!("config.json {key} = {}: {why}", obj[*key]));
            }
        }
        if !is("pruned_heads", &|v| {
            v.as_object().is_some_and(|o| o.is_empty())
        }) {
            return fail(
                "config.json pruned_heads: pruned attention heads are not implemented".into(),
            );
        }
        if obj.contains_key("quantization_config") {
            return fail(
                "config.json quantization_config: pre-quantised checkpoints (GPTQ, AWQ, \
                 bitsandbytes) are not implemented; use the unquantised weights or a GGUF file"
                    .into(),
            );
        }
        for key in obj.keys() {
            let known = INERT_KEYS.contains(&key.as_str())
                || IMPLEMENTED_KEYS.contains(&key.as_str())
                || (gemma && GEMMA_KEYS.contains(&key.as_str()))
                || checked.iter().any(|(k, _, _)| k == key)
                || key == "pruned_heads";
            if !known {
                return fail(format!(
                    "config.json key {key:?} is not implemented by fedveil's {model_type} decoder; \
                     it is refused rather than ignored, since it may change what the model computes"
                ));
            }
        }
        let mut json = Value::Object(filled.clone());
        // The activation: Gemma's `hidden_activation` (its `hidden_act`, where
        // a file has both, must agree), everyone else's `hidden_act`.
        let act_key = if gemma {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        let act_name = match obj.get(act_key) {
            // transformers would fail on Gemma's null: no activation.
            Some(Value::Null) if gemma => {
                return fail("config.json hidden_activation = null: no activation".into());
            }
            None | Some(Value::Null) => "silu",
            Some(v) => match v.as_str() {
                Some(n) => n,
                None => return fail(format!("config.json {act_key} must be a string, got {v}")),
            },
        };
        let activation = Activation::from_name(act_name)
            .map_err(|e| ModelError::Config(format!("{act_key}: {e}")))?;
        if gemma
            && let Some(other) = obj.get("hidden_act").filter(|v| !v.is_null())
            && other.as_str() != Some(act_name)
        {
            return fail(format!(
                "config.json hidden_act = {other} and hidden_activation = {act_name:?} disagree"
            ));
        }
        if let Some(o) = json.as_object_mut() {
            o.remove("hidden_activation");
            o.insert(
                "hidden_act".into(),
                serde_json::to_value(activation).unwrap_or_default(),
            );
        }
        // transformers 5 writes Gemma-3's rotary settings per layer type:
        // the full layers' as Llama's, the sliding layers' base (unscaled).
        if let Some(params) = json
            .get_mut("rope_parameters")
            .and_then(Value::as_object_mut)
            && (params.contains_key("full_attention") || params.contains_key("sliding_attention"))
        {
            if model_type != "gemma3_text" {
                return fail(format!(
                    "rope_parameters per layer type are implemented for gemma3_text only, not \
                     {model_type}"
                ));
            }
            let full = params.remove("full_attention").unwrap_or(Value::Null);
            let sliding = params.remove("sliding_attention").unwrap_or(Value::Null);
            if let Some(key) = params.keys().next() {
                return fail(format!("rope_parameters key {key:?} is not implemented"));
            }
            let Some(mut sliding) = sliding.as_object().cloned() else {
                return fail(format!(
                    "rope_parameters sliding_attention must be an object, got {sliding}"
                ));
            };
            match sliding.remove("rope_type") {
                None => {}
                Some(t) if t.as_str() == Some("default") => {}
                Some(t) => {
                    return fail(format!(
                        "rope_parameters sliding_attention rope_type {t}: only unscaled rotary \
                         embeddings are implemented on sliding layers"
                    ));
                }
            }
            if let Some(theta) = sliding.remove("rope_theta") {
                json["rope_local_base_freq"] = theta;
            }
            if let Some(key) = sliding.keys().next() {
                return fail(format!(
                    "rope_parameters sliding_attention key {key:?} is not implemented"
                ));
            }
            json["rope_parameters"] = full;
        }
        // transformers 5 writes `rope_parameters`: `rope_theta` and the
        // scaling in one object.
        if let Some(params) = json
            .as_object_mut()
            .and_then(|o| o.remove("rope_parameters"))
            && !params.is_null()
        {
            let Some(mut params) = params.as_object().cloned() else {
                return fail(format!("rope_parameters must be an object, got {params}"));
            };
            if let Some(theta) = params.remove("rope_theta") {
                if json.get("rope_theta").is_some_and(|t| *t != theta) {
                    return fail(format!(
                        "rope_parameters rope_theta {theta} differs from rope_theta {}",
                        json["rope_theta"]
                    ));
                }
                json["rope_theta"] = theta;
            }
            if !json["rope_scaling"].is_null() {
                return fail("config.json has both rope_scaling and rope_parameters".into());
            }
            // Phi-3's, moved here by transformers 5.
            if let Some(factor) = params.remove("partial_rotary_factor")
                && factor.as_f64() != Some(1.0)
            {
                return fail(format!(
                    "rope_parameters partial_rotary_factor = {factor}: rotary embeddings on part \
                     of each head are not implemented"
                ));
            }
            let unscaled = params.is_empty()
                || (params.len() == 1
                    && params.get("rope_type").and_then(Value::as_str) == Some("default"));
            if !unscaled {
                let params = Value::Object(params);
                if let Err(e) = RopeScaling::from_json(&params) {
                    return fail(format!("rope_parameters: {e}"));
                }
                json["rope_scaling"] = params;
            }
        }
        // Gemma's default base where neither form gave one (transformers
        // fills `rope_parameters` from the family's default too).
        if gemma && json["rope_theta"].is_null() {
            json["rope_theta"] = if model_type == "gemma2" {
                10_000.0
            } else {
                1_000_000.0
            }
            .into();
        }
        // `"rope_scaling": {"rope_type": "default"}` is no scaling.
        if json["rope_scaling"].as_object().is_some_and(|o| {
            o.len() == 1 && o.get("rope_type").and_then(Value::as_str) == Some("default")
        }) {
            json["rope_scaling"] = Value::Null;
        }
        // Gemma's layer types: listed (transformers 5), else by a pattern: every
        // `sliding_window_pattern`-th layer full (Gemma-2's pattern is 2),
        // the others sliding.
        if gemma {
            let n = json["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
            // Gemma-2's alternation is fixed; transformers reads no pattern.
            // transformers 5 reads `sliding_window_pattern` only.
            let pattern_key = ["sliding_window_pattern"]
                .into_iter()
                .find(|k| model_type == "gemma3_text" && !json[*k].is_null());
            let pattern = match pattern_key {
                Some(k) => match json[k].as_u64() {
                    Some(p) if p > 0 => p as usize,
                    _ => {
                        return fail(format!(
                            "config.json {k} must be a positive whole number, got {}",
                            json[k]
                        ));
                    }
                },
                None if model_type == "gemma2" => 2,
                None => 6,
            };
            // transformers takes the list where a file has both.
            if json["layer_types"].is_null() {
                json["layer_types"] =
                    serde_json::to_value(LayerType::pattern(n, pattern)).unwrap_or_default();
            }
        } else if let Some(o) = json.as_object_mut() {
            // Checked above: every layer full.
            o.remove("layer_types");
        }
        // The key a type error is at is named (serde's own message does not).
        let mut config: LlamaConfig = serde_path_to_error::deserialize(json).map_err(|e| {
            let at = e.path().to_string();
            let at = if at == "." {
                String::new()
            } else {
                format!(" {at}")
            };
            ModelError::Config(format!("config.json{at}: {}", e.inner()))
        })?;
        match model_type {
            // Qwen2 always has the q/k/v bias and says so nowhere; its
            // `sliding_window` is read only under `use_sliding_window`.
            "qwen2" => {
                config.attention_bias = true;
                config.sliding_window = None;
            }
            // Qwen3: a norm on each query and key head; its bias follows
            // `attention_bias` as Llama's does (q, k, v and o).
            "qwen3" => {
                config.qk_norm = true;
                config.sliding_window = None;
            }
            // Gemma: (1 + w) norms, norms after attention and the MLP, scaled
            // token embeddings; Gemma-3 also norms its query and key heads.
            "gemma2" | "gemma3_text" => {
                config.norm_unit_offset = true;
                config.sandwich_norms = true;
                config.qk_norm = model_type == "gemma3_text";
                config.embed_scale = true;
                if model_type == "gemma2" {
                    config.rope_local_base_freq = None;
                }
            }
            // A window as long as the context hides nothing.
            _ => {
                if config
                    .sliding_window
                    .is_some_and(|w| w >= config.max_position_embeddings)
                {
                    config.sliding_window = None;
                }
                // transformers' Llama never windows: a window on a llama
                // config is refused rather than applied or dropped.
                if model_type == "llama"
                    && let Some(w) = config.sliding_window
                {
                    return fail(format!(
                        "config.json sliding_window = {w} on a llama model, whose transformers \
                         implementation ignores it; say model_type mistral for a windowed model"
                    ));
                }
            }
        }
        config.validate()?;
        Ok(config.canonical())
    }

    /// The language model of a multimodal Gemma-3 (`gemma3`: Gemma-3-4B,
    /// 12B, 27B), its `text_config`. The vision tower's settings are
    /// accepted and not read: fedveil fine-tunes on text, where the
    /// multimodal model is its language model. The other top-level keys are
    /// checked as everywhere: known, or refused by name.
    fn from_gemma3_multimodal(
        obj: &serde_json::Map<String, Value>,
    ) -> Result<LlamaConfig, ModelError> {
        let fail = |why: String| Err(ModelError::Config(why));
        const MULTIMODAL_KEYS: &[&str] = &[
            "text_config",
            "vision_config",
            "boi_token_index",
            "eoi_token_index",
            "image_token_index",
            "mm_tokens_per_image",
            "bos_token_id",
            "eos_token_id",
            "tie_word_embeddings",
        ];
        for key in obj.keys() {
            if !(INERT_KEYS.contains(&key.as_str()) || MULTIMODAL_KEYS.contains(&key.as_str())) {
                return fail(format!(
                    "config.json key {key:?} is not implemented for gemma3; it is refused \
                     rather than ignored"
                ));
            }
        }
        if obj
            .get("tie_word_embeddings")
            .is_some_and(|v| v.as_bool() == Some(false))
        {
            return fail(
                "config.json tie_word_embeddings = false: Gemma-3's output is its embedding".into(),
            );
        }
        let mut text = match obj.get("text_config") {
            Some(Value::Object(t)) => t.clone(),
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(v) => {
                return fail(format!(
                    "config.json text_config must be an object, got {v}"
                ));
            }
        };
        match text.get("model_type").and_then(Value::as_str) {
            None | Some("gemma3_text") => {}
            Some(other) => {
                return fail(format!(
                    "config.json text_config model_type {other:?}: gemma3's language model is \
                     gemma3_text"
                ));
            }
        }
        text.insert("model_type".into(), "gemma3_text".into());
        // Tying follows the text config: transformers ties by the top-level
        // setting only where the checkpoint has no differing `lm_head`, so a
        // text config saying `false` reads that `lm_head` (and is refused,
        // naming it, where there is none) rather than guessing.
        // The ids the generation config also says, where the text config
        // leaves them out.
        for key in ["bos_token_id", "eos_token_id"] {
            if let Some(v) = obj.get(key)
                && !text.contains_key(key)
            {
                text.insert(key.into(), v.clone());
            }
        }
        LlamaConfig::from_hf_json(&Value::Object(text)).map_err(|e| match e {
            ModelError::Config(why) => ModelError::Config(format!("text_config: {why}")),
            other => other,
        })
    }

    /// The same model with an explicit `head_dim` that equals the default
    /// (`hidden_size / num_attention_heads`) left implicit, so that two
    /// configs of one model compare equal.
    pub fn canonical(mut self) -> LlamaConfig {
        let heads = self.num_attention_heads;
        if self.head_dim.is_some_and(|d| d * heads == self.hidden_size) {
            self.head_dim = None;
        }
        self
    }

    /// The number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The width of the queries (and of the attention output) of one layer.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    /// The rotary inverse frequencies `θ^(-2i/d)`, `i < d/2`, rescaled by
    /// `rope_scaling`.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim();
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some(scaling) = &self.rope_scaling {
            scaling.apply(&mut inv);
        }
        inv
    }

    /// The width of the keys (and values) of one layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads() * self.head_dim()
    }

    /// How many keys a query of layer `i` (a position in this model) sees
    /// at most: the sliding window where that layer slides, else `None`.
    pub fn window(&self, i: usize) -> Option<usize> {
        match &self.layer_types {
            Some(types) => match types.get(i) {
                Some(LayerType::Sliding) => self.sliding_window,
                _ => None,
            },
            None => self.sliding_window,
        }
    }

    /// Whether layer `i` takes the sliding layers' rotary tables
    /// (`rope_local_base_freq`, Gemma-3).
    pub fn local_rope(&self, i: usize) -> bool {
        self.rope_local_base_freq.is_some()
            && self
                .layer_types
                .as_ref()
                .is_some_and(|t| t.get(i) == Some(&LayerType::Sliding))
    }

    /// The sliding layers' unscaled inverse frequencies, where they have
    /// their own base.
    pub fn local_inv_freq(&self) -> Option<Vec<f64>> {
        let base = self.rope_local_base_freq?;
        let d = self.head_dim();
        Some(
            (0..d / 2)
                .map(|i| 1.0 / base.powf(2.0 * i as f64 / d as f64))
                .collect(),
        )
    }

    /// The factor on the attention scores: `query_pre_attn_scalar^(-1/2)`
    /// (Gemma) or `head_dim^(-1/2)`.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim() as f64)
            .sqrt()
    }

    /// Checks that the shape is one this implementation can run.
    pub fn validate(&self) -> Result<(), ModelError> {
        let fail = |why: String| Err(ModelError::Config(why));
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
            ("head_dim", self.head_dim()),
            ("sliding_window", self.sliding_window.unwrap_or(1)),
        ] {
            if value == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return fail(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return fail(format!(
                "the head width {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return fail(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if let Some(RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. }) =
            &self.rope_scaling
            && !(factor.is_finite() && *factor > 0.0)
        {
            return fail(format!(
                "rope_scaling factor must be positive, got {factor}"
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return fail(format!(
                "rms_norm_eps must be positive, got {}",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return fail(format!(
                "rope_theta must be above 1, got {}",
                self.rope_theta
            ));
        }
        if let Some(base) = self.rope_local_base_freq
            && !(base.is_finite() && base > 1.0)
        {
            return fail(format!("rope_local_base_freq must be above 1, got {base}"));
        }
        for (name, value) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(x) = value
                && !(x.is_finite() && x > 0.0)
            {
                return fail(format!("{name} must be positive, got {x}"));
            }
        }
        if self.num_hidden_layers > MAX_LAYERS {
            return fail(format!(
                "num_hidden_layers {} is more than {MAX_LAYERS}",
                self.num_hidden_layers
            ));
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return fail(format!(
                    "layer_types lists {} layers, the model has {}",
                    types.len(),
                    self.num_hidden_layers
                ));
            }
            if self.sliding_window.is_none() && types.contains(&LayerType::Sliding) {
                return fail("layer_types has sliding layers but sliding_window is not set".into());
            }
        }
        if self.sandwich_norms && !self.norm_unit_offset {
            return fail("sandwich norms are implemented with Gemma's (1 + w) norms only".into());
        }
        Ok(())
    }

    /// The number of weights in the model (the embedding counted once when
    /// it is tied).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let attention = h * self.q_dim() * 2 + h * self.kv_dim() * 2;
        let bias = if self.attention_bias {
            self.q_dim() + 2 * self.kv_dim()
        } else {
            0
        };
        let mlp = 3 * h * self.intermediate_size;
        let qk_norm = if self.qk_norm { 2 * self.head_dim() } else { 0 };
        let norms = if self.sandwich_norms { 4 * h } else { 2 * h };
        let per_layer = attention + bias + mlp + norms + qk_norm;
        let embeddings = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        embeddings + self.num_hidden_layers * per_layer + h
    }

    /// A small model for tests and examples: two layers, grouped-query
    /// attention, tied embeddings.
    pub fn tiny(vocab_size: usize) -> LlamaConfig {
        LlamaConfig {
            vocab_size,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_id: None,
            head_dim: None,
            rope_scaling: None,
            sliding_window: None,
            qk_norm: false,
            hidden_act: Activation::Silu,
            layer_types: None,
            rope_local_base_freq: None,
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            norm_unit_offset: false,
            sandwich_norms: false,
            embed_scale: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_hugging_face_config() {
        let json = r#"{
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true,
            "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": [2, 0]
        }"#;
        let config: LlamaConfig = serde_json::from_str(json).unwrap();
        config.validate().unwrap();
        assert_eq!(config.head_dim(), 64);
        assert_eq!(config.kv_dim(), 192);
        assert_eq!(config.eos_token_id, Some(2));
        // SmolLM2-135M: 134.5 million weights.
        assert_eq!(config.parameter_count(), 134_515_008);
    }

    #[test]
    fn reads_transformers_5_rope_parameters_and_layer_types() {
        let mut json = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "dtype": "bfloat16",
            "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "hidden_act": "silu",
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "layer_types": ["full_attention", "full_attention"], "use_sliding_window": false,
            "sliding_window": null, "max_window_layers": 28, "attention_dropout": 0.0
        });
        let config = LlamaConfig::from_hf_json(&json).unwrap();
        assert_eq!(config.rope_theta, 1e6);
        assert_eq!(config.rope_scaling, None);
        assert!(config.attention_bias);
        json["rope_parameters"] = serde_json::json!({"rope_theta": 500000.0, "rope_type": "llama3",
            "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let config = LlamaConfig::from_hf_json(&json).unwrap();
        assert_eq!(config.rope_theta, 5e5);
        assert!(
            matches!(config.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0)
        );
        for (key, value, named) in [
            (
                "layer_types",
                serde_json::json!(["full_attention", "sliding_attention"]),
                "layer_types",
            ),
            (
                "rope_parameters",
                serde_json::json!({"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}),
                "yarn",
            ),
            ("rope_theta", serde_json::json!(10000.0), "differs"),
        ] {
            let mut bad = json.clone();
            bad[key] = value;
            let err = LlamaConfig::from_hf_json(&bad).unwrap_err().to_string();
            assert!(err.contains(named), "{key}: {err}");
        }
    }

    #[test]
    fn llama3_rope_scaling_keeps_short_wavelengths_and_divides_long_ones() {
        let mut config = LlamaConfig::tiny(10);
        config.head_dim = Some(16);
        let plain = config.inv_freq();
        config.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        });
        let scaled = config.inv_freq();
        let wavelen = |f: f64| 2.0 * std::f64::consts::PI / f;
        for (p, s) in plain.iter().zip(&scaled) {
            if wavelen(*p) < 16.0 {
                assert_eq!(s, p);
            } else if wavelen(*p) > 64.0 {
                assert_eq!(*s, p / 8.0);
            } else {
                assert!(*s < *p && *s > p / 8.0, "{s} of {p}");
            }
        }
        // Each regime occurs at these settings.
        assert!(wavelen(plain[0]) < 16.0 && wavelen(plain[7]) > 64.0);
        assert!(plain.iter().any(|&p| (16.0..=64.0).contains(&wavelen(p))));
    }

    #[test]
    fn gemma_patterns_put_the_full_layer_last() {
        // Gemma-3-1B: 26 layers, every sixth full; Gemma-2: alternating,
        // sliding first.
        let full: Vec<usize> = LayerType::pattern(26, 6)
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == LayerType::Full)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(full, [5, 11, 17, 23]);
        assert_eq!(
            LayerType::pattern(3, 2),
            [LayerType::Sliding, LayerType::Full, LayerType::Sliding]
        );
    }

    #[test]
    fn rejects_impossible_shapes() {
        let mut config = LlamaConfig::tiny(10);
        config.num_key_value_heads = Some(3);
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads 3"), "{err}");
        let mut config = LlamaConfig::tiny(10);
        config.hidden_size = 30;
        assert!(config.validate().is_err());
    }
}
