//! Loading a tiny model that the test writes itself, as a Hugging Face
//! directory (safetensors, single and sharded) and as GGUF (llama.cpp's
//! interleaved Q/K layout, tokenizer in the metadata): the loaded model
//! computes the same logits as the one written.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use fedveil_model::load::{load, load_gguf, load_gguf_with, load_hf_dir, load_with};
use fedveil_model::model::Mode;
use fedveil_model::{Activation, LayerType, Llama, LlamaConfig, Module, QuantFormat, Quantize};
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
    t.insert(
        "model.embed_tokens.weight".to_string(),
        w.embed.dense().unwrap(),
    );
    t.insert("model.norm.weight".to_string(), w.norm.clone());
    if let Some(head) = &w.lm_head {
        t.insert("lm_head.weight".to_string(), head.dense().unwrap());
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
        if let Some((q, k)) = &layer.qk_norm {
            t.insert(format!("{p}.self_attn.q_norm.weight"), q.clone());
            t.insert(format!("{p}.self_attn.k_norm.weight"), k.clone());
        }
        for module in Module::ALL {
            let l = layer.linear(module);
            let name = format!("{p}.{}.{}", module.parent(), module.name());
            t.insert(format!("{name}.weight"), l.weight.dense().unwrap());
            if let Some(b) = &l.bias {
                t.insert(format!("{name}.bias"), b.clone());
            }
        }
    }
    t
}

fn write_hf_dir(dir: &Path, m: &Llama, sharded: bool) {
    write_hf_dir_with(dir, m, sharded, |_, _| {});
}

/// Writes `m` as a Hugging Face directory after `edit` changed its
/// config.json and tensors.
fn write_hf_dir_with(
    dir: &Path,
    m: &Llama,
    sharded: bool,
    edit: impl FnOnce(&mut serde_json::Value, &mut HashMap<String, Tensor>),
) {
    if m.config().sandwich_norms {
        // Gemma: as fedveil's own writer writes it (Gemma's names and
        // config keys), then edited.
        let src = dir.join("gemma-src");
        let loaded = fedveil_model::load::Loaded {
            model: m.clone(),
            tokenizer: fedveil_model::tiny::byte_tokenizer().unwrap(),
            source: "test".into(),
        };
        fedveil_model::load::save_hf_dir(&loaded, &src).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
        std::fs::remove_dir_all(&src).unwrap();
        edit(&mut config, &mut tensors);
        return write_edited(dir, config, tensors, sharded);
    }
    let mut config = serde_json::to_value(m.config()).unwrap();
    let qwen = m.config().attention_bias;
    config["model_type"] = if m.config().qk_norm {
        "qwen3"
    } else if qwen {
        "qwen2"
    } else {
        "llama"
    }
    .into();
    // Qwen3's model type says so; config.json has no such key.
    config.as_object_mut().unwrap().remove("qk_norm");
    let mut tensors = hf_tensors(m);
    edit(&mut config, &mut tensors);
    write_edited(dir, config, tensors, sharded);
}

fn write_edited(
    dir: &Path,
    config: serde_json::Value,
    tensors: HashMap<String, Tensor>,
    sharded: bool,
) {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
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
    write_gguf_with(path, m, arch, |_, _| {});
}

/// Writes `m` as a GGUF file after `edit` changed its metadata and
/// tensors.
fn write_gguf_with(
    path: &Path,
    m: &Llama,
    arch: &str,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, Tensor)>),
) {
    write_gguf_as(path, m, arch, GgmlDType::F32, edit)
}

/// Like [`write_gguf_with`], with every matrix stored as `matrices`
/// (vectors stay f32), as llama.cpp's quantised files are.
fn write_gguf_as(
    path: &Path,
    m: &Llama,
    arch: &str,
    matrices: GgmlDType,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, Tensor)>),
) {
    let c = m.config();
    let w = m.weights();
    let llama = arch == "llama";
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("token_embd.weight".into(), w.embed.dense().unwrap()),
        ("output_norm.weight".into(), w.norm.clone()),
    ];
    if let Some(head) = &w.lm_head {
        tensors.push(("output.weight".into(), head.dense().unwrap()));
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
            tensors.push((
                format!("{p}.{name}.weight"),
                permute(&l.weight.dense().unwrap()),
            ));
            if let Some(b) = &l.bias {
                tensors.push((format!("{p}.{name}.bias"), permute(b)));
            }
        }
    }
    let mut metadata = metadata(c, arch);
    edit(&mut metadata, &mut tensors);
    let q: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let dtype = if t.rank() == 2 {
                matrices
            } else {
                GgmlDType::F32
            };
            (n.clone(), QTensor::quantize(t, dtype).unwrap())
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

