//! Saving and loading adapters.
//!
//! An adapter is a directory with `adapter_config.json` and
//! `adapter_model.safetensors`, the layout of Hugging Face PEFT. A LoRA
//! adapter is written exactly as PEFT writes one (`peft_type: "LORA"`, its
//! key names, `lora_alpha`, `target_modules`), so Python's
//! `PeftModel.from_pretrained` loads it onto the same base model, and an
//! adapter PEFT trained loads here. The other methods use PEFT's layout
//! with `peft_type: "FEDVEIL"` and fedveil's own configuration, which PEFT
//! refuses rather than misreads (their prefix layout follows the model's
//! grouped key/value heads).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::{Value, json};

use crate::files::write_atomically;
use crate::model::Llama;
use crate::peft::{Adapter, LoraConfig, PeftConfig, lora_targets};
use crate::{ModelError, Result};

/// The configuration file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Writes `adapter` into `dir` (created if needed). `base_model` goes into
/// the configuration's `base_model_name_or_path`.
pub fn save_adapter(adapter: &Adapter, dir: &Path, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::file(dir, e))?;
    let config = match adapter.config() {
        PeftConfig::Lora(c) => peft_lora_config(c, base_model)?,
        other => json!({
            "peft_type": "FEDVEIL",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "fedveil": other,
        }),
    };
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| ModelError::Config(format!("cannot encode the adapter config: {e}")))?;
    write_atomically(&dir.join(CONFIG_FILE), text.as_bytes())?;
    let tensors: Vec<(String, Tensor)> = adapter
        .params()
        .iter()
        .map(|(name, var)| {
            Ok((
                name.clone(),
                var.as_tensor().to_dtype(DType::F32)?.contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::tensor::serialize(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
    )
    .map_err(|e| ModelError::file(&dir.join(WEIGHTS_FILE), e))?;
    write_atomically(&dir.join(WEIGHTS_FILE), &bytes)
}

fn peft_lora_config(c: &LoraConfig, base_model: &str) -> Result<Value> {
    let targets: Vec<&str> = lora_targets(&c.target_modules)?
        .into_iter()
        .map(|m| m.name())
        .collect();
    Ok(json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.r,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": c.layers_to_transform,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": false,
        "use_dora": false,
        "revision": null,
    }))
}

/// Reads the adapter in `dir` for `model`: every tensor the method needs
/// must be there with the right shape, and nothing else.
pub fn load_adapter(dir: &Path, model: &Llama) -> Result<Adapter> {
    let config_path = dir.join(CONFIG_FILE);
    let config = crate::files::read_json(&config_path)?;
    let peft = parse_config(&config).map_err(|why| ModelError::file(&config_path, why))?;
    // The initial values are all overwritten below.
    let mut rng = ChaCha20Rng::from_seed([0; 32]);
    let adapter = Adapter::new(peft, model, &mut rng)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let mut tensors = candle_core::safetensors::load(&weights_path, model.device())
        .map_err(|e| ModelError::file(&weights_path, e))?;
    for (name, var) in adapter.params() {
        let tensor = tensors.remove(name).ok_or_else(|| {
            ModelError::file(&weights_path, format!("the tensor {name} is missing"))
        })?;
        if tensor.dims() != var.dims() {
            return Err(ModelError::file(
                &weights_path,
                format!(
                    "{name} has shape {:?}, the model needs {:?}",
                    tensor.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&tensor.to_dtype(DType::F32)?)?;
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(ModelError::file(
            &weights_path,
            format!(
                "unexpected tensor {extra} ({} in all that this adapter does not have)",
                tensors.len()
            ),
        ));
    }
    Ok(adapter)
}

/// Reads PEFT's LoRA configuration (refusing the variants this
/// implementation would silently get wrong) or fedveil's own.
fn parse_config(config: &Value) -> Result<PeftConfig, String> {
    let peft_type = config
        .get("peft_type")
        .and_then(Value::as_str)
        .ok_or("no peft_type")?;
    match peft_type {
        "LORA" => {
            let number = |key: &str| config.get(key).and_then(Value::as_f64);
            let r = number("r").ok_or("LORA config without r")?;
            if r < 1.0 || r.fract() != 0.0 {
                return Err(format!("r must be a positive integer, got {r}"));
            }
            let alpha = number("lora_alpha").unwrap_or(8.0);
            let dropout = number("lora_dropout").unwrap_or(0.0) as f32;
            let target_modules = match config.get("target_modules") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or("a target module that is not a string")
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                Some(Value::String(s)) if s == "all-linear" => vec![s.clone()],
                Some(Value::String(s)) => {
                    return Err(format!(
                        "target_modules {s:?} is a regular expression; list the module names instead"
                    ));
                }
                _ => return Err("LORA config without target_modules".into()),
            };
            let flag = |key: &str| config.get(key).and_then(Value::as_bool).unwrap_or(false);
            for key in ["use_dora", "use_rslora", "fan_in_fan_out"] {
                if flag(key) {
                    return Err(format!("{key} = true is not supported"));
                }
            }
            if let Some(bias) = config.get("bias").and_then(Value::as_str)
                && bias != "none"
            {
                return Err(format!("bias = {bias:?} is not supported (only \"none\")"));
            }
            if config.get("modules_to_save").is_some_and(|v| !v.is_null()) {
                return Err("modules_to_save is not supported".into());
            }
            let layers_to_transform = match config.get("layers_to_transform") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => Some(vec![layer_index(n.as_u64())?]),
                Some(Value::Array(items)) => Some(
                    items
                        .iter()
                        .map(|v| layer_index(v.as_u64()))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                Some(_) => return Err("layers_to_transform must be a layer index or a list".into()),
            };
            if layers_to_transform.is_some()
                && config
                    .get("layers_pattern")
                    .is_some_and(|v| !v.is_null() && v.as_str() != Some("layers"))
            {
                return Err("a layers_pattern other than \"layers\" is not supported".into());
            }
            for key in ["rank_pattern", "alpha_pattern"] {
                if config
                    .get(key)
                    .and_then(Value::as_object)
                    .is_some_and(|m| !m.is_empty())
                {
                    return Err(format!("a non-empty {key} is not supported"));
                }
            }
            Ok(PeftConfig::Lora(LoraConfig {
                r: r as usize,
                alpha,
                dropout,
                target_modules,
                layers_to_transform,
            }))
        }
        "FEDVEIL" => {
            let inner = config
                .get("fedveil")
                .ok_or("FEDVEIL config without its fedveil section")?;
            serde_json::from_value(inner.clone()).map_err(|e| format!("bad fedveil section: {e}"))
        }
        other => Err(format!(
            "peft_type {other:?} is not supported (LORA, or FEDVEIL for fedveil's own)"
        )),
    }
}

fn layer_index(v: Option<u64>) -> Result<usize, String> {
    v.and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| "layers_to_transform holds something other than a layer index".into())
}
