//! The language-model task end to end, on a tiny random llama and data the
//! test writes itself (no downloads): `fedveil run` fine-tunes a LoRA
//! adapter over loopback QUIC with SecAgg+, and offsite-tuning across
//! separate server and client processes gives every client the emulator
//! and never a tensor of a dropped layer (protocols/offsite-tuning.md §3).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use common::{fedveil, fedveil_env, free_udp_port, keygen, spawn};
use fedveil_data::Record;
use fedveil_model::offsite::{Layout, OffsiteConfig, bundle_digests, weight_digests};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-llm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny llama (eight layers, byte tokenizer) at `dir/model`.
fn tiny_model(dir: &Path) -> PathBuf {
    let loaded =
        fedveil_model::tiny::tiny_model(8, &Device::Cpu, &mut ChaCha20Rng::from_seed([7; 32]))
            .unwrap();
    let path = dir.join("model");
    fedveil_model::load::save_hf_dir(&loaded, &path).unwrap();
    path
}

/// `fedveil model check --logits` writes the fixed sentence's ids, as the
/// model's tokenizer encodes it, and the logits the model computes for them.
#[test]
fn model_check_writes_the_sentence_ids_and_the_logits_the_model_computes() {
    let dir = scratch("logits");
    let model = tiny_model(&dir);
    let out = dir.join("logits.safetensors");
    let (code, stdout, stderr) = fedveil(&[
        "model",
        "check",
        "--model",
        model.to_str().unwrap(),
        "--json",
        "--logits",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let file = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let ids: Vec<i64> = file["ids"].to_vec1().unwrap();
    let loaded = fedveil_model::load::load(&model, &Device::Cpu).unwrap();
    let want = loaded
        .tokenizer
        .encode(fedveil_model::check::SENTENCE, false)
        .unwrap();
    let want: Vec<i64> = want.get_ids().iter().map(|&i| i64::from(i)).collect();
    assert_eq!(ids, want);
    let (_, logits) = fedveil_model::check::sentence_logits(&loaded).unwrap();
    let (got, want) = (&file["logits"], logits);
    assert_eq!(got.dims(), &[ids.len(), loaded.model.config().vocab_size]);
    let diff: f32 = (got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff <= 1e-5, "the file's logits differ by {diff}");
    // A path it cannot write is an error naming the flag.
    let (code, _, stderr) = fedveil(&[
        "model",
        "check",
        "--model",
        model.to_str().unwrap(),
        "--logits",
        dir.join("no/such/dir/l.safetensors").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--logits"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Short question/answer records in six categories: each answer is a
/// fixed word per category, so an adapter can learn them.
fn records(n: usize, offset: usize) -> Vec<Record> {
    const WORDS: [&str; 6] = ["red", "green", "blue", "amber", "violet", "teal"];
    (offset..offset + n)
        .map(|i| {
            let c = i % WORDS.len();
            Record {
                instruction: format!("colour of item {c}?"),
                input: String::new(),
                output: WORDS[c].into(),
                category: format!("c{c}"),
                test: String::new(),
                ..Default::default()
            }
        })
        .collect()
}

fn write_records(path: &Path, records: &[Record]) {
    std::fs::write(path, fedveil_data::records::to_jsonl(records)).unwrap();
}

fn metrics_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each metrics line is JSON"))
        .collect()
}

#[test]
fn run_fine_tunes_over_quic_with_secagg_writes_peft_adapters_and_starts_from_one() {
    let dir = scratch("run");
    let model = tiny_model(&dir);
    write_records(&dir.join("data.jsonl"), &records(96, 0));
    let metrics = dir.join("metrics.jsonl");
    let config = format!(
        r#"
[run]
clients = 3

[federation]
rounds = 8
cohort_size = 3

[training]
local_steps = 8
batch_size = 8
learning_rate = 0.005

[optimizer]
kind = "fedavg"
server_lr = 1.0

[secagg]
threshold = 2
clamp = 1.0

[task]
kind = "llm"
model = "{model}"
data = "data.jsonl"
eval_fraction = 0.25
template = "plain"
max_len = 64
split = {{ kind = "dirichlet", alpha = 1.0 }}
exact_match = 4
max_new_tokens = 6
save_adapter = "adapters"
save_every = 3

[task.peft]
method = "lora"
r = 8
alpha = 16
target_modules = ["all-linear"]
"#,
        model = model.display()
    );
    let file = dir.join("run.toml");
    std::fs::write(&file, config).unwrap();
    let (code, out, err) = fedveil(&[
        "run",
        file.to_str().unwrap(),
        "--json",
        "--quiet",
        "--metrics",
        metrics.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON summary");
    assert_eq!(summary["rounds"], 8);
    assert_eq!(summary["clients_failed"], 0);
    // The summary records which records trained and which evaluated.
    let data = &summary["data"];
    assert!(
        data["train"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with("data.jsonl"),
        "{data}"
    );
    assert_eq!(data["train"], data["eval"], "{data}");
    assert!(
        data["evaluated"]
            .as_str()
            .unwrap()
            .contains("the last 0.25"),
        "{data}"
    );
    assert_eq!(data["split"], "dirichlet (α = 1)", "{data}");
    // The model it started from and the one it ended with, both with the
    // (generation-based) exact match.
    assert!(summary["initial_loss"].as_f64().unwrap() > summary["loss"].as_f64().unwrap());
    for key in ["initial_eval", "eval"] {
        let em = summary[key]["exact_match"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&em), "{summary}");
    }
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 8);
    let losses: Vec<f64> = lines.iter().map(|l| l["loss"].as_f64().unwrap()).collect();
    for l in &lines {
        assert_eq!(l["survivors"], 3, "{l}");
        assert!(l["eval"]["perplexity"].as_f64().unwrap() > 1.0);
    }
    // The held-out loss of the tiny model falls as the adapter learns the
    // answers (a random model starts near ln 257 ≈ 5.5 nats per token).
    assert!(
        losses[7] < 0.6 * losses[0],
        "the evaluation loss did not fall: {losses:?}"
    );

    // The server wrote the global adapter after rounds 3 and 6 and at the
    // end, in PEFT's layout.
    let mut saved: Vec<String> = std::fs::read_dir(dir.join("adapters"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    saved.sort();
    assert_eq!(saved, ["final", "round-3", "round-6"]);
    for s in &saved {
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            assert!(
                dir.join("adapters").join(s).join(file).is_file(),
                "{s}/{file}"
            );
        }
    }
    // `fedveil model eval` scores the model with the final adapter lower
    // than without it, on the run's records.
    let data = dir.join("data.jsonl").display().to_string();
    let eval = |adapter: Option<&str>| -> f64 {
        let mut args = vec![
            "model",
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--task",
            &data,
            "--template",
            "plain",
            "--max-len",
            "64",
            "--json",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        let (code, out, err) = fedveil(&args);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
        assert_eq!(v["kind"], "completion", "{v}");
        v["loss"].as_f64().unwrap()
    };
    let final_dir = dir.join("adapters/final");
    let with = eval(Some(final_dir.to_str().unwrap()));
    let without = eval(None);
    assert!(
        with < 0.6 * without,
        "loss {without} without the adapter, {with} with"
    );

    // A run that starts from the final adapter starts where this one ended:
    // the same held-out records score the same loss.
    let restart = std::fs::read_to_string(&file)
        .unwrap()
        .replace("rounds = 8", "rounds = 1")
        .replace(
            "save_adapter = \"adapters\"\nsave_every = 3",
            "adapter = \"adapters/final\"",
        );
    let restart = restart[..restart.find("[task.peft]").unwrap()].to_string();
    let file2 = dir.join("restart.toml");
    std::fs::write(&file2, restart).unwrap();
    let (code, out, err) = fedveil(&["run", file2.to_str().unwrap(), "--json", "--quiet"]);
    assert_eq!(code, 0, "{err}");
    let again: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON summary");
    let (ended, started) = (
        summary["loss"].as_f64().unwrap(),
        again["initial_loss"].as_f64().unwrap(),
    );
    assert!(
        (ended - started).abs() <= 1e-6 * ended,
        "ended at {ended}, restarted at {started}"
    );
}

#[test]
fn bad_language_model_configs_are_refused_with_the_key() {
    let dir = scratch("bad");
    let model = tiny_model(&dir);
    write_records(&dir.join("data.jsonl"), &records(12, 0));
    std::fs::write(
        dir.join("broken.jsonl"),
        "{\"instruction\":\"a\",\"output\":\"b\"}\n{\"instruction\":\"a\"}\n",
    )
    .unwrap();
    let base = format!(
        "[run]\nclients = 3\n[federation]\nrounds = 1\n[task]\nkind = \"llm\"\nmodel = \"{}\"\n\
         data = \"data.jsonl\"\ntemplate = \"plain\"\nmax_len = 32\n",
        model.display()
    );
    let cases: &[(&str, &[&str], &str)] = &[
        ("", &["--set", "task.data=\"nope.jsonl\""], "nope.jsonl"),
        (
            "",
            &["--set", "task.data=\"broken.jsonl\""],
            "broken.jsonl:2: field 'output' is missing",
        ),
        ("", &["--set", "task.max_len=1"], "task.max_len"),
        ("", &["--set", "task.colour=1"], "colour"),
        (
            "",
            &[
                "--set",
                "task.pass_at_k={problems = 2, samples = 1, k = [2]}",
            ],
            "every k must be in 1..=1",
        ),
        (
            "",
            &["--set", "task.pass_at_k={problems = 2}"],
            "no held-out record has tests",
        ),
        (
            "",
            &["--set", "task.data=3"],
            "a dataset name or file, or a list",
        ),
        (
            "[offsite]\nenabled = true\ntuning = \"lora\"\n[task.peft]\nmethod = \"prompt\"\n",
            &[],
            "task.peft",
        ),
        (
            "[offsite]\nenabled = true\nadapter_bottom = 4\nadapter_top = 4\n",
            &[],
            "leave none of the model's 8 layers",
        ),
        (
            "[offsite]\nenabled = true\ndrop_ratio = 1.5\n",
            &[],
            "drop_ratio",
        ),
        ("[offsite]\nenabled = true\nwhatever = 1\n", &[], "whatever"),
        (
            "[offsite]\nenabled = true\n[offsite.distill]\nsteps = 3\n",
            &[],
            "offsite.distill.data",
        ),
    ];
    for (i, (extra, args, needle)) in cases.iter().enumerate() {
        // [task.peft] must come after [task]'s keys, [offsite] anywhere.
        let file = dir.join(format!("bad-{i}.toml"));
        std::fs::write(&file, format!("{base}{extra}")).unwrap();
        let mut argv = vec!["run", "--quiet", file.to_str().unwrap()];
        argv.extend_from_slice(args);
        let (code, _, err) = fedveil(&argv);
        assert_eq!(code, 2, "{extra} {args:?}: {err}");
        assert!(
            err.contains(needle),
            "{extra} {args:?}: expected '{needle}' in: {err}"
        );
    }
    // Offsite-tuning splits a language model only.
    let synthetic = dir.join("synthetic.toml");
    std::fs::write(
        &synthetic,
        "[run]\nclients = 3\n[federation]\nrounds = 1\n[task]\nkind = \"synthetic\"\ndim = 4\n\
         samples_per_client = 8\n[offsite]\nenabled = true\n",
    )
    .unwrap();
    let (code, _, err) = fedveil(&["run", "--quiet", synthetic.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("offsite.enabled"), "{err}");
}

/// Code records: a function header for a prompt, the body for an answer
/// and an assertion for a test, every function returning the same number
/// so that a tiny model can learn to write it.
fn code_records(n: usize, offset: usize) -> Vec<Record> {
    (offset..offset + n)
        .map(|i| Record {
            instruction: format!("def f{i}():\n"),
            input: String::new(),
            output: "    return 7\n".into(),
            category: "code".into(),
            test: format!("assert f{i}() == 7"),
            ..Default::default()
        })
        .collect()
}

// pass@k end to end: generated code runs against its tests in the sandbox
// (python3, time and memory limits, no network), on the model the run
// starts from and the one it ends with; data from two sources, held out
// from each.
#[test]
fn pass_at_k_judges_generated_code_from_two_sources_in_the_sandbox() {
    let dir = scratch("passk");
    let model = tiny_model(&dir);
    write_records(&dir.join("code.jsonl"), &code_records(48, 0));
    write_records(&dir.join("colours.jsonl"), &records(48, 0));
    let config = format!(
        r#"
[run]
clients = 3

[federation]
rounds = 12
cohort_size = 3

[training]
local_steps = 8
batch_size = 8
learning_rate = 0.01

[optimizer]
kind = "fedavg"
server_lr = 1.0

[secagg]
threshold = 2
clamp = 1.0

[task]
kind = "llm"
model = "{model}"
data = ["code.jsonl", "colours.jsonl"]
eval_fraction = 0.125
template = "plain"
max_len = 48
split = {{ kind = "meta" }}
max_new_tokens = 16

[task.pass_at_k]
problems = 4
samples = 2
k = [1, 2]
timeout_s = 5
temperature = 0.1

[task.peft]
method = "lora"
r = 8
alpha = 16
target_modules = ["all-linear"]
"#,
        model = model.display()
    );
    let file = dir.join("run.toml");
    std::fs::write(&file, config).unwrap();
    let (code, out, err) = fedveil(&["run", file.to_str().unwrap(), "--json", "--quiet"]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON summary");
    let (before, after) = (&summary["initial_eval"], &summary["eval"]);
    for eval in [before, after] {
        for k in ["pass@1", "pass@2"] {
            let p = eval[k].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&p), "{k}: {summary}");
        }
        assert!(eval["pass@2"].as_f64() >= eval["pass@1"].as_f64());
    }
    // A random model writes no working function; the trained one learnt
    // the answer that every test accepts.
    assert_eq!(before["pass@1"].as_f64(), Some(0.0), "{summary}");
    assert!(after["pass@1"].as_f64().unwrap() > 0.0, "{summary}");
}

// offsite-tuning.md §3: each client process receives, over QUIC, the
// emulator and the adapter layers; the content hash of every tensor it
// received (its cached bundle, exactly the bytes it verified) is compared
// with every tensor of the full model: none belongs to a dropped layer.
#[test]
fn offsite_clients_over_quic_never_receive_a_dropped_layer() {
    let dir = scratch("offsite");
    let model = tiny_model(&dir);
    let keys = dir.join("keys");
    keygen(&keys, 3);
    write_records(&dir.join("eval.jsonl"), &records(12, 1000));
    write_records(&dir.join("owner.jsonl"), &records(24, 2000));
    let port = free_udp_port();
    let metrics = dir.join("metrics.jsonl");
    let server_toml = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
certificate = "keys/server/cert.pem"
key = "keys/server/key.pem"
allow_list = "keys/allow.txt"

[federation]
rounds = 2
cohort_size = 3
wait_s = 120
metrics = "metrics.jsonl"

[training]
local_steps = 3
batch_size = 4
learning_rate = 0.001

[secagg]
threshold = 2

[dp]
placement = "distributed"
clip = 1.0
noise_multiplier = 0.5
min_survivors = 3
epsilon_budget = 1000.0

[task]
kind = "llm"
model = "{model}"
eval_data = "eval.jsonl"
template = "plain"
max_len = 48

[offsite]
enabled = true
adapter_bottom = 1
adapter_top = 1
drop_ratio = 0.5

[offsite.distill]
steps = 4
batch_size = 4
data = "owner.jsonl"
"#,
        model = model.display()
    );
    std::fs::write(dir.join("server.toml"), server_toml).unwrap();
    let server_cache = dir.join("server-cache");
    let mut server = spawn(
        &[
            "server".into(),
            "--quiet".into(),
            "--config".into(),
            dir.join("server.toml").display().to_string(),
        ],
        &dir.join("server.log"),
        &[("FEDVEIL_CACHE", &server_cache)],
    );
    let mut clients = Vec::new();
    for i in 0..3 {
        write_records(
            &dir.join(format!("client-{i}.jsonl")),
            &records(10, 100 * i),
        );
        let toml = format!(
            r#"
[client]
server = "127.0.0.1:{port}"
server_name = "localhost"
fingerprint_file = "keys/server/fingerprint.txt"
identity = "keys/client-{i}.key"
reconnect = 0.2
max_reconnect = 1
give_up_after = 120
bundle_cache = "client-{i}/bundles"

[task]
kind = "llm"
data = "client-{i}.jsonl"
template = "plain"
max_len = 48
"#
        );
        let path = dir.join(format!("client-{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        clients.push(spawn(
            &[
                "client".into(),
                "--config".into(),
                path.display().to_string(),
            ],
            &dir.join(format!("client-{i}.log")),
            &[("FEDVEIL_CACHE", &dir.join(format!("client-{i}-cache")))],
        ));
    }
    let status = server.wait_timeout(Duration::from_secs(300));
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    assert!(status.success(), "the server failed: {log}");
    assert!(log.contains("distilled the emulator"), "{log}");
    for (i, c) in clients.iter_mut().enumerate() {
        let status = c.wait_timeout(Duration::from_secs(60));
        let log = std::fs::read_to_string(dir.join(format!("client-{i}.log"))).unwrap();
        assert!(status.success(), "client {i}: {log}");
        assert!(
            log.contains("installed the server's bundle"),
            "client {i}: {log}"
        );
    }

    // Both evaluations, every round, and the privacy spent.
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["survivors"], 3, "{l}");
        for key in ["emulator_loss", "plugin_loss", "emulator_perplexity"] {
            assert!(
                l["eval"][key].as_f64().is_some_and(f64::is_finite),
                "{key}: {l}"
            );
        }
        assert!(l["epsilon"].as_f64().unwrap() > 0.0);
    }

    // What each client received, against the full model.
    let full = fedveil_model::load::load(&model, &Device::Cpu)
        .unwrap()
        .model;
    let layout = Layout::new(
        8,
        &OffsiteConfig {
            adapter_bottom: 1,
            adapter_top: 1,
            drop_ratio: 0.5,
        },
    )
    .unwrap();
    let digests = weight_digests(&full).unwrap();
    let in_layers = |layers: &[usize]| -> Vec<(String, [u8; 32])> {
        digests
            .iter()
            .filter(|(n, _)| {
                layers
                    .iter()
                    .any(|l| n.starts_with(&format!("model.layers.{l}.")))
            })
            .cloned()
            .collect()
    };
    let dropped = in_layers(&layout.dropped());
    let adapter = in_layers(&layout.adapter_layers());
    assert_eq!(dropped.len(), 3 * 9);
    let mut sizes = BTreeSet::new();
    for i in 0..3 {
        let cache = dir.join(format!("client-{i}/bundles"));
        let files: Vec<PathBuf> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "client {i} holds {files:?}");
        let bytes = std::fs::read(&files[0]).unwrap();
        sizes.insert(bytes.len());
        let received: BTreeSet<[u8; 32]> = bundle_digests(&bytes)
            .unwrap()
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        for (name, d) in &dropped {
            assert!(!received.contains(d), "client {i} received {name}");
        }
        for (name, d) in &adapter {
            assert!(
                received.contains(d),
                "client {i} lacks the adapter tensor {name}"
            );
        }
    }
    assert_eq!(sizes.len(), 1, "the clients received different bundles");
}

/// `dir/run.toml`: three clients fine-tuning the tiny model's emulator on
/// `dir/data.jsonl` (40 records, written here), distilled in
/// `distill_steps` steps on `dir/owner.jsonl`; `extra` adds tables.
fn offsite_run(dir: &Path, model: &Path, extra: &str, distill_steps: u32) {
    write_records(&dir.join("data.jsonl"), &records(40, 0));
    write_records(&dir.join("owner.jsonl"), &records(16, 500));
    std::fs::write(
        dir.join("run.toml"),
        format!(
            "[run]\nclients = 3\n{extra}[training]\nlocal_steps = 2\n\
             batch_size = 4\nlearning_rate = 0.001\n[task]\nkind = \"llm\"\nmodel = \"{}\"\n\
             data = \"data.jsonl\"\ntemplate = \"plain\"\nmax_len = 48\n[offsite]\n\
             enabled = true\nadapter_bottom = 1\nadapter_top = 2\ndrop_ratio = 0.6\n\
             [offsite.distill]\nsteps = {distill_steps}\ndata = \"owner.jsonl\"\n",
            model.display()
        ),
    )
    .unwrap();
}

// offsite-tuning.md §2.3: the emulator is distilled once per model,
// layout, settings and data, then read back from the cache; an in-process
// run logs both evaluations every round.
#[test]
fn distillation_runs_once_and_an_in_process_offsite_run_evaluates_both_ways() {
    let dir = scratch("distill");
    let model = tiny_model(&dir);
    let file = dir.join("run.toml");
    offsite_run(&dir, &model, "[federation]\nrounds = 2\n", 3);
    let cache = dir.join("cache");
    let info = PathBuf::from("info");
    let env = [
        ("FEDVEIL_CACHE", cache.as_path()),
        ("FEDVEIL_LOG", info.as_path()),
    ];
    let metrics = dir.join("metrics.jsonl");
    let args = [
        "run",
        "--quiet",
        "--fresh",
        file.to_str().unwrap(),
        "--metrics",
        metrics.to_str().unwrap(),
    ];
    let (code, _, err) = fedveil_env(&args, &env);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("distilling the emulator"), "{err}");
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let plugin = l["eval"]["plugin_loss"].as_f64().unwrap();
        assert_eq!(l["loss"].as_f64().unwrap(), plugin, "{l}");
        assert!(l["eval"]["emulator_loss"].as_f64().is_some(), "{l}");
    }
    std::fs::remove_file(&metrics).unwrap();
    let (code, _, err) = fedveil_env(&args, &env);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("distilling the emulator"), "{err}");
    assert!(err.contains("the distilled emulator from"), "{err}");
    // Other settings distil again.
    let (code, _, err) = fedveil_env(
        &[&args[..], &["--set", "offsite.distill.steps=4"]].concat(),
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("distilling the emulator"), "{err}");
}