/// The GGUF metadata of a tiny model of `arch` with the test's tokenizer.
fn metadata(c: &LlamaConfig, arch: &str) -> Vec<(String, Value)> {
    let (tokens, merges) = vocabulary();
    let mut types = vec![Value::I32(1); tokens.len()];
    types[0] = Value::I32(3);
    let k = |key: &str| format!("{arch}.{key}");
    vec![
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
        (k("rope.dimension_count"), Value::U32(c.head_dim() as u32)),
        (k("attention.key_length"), Value::U32(c.head_dim() as u32)),
        (k("attention.value_length"), Value::U32(c.head_dim() as u32)),
        (
            k("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
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
    ]
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
fn a_tied_checkpoint_whose_stored_head_differs_from_its_embedding_is_refused() {
    let vocab = vocabulary().0.len();
    let original = model(config(vocab, false));
    assert!(original.config().tie_word_embeddings);
    let embed = original.weights().embed.dense().unwrap();
    let load_with_head = |head: Tensor, sharded: bool| {
        let dir = tempdir("tied");
        write_hf_dir_with(&dir, &original, sharded, |_, t| {
            t.insert("lm_head.weight".into(), head);
        });
        let loaded = load_hf_dir(&dir, &Device::Cpu);
        std::fs::remove_dir_all(&dir).unwrap();
        loaded
    };
    // A copy of the embedding as lm_head.weight is what tied checkpoints
    // often carry: it loads, tied, from one file or across shards.
    for sharded in [false, true] {
        let loaded = load_with_head(embed.clone(), sharded).unwrap();
        assert!(loaded.model.weights().lm_head.is_none());
        assert_eq!(logits(&loaded.model), logits(&original));
    }
    // A head that differs in one value contradicts the config.
    let mut changed = embed.to_vec2::<f32>().unwrap();
    changed[vocab - 1][3] += 0.5;
    let changed = Tensor::new(changed, &Device::Cpu).unwrap();
    for sharded in [false, true] {
        let err = load_with_head(changed.clone(), sharded)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("tie_word_embeddings = true") && err.contains("lm_head.weight differs"),
            "{err}"
        );
    }
    // So does one of another shape.
    let err = load_with_head(embed.narrow(0, 0, 5).unwrap(), false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("lm_head.weight differs"), "{err}");
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
fn gguf_files_with_llama3_and_sentencepiece_tokenizers_load_with_their_bos() {
    let dir = tempdir("gguf-tokenizers");
    let path = dir.join("tiny.gguf");
    let set = |meta: &mut Vec<(String, Value)>, key: &str, value: Option<Value>| {
        meta.retain(|(k, _)| k != key);
        if let Some(v) = value {
            meta.push((key.to_string(), v));
        }
    };
    // Llama-3's pre-tokenizer: a BOS by default, as llama.cpp and the
    // model's own tokenizer add one.
    let (tokens, _) = vocabulary();
    let m = model(config(tokens.len(), false));
    write_gguf_with(&path, &m, "llama", |meta, _| {
        set(
            meta,
            "tokenizer.ggml.pre",
            Some(Value::String("llama-bpe".into())),
        );
        set(meta, "tokenizer.ggml.bos_token_id", Some(Value::U32(0)));
    });
    let t = load_gguf(&path, &Device::Cpu).unwrap().tokenizer;
    let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
    assert_eq!(
        t.encode("hello world", true).unwrap().get_ids()[..3],
        [0, id("hello"), id("Ġw")]
    );
    assert_eq!(t.encode("hello", false).unwrap().get_ids(), [id("hello")]);
    // SentencePiece (Llama-2, Mistral): pieces and scores, no merges.
    let mut pieces: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let words = [
        "▁", "h", "e", "l", "o", "ll", "he", "hell", "hello", "▁hello",
    ];
    pieces.extend(words.map(String::from));
    let scores: Vec<Value> = (0..pieces.len()).map(|i| Value::F32(-(i as f32))).collect();
    let mut types = vec![Value::I32(1); pieces.len()];
    types[0] = Value::I32(2);
    types[1] = Value::I32(3);
    types[2] = Value::I32(3);
    let m = model(config(pieces.len(), false));
    write_gguf_with(&path, &m, "llama", |meta, _| {
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        set(
            meta,
            "tokenizer.ggml.model",
            Some(Value::String("llama".into())),
        );
        set(
            meta,
            "tokenizer.ggml.pre",
            Some(Value::String("default".into())),
        );
        set(meta, "tokenizer.ggml.tokens", Some(strings(&pieces)));
        set(meta, "tokenizer.ggml.merges", None);
        set(meta, "tokenizer.ggml.scores", Some(Value::Array(scores)));
        set(meta, "tokenizer.ggml.token_type", Some(Value::Array(types)));
        set(meta, "tokenizer.ggml.bos_token_id", Some(Value::U32(1)));
        set(meta, "tokenizer.ggml.eos_token_id", Some(Value::U32(2)));
        set(
            meta,
            "tokenizer.ggml.add_bos_token",
            Some(Value::Bool(true)),
        );
    });
    let loaded = load_gguf(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config().eos_token_id, Some(2));
    let t = loaded.tokenizer;
    let id = |s: &str| pieces.iter().position(|t| t == s).unwrap() as u32;
    let enc = t.encode("hello!", true).unwrap();
    assert_eq!(enc.get_ids(), [1, id("▁hello"), id("<0x21>")]);
    assert_eq!(t.decode(enc.get_ids(), true).unwrap(), "hello!");
    std::fs::remove_dir_all(&dir).unwrap();
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
    // A value of the wrong type names its key.
    for (key, value) in [
        ("num_hidden_layers", serde_json::json!(2.5)),
        ("rms_norm_eps", serde_json::json!("small")),
        ("hidden_size", serde_json::json!(-64)),
    ] {
        for model_type in ["llama", "gemma3_text"] {
            let err = hf_error(model_type, |c, _| c[key] = value.clone());
            assert!(err.contains(&format!("config.json {key}")), "{err}");
        }
    }
}

/// The error loading `dir` after `edit` changed the config or tensors of
/// a tiny model of `model_type`.
fn hf_error(
    model_type: &str,
    edit: impl FnOnce(&mut serde_json::Value, &mut HashMap<String, Tensor>),
) -> String {
    let qwen = model_type == "qwen2";
    let m = model(if model_type.starts_with("gemma") {
        gemma_config(model_type)
    } else {
        LlamaConfig {
            qk_norm: model_type == "qwen3",
            ..config(vocabulary().0.len(), qwen)
        }
    });
    let dir = tempdir("refuse");
    write_hf_dir_with(&dir, &m, false, |c, t| {
        c["model_type"] = model_type.into();
        if model_type == "phi3" {
            common::fuse_phi3(t, m.config().num_hidden_layers);
        }
        edit(c, t)
    });
    let err = match load_hf_dir(&dir, &Device::Cpu) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    std::fs::remove_dir_all(&dir).unwrap();
    err
}

/// Each `(key, value, what the error must name)` set on a config of
/// `model_type` is refused, naming it; and the family's real config keys,
/// at the values it implements, load.
fn refuses_by_name(model_type: &str, cases: &[(&str, serde_json::Value, &str)]) {
    for (key, value, named) in cases {
        let err = hf_error(model_type, |c, _| c[*key] = value.clone());
        assert!(
            err.contains(named),
            "{model_type}: {key} = {value} was not refused naming {named:?}: {err:?}"
        );
    }
    // A key no family has.
    let err = hf_error(model_type, |c, _| c["attention_sink_size"] = 4.into());
    assert!(err.contains("attention_sink_size"), "{model_type}: {err:?}");
    // A tensor the decoder would not read (gpt-oss's attention sinks).
    let err = hf_error(model_type, |_, t| {
        t.insert(
            "model.layers.1.self_attn.sinks".into(),
            Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        err.contains("model.layers.1.self_attn.sinks"),
        "{model_type}: {err:?}"
    );
    // Qwen3's (and Gemma-3's) q/k norms, elsewhere, are parts fedveil
    // would not read.
    if !matches!(model_type, "qwen3" | "gemma3_text") {
        let err = hf_error(model_type, |_, t| {
            t.insert(
                "model.layers.0.self_attn.q_norm.weight".into(),
                Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
        });
        assert!(
            err.contains("self_attn.q_norm.weight"),
            "{model_type}: {err:?}"
        );
    }
}

#[test]
fn a_llama_config_key_fedveil_does_not_implement_is_refused_by_name() {
    use serde_json::json;
    refuses_by_name(
        "llama",
        &[
            (
                "rope_scaling",
                json!({"rope_type": "yarn", "factor": 4.0}),
                "yarn",
            ),
            (
                "rope_scaling",
                json!({"type": "dynamic", "factor": 2.0}),
                "dynamic",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "linear", "factor": 2.0, "attention_factor": 0.5}),
                "attention_factor",
            ),
            ("hidden_act", json!("gelu"), "hidden_act"),
            // A window, which transformers' Llama would ignore.
            ("sliding_window", json!(16), "sliding_window"),
            // Gemma's keys: Llama's transformers model would ignore them.
            ("query_pre_attn_scalar", json!(256), "query_pre_attn_scalar"),
            (
                "rope_local_base_freq",
                json!(10000.0),
                "rope_local_base_freq",
            ),
            ("mlp_bias", json!(true), "mlp_bias"),
            ("attention_dropout", json!(0.1), "attention_dropout"),
            ("rope_interleaved", json!(true), "rope_interleaved"),
            (
                "quantization_config",
                json!({"quant_method": "gptq", "bits": 4}),
                "quantization_config",
            ),
        ],
    );
    // What Llama-3.2's config.json says loads as it says.
    let err = hf_error("llama", |c, _| {
        c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        c["hidden_act"] = json!("silu");
        c["mlp_bias"] = json!(false);
        c["attention_dropout"] = json!(0.0);
        c["pretraining_tp"] = json!(1);
        c["torch_dtype"] = json!("bfloat16");
        c["transformers_version"] = json!("4.45.0");
    });
    assert_eq!(err, "");
}

#[test]
fn a_mistral_config_key_fedveil_does_not_implement_is_refused_by_name() {
    use serde_json::json;
    refuses_by_name(
        "mistral",
        &[
            ("hidden_act", json!("gelu_new"), "hidden_act"),
            (
                "attn_logit_softcapping",
                json!(50.0),
                "attn_logit_softcapping",
            ),
            ("rope_scaling", json!({"rope_type": "longrope"}), "longrope"),
        ],
    );
    // Mistral-7B-v0.1's sliding window: within it, the logits of full
    // attention; past it, the first key drops out of the last query's view.
    let m = model(config(vocabulary().0.len(), false));
    let dir = tempdir("window");
    write_hf_dir_with(&dir, &m, false, |c, _| {
        c["model_type"] = "mistral".into();
        c["sliding_window"] = 6.into();
    });
    let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config().sliding_window, Some(6));
    assert_eq!(logits(&loaded.model), logits(&m));
    let seven = Tensor::new(&[[1u32, 7, 42, 99, 3, 250, 5]], &Device::Cpu).unwrap();
    let run = |model: &Llama| -> Vec<f32> {
        let out = model.forward(&seven, None, Mode::Eval).unwrap();
        out.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (windowed, full) = (run(&loaded.model), run(&m));
    let vocab = m.config().vocab_size;
    assert_eq!(windowed[..6 * vocab], full[..6 * vocab]);
    assert_ne!(windowed[6 * vocab..], full[6 * vocab..]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_qwen2_config_key_fedveil_does_not_implement_is_refused_by_name() {
    use serde_json::json;
    refuses_by_name(
        "qwen2",
        &[
            ("use_sliding_window", json!(true), "use_sliding_window"),
            ("hidden_act", json!("relu"), "hidden_act"),
            (
                "final_logit_softcapping",
                json!(30.0),
                "final_logit_softcapping",
            ),
        ],
    );
    // Qwen2.5's config: a sliding_window it never uses.
    let err = hf_error("qwen2", |c, _| {
        c["use_sliding_window"] = json!(false);
        c["sliding_window"] = json!(4);
        c["max_window_layers"] = json!(21);
        c["rope_scaling"] = json!(null);
    });
    assert_eq!(err, "");
}

/// A model whose heads are not `hidden_size / num_attention_heads` wide
/// (Llama-3.2-1B and Mistral-Nemo say `head_dim`), with Llama-3.1's rotary
/// scaling: both loaders read it back to the same logits.
#[test]
fn an_explicit_head_dim_and_llama3_rope_scaling_load_from_both_formats() {
    let c = LlamaConfig {
        head_dim: Some(16),
        rope_scaling: Some(fedveil_model::RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }),
        ..config(vocabulary().0.len(), false)
    };
    let original = model(c.clone());
    assert_eq!(original.weights().layers[0].q.weight.dims(), &[64, 32]);
    assert_eq!(original.weights().layers[0].o.weight.dims(), &[32, 64]);
    // The scaling changes the model: a different output at the same weights.
    let unscaled = Llama::new(
        LlamaConfig {
            rope_scaling: None,
            ..c.clone()
        },
        original.weights().clone(),
    )
    .unwrap();
    assert_ne!(logits(&unscaled), logits(&original));
    let dir = tempdir("head-dim");
    write_hf_dir(&dir, &original, false);
    let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config(), &c);
    assert_eq!(logits(&loaded.model), logits(&original));
    // GGUF keeps the head width in attention.key_length; llama.cpp writes
    // Llama-3.1's scaling as a rope_freqs tensor, which is refused by name.
    let unscaled_path = dir.join("unscaled.gguf");
    write_gguf(&unscaled_path, &unscaled, "llama");
    let from_gguf = load_gguf(&unscaled_path, &Device::Cpu).unwrap();
    assert_eq!(from_gguf.model.config().head_dim(), 16);
    let (a, b) = (logits(&from_gguf.model), logits(&unscaled));
    assert!(a.iter().zip(&b).all(|(x, y)| x == y));
    let freqs = dir.join("freqs.gguf");
    write_gguf_with(&freqs, &unscaled, "llama", |_, t| {
        t.push((
            "rope_freqs.weight".into(),
            Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ))
    });
    let err = load_gguf(&freqs, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("rope_freqs.weight"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_metadata_fedveil_does_not_implement_is_refused_by_name() {
    let m = model(config(vocabulary().0.len(), false));
    let dir = tempdir("gguf-refuse");
    let path = dir.join("m.gguf");
    let set = |meta: &mut Vec<(String, Value)>, key: &str, value: Option<Value>| {
        meta.retain(|(k, _)| k != key);
        if let Some(v) = value {
            meta.push((key.to_string(), v));
        }
    };
    let s = |v: &str| Some(Value::String(v.into()));
    type Case<'a> = (&'a str, Option<Value>, &'a str);
    let cases: Vec<Case> = vec![
        ("llama.rope.scaling.type", s("yarn"), "yarn"),
        (
            "llama.attn_logit_softcapping",
            Some(Value::F32(50.0)),
            "llama.attn_logit_softcapping",
        ),
        (
            "llama.expert_count",
            Some(Value::U32(8)),
            "llama.expert_count",
        ),
        (
            "llama.rope.dimension_count",
            Some(Value::U32(4)),
            "llama.rope.dimension_count",
        ),
        ("tokenizer.ggml.pre", s("deepseek-coder"), "deepseek-coder"),
        ("tokenizer.ggml.pre", None, "tokenizer.ggml.pre"),
        (
            "tokenizer.ggml.add_space_prefix",
            Some(Value::Bool(true)),
            "add_space_prefix",
        ),
        ("tokenizer.ggml.model", s("bert"), "tokenizer.ggml.model"),
    ];
    for (key, value, named) in cases {
        write_gguf_with(&path, &m, "llama", |meta, _| set(meta, key, value.clone()));
        let err = load_gguf(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains(named), "{key}: {err}");
    }
    // A tensor the decoder would not read.
    write_gguf_with(&path, &m, "llama", |_, t| {
        t.push((
            "blk.0.attn_q_norm.weight".into(),
            Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ))
    });
    let err = load_gguf(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("blk.0.attn_q_norm.weight"), "{err}");
    // Linear rotary scaling is implemented.
    write_gguf_with(&path, &m, "llama", |meta, _| {
        set(meta, "llama.rope.scaling.type", s("linear"));
        set(meta, "llama.rope.scaling.factor", Some(Value::F32(2.0)));
    });
    let loaded = load_gguf(&path, &Device::Cpu).unwrap();
    assert_eq!(
        loaded.model.config().rope_scaling,
        Some(fedveil_model::RopeScaling::Linear { factor: 2.0 })
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_phi3_config_key_fedveil_does_not_implement_is_refused_by_name() {
    use serde_json::json;
    refuses_by_name(
        "phi3",
        &[
            (
                "partial_rotary_factor",
                json!(0.75),
                "partial_rotary_factor",
            ),
            ("resid_pdrop", json!(0.1), "resid_pdrop"),
            ("embd_pdrop", json!(0.1), "embd_pdrop"),
            (
                "rope_scaling",
                json!({"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}),
                "longrope",
            ),
        ],
    );
    // Phi-3-mini-4k's config, with its fused projections, loads to the
    // same logits as the unfused model.
    let m = model(config(vocabulary().0.len(), false));
    let dir = tempdir("phi3");
    write_hf_dir_with(&dir, &m, false, |c, t| {
        c["model_type"] = "phi3".into();
        c["resid_pdrop"] = json!(0.0);
        c["embd_pdrop"] = json!(0.0);
        c["attention_dropout"] = json!(0.0);
        c["original_max_position_embeddings"] = json!(4096);
        c["sliding_window"] = json!(2047);
        common::fuse_phi3(t, m.config().num_hidden_layers);
    });
    let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(logits(&loaded.model), logits(&m));
    // A fused projection with the wrong number of rows is named.
    write_hf_dir_with(&dir, &m, false, |c, t| {
        c["model_type"] = "phi3".into();
        common::fuse_phi3(t, m.config().num_hidden_layers);
        let name = "model.layers.0.mlp.gate_up_proj.weight";
        let short = t[name].narrow(0, 0, 100).unwrap();
        t.insert(name.into(), short);
    });
    let err = load_hf_dir(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("gate_up_proj.weight has 100 rows"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_qwen3_config_key_fedveil_does_not_implement_is_refused_by_name() {
    use serde_json::json;
    refuses_by_name(
        "qwen3",
        &[
            ("use_sliding_window", json!(true), "use_sliding_window"),
            (
                "layer_types",
                json!(["full_attention", "sliding_attention"]),
                "layer_types",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "yarn", "factor": 4.0}),
                "yarn",
            ),
        ],
    );
    // Its q/k norms are read; one missing is named.
    let err = hf_error("qwen3", |_, t| {
        t.remove("model.layers.1.self_attn.k_norm.weight");
    });
    assert!(
        err.contains("model.layers.1.self_attn.k_norm.weight"),
        "{err}"
    );
}

/// Qwen3 as GGUF (`qwen3`: q/k norms as attn_q_norm and attn_k_norm, no
/// row interleaving) and as a Hugging Face directory: the same logits.
#[test]
fn a_qwen3_model_loads_from_both_formats() {
    let c = LlamaConfig {
        qk_norm: true,
        head_dim: Some(16),
        ..config(vocabulary().0.len(), false)
    };
    let m = model(c.clone());
    let dir = tempdir("qwen3");
    write_hf_dir(&dir, &m, false);
    let hf = load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(hf.model.config(), &c);
    assert_eq!(logits(&hf.model), logits(&m));
    let path = dir.join("qwen3.gguf");
    write_gguf_with(&path, &m, "qwen3", |_, t| {
        for (i, l) in m.weights().layers.iter().enumerate() {
            let (q, k) = l.qk_norm.clone().unwrap();
            t.push((format!("blk.{i}.attn_q_norm.weight"), q));
            t.push((format!("blk.{i}.attn_k_norm.weight"), k));
        }
    });
    let gguf = load_gguf(&path, &Device::Cpu).unwrap();
    assert!(gguf.model.config().qk_norm);
    assert_eq!(logits(&gguf.model), logits(&m));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A config whose rows are whole K-quant super-blocks (256 values).
fn block_config(vocab: usize, qwen: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 256,
        intermediate_size: 512,
        ..config(vocab, qwen)
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (diff, scale)
}

#[test]
fn a_gguf_file_keeps_its_quantised_blocks_and_computes_what_their_values_do() {
    let (tokens, _) = vocabulary();
    for (arch, qwen) in [("llama", false), ("qwen2", true)] {
        let original = model(block_config(tokens.len(), qwen));
        for (dtype, format) in [
            (GgmlDType::Q4K, QuantFormat::Q4K),
            (GgmlDType::Q5K, QuantFormat::Q5K),
            (GgmlDType::Q6K, QuantFormat::Q6K),
            (GgmlDType::Q8_0, QuantFormat::Q8_0),
            (GgmlDType::Q4_1, QuantFormat::Q4_1),
        ] {
            let dir = tempdir("gguf-quant");
            let path = dir.join("tiny.gguf");
            write_gguf_as(&path, &original, arch, dtype, |_, _| {});
            // The same file dequantised on load, and kept in its blocks.
            let dense = load_gguf(&path, &Device::Cpu).unwrap().model;
            let kept = load_gguf_with(&path, &Device::Cpu, Quantize::Gguf)
                .unwrap()
                .model;
            let w = kept.weights();
            for l in &w.layers {
                for m in Module::ALL {
                    let q = l
                        .linear(m)
                        .weight
                        .quantized()
                        .expect("a quantised projection");
                    assert_eq!(q.format(), format);
                }
            }
            assert_eq!(w.embed.quantized().map(|q| q.format()), Some(format));
            assert_eq!(w.lm_head.is_some(), qwen);
            // Llama's Q and K rows, interleaved in the file, come back in
            // the "rotate half" layout, blocks and all: the same logits.
            let (diff, scale) = max_diff(&logits(&kept), &logits(&dense));
            assert!(
                diff <= 1e-5 * scale,
                "{arch} {dtype:?}: logits differ by {diff} of {scale}"
            );
            let ratio = kept.weight_bytes() as f64 / dense.weight_bytes() as f64;
            assert!(ratio < 0.3, "{arch} {dtype:?}: {ratio} of the f32 bytes");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn quantising_on_load_and_its_refusals() {
    let (tokens, _) = vocabulary();
    let original = model(block_config(tokens.len(), false));
    let dir = tempdir("quant-on-load");
    write_hf_dir(&dir, &original, false);
    // A Hugging Face directory quantised on load: every projection in the
    // format, the logits within its error of the f32 model's.
    for (name, bound) in [("q8_0", 0.05), ("q6_k", 0.1), ("q4_k", 0.5)] {
        let quantize = Quantize::parse(name).unwrap();
        let loaded = load_with(&dir, &Device::Cpu, quantize).unwrap().model;
        let q = loaded.weights().layers[1].down.weight.quantized().unwrap();
        assert_eq!(q.format().name(), name);
        let (diff, scale) = max_diff(&logits(&loaded), &logits(&original));
        assert!(
            diff > 0.0 && diff <= bound * scale,
            "{name}: {diff} of {scale}"
        );
    }
    // "gguf" keeps a GGUF file's blocks; a directory has none.
    let err = load_with(&dir, &Device::Cpu, Quantize::Gguf)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("quantize = \"gguf\"") && err.contains("q4_k"),
        "{err}"
    );
    // A block format fedveil does not keep is refused, naming the tensor.
    let path = dir.join("q3.gguf");
    write_gguf_as(&path, &original, "llama", GgmlDType::Q3K, |_, _| {});
    let err = load_gguf_with(&path, &Device::Cpu, Quantize::Gguf)
        .unwrap_err()
        .to_string();
    assert!(err.contains("token_embd.weight is stored as Q3K"), "{err}");
    // Dequantised on load, the same file loads.
    load_gguf(&path, &Device::Cpu).unwrap();
    // A file cut short: the quantised tensor whose bytes are missing is
    // named, nothing is allocated for them, nothing panics.
    let path = dir.join("short.gguf");
    write_gguf_as(&path, &original, "llama", GgmlDType::Q8_0, |_, _| {});
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 1000).unwrap();
    drop(file);
    let err = load_gguf_with(&path, &Device::Cpu, Quantize::Gguf)
        .unwrap_err()
        .to_string();
    assert!(err.contains("are not within the file"), "{err}");
    // Rows that are not whole blocks of the format: refused, not padded.
    let narrow = model(config(tokens.len(), false));
    let narrow_dir = dir.join("narrow");
    std::fs::create_dir_all(&narrow_dir).unwrap();
    write_hf_dir(&narrow_dir, &narrow, false);
    let err = load_with(&narrow_dir, &Device::Cpu, Quantize::To(QuantFormat::Q4K))
        .unwrap_err()
        .to_string();
    assert!(err.contains("blocks of 256"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `original` written as llama.cpp writes Phi-3: Q, K and V fused into
/// `attn_qkv`, gate and up into `ffn_up` (gate first).
fn write_phi3_gguf(path: &Path, original: &Llama, matrices: GgmlDType, window: u32) {
    let layers = original.config().num_hidden_layers;
    write_gguf_as(path, original, "phi3", matrices, |meta, tensors| {
        meta.push(("phi3.attention.sliding_window".into(), Value::U32(window)));
        for i in 0..layers {
            let p = format!("blk.{i}");
            let mut take = |name: &str| {
                let at = tensors
                    .iter()
                    .position(|(n, _)| *n == format!("{p}.{name}.weight"))
                    .unwrap();
                tensors.remove(at).1
            };
            let (q, k, v) = (take("attn_q"), take("attn_k"), take("attn_v"));
            let (gate, up) = (take("ffn_gate"), take("ffn_up"));
            tensors.push((
                format!("{p}.attn_qkv.weight"),
                Tensor::cat(&[q, k, v], 0).unwrap(),
            ));
            tensors.push((
                format!("{p}.ffn_up.weight"),
                Tensor::cat(&[gate, up], 0).unwrap(),
            ));
        }
    });
}

#[test]
fn a_phi3_gguf_file_with_fused_projections_loads_to_the_same_model() {
    let (tokens, _) = vocabulary();
    let dir = tempdir("gguf-phi3");
    let path = dir.join("tiny.gguf");
    // f32: the same logits as the model written.
    let original = model(config(tokens.len(), false));
    write_phi3_gguf(&path, &original, GgmlDType::F32, 0);
    let loaded = load_gguf(&path, &Device::Cpu).unwrap();
    // Phi-4's 0 is "no window".
    assert_eq!(loaded.model.config().sliding_window, None);
    let (diff, _) = max_diff(&logits(&loaded.model), &logits(&original));
    assert!(diff == 0.0, "logits differ by {diff}");
    write_phi3_gguf(&path, &original, GgmlDType::F32, 2047);
    let loaded = load_gguf(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config().sliding_window, Some(2047));
    // Quantised: each part of a fused matrix keeps its own rows' blocks and
    // computes what the dequantised file does.
    let original = model(block_config(tokens.len(), false));
    write_phi3_gguf(&path, &original, GgmlDType::Q8_0, 0);
    let dense = load_gguf(&path, &Device::Cpu).unwrap().model;
    let kept = load_gguf_with(&path, &Device::Cpu, Quantize::Gguf)
        .unwrap()
        .model;
    for l in &kept.weights().layers {
        for m in Module::ALL {
            let q = l
                .linear(m)
                .weight
                .quantized()
                .expect("a quantised projection");
            assert_eq!(q.format(), QuantFormat::Q8_0);
        }
    }
    let (diff, scale) = max_diff(&logits(&kept), &logits(&dense));
    assert!(diff <= 1e-5 * scale, "logits differ by {diff} of {scale}");
    // A fused matrix of the wrong height, and llama's separate projections
    // (which Phi-3's decoder would not read), are refused by name.
    write_gguf_as(&path, &original, "phi3", GgmlDType::F32, |_, _| {});
    let err = load_gguf(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("attn_qkv"), "{err}");
    write_gguf_as(&path, &original, "phi3", GgmlDType::F32, |_, tensors| {
        let at = tensors
            .iter()
            .position(|(n, _)| n == "blk.0.attn_q.weight")
            .unwrap();
        tensors[at].0 = "blk.0.attn_qkv.weight".into();
    });
    let err = load_gguf(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("blk.0.attn_qkv.weight has 256 rows, the metadata needs 256 + 128 + 128"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_hugging_face_checkpoint_is_read_one_tensor_at_a_time_and_bad_headers_are_refused() {
    let (tokens, _) = vocabulary();
    let original = model(block_config(tokens.len(), false));
    let dir = tempdir("hf-per-tensor");
    // Quantised as each tensor is read: the same model as quantising the
    // loaded f32 model afterwards, bit for bit; sharded or not.
    for sharded in [false, true] {
        write_hf_dir(&dir, &original, sharded);
        let direct = load_with(&dir, &Device::Cpu, Quantize::parse("q4_k").unwrap())
            .unwrap()
            .model;
        let after = load_hf_dir(&dir, &Device::Cpu)
            .unwrap()
            .model
            .quantize(QuantFormat::Q4K)
            .unwrap();
        assert_eq!(direct.weight_bytes(), after.weight_bytes());
        let (diff, _) = max_diff(&logits(&direct), &logits(&after));
        assert!(diff == 0.0, "sharded {sharded}: logits differ by {diff}");
        for f in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
    }
    // Stored in bf16 (as most checkpoints are): read as the bf16 values in f32.
    write_hf_dir_with(&dir, &original, false, |_, tensors| {
        for t in tensors.values_mut() {
            *t = t.to_dtype(candle_core::DType::BF16).unwrap();
        }
    });
    let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap().model;
    let rounded = original.weights().layers[0].q.weight.dense().unwrap();
    let rounded = rounded
        .to_dtype(candle_core::DType::BF16)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let got = loaded.weights().layers[0].q.weight.dense().unwrap();
    assert_eq!(
        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        rounded.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // A header that lies about where a tensor's bytes are, a dtype fedveil
    // does not read, and a header longer than the file: each named.
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().to_string();
    let write = |header: &str| {
        // Same length, so the data offsets stay where they were.
        assert_eq!(header.len(), n);
        let mut out = bytes[..8].to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&bytes[8 + n..]);
        std::fs::write(&file, out).unwrap();
        load_hf_dir(&dir, &Device::Cpu).unwrap_err().to_string()
    };
    let err = write(&header.replacen("\"BF16\"", "\"I16\" ", 1));
    assert!(err.contains("is stored as I16"), "{err}");
    // A file cut short: the tensor whose bytes are past its end is named.
    let json: serde_json::Value = serde_json::from_str(&header).unwrap();
    let last = json
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.get("data_offsets")?[1].as_u64()?)))
        .max_by_key(|(_, end)| *end)
        .unwrap()
        .0;
    std::fs::write(&file, &bytes[..bytes.len() - 2]).unwrap();
    let err = load_hf_dir(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains(&format!("tensor {last}:")) && err.contains("do not hold"),
        "{err}"
    );
    let mut out = (u64::MAX / 2).to_le_bytes().to_vec();
    out.extend_from_slice(&bytes[8..]);
    std::fs::write(&file, out).unwrap();
    let err = load_hf_dir(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tiny Gemma-2 (`gemma2`) or Gemma-3 (`gemma3_text`): a sliding first
/// layer with a window shorter than the test's six tokens, a full second.
fn gemma_config(model_type: &str) -> LlamaConfig {
    let three = model_type == "gemma3_text";
    LlamaConfig {
        hidden_act: Activation::GeluTanh,
        norm_unit_offset: true,
        sandwich_norms: true,
        embed_scale: true,
        qk_norm: three,
        tie_word_embeddings: true,
        query_pre_attn_scalar: Some(8.0),
        attn_logit_softcapping: if three { None } else { Some(50.0) },
        final_logit_softcapping: if three { None } else { Some(30.0) },
        rope_theta: if three { 1e6 } else { 1e4 },
        rope_local_base_freq: if three { Some(1e4) } else { None },
        sliding_window: Some(4),
        layer_types: Some(vec![LayerType::Sliding, LayerType::Full]),
        rms_norm_eps: 1e-6,
        ..LlamaConfig::tiny(vocabulary().0.len())
    }
}

#[test]
fn a_gemma2_config_key_fedveil_does_not_implement_is_refused_by_name() {
    use serde_json::json;
    refuses_by_name(
        "gemma2",
        &[
            ("hidden_activation", json!("gelu"), "hidden_activation"),
            ("hidden_activation", json!(null), "hidden_activation"),
            ("hidden_act", json!("silu"), "disagree"),
            ("sliding_window_size", json!(7), "sliding_window_size"),
            ("num_hidden_layers", json!(1u64 << 40), "num_hidden_layers"),
            (
                "use_bidirectional_attention",
                json!(true),
                "use_bidirectional_attention",
            ),
            (
                "attn_logit_softcapping",
                json!(-1.0),
                "attn_logit_softcapping",
            ),
            (
                "layer_types",
                json!(["sliding_attention", "chunked_attention"]),
                "layer_types",
            ),
            ("sliding_window", json!(null), "sliding_window"),
            (
                "rope_scaling",
                json!({"rope_type": "yarn", "factor": 4.0}),
                "yarn",
            ),
            ("attention_bias", json!(true), "self_attn.q_proj.bias"),
        ],
    );
    // Gemma-2-2B's config.json as transformers 4.42 wrote it (no
    // layer_types: Gemma-2 alternates, sliding first) loads to the logits
    // of the model written.
    let m = model(gemma_config("gemma2"));
    let dir = tempdir("gemma2");
    write_hf_dir_with(&dir, &m, false, |c, _| {
        let o = c.as_object_mut().unwrap();
        o.remove("layer_types");
        o.remove("tie_word_embeddings");
        o.insert("hidden_act".into(), json!("gelu_pytorch_tanh"));
        o.insert("sliding_window_size".into(), json!(4));
        o.insert("cache_implementation".into(), json!("hybrid"));
        o.insert("attention_dropout".into(), json!(0.0));
        o.insert("torch_dtype".into(), json!("float32"));
        o.insert("transformers_version".into(), json!("4.42.4"));
    });
    let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config(), m.config());
    assert_eq!(logits(&loaded.model), logits(&m));
    // Left out, transformers' Gemma-2 defaults apply (soft caps 50 and
    // 30, head_dim 256), not Llama's.
    write_hf_dir_with(&dir, &m, false, |c, _| {
        let o = c.as_object_mut().unwrap();
        o.remove("final_logit_softcapping");
        o.remove("head_dim");
    });
    let err = load_hf_dir(&dir, &Device::Cpu).unwrap_err().to_string();
    // (Four heads of 256 where the weights have 32 rows.)
    assert!(err.contains("q_proj") && err.contains("1024"), "{err}");
    // transformers 5's form: the base in rope_parameters, none beside it.
    write_hf_dir_with(&dir, &m, false, |c, _| {
        let o = c.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": 50000.0}),
        );
    });
    let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config().rope_theta, 50000.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_gemma3_config_key_fedveil_does_not_implement_is_refused_by_name() {
    use serde_json::json;
    refuses_by_name(
        "gemma3_text",
        &[
            (
                "rope_parameters",
                json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
                "sliding_attention",
            ),
            (
                "use_bidirectional_attention",
                json!(true),
                "use_bidirectional_attention",
            ),
            ("hidden_activation", json!("gelu_new"), "hidden_activation"),
            ("query_pre_attn_scalar", json!(0), "query_pre_attn_scalar"),
        ],
    );
    // A multimodal Gemma-3's language model: its text_config, its weights
    // under transformers 4's and 5's prefixes; the vision tower set aside.
    let m = model(gemma_config("gemma3_text"));
    let dir = tempdir("gemma3-multimodal");
    for (lm, vision) in [
        ("language_model.model.", "vision_tower.vision_model."),
        ("model.language_model.", "model.vision_tower.vision_model."),
    ] {
        write_hf_dir_with(&dir, &m, true, |c, t| {
            let text = c.clone();
            *c = json!({
                "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                "text_config": text, "vision_config": {"model_type": "siglip_vision_model",
                "hidden_size": 16}, "boi_token_index": 255999, "eoi_token_index": 256000,
                "image_token_index": 262144, "mm_tokens_per_image": 256,
                "initializer_range": 0.02, "eos_token_id": [1, 106],
            });
            let names: Vec<String> = t.keys().cloned().collect();
            for name in names {
                let tensor = t.remove(&name).unwrap();
                t.insert(name.replacen("model.", lm, 1), tensor);
            }
            let patch = Tensor::ones((4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
            t.insert(
                format!("{vision}embeddings.patch_embedding.weight"),
                patch.clone(),
            );
            t.insert(
                "multi_modal_projector.mm_input_projection_weight".into(),
                patch,
            );
        });
        let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap();
        assert_eq!(loaded.model.config().layer_types, m.config().layer_types);
        assert_eq!(logits(&loaded.model), logits(&m), "{lm}");
    }
    // Its own keys are checked too, and the text config's by name.
    for (key, value, named) in [
        ("audio_config", json!({}), "audio_config"),
        ("tie_word_embeddings", json!(false), "tie_word_embeddings"),
    ] {
        write_hf_dir_with(&dir, &m, false, |c, _| {
            let text = c.clone();
            *c = json!({"model_type": "gemma3", "text_config": text});
            c[key] = value.clone();
        });
        let err = load_hf_dir(&dir, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains(named), "{err}");
    }
    write_hf_dir_with(&dir, &m, false, |c, _| {
        let mut text = c.clone();
        text["use_bidirectional_attention"] = json!(true);
        *c = json!({"model_type": "gemma3", "text_config": text});
    });
    let err = load_hf_dir(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("text_config: config.json use_bidirectional_attention"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // Gemma-3-1B's config.json as transformers 4.50 wrote it (a pattern,
    // not layer_types; the local rotary base by its old name) loads to the
    // logits of the model written; so does transformers 5's form.
    let m = model(gemma_config("gemma3_text"));
    let dir = tempdir("gemma3");
    write_hf_dir_with(&dir, &m, false, |c, _| {
        let o = c.as_object_mut().unwrap();
        o.remove("layer_types");
        o.insert("sliding_window_pattern".into(), json!(2));
        o.insert("eos_token_id".into(), json!([1, 106]));
        o.insert("rope_scaling".into(), json!(null));
        o.insert("cache_implementation".into(), json!("hybrid"));
    });
    let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config().layer_types, m.config().layer_types);
    assert_eq!(logits(&loaded.model), logits(&m));
    write_hf_dir_with(&dir, &m, false, |c, _| {
        let o = c.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("rope_local_base_freq");
        o.insert(
            "rope_parameters".into(),
            json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        );
        o.insert("_sliding_window_pattern".into(), json!(6));
    });
    let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config(), m.config());
    assert_eq!(logits(&loaded.model), logits(&m));
    // Without bases in rope_parameters, Gemma-3's defaults (10⁶ and 10⁴),
    // as transformers fills them, not Llama's.
    write_hf_dir_with(&dir, &m, false, |c, _| {
        let o = c.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("rope_local_base_freq");
        o.insert(
            "rope_parameters".into(),
            json!({"full_attention": {"rope_type": "default"},
                "sliding_attention": {"rope_type": "default"}}),
        );
    });
    let loaded = load_hf_dir(&dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config(), m.config());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Gemma-2 and Gemma-3 as GGUF, as llama.cpp's converter writes them: the
/// norms stored as the `1 + w` they multiply by, the norms after attention
/// and the MLP as `post_attention_norm` and `post_ffw_norm`, the soft caps
/// and window in the metadata (Gemma-3's layer pattern too, where it is not
/// llama.cpp's default of 6). Both load to the model written.
#[test]
fn gemma_models_load_from_gguf_as_llama_cpp_writes_them() {
    for (arch, model_type) in [("gemma2", "gemma2"), ("gemma3", "gemma3_text")] {
        let m = model(gemma_config(model_type));
        let c = m.config().clone();
        let dir = tempdir(arch);
        // The norms a llama-style GGUF writer leaves out, by llama.cpp's names.
        let gemma_norms = |m: &Llama, t: &mut Vec<(String, Tensor)>| {
            for (i, l) in m.weights().layers.iter().enumerate() {
                let (a, f) = l.sandwich_norms.clone().unwrap();
                t.push((format!("blk.{i}.post_attention_norm.weight"), a));
                t.push((format!("blk.{i}.post_ffw_norm.weight"), f));
                if let Some((q, k)) = l.qk_norm.clone() {
                    t.push((format!("blk.{i}.attn_q_norm.weight"), q));
                    t.push((format!("blk.{i}.attn_k_norm.weight"), k));
                }
            }
        };
        let path = dir.join("m.gguf");
        write_gguf_with(&path, &m, arch, |meta, t| {
            gemma_norms(&m, t);
            for (name, tensor) in t.iter_mut() {
                if name.ends_with("norm.weight") {
                    *tensor = (&*tensor + 1.0).unwrap();
                }
            }
            let k = |key: &str| format!("{arch}.{key}");
            meta.push((k("attention.sliding_window"), Value::U32(4)));
            meta.push((k("attention.key_length"), Value::U32(c.head_dim() as u32)));
            meta.push((k("attention.value_length"), Value::U32(c.head_dim() as u32)));
            if arch == "gemma2" {
                meta.push((k("attn_logit_softcapping"), Value::F32(50.0)));
                meta.push((k("final_logit_softcapping"), Value::F32(30.0)));
            } else {
                meta.push((k("attention.sliding_window_pattern"), Value::U32(2)));
            }
        });
        let gguf = load_gguf(&path, &Device::Cpu).unwrap();
        // (The epsilon as f32, the EOS from the test's tokenizer.)
        let read = LlamaConfig {
            rms_norm_eps: c.rms_norm_eps,
            eos_token_id: c.eos_token_id,
            ..gguf.model.config().clone()
        };
        assert_eq!(read, c, "{arch}");
        let (diff, scale) = max_diff(&logits(&gguf.model), &logits(&m));
        assert!(diff <= 1e-5 * scale, "{arch}: {diff} of {scale}");
        // Without the shift the norms would be off by one: the logits show it.
        write_gguf_with(&path, &m, arch, |meta, t| {
            gemma_norms(&m, t);
            meta.push((format!("{arch}.attention.sliding_window"), Value::U32(4)));
            if arch == "gemma3" {
                // A key another architecture has is refused on Gemma-3's.
                meta.push((format!("{arch}.attn_logit_softcapping"), Value::F32(50.0)));
            }
        });
        match load_gguf(&path, &Device::Cpu) {
            Ok(unshifted) => {
                let (diff, scale) = max_diff(&logits(&unshifted.model), &logits(&m));
                assert!(diff > 1e-2 * scale, "{arch}: {diff} of {scale}");
            }
            Err(e) => {
                assert_eq!(arch, "gemma3");
                assert!(
                    e.to_string().contains("gemma3.attn_logit_softcapping"),
                    "{e}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Read straight into bf16 (what a GPU computes in), a model is the f32
/// model cast afterwards, bit for bit: from a sharded Hugging Face
/// directory, and from GGUF files of llama (permuted Q/K) and Gemma-2
/// (norms shifted in f32 before the cast).
#[test]
fn loading_straight_into_bf16_is_loading_in_f32_then_casting() {
    use candle_core::DType;
    use fedveil_model::load::load_with_dtype;
    let weights = |m: &Llama| -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        for (i, l) in m.weights().layers.iter().enumerate() {
            let mut dense = vec![l.input_norm.clone(), l.post_norm.clone()];
            dense.extend(
                l.sandwich_norms
                    .iter()
                    .flat_map(|(a, b)| [a.clone(), b.clone()]),
            );
            for module in Module::ALL {
                dense.push(l.linear(module).weight.dense().unwrap());
            }
            for (j, t) in dense.iter().enumerate() {
                assert_eq!(t.dtype(), DType::BF16);
                let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                out.push((format!("{i}.{j}"), v.to_vec1().unwrap()));
            }
        }
        out
    };
    let dir = tempdir("bf16");
    let m = model(config(vocabulary().0.len(), true));
    write_hf_dir(&dir, &m, true);
    let gemma = model(gemma_config("gemma2"));
    let gemma_path = dir.join("gemma2.gguf");
    write_gguf_with(&gemma_path, &gemma, "gemma2", |meta, t| {
        for (i, l) in gemma.weights().layers.iter().enumerate() {
            let (a, f) = l.sandwich_norms.clone().unwrap();
            t.push((format!("blk.{i}.post_attention_norm.weight"), a));
            t.push((format!("blk.{i}.post_ffw_norm.weight"), f));
        }
        for (name, tensor) in t.iter_mut() {
            if name.ends_with("norm.weight") {
                // Norms away from zero, so the shift's precision shows.
                *tensor = (&*tensor + 1.001).unwrap();
            }
        }
        meta.push(("gemma2.attention.sliding_window".into(), Value::U32(4)));
        meta.push(("gemma2.attention.key_length".into(), Value::U32(8)));
    });
    let llama_path = dir.join("llama.gguf");
    write_gguf(
        &llama_path,
        &model(config(vocabulary().0.len(), false)),
        "llama",
    );
    for path in [dir.clone(), gemma_path, llama_path] {
        let direct = load_with_dtype(&path, &Device::Cpu, Quantize::None, DType::BF16).unwrap();
        let cast = load(&path, &Device::Cpu)
            .unwrap()
            .model
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(direct.model.dtype(), DType::BF16);
        assert_eq!(weights(&direct.model), weights(&cast), "{path:?}");
        assert_eq!(logits(&direct.model), logits(&cast), "{path:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
