//! The tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes, built
//! as the model's reference (Hugging Face) tokenizer is, so that the ids are
//! the ones the model was trained on.
//!
//! Two kinds of model (`tokenizer.ggml.model`):
//! - `"gpt2"`, byte-level BPE: vocabulary and merges from the file, and the
//!   pre-tokenizer that `tokenizer.ggml.pre` names. Implemented: `smollm`
//!   (and `starcoder` and `refact`, the same pre-tokenizer: digits one by
//!   one, then GPT-2's byte-level split), `gpt-2`, `llama-bpe` (Llama-3.x:
//!   its split expression, whole words found in the vocabulary taken without
//!   merging) and `qwen2` (Qwen2, 2.5 and 3: NFC, then its split expression,
//!   digits one by one). Any other name is refused: another pre-tokenizer
//!   splits text differently and would give other ids than the model's.
//! - `"llama"`, SentencePiece BPE (Llama-2, Mistral, Phi-3, Gemma): pieces
//!   and their scores from the file, merged as SentencePiece merges (the
//!   pair whose merged piece scores highest first; Hugging Face's conversion
//!   of a SentencePiece model into merge rules), unknown characters as
//!   their UTF-8 bytes (`<0x..>` pieces), spaces as `▁`, and a `▁` in front
//!   of the text unless `tokenizer.ggml.add_space_prefix` is false.
//!
//! Control tokens (token type 3) become special tokens, user-defined ones
//! (type 4) added tokens. `tokenizer.ggml.add_bos_token` and
//! `add_eos_token` (defaults as llama.cpp's: a BOS for SentencePiece and
//! `llama-bpe`, none otherwise) become the post-processor that encoding
//! with special tokens applies.
//!
//! Checked against the reference tokenizers' ids on llama.cpp's vocabulary
//! test files (`tests/gguf_tokenizers.rs`, BENCHMARKS.md).

use candle_core::quantized::gguf_file;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{NFC, NormalizerWrapper, Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Llama-3's split expression, as its `tokenizer.json` has it.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama-3's with digits one by one.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer names (`tokenizer.ggml.pre`) fedveil implements.
pub const PRE_TOKENIZERS: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "gpt-2",
    "llama-bpe",
    "qwen2",
];

/// The longest SentencePiece piece accepted, in bytes.
const MAX_PIECE_BYTES: usize = 1024;

// llama.cpp's token types.
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

struct Meta<'a>(&'a gguf_file::Content);

impl Meta<'_> {
    fn value(&self, key: &str) -> Option<&gguf_file::Value> {
        self.0.metadata.get(key)
    }
    fn string(&self, key: &str) -> Result<Option<String>, String> {
        self.value(key)
            .map(|v| v.to_string().cloned().map_err(|e| format!("{key}: {e}")))
            .transpose()
    }
    fn bool(&self, key: &str) -> Result<Option<bool>, String> {
        self.value(key)
            .map(|v| v.to_bool().map_err(|e| format!("{key}: {e}")))
            .transpose()
    }
    fn id(&self, key: &str, vocab: usize) -> Result<Option<u32>, String> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let id = v.to_u32().map_err(|e| format!("{key}: {e}"))?;
        if id as usize >= vocab {
            return Err(format!("{key} = {id} is outside the vocabulary of {vocab}"));
        }
        Ok(Some(id))
    }
    fn array(&self, key: &str) -> Result<&Vec<gguf_file::Value>, String> {
        self.value(key)
            .ok_or(format!("no {key} in the metadata"))?
            .to_vec()
            .map_err(|e| format!("{key}: {e}"))
    }
    fn strings(&self, key: &str) -> Result<Vec<String>, String> {
        self.array(key)?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| format!("{key}: {e}")))
            .collect()
    }
}

