//! The architecture of a llama-family decoder.
//!
//! The fields and their names follow Hugging Face's `config.json` for
//! `LlamaForCausalLM` (and `Qwen2ForCausalLM`, whose only difference that
//! matters here is a bias on the query, key and value projections), so a
//! model directory's `config.json` deserialises straight into
//! [`LlamaConfig`].

use serde::{Deserialize, Serialize};

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
}

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
    /// The number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// The width of the keys (and values) of one layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads() * self.head_dim()
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
        ] {
            if value == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
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
        Ok(())
    }

    /// The number of weights in the model (the embedding counted once when
    /// it is tied).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let attention = h * h * 2 + h * self.kv_dim() * 2;
        let bias = if self.attention_bias {
            h + 2 * self.kv_dim()
        } else {
            0
        };
        let mlp = 3 * h * self.intermediate_size;
        let per_layer = attention + bias + mlp + 2 * h;
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
