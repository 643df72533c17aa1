//! Loading a tiny model that the test writes itself, as a Hugging Face
//! directory (safetensors, single and sharded) and as GGUF (llama.cpp's
//! interleaved Q/K layout, tokenizer in the metadata): the loaded model
//! computes the same logits as the one written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use fedveil_model::load::{load, load_gguf, load_hf_dir};
use fedveil_model::model::Mode;
use fedveil_model::{Llama, LlamaConfig, Module};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

fn tempdir(tag: &str) -> PathBuf {
    let mut bytes = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    let dir = std::env::temp_dir().join(format!("fedveil-load-{tag}-{}", hex::encode(bytes)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A byte-level BPE vocabulary: a control token, the 256 byte symbols and
/// a few merges that spell "hello".
fn vocabulary() -> (Vec<String>, Vec<String>) {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut tokens = vec!["<|endoftext|>".to_string()];
    tokens.extend(alphabet.iter().map(|c| c.to_string()));
    let merges = vec!["h e", "l l", "he ll", "hell o", "Ġ w"];
    for m in &merges {
        tokens.push(m.replace(' ', ""));
    }
    (tokens, merges.into_iter().map(str::to_string).collect())
}

fn model(config: LlamaConfig) -> Llama {
    Llama::random(config, &Device::Cpu, &mut ChaCha20Rng::from_seed([3; 32])).unwrap()
}

fn config(vocab: usize, qwen: bool) -> LlamaConfig {
    let mut c = LlamaConfig::tiny(vocab);
    c.tie_word_embeddings = !qwen;
    c.attention_bias = qwen;
    c.rope_theta = 100_000.0;
    c
}

fn logits(model: &Llama) -> Vec<f32> {
    let ids = Tensor::new(&[[1u32, 7, 42, 99, 3, 250]], &Device::Cpu).unwrap();
    model
        .forward(&ids, None, Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn hf_tensors(m: &Llama) -> HashMap<String, Tensor> {
    let mut t = HashMap::new();
    let w = m.weights();
    t.insert("model.embed_tokens.weight".to_string(), w.embed.clone());
    t.insert("model.norm.weight".to_string(), w.norm.clone());
    if let Some(head) = &w.lm_head {
        t.insert("lm_head.weight".to_string(), head.clone());
    }
    for (i, layer) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        t.insert(
            format!("{p}.input_layernorm.weight"),
            layer.input_norm.clone(),
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_norm.clone(),
        );
        for module in Module::ALL {
            let l = layer.linear(module);
            let name = format!("{p}.{}.{}", module.parent(), module.name());
            t.insert(format!("{name}.weight"), l.weight.clone());
            if let Some(b) = &l.bias {
                t.insert(format!("{name}.bias"), b.clone());
            }
        }
    }
    t
}

fn write_hf_dir(dir: &Path, m: &Llama, sharded: bool) {
    let mut config = serde_json::to_value(m.config()).unwrap();
    let qwen = m.config().attention_bias;
    config["model_type"] = if qwen { "qwen2" } else { "llama" }.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tensors = hf_tensors(m);
    if sharded {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let (a, b) = names.split_at(names.len() / 2);
        let mut map = serde_json::Map::new();
        for (file, part) in [
            ("model-00001-of-00002.safetensors", a),
            ("model-00002-of-00002.safetensors", b),
        ] {
            let shard: HashMap<String, Tensor> = part
                .iter()
                .map(|n| ((*n).clone(), tensors[*n].clone()))
                .collect();
            candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
            for n in part {
                map.insert((*n).clone(), file.into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    } else {
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    }
    // A tokenizer.json written by the tokenizers crate itself.
    let (tokens, merges) = vocabulary();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    let bpe = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.save(dir.join("tokenizer.json"), false).unwrap();
}

/// llama.cpp's permutation of Q/K rows for its interleaved rope.
fn interleave(t: &Tensor, heads: usize, head_dim: usize) -> Tensor {
    let dims = t.dims().to_vec();
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, 2, head_dim / 2, rest))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

fn write_gguf(path: &Path, m: &Llama, arch: &str) {
    let c = m.config();
    let w = m.weights();
    let llama = arch == "llama";
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("token_embd.weight".into(), w.embed.clone()),
        ("output_norm.weight".into(), w.norm.clone()),
    ];
    if let Some(head) = &w.lm_head {
        tensors.push(("output.weight".into(), head.clone()));
    }
    for (i, layer) in w.layers.iter().enumerate() {
        let p = format!("blk.{i}");
        tensors.push((format!("{p}.attn_norm.weight"), layer.input_norm.clone()));
        tensors.push((format!("{p}.ffn_norm.weight"), layer.post_norm.clone()));
        for (module, name) in [
            (Module::Q, "attn_q"),
            (Module::K, "attn_k"),
            (Module::V, "attn_v"),
            (Module::O, "attn_output"),
            (Module::Gate, "ffn_gate"),
            (Module::Up, "ffn_up"),
            (Module::Down, "ffn_down"),
        ] {
            let l = layer.linear(module);
            let heads = match module {
                Module::Q => Some(c.num_attention_heads),
                Module::K => Some(c.kv_heads()),
                _ => None,
            };
            let permute = |t: &Tensor| match heads {
                Some(n) if llama => interleave(t, n, c.head_dim()),
                _ => t.clone(),
            };
            tensors.push((format!("{p}.{name}.weight"), permute(&l.weight)));
            if let Some(b) = &l.bias {
                tensors.push((format!("{p}.{name}.bias"), permute(b)));
            }
        }
    }
    let q: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let (tokens, merges) = vocabulary();
    let mut types = vec![Value::I32(1); tokens.len()];
    types[0] = Value::I32(3);
    let k = |key: &str| format!("{arch}.{key}");
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (k("block_count"), Value::U32(c.num_hidden_layers as u32)),
        (k("embedding_length"), Value::U32(c.hidden_size as u32)),
        (
            k("feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            k("attention.head_count"),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            k("attention.head_count_kv"),
            Value::U32(c.kv_heads() as u32),
        ),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (
            k("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
    ];
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

#[test]
fn a_hugging_face_directory_loads_to_the_same_model() {
    let vocab = vocabulary().0.len();
    for (qwen, sharded) in [(false, false), (true, true)] {
        let original = model(config(vocab, qwen));
        let dir = tempdir("hf");
        write_hf_dir(&dir, &original, sharded);
        let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap();
        assert_eq!(loaded.model.config().attention_bias, qwen);
        assert_eq!(logits(&loaded.model), logits(&original));
        let ids = loaded.tokenizer.encode("hello world", false).unwrap();
        let hello = vocabulary().0.iter().position(|t| t == "hello").unwrap() as u32;
        assert_eq!(ids.get_ids()[0], hello);
        // `load` picks the loader by what the path is.
        assert!(load(&dir, &Device::Cpu).is_ok());
        // A missing tensor is named.
        if !sharded {
            let mut tensors = hf_tensors(&original);
            tensors.remove("model.layers.1.mlp.up_proj.weight");
            candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
            let err = load_hf_dir(&dir, &Device::Cpu).unwrap_err().to_string();
            assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_gguf_file_loads_to_the_same_model_with_its_tokenizer() {
    let (tokens, _) = vocabulary();
    for (arch, qwen) in [("llama", false), ("qwen2", true)] {
        let original = model(config(tokens.len(), qwen));
        let dir = tempdir("gguf");
        let path = dir.join("tiny.gguf");
        write_gguf(&path, &original, arch);
        let loaded = load_gguf(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.model.config().kv_heads(), 2);
        assert_eq!(loaded.model.config().tie_word_embeddings, !qwen);
        assert_eq!(loaded.model.config().eos_token_id, Some(0));
        // Q and K come back in the "rotate half" layout: identical logits.
        let (a, b) = (logits(&loaded.model), logits(&original));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff == 0.0, "{arch}: logits differ by {diff}");
        // The tokenizer from the metadata: BPE merges, byte-level pieces and
        // the control token as a special token.
        let t = &loaded.tokenizer;
        let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
        let enc = t.encode("hello world<|endoftext|>", false).unwrap();
        assert_eq!(enc.get_ids()[0], id("hello"));
        assert_eq!(enc.get_ids()[1], id("Ġw"));
        assert_eq!(*enc.get_ids().last().unwrap(), 0);
        assert_eq!(t.decode(enc.get_ids(), true).unwrap(), "hello world");
        assert_eq!(t.encode("2024", false).unwrap().get_ids().len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn unreadable_models_get_clear_errors() {
    let dir = tempdir("bad");
    let err = load(&dir.join("nothing.gguf"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such file"), "{err}");
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    assert!(load(&junk, &Device::Cpu).is_err());
    let err = load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "bert", "vocab_size": 10}"#,
    )
    .unwrap();
    assert!(load(&dir, &Device::Cpu).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
