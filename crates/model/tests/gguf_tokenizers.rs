//! fedveil's GGUF tokenizers against the reference (Hugging Face) tokenizers'
//! ids, on llama.cpp's vocabulary test files: a GGUF holding only a model's
//! tokenizer, its test texts (`.inp`: digits, code, whitespace runs,
//! accents, Chinese, Cyrillic, emoji) and the ids the model's own tokenizer
//! gives them (`.out`, written by llama.cpp's `convert_hf_to_gguf_update.py`
//! with `transformers`).
//!
//! The files are not fetched by tests. `benches/gguf_vocabs.sh DIR` writes
//! them from the pinned llama-cpp-python source package; then
//! `FEDVEIL_GGUF_VOCABS=DIR cargo test --release -p fedveil-model --test
//! gguf_tokenizers -- --ignored --nocapture`.

use candle_core::quantized::gguf_file;
use fedveil_model::load::gguf_tokenizer;
use std::path::Path;

/// Each kind of GGUF tokenizer fedveil implements, by its vocabulary file:
/// byte-level BPE with each pre-tokenizer (`starcoder` and `refact` share
/// `smollm`'s, and their HF tokenizers its definition) and SentencePiece.
const VOCABS: &[&str] = &[
    "llama-bpe",
    "qwen2",
    "starcoder",
    "refact",
    "gpt-2",
    "llama-spm",
    "phi-3",
];

fn cases(dir: &Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    // As llama.cpp's test-tokenizer-0 reads them.
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut pos = 0;
    while pos < inp.len() {
        match inp[pos..].find(sep) {
            Some(n) => {
                texts.push(inp[pos..pos + n].to_string());
                pos += n + sep.len();
            }
            None => {
                texts.push(inp[pos..].to_string());
                break;
            }
        }
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{name}: .inp and .out differ in length"
    );
    texts.into_iter().zip(ids).collect()
}

#[test]
#[ignore = "needs llama.cpp's vocabulary files: FEDVEIL_GGUF_VOCABS=DIR (benches/gguf_vocabs.sh)"]
fn gguf_tokenizers_give_the_reference_tokenizers_ids() {
    let dir = std::env::var("FEDVEIL_GGUF_VOCABS")
        .expect("FEDVEIL_GGUF_VOCABS names the directory benches/gguf_vocabs.sh wrote");
    let dir = Path::new(&dir);
    let mut failed = Vec::new();
    println!("| vocabulary | model | pre-tokenizer | texts | tokens | ids equal | decoded equal |");
    println!("|---|---|---|---|---|---|---|");
    for name in VOCABS {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let mut file = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let meta = |k: &str| {
            content
                .metadata
                .get(k)
                .and_then(|v| v.to_string().ok().cloned())
                .unwrap_or_default()
        };
        let tokenizer = gguf_tokenizer(&content).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cases = cases(dir, name);
        let (mut same, mut decoded, mut tokens) = (0, 0, 0);
        for (text, want) in &cases {
            let got = tokenizer
                .encode(text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            tokens += want.len();
            if &got == want {
                same += 1;
            } else {
                failed.push(format!("{name}: {text:?}\n  want {want:?}\n  got  {got:?}"));
            }
            if tokenizer.decode(&got, false).unwrap() == *text {
                decoded += 1;
            }
        }
        println!(
            "| {name} | {} | {} | {} | {tokens} | {same}/{} | {decoded}/{} |",
            meta("tokenizer.ggml.model"),
            meta("tokenizer.ggml.pre"),
            cases.len(),
            cases.len(),
            cases.len()
        );
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