// `fedveil sweep`: every grid point runs; the results come as CSV, JSON,
// a Markdown table and an SVG plot, and the ε spent falls as the noise
// grows.
#[test]
fn a_sweep_writes_its_table_and_plot() {
    let dir = scratch("sweep");
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/synthetic.toml");
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        format!(
            "[sweep]\nbase = \"{}\"\nout = \"out\"\nnoise_multiplier = [0.0, 0.5, 2.0]\n\
             clients = [10, 20]\nrounds = [4]\nmetric = \"distance_to_optimum\"\n\
             set = [\"secagg.degree=6\", \"secagg.threshold=4\", \"dp.min_survivors=8\"]\n",
            base.display()
        ),
    )
    .unwrap();
    let (code, out, err) = fedveil(&["sweep", "--quiet", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("| privacy | clients | rounds | ε spent |"),
        "{out}"
    );
    let csv = std::fs::read_to_string(dir.join("out/results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 6, "{csv}");
    let eps = |clients: &str, z: &str| -> f64 {
        let row = rows
            .iter()
            .find(|r| r[3] == clients && r[1] == z)
            .unwrap_or_else(|| panic!("{clients} {z}: {csv}"));
        row[5].parse().unwrap()
    };
    for clients in ["10", "20"] {
        assert!(eps(clients, "0.5") > eps(clients, "2"), "{csv}");
        let none = rows
            .iter()
            .find(|r| r[3] == clients && r[0] == "no DP")
            .unwrap();
        assert!(none[5].is_empty(), "no ε without DP: {csv}");
        assert!(none[9].parse::<f64>().unwrap() >= 0.0);
    }
    // Every point keeps its config, checkpoint and metrics in its own
    // directory of the output.
    for i in 0..6 {
        let run = dir.join(format!("out/run-{i:02}"));
        assert!(run.join("run.toml").exists() && run.join("metrics.jsonl").exists());
    }
    let svg = std::fs::read_to_string(dir.join("out/utility.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("distance_to_optimum"),
        "{svg}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/results.json")).unwrap())
            .unwrap();
    assert_eq!(json["points"].as_array().unwrap().len(), 6);
    // The plot and table are redrawn from results.json without running.
    std::fs::remove_file(dir.join("out/utility.svg")).unwrap();
    let (code, out, err) = fedveil(&["sweep", "--replot", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| z = 2 | 20 | 4 |"), "{out}");
    assert!(dir.join("out/utility.svg").exists());
    // A sweep over noise needs noise to sweep.
    std::fs::write(&file, "[sweep]\nbase = \"x.toml\"\nout = \"o\"\n").unwrap();
    let (code, _, err) = fedveil(&["sweep", file.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("x.toml"), "{err}");
}

// FS-LLM's comparison: at each privacy level and seed the sweep runs the
// federation (Fed), one party with every client's records (Global) and each
// client alone (Local), and reports the mean ± std over the seeds.
#[test]
fn a_sweep_runs_global_fed_and_local_over_seeds_with_mean_and_std() {
    let dir = scratch("sweep-baselines");
    std::fs::write(
        dir.join("record.toml"),
        "[run]\nclients = 4\n[federation]\nrounds = 2\ncohort_size = 4\n\
         [training]\nlocal_steps = 3\nbatch_size = 32\nlearning_rate = 0.1\n\
         [dp]\nunit = \"record\"\nclip = 1.0\nsampling_rate = 0.2\nnoise_multiplier = 1.0\n\
         accountant = \"rdp\"\n[task]\nkind = \"synthetic\"\ndim = 4\nsamples_per_client = 64\n",
    )
    .unwrap();
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        "[sweep]\nbase = \"record.toml\"\nout = \"out\"\nnoise_multiplier = [0.0, 1.0]\n\
         baselines = [\"global\", \"fed\", \"local\"]\nseeds = [1, 2, 3]\n",
    )
    .unwrap();
    let (code, out, err) = fedveil(&["sweep", "--quiet", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // Two privacy levels × three seeds × (Global, Fed, four Locals).
    let csv = std::fs::read_to_string(dir.join("out/results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 3 * 6, "{csv}");
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",baseline,seed,party")
    );
    let summary = std::fs::read_to_string(dir.join("out/summary.csv")).unwrap();
    let header: Vec<&str> = summary.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = summary
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 6, "{summary}");
    let row = |baseline: &str, dp: bool| {
        rows.iter()
            .find(|r| r[0] == baseline && (r[col("noise_multiplier")] == "1") == dp)
            .unwrap_or_else(|| panic!("{baseline} {dp}: {summary}"))
    };
    for r in &rows {
        assert_eq!(r[col("seeds")], "3", "{summary}");
        let std: f64 = r[col("loss_std")].parse().unwrap();
        assert!(std >= 0.0, "{summary}");
    }
    let eps = |b: &str| -> f64 { row(b, true)[col("epsilon")].parse().unwrap() };
    for b in ["global", "fed", "local"] {
        assert_eq!(
            row(b, true)[col("runs")],
            if b == "local" { "12" } else { "3" }
        );
        assert!(row(b, false)[col("epsilon")].is_empty(), "{summary}");
    }
    // A client alone spends what it spends in the federation; one party
    // with every record, sampling each at a quarter of the rate, less.
    assert!((eps("local") - eps("fed")).abs() < 1e-9, "{summary}");
    assert!(eps("global") < 0.8 * eps("fed"), "{summary}");
    // Pooled data and as many steps as the cohort: Global fits the pooled
    // held-out data better than a client alone.
    let loss = |b: &str| -> f64 { row(b, false)[col("loss_mean")].parse().unwrap() };
    assert!(loss("global") < loss("local"), "{summary}");
    // Global trains as much per round as the cohort together: four times a
    // client's steps, at a quarter of its sampling rate.
    let global = std::fs::read_to_string(dir.join("out/run-06/run.toml")).unwrap();
    assert!(global.contains("local_steps = 12"), "{global}");
    assert!(global.contains("sampling_rate = 0.05"), "{global}");
    assert!(out.contains("| Global | record | z = 1 | 4 | 2 |"), "{out}");
    assert!(out.contains("| Local (client 3) | 3 | record |"), "{out}");
    assert!(out.contains(" ± "), "{out}");
    let svg = std::fs::read_to_string(dir.join("out/utility.svg")).unwrap();
    assert!(
        svg.contains("Global: record-level DP, 4 clients, 2 rounds"),
        "{svg}"
    );
    assert!(svg.contains("mean ± std over seeds"), "{svg}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/results.json")).unwrap())
            .unwrap();
    assert_eq!(json["summary"].as_array().unwrap().len(), 6);
    // A sweep cut short resumes: the finished runs are kept, the rest run.
    std::fs::remove_file(dir.join("out/run-07/point.json")).unwrap();
    let (code, _, err) = fedveil(&["sweep", "--quiet", "--resume", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("resuming: 35 of 36 runs finished before"),
        "{err}"
    );
    let again = std::fs::read_to_string(dir.join("out/results.csv")).unwrap();
    let keep = |csv: &str, n: usize| -> String { csv.lines().nth(n).unwrap().to_string() };
    assert_eq!(keep(&again, 1), keep(&csv, 1));
    assert_eq!(again.lines().count(), csv.lines().count());
    // A resumed sweep with another grid keeps no run that is not its own,
    // though a Local run's file is the same as the federation's.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("[\"global\", \"fed\", \"local\"]", "[\"local\"]"),
    )
    .unwrap();
    let (code, _, err) = fedveil(&["sweep", "--quiet", "--resume", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("resuming: 0 of 24 runs finished before"),
        "{err}"
    );
    let refused = |sweep: &str| -> String {
        std::fs::write(&file, format!("[sweep]\nout = \"o\"\n{sweep}")).unwrap();
        let (code, _, err) = fedveil(&["sweep", file.to_str().unwrap()]);
        assert_eq!(code, 2, "{err}");
        err
    };
    // An unknown baseline is named.
    let err =
        refused("base = \"record.toml\"\ntarget_epsilon = [4.0]\nbaselines = [\"central\"]\n");
    assert!(err.contains("\"central\""), "{err}");
    // Client-level DP hides a client among many: one party has none.
    std::fs::write(
        dir.join("client.toml"),
        "[run]\nclients = 4\n[training]\nlocal_steps = 3\n[federation]\nrounds = 2\n\
         [dp]\nplacement = \"distributed\"\nclip = 1.0\nnoise_multiplier = 1.0\n\
         [task]\nkind = \"synthetic\"\ndim = 4\n",
    )
    .unwrap();
    let err = refused(
        "base = \"client.toml\"\nnoise_multiplier = [1.0]\nbaselines = [\"global\", \"fed\"]\n",
    );
    assert!(err.contains("dp.placement"), "{err}");
}

// The Global and Local baselines of a language-model task: one party with
// every client's records, or one client's, the emulator from the
// evaluator's bundle (offsite-tuning), record-level DP accounted by the
// party itself (protocols/federation.md §6.2).
#[test]
fn a_language_model_sweep_runs_global_and_local_without_a_federation() {
    let dir = scratch("sweep-llm-baselines");
    let model = tiny_model(&dir);
    offsite_run(
        &dir,
        &model,
        "[federation]\nrounds = 1\n[dp]\nunit = \"record\"\nclip = 1.0\nsampling_rate = 0.25\n\
         noise_multiplier = 1.0\naccountant = \"rdp\"\n",
        2,
    );
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        "[sweep]\nbase = \"run.toml\"\nout = \"out\"\nnoise_multiplier = [1.0]\n\
         baselines = [\"global\", \"local\"]\n",
    )
    .unwrap();
    let cache = dir.join("cache");
    let info = PathBuf::from("info");
    let env = [
        ("FEDVEIL_CACHE", cache.as_path()),
        ("FEDVEIL_LOG", info.as_path()),
    ];
    let (code, _, err) = fedveil_env(&["sweep", "--quiet", file.to_str().unwrap()], &env);
    assert_eq!(code, 0, "{err}");
    // Global holds every client's records; each Local run one client's.
    let held: Vec<(usize, usize)> = err
        .lines()
        .filter_map(|l| {
            let rest = l.split("one party holding ").nth(1)?;
            let mut words = rest.split(' ');
            let n = words.next()?.parse().ok()?;
            let all = words.nth(2)?.parse().ok()?;
            Some((n, all))
        })
        .collect();
    assert_eq!(held.len(), 4, "{err}");
    let all = held[0].1;
    assert_eq!(held[0].0, all, "{err}");
    assert_eq!(held[1..].iter().map(|h| h.0).sum::<usize>(), all, "{err}");
    assert!(held[1..].iter().all(|h| h.0 > 0 && h.0 < all), "{err}");
    let csv = std::fs::read_to_string(dir.join("out/results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    for l in csv.lines().skip(1) {
        let eps: f64 = l.split(',').nth(5).unwrap().parse().unwrap();
        assert!(eps > 0.0 && eps.is_finite(), "{csv}");
    }
    // The federation's metrics lines, with a cohort of one, both offsite
    // evaluations and the ε spent.
    let lines = metrics_lines(&dir.join("out/run-00/metrics.jsonl"));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["cohort"], 1, "{}", lines[0]);
    assert!(
        lines[0]["eval"]["emulator_loss"].as_f64().is_some(),
        "{}",
        lines[0]
    );
    assert!(lines[0]["epsilon"].as_f64().unwrap() > 0.0, "{}", lines[0]);
}

// A sweep whose base file has record-level DP sweeps each client's DP-SGD
// noise (protocols/dp.md §8): more noise spends less ε per record.
#[test]
fn a_sweep_over_record_level_noise_spends_less_with_more_noise() {
    let dir = scratch("sweep-record");
    let base = dir.join("record.toml");
    std::fs::write(
        &base,
        "[run]\nclients = 4\n[federation]\nrounds = 2\ncohort_size = 4\n\
         [training]\nlocal_steps = 3\nbatch_size = 32\nlearning_rate = 0.1\n\
         [dp]\nunit = \"record\"\nclip = 1.0\nsampling_rate = 0.2\nnoise_multiplier = 1.0\n\
         [task]\nkind = \"synthetic\"\ndim = 4\nsamples_per_client = 64\n",
    )
    .unwrap();
    let file = dir.join("sweep.toml");
    std::fs::write(
        &file,
        "[sweep]\nbase = \"record.toml\"\nout = \"out\"\nnoise_multiplier = [0.0, 0.8, 3.0]\n",
    )
    .unwrap();
    let (code, out, err) = fedveil(&["sweep", "--quiet", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let csv = std::fs::read_to_string(dir.join("out/results.csv")).unwrap();
    let eps = |z: &str| -> Option<f64> {
        let row = csv
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|r| r[1] == z || (z.is_empty() && r[0] == "no DP"))
            .unwrap_or_else(|| panic!("{z}: {csv}"));
        row[5].parse().ok()
    };
    let (low, high) = (eps("0.8").unwrap(), eps("3").unwrap());
    assert!(low > high && high > 0.0, "{out}\n{csv}");
    assert_eq!(eps(""), None, "no ε without DP: {csv}");
    // The last column names the unit: record-level for the noised points.
    let unit = csv
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|c| c == "unit")
        .unwrap();
    let units: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(unit).unwrap())
        .collect();
    assert_eq!(units, ["none", "record", "record"], "{csv}");
    // Target ε values, `inf` for a run without DP, and the first sweep's
    // points beside this one's in the table and the plot (not in its CSV).
    std::fs::write(
        &file,
        "[sweep]\nbase = \"record.toml\"\nout = \"second\"\ntarget_epsilon = [inf, 4.0]\n\
         beside = [\"out/results.json\"]\n",
    )
    .unwrap();
    let (code, out, err) = fedveil(&["sweep", "--quiet", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let csv = std::fs::read_to_string(dir.join("second/results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 2, "{csv}");
    assert_eq!((rows[0][0], rows[0][5]), ("no DP", ""), "{csv}");
    let spent: f64 = rows[1][5].parse().unwrap();
    assert!(
        spent > 3.5 && spent <= 4.0,
        "target ε = 4 spent {spent}: {csv}"
    );
    assert_eq!(out.matches("(beside)").count(), 3, "{out}");
    let svg = std::fs::read_to_string(dir.join("second/utility.svg")).unwrap();
    assert!(svg.contains("record-level DP"), "{svg}");
    // A beside file that is not there is named.
    std::fs::write(
        &file,
        "[sweep]\nbase = \"record.toml\"\nout = \"third\"\ntarget_epsilon = [4.0]\n\
         beside = [\"nowhere.json\"]\n",
    )
    .unwrap();
    let (code, _, err) = fedveil(&["sweep", "--quiet", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nowhere.json"), "{err}");
}