/// The tokenizer that `content`'s metadata describes; an error naming the
/// key when it describes one fedveil does not implement.
pub fn gguf_tokenizer(content: &gguf_file::Content) -> Result<Tokenizer, String> {
    let meta = Meta(content);
    let model = meta
        .string("tokenizer.ggml.model")?
        .ok_or("no tokenizer.ggml.model in the metadata")?;
    let pre = meta.string("tokenizer.ggml.pre")?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match meta.value("tokenizer.ggml.token_type") {
        Some(_) => meta
            .array("tokenizer.ggml.token_type")?
            .iter()
            .map(|t| {
                t.to_i32()
                    .map_err(|e| format!("tokenizer.ggml.token_type: {e}"))
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let (mut tokenizer, default_bos) = match model.as_str() {
        "gpt2" => {
            let pre = pre.ok_or(format!(
                "the file names no pre-tokenizer (tokenizer.ggml.pre); fedveil implements {} \
                 and refuses to guess",
                PRE_TOKENIZERS.join(", ")
            ))?;
            byte_level_bpe(&meta, &tokens, &pre)?
        }
        "llama" => {
            if let Some(pre) = pre.filter(|p| p != "default") {
                return Err(format!(
                    "tokenizer.ggml.pre {pre:?} with a SentencePiece model is not implemented \
                     (fedveil implements \"default\")"
                ));
            }
            (sentencepiece(&meta, &tokens, &types)?, true)
        }
        other => {
            return Err(format!(
                "tokenizer.ggml.model {other:?} is not implemented (fedveil implements \
                 byte-level BPE, \"gpt2\", and SentencePiece, \"llama\")"
            ));
        }
    };
    if model == "gpt2"
        && let Some(true) = meta.bool("tokenizer.ggml.add_space_prefix")?
    {
        return Err(
            "tokenizer.ggml.add_space_prefix = true with byte-level BPE is not \
                    implemented"
                .into(),
        );
    }
    let added: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter_map(|(i, t)| match *t {
            TOKEN_CONTROL => Some(AddedToken::from(tokens[i].clone(), true)),
            TOKEN_USER_DEFINED => {
                Some(AddedToken::from(tokens[i].clone(), false).normalized(false))
            }
            _ => None,
        })
        .collect();
    let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| format!("cannot add the control tokens: {e}"))?;
    tokenizer
        .add_tokens(plain)
        .map_err(|e| format!("cannot add the user-defined tokens: {e}"))?;

    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(default_bos);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = meta.id("tokenizer.ggml.bos_token_id", tokens.len())?;
    let eos = meta.id("tokenizer.ggml.eos_token_id", tokens.len())?;
    let mut marks = Vec::new();
    if add_bos {
        marks.push((
            "bos",
            bos.ok_or("tokenizer.ggml.add_bos_token is set but the file names no bos_token_id")?,
        ));
    }
    if add_eos {
        marks.push((
            "eos",
            eos.ok_or("tokenizer.ggml.add_eos_token is set but the file names no eos_token_id")?,
        ));
    }
    if !marks.is_empty() {
        let token = |which: &str| {
            marks
                .iter()
                .find(|(w, _)| *w == which)
                .map(|(_, id)| tokens[*id as usize].clone())
        };
        let (b, e) = (token("bos"), token("eos"));
        let wrap = |body: &str| {
            let mut parts: Vec<String> = Vec::new();
            parts.extend(b.iter().map(|t| format!("{t}:0")));
            parts.push(body.to_string());
            parts.extend(e.iter().map(|t| format!("{t}:0")));
            parts.join(" ")
        };
        let single = wrap("$A:0");
        let pair = format!("{} {}", wrap("$A:0"), wrap("$B:1").replace(":0", ":1"));
        let specials: Vec<(String, u32)> = marks
            .iter()
            .map(|(_, id)| (tokens[*id as usize].clone(), *id))
            .collect();
        let processor = TemplateProcessing::builder()
            .try_single(single.as_str())
            .and_then(|b| b.try_pair(pair.as_str()))
            .map_err(|e| format!("cannot build the BOS/EOS template: {e}"))?
            .special_tokens(specials)
            .build()
            .map_err(|e| format!("cannot build the BOS/EOS template: {e}"))?;
        tokenizer.with_post_processor(Some(processor));
    }
    Ok(tokenizer)
}

/// Byte-level BPE with the pre-tokenizer `pre` names; whether it adds a BOS
/// by default (llama.cpp's default for the kind).
fn byte_level_bpe(meta: &Meta, tokens: &[String], pre: &str) -> Result<(Tokenizer, bool), String> {
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or(format!("merge {m:?} is not two tokens"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, String> {
        Ok(PreTokenizerWrapper::Split(
            Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| format!("cannot build the {pre} split expression: {e}"))?,
        ))
    };
    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let (pre_tokenizer, normalizer, ignore_merges, bos) = match pre {
        "smollm" | "starcoder" | "refact" => (
            vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ],
            None,
            false,
            false,
        ),
        "gpt-2" => (vec![byte_level(true)], None, false, false),
        "llama-bpe" => (
            vec![split(LLAMA3_SPLIT)?, byte_level(false)],
            None,
            true,
            true,
        ),
        "qwen2" => (
            vec![split(QWEN2_SPLIT)?, byte_level(false)],
            Some(NormalizerWrapper::NFC(NFC)),
            false,
            false,
        ),
        other => {
            return Err(format!(
                "tokenizer.ggml.pre {other:?} is not implemented (fedveil implements {})",
                PRE_TOKENIZERS.join(", ")
            ));
        }
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| format!("cannot build the BPE model: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(normalizer)
        .map_err(|e| format!("cannot set the normaliser: {e}"))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(pre_tokenizer)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok((tokenizer, bos))
}

/// SentencePiece BPE as Hugging Face converts it: merge rules from the
/// pieces' scores, byte fallback, `▁` for spaces.
fn sentencepiece(meta: &Meta, tokens: &[String], types: &[i32]) -> Result<Tokenizer, String> {
    let scores: Vec<f32> = meta
        .array("tokenizer.ggml.scores")?
        .iter()
        .map(|s| {
            s.to_f32()
                .map_err(|e| format!("tokenizer.ggml.scores: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if scores.len() != tokens.len() {
        return Err(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        ));
    }
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err("tokenizer.ggml.tokens holds a piece twice".into());
    }
    // Each piece's splits are looked up one by one: bound the work a
    // malformed file can ask for. SentencePiece's own pieces are at most
    // a few dozen characters.
    if let Some(i) = tokens.iter().position(|t| t.len() > MAX_PIECE_BYTES) {
        return Err(format!(
            "tokenizer.ggml.tokens[{i}] is {} bytes long (more than {MAX_PIECE_BYTES})",
            tokens[i].len()
        ));
    }
    let merges = sentencepiece_merges(tokens, &scores, &vocab);
    let unk = match meta.id("tokenizer.ggml.unknown_token_id", tokens.len())? {
        Some(id) => tokens[id as usize].clone(),
        None => types
            .iter()
            .position(|t| *t == 2)
            .map(|i| tokens[i].clone())
            .ok_or("a SentencePiece vocabulary without an unknown token (tokenizer.ggml.unknown_token_id)")?,
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| format!("cannot build the SentencePiece model: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let prefix = meta
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let replace = Replace::new(" ", "▁").map_err(|e| e.to_string())?;
    let mut normalizers = Vec::new();
    if prefix {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
    }
    normalizers.push(NormalizerWrapper::Replace(replace));
    tokenizer
        .with_normalizer(Some(NormSequence::new(normalizers)))
        .map_err(|e| format!("cannot set the normaliser: {e}"))?;
    let mut decoders = vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(|e| e.to_string())?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Merge rules equivalent to SentencePiece's BPE: every split of every piece
/// into two pieces of the vocabulary, ranked by the merged piece's score
/// (highest first; ties in vocabulary order, then by the halves' ids), as
/// the `SentencePieceExtractor` that wrote Llama-2's and Mistral's
/// `tokenizer.json` ranks them. (Newer transformers break ties of equal
/// score by the halves' lengths instead; the two orders differ only where
/// two overlapping pairs make pieces of equal score, and agree on every
/// reference text of BENCHMARKS.md.)
fn sentencepiece_merges(
    tokens: &[String],
    scores: &[f32],
    vocab: &tokenizers::models::bpe::Vocab,
) -> Vec<(String, String)> {
    let mut merges: Vec<(u32, u32, f32)> = Vec::new();
    for (piece, score) in tokens.iter().zip(scores) {
        let mut local: Vec<(u32, u32, f32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*vocab.get(l)?, *vocab.get(r)?, *score))
            })
            .collect();
        local.sort_by_key(|(l, r, _)| (*l, *r));
        merges.extend(local);
    }
    // A stable sort keeps the order above among equal scores.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value;
    use std::collections::HashMap;

    /// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte
    /// pieces, then `pieces` with their scores.
    fn spm(pieces: &[(&str, f32)], extra: &[(&str, Value)]) -> gguf_file::Content {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0f32; 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (p, s) in pieces {
            tokens.push(p.to_string());
            types.push(1);
            scores.push(*s);
        }
        let mut metadata: HashMap<String, Value> = HashMap::new();
        let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        metadata.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        metadata.insert("tokenizer.ggml.tokens".into(), strings(tokens));
        metadata.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        );
        metadata.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        );
        metadata.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
        metadata.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        metadata.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
        for (k, v) in extra {
            metadata.insert(k.to_string(), v.clone());
        }
        gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn pieces(t: &Tokenizer, text: &str, special: bool) -> Vec<String> {
        t.encode(text, special)
            .unwrap()
            .get_tokens()
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    const WORDS: &[(&str, f32)] = &[
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("ll", -3.0),
        ("he", -4.0),
        ("hell", -5.0),
        ("hello", -6.0),
        ("▁hello", -7.0),
        ("or", -8.0),
        ("▁w", -9.0),
        ("▁wor", -10.0),
    ];

    #[test]
    fn a_sentencepiece_vocabulary_merges_by_score_falls_back_to_bytes_and_adds_a_bos() {
        let t = gguf_tokenizer(&spm(WORDS, &[])).unwrap();
        // A space prefix, spaces as ▁, merges down to the vocabulary's pieces.
        assert_eq!(
            pieces(&t, "hello world", false),
            ["▁hello", "▁wor", "l", "d"]
        );
        // A character outside the vocabulary becomes its UTF-8 bytes.
        assert_eq!(pieces(&t, "hé", false), ["▁", "h", "<0xC3>", "<0xA9>"]);
        // The BOS with special tokens, as llama.cpp's default for SentencePiece.
        assert_eq!(pieces(&t, "hello", true), ["<s>", "▁hello"]);
        assert_eq!(
            t.decode(t.encode("hello héd", true).unwrap().get_ids(), true)
                .unwrap(),
            "hello héd"
        );
        // Control tokens in the text are the special tokens.
        assert_eq!(pieces(&t, "</s>hello", false)[0], "</s>");
        // Without the prefix (Gemma) and without the BOS.
        let t = gguf_tokenizer(&spm(
            WORDS,
            &[
                ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
                ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
                ("tokenizer.ggml.add_eos_token", Value::Bool(true)),
            ],
        ))
        .unwrap();
        assert_eq!(
            pieces(&t, "hello world", true),
            ["hello", "▁wor", "l", "d", "</s>"]
        );
    }

    #[test]
    fn sentencepiece_merges_follow_the_merged_pieces_scores() {
        let chars = [("a", -1.0), ("b", -1.0), ("c", -1.0), ("▁", -1.0)];
        let with = |ab: f32, bc: f32| {
            let mut v = chars.to_vec();
            v.extend([("ab", ab), ("bc", bc)]);
            let t = gguf_tokenizer(&spm(&v, &[])).unwrap();
            pieces(&t, "abc", false)
        };
        assert_eq!(with(-2.0, -3.0), ["▁", "ab", "c"]);
        assert_eq!(with(-3.0, -2.0), ["▁", "a", "bc"]);
    }

    #[test]
    fn tokenizer_metadata_fedveil_does_not_implement_is_refused_by_name() {
        let edit = |key: &str, value: Value| {
            let mut c = spm(WORDS, &[]);
            c.metadata.insert(key.into(), value);
            gguf_tokenizer(&c).unwrap_err()
        };
        let err = edit("tokenizer.ggml.model", Value::String("bert".into()));
        assert!(err.contains("\"bert\""), "{err}");
        let err = edit("tokenizer.ggml.pre", Value::String("llama-bpe".into()));
        assert!(err.contains("llama-bpe"), "{err}");
        let err = edit("tokenizer.ggml.bos_token_id", Value::U32(100_000));
        assert!(err.contains("tokenizer.ggml.bos_token_id"), "{err}");
        let long = "a".repeat(MAX_PIECE_BYTES + 1);
        let err = gguf_tokenizer(&spm(&[(long.as_str(), -1.0)], &[])).unwrap_err();
        assert!(err.contains("tokenizer.ggml.tokens[259]"), "{err}");
        let mut c = spm(WORDS, &[]);
        c.metadata.remove("tokenizer.ggml.scores");
        let err = gguf_tokenizer(&c).unwrap_err();
        assert!(err.contains("tokenizer.ggml.scores"), "{err}");
        // Byte-level BPE: a pre-tokenizer fedveil does not implement, and none.
        let mut c = spm(WORDS, &[]);
        c.metadata
            .insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        c.metadata.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("h e".into())]),
        );
        c.metadata.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("deepseek-coder".into()),
        );
        let err = gguf_tokenizer(&c).unwrap_err();
        assert!(err.contains("deepseek-coder"), "{err}");
        c.metadata.remove("tokenizer.ggml.pre");
        let err = gguf_tokenizer(&c).unwrap_err();
        assert!(err.contains("tokenizer.ggml.pre"), "{err}");
        c.metadata
            .insert("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
        assert!(gguf_tokenizer(&c).is_ok());
    }
}
