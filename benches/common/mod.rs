//! Helpers shared by the language-model benchmarks (each uses some).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use fedveil_data::{Record, Template};
use fedveil_model::Example;
use fedveil_model::load::Loaded;

/// The median (sorts `v`).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// This process's peak resident memory (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .map_or(0, |kib| kib * 1024)
}

/// GSM8K prepared into `dir` through the `fedveil` binary, as a user
/// prepares it; the file's path.
pub fn prepare_gsm8k(dir: &Path) -> PathBuf {
    let out = dir.join("gsm8k.jsonl");
    let status = Command::new(env!("CARGO_BIN_EXE_fedveil"))
        .args(["data", "prepare", "gsm8k-test", "--out"])
        .arg(&out)
        .status()
        .expect("fedveil data prepare");
    assert!(status.success(), "fedveil data prepare gsm8k-test failed");
    out
}

/// Records as Alpaca-template examples of at most `max_len` tokens, the
/// loss on the completion.
pub fn encode_alpaca(loaded: &Loaded, records: &[Record], max_len: usize) -> Vec<Example> {
    let eos = loaded.model.config().eos_token_id;
    records
        .iter()
        .filter_map(|r| {
            let prompt = Template::Alpaca.prompt(r);
            let completion = Template::Alpaca.completion(r);
            Example::prompted(&loaded.tokenizer, &prompt, &completion, eos, max_len)
                .expect("tokenise")
        })
        .collect()
}
