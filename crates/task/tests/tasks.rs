//! The tasks called directly, as the binary calls them but without it:
//! configs are parsed once into a `TaskConfig`, which builds the server's
//! evaluator and the clients' trainers; a tiny random llama and data the
//! test writes itself stand in for a real model (no downloads).

use std::path::{Path, PathBuf};

use candle_core::Device;
use fedveil_data::Record;
use fedveil_fed::FedError;
use fedveil_fed::trainer::TrainingConfig;
use fedveil_task::TaskConfig;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-task-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny llama (four layers, byte tokenizer) at `dir/model`.
fn tiny_model(dir: &Path) -> PathBuf {
    let loaded =
        fedveil_model::tiny::tiny_model(4, &Device::Cpu, &mut ChaCha20Rng::from_seed([3; 32]))
            .unwrap();
    let path = dir.join("model");
    fedveil_model::load::save_hf_dir(&loaded, &path).unwrap();
    path
}

/// Question/answer records whose answer is a fixed word per category.
fn records(n: usize) -> Vec<Record> {
    const WORDS: [&str; 4] = ["red", "green", "blue", "amber"];
    (0..n)
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

fn table(text: &str) -> toml::Table {
    text.parse().unwrap()
}

fn parse(task: &str, offsite: Option<&str>, base: &Path) -> Result<TaskConfig, FedError> {
    let offsite = offsite.map(table);
    TaskConfig::parse(&table(task), offsite.as_ref(), &base.join("run.toml"))
}

fn config_path(e: FedError) -> (String, String) {
    match e {
        FedError::Config { path, reason } => (path, reason),
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn the_synthetic_tasks_trainer_moves_the_evaluators_loss_down() {
    let dir = scratch("synthetic");
    let task = parse("kind = \"synthetic\"\ndim = 6\nseed = 2", None, &dir).unwrap();
    assert_eq!(task.kind(), "synthetic");
    let (mut evaluator, trainers) = task.in_process(3, &mut |_| {}).unwrap();
    let global = evaluator.initial_params().unwrap();
    assert_eq!(global.len(), 6);
    let before = evaluator.evaluate(&global).unwrap().loss;
    let mut trainer = trainers(1).unwrap();
    assert_eq!(trainer.dim(), 6);
    let config = TrainingConfig::default();
    let update = trainer
        .train(&global, &config, &mut ChaCha20Rng::from_seed([1; 32]))
        .unwrap();
    let moved: Vec<f32> = global
        .iter()
        .zip(&update.delta)
        .map(|(g, d)| g + d)
        .collect();
    let after = evaluator.evaluate(&moved).unwrap().loss;
    assert!(after < before, "loss {before} -> {after}");
    // A client needs its shard, a server must not name one.
    let client = parse("kind = \"synthetic\"", None, &dir).unwrap();
    let (path, _) = config_path(client.client_trainer().err().unwrap());
    assert_eq!(path, "task.shard");
    let server = parse("kind = \"synthetic\"\nshard = 1", None, &dir).unwrap();
    let (path, _) = config_path(server.evaluator(3, &mut |_| {}).err().unwrap());
    assert_eq!(path, "task.shard");
    assert!(server.client_trainer().is_ok());
}

#[test]
fn an_llm_task_trains_an_adapter_that_the_servers_evaluator_scores_lower() {
    for quantize in ["none", "q8_0"] {
        llm_task_learns(quantize);
    }
}

/// With the base held as `quantize` says.
fn llm_task_learns(quantize: &str) {
    let dir = scratch(&format!("llm-{quantize}"));
    let model = tiny_model(&dir);
    std::fs::write(
        dir.join("data.jsonl"),
        fedveil_data::records::to_jsonl(&records(48)),
    )
    .unwrap();
    // The held-out records are the training records' questions: an adapter
    // that learnt them scores lower there.
    let task = parse(
        &format!(
            "kind = \"llm\"\nmodel = \"{}\"\ndata = \"data.jsonl\"\neval_data = \"data.jsonl\"\n\
             template = \"plain\"\nmax_len = 32\neval_examples = 16\nquantize = \"{quantize}\"\n\
             [peft]\nmethod = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"all-linear\"]\n",
            model.display()
        ),
        None,
        &dir,
    )
    .unwrap();
    assert_eq!(task.kind(), "llm");
    let mut heard = 0;
    let (mut evaluator, trainers) = task.in_process(2, &mut |_| heard += 1).unwrap();
    assert_eq!(heard, 0, "nothing to distil, nothing to report");
    let global = evaluator.initial_params().unwrap();
    let before = evaluator.evaluate(&global).unwrap();
    assert!(before.loss.is_finite() && before.metrics["perplexity"] > 1.0);
    let mut trainer = trainers(0).unwrap();
    assert_eq!(trainer.dim(), global.len());
    assert!(!trainer.wants_bundle());
    let config = TrainingConfig {
        local_steps: 12,
        batch_size: 8,
        learning_rate: 0.01,
        proximal_mu: 0.0,
        record_dp: None,
    };
    let update = trainer
        .train(&global, &config, &mut ChaCha20Rng::from_seed([2; 32]))
        .unwrap();
    assert_eq!(update.delta.len(), global.len());
    assert!(update.samples > 0 && update.loss.is_finite());
    let moved: Vec<f32> = global
        .iter()
        .zip(&update.delta)
        .map(|(g, d)| g + d)
        .collect();
    let after = evaluator.evaluate(&moved).unwrap();
    assert!(
        after.loss < before.loss,
        "{quantize}: held-out loss {} -> {}",
        before.loss,
        after.loss
    );
    // The factory has one part of the split per client, and no more.
    assert!(trainers(1).is_ok());
    assert!(trainers(2).is_err());
}

/// Multiple-choice records: the colour of an item is a fixed choice per
/// category, among four.
fn choice_records(n: usize) -> Vec<Record> {
    const WORDS: [&str; 4] = [" red", " green", " blue", " amber"];
    (0..n)
        .map(|i| {
            let c = i % WORDS.len();
            Record {
                instruction: format!("Question: colour of item {c}?\nAnswer:"),
                output: WORDS[c].into(),
                category: format!("c{c}"),
                choices: WORDS.iter().map(|w| w.to_string()).collect(),
                gold: Some(c),
                ..Default::default()
            }
        })
        .collect()
}

#[test]
fn a_multiple_choice_task_reports_held_out_accuracy_that_training_raises() {
    let dir = scratch("choice");
    let model = tiny_model(&dir);
    std::fs::write(
        dir.join("mc.jsonl"),
        fedveil_data::records::to_jsonl(&choice_records(48)),
    )
    .unwrap();
    let task = parse(
        &format!(
            "kind = \"llm\"\nmodel = \"{}\"\ndata = \"mc.jsonl\"\neval_data = \"mc.jsonl\"\n\
             template = \"plain\"\nmax_len = 64\neval_examples = 8\n\
             save_adapter = \"saved\"\nsave_every = 2\n\
             [peft]\nmethod = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"all-linear\"]\n",
            model.display()
        ),
        None,
        &dir,
    )
    .unwrap();
    let (mut evaluator, trainers) = task.in_process(2, &mut |_| {}).unwrap();
    let global = evaluator.initial_params().unwrap();
    let before = evaluator.evaluate(&global).unwrap();
    for key in [
        "accuracy",
        "accuracy_stderr",
        "accuracy_norm",
        "accuracy_norm_stderr",
    ] {
        assert!(before.metrics.contains_key(key), "{key} missing");
    }
    let config = TrainingConfig {
        local_steps: 100,
        batch_size: 8,
        learning_rate: 0.01,
        proximal_mu: 0.0,
        record_dp: None,
    };
    let update = trainers(0)
        .unwrap()
        .train(&global, &config, &mut ChaCha20Rng::from_seed([4; 32]))
        .unwrap();
    let moved: Vec<f32> = global
        .iter()
        .zip(&update.delta)
        .map(|(g, d)| g + d)
        .collect();
    let after = evaluator.evaluate(&moved).unwrap();
    assert!(
        after.metrics["accuracy"] == 1.0 && before.metrics["accuracy"] < 1.0,
        "accuracy {} -> {}",
        before.metrics["accuracy"],
        after.metrics["accuracy"]
    );
    assert_eq!(after.metrics["accuracy_stderr"], 0.0);
    // The adapter is written after every second round, and the last round
    // writes both its round-<n>/ and final/: the parameters given.
    let saved = dir.join("saved");
    assert!(saved.is_dir(), "created before the first round");
    assert_eq!(evaluator.save(&moved, 3, false).unwrap(), None);
    assert_eq!(
        evaluator.save(&moved, 2, false).unwrap(),
        Some(saved.join("round-2"))
    );
    assert_eq!(
        evaluator.save(&moved, 4, true).unwrap(),
        Some(saved.join("final"))
    );
    let loaded = fedveil_model::load::load(&model, &Device::Cpu).unwrap();
    for name in ["round-2", "round-4", "final"] {
        let a = fedveil_model::interop::load_adapter(&saved.join(name), &loaded.model).unwrap();
        assert_eq!(a.to_vec().unwrap(), moved, "{name}");
    }
    assert!(!saved.join("round-3").exists());
    // Held-out records that mix multiple choice with other records are
    // refused, by key.
    let mut mixed = choice_records(4);
    mixed.extend(records(4));
    std::fs::write(
        dir.join("mixed.jsonl"),
        fedveil_data::records::to_jsonl(&mixed),
    )
    .unwrap();
    let task = parse(
        &format!(
            "kind = \"llm\"\nmodel = \"{}\"\ndata = \"mc.jsonl\"\neval_data = \"mixed.jsonl\"\n\
             template = \"plain\"\nmax_len = 64\n",
            model.display()
        ),
        None,
        &dir,
    )
    .unwrap();
    let (path, reason) = config_path(task.in_process(2, &mut |_| {}).err().unwrap());
    assert_eq!(path, "task.eval_data");
    assert!(
        reason.contains("4 of 8 records are multiple-choice"),
        "{reason}"
    );
}

#[test]
fn an_offsite_task_hands_clients_the_emulator_and_they_train_on_it() {
    // On an f32 base, and on a Q8_0 one, which runs the clients' path that
    // quantises the f32 emulator on arrival.
    for quantize in ["none", "q8_0"] {
        offsite_clients_train(quantize);
    }
}

fn offsite_clients_train(quantize: &str) {
    let dir = scratch(&format!("offsite-{quantize}"));
    let model = tiny_model(&dir);
    std::fs::write(
        dir.join("data.jsonl"),
        fedveil_data::records::to_jsonl(&records(24)),
    )
    .unwrap();
    let task = parse(
        &format!(
            "kind = \"llm\"\nmodel = \"{}\"\ndata = \"data.jsonl\"\ntemplate = \"plain\"\n\
             max_len = 32\neval_fraction = 0.25\nquantize = \"{quantize}\"\n",
            model.display()
        ),
        Some("enabled = true\nadapter_bottom = 1\nadapter_top = 1\ndrop_ratio = 0.5\n"),
        &dir,
    )
    .unwrap();
    let (mut evaluator, trainers) = task.in_process(2, &mut |_| {}).unwrap();
    let global = evaluator.initial_params().unwrap();
    let first = evaluator.evaluate(&global).unwrap();
    for key in ["plugin_loss", "emulator_loss"] {
        assert!(first.metrics[key].is_finite(), "{key}: {:?}", first.metrics);
    }
    let bundle = evaluator
        .client_bundle()
        .unwrap()
        .expect("an emulator bundle");
    let mut trainer = trainers(0).unwrap();
    assert!(trainer.wants_bundle());
    let config = TrainingConfig {
        local_steps: 2,
        batch_size: 4,
        ..TrainingConfig::default()
    };
    let mut rng = ChaCha20Rng::from_seed([4; 32]);
    assert!(
        trainer.train(&global, &config, &mut rng).is_err(),
        "no model before the bundle"
    );
    trainer.install_bundle(&bundle).unwrap();
    assert_eq!(trainer.dim(), global.len());
    let update = trainer.train(&global, &config, &mut rng).unwrap();
    assert_eq!(update.delta.len(), global.len());
    assert!(update.delta.iter().all(|d| d.is_finite()));
}

#[test]
fn bad_task_configs_are_refused_by_key() {
    let dir = scratch("bad");
    let model = tiny_model(&dir);
    std::fs::write(
        dir.join("data.jsonl"),
        fedveil_data::records::to_jsonl(&records(8)),
    )
    .unwrap();
    let llm = format!(
        "kind = \"llm\"\nmodel = \"{}\"\ndata = \"data.jsonl\"\ntemplate = \"plain\"\nmax_len = 32\n",
        model.display()
    );
    let cases: &[(&str, Option<&str>, &str, &str)] = &[
        (
            "kind = \"vision\"",
            None,
            "task.kind",
            "unknown task \"vision\"",
        ),
        ("dim = 3", None, "task.kind", "is required"),
        ("kind = 3", None, "task.kind", "must be a string"),
        ("kind = \"synthetic\"\ncolour = 1", None, "task", "colour"),
        (
            "kind = \"synthetic\"",
            Some("enabled = true"),
            "offsite.enabled",
            "needs task.kind = \"llm\"",
        ),
        (&format!("{llm}colour = 1"), None, "task", "colour"),
        (
            &format!("{llm}eval_fraction = 1.0"),
            None,
            "task.eval_fraction",
            "[0, 1)",
        ),
        (
            &format!("{llm}quantize = \"nf4\""),
            None,
            "task.quantize",
            "quantize = \"nf4\" is not implemented",
        ),
        (
            &llm,
            Some("enabled = true\nwhatever = 1"),
            "offsite",
            "whatever",
        ),
        (
            &format!("{llm}save_every = 2"),
            None,
            "task.save_every",
            "task.save_adapter, which is not given",
        ),
        (
            &format!("{llm}adapter = \"a\"\n[peft]\nmethod = \"lora\""),
            None,
            "task.peft",
            "brings its own configuration",
        ),
    ];
    for (task, offsite, key, needle) in cases {
        let (path, reason) = config_path(parse(task, *offsite, &dir).err().unwrap());
        assert_eq!(path, *key, "{task} / {offsite:?}: {reason}");
        assert!(
            reason.contains(needle),
            "{task}: expected '{needle}' in: {reason}"
        );
    }
    // Checks that need the data or the model come when the parts are built.
    // An offsite client (no model of its own) cannot keep GGUF blocks.
    let client = "kind = \"llm\"\ndata = \"data.jsonl\"\ntemplate = \"plain\"\nmax_len = 32\n";
    let built: &[(&str, Option<&str>, &str, &str)] = &[
        (
            &format!("{client}quantize = \"gguf\""),
            None,
            "task.quantize",
            "an offsite client has no model file",
        ),
        // The tiny model's 32-wide rows are not whole Q4_K super-blocks.
        (
            &format!("{llm}quantize = \"q4_k\""),
            None,
            "task.model",
            "cannot be quantised to q4_k",
        ),
        (
            &format!("{llm}split = {{ kind = \"iid\" }}\nshard = 2\nshards = 2"),
            None,
            "task.shard",
            "not below",
        ),
        (
            &llm,
            Some("enabled = true\nadapter_bottom = 2\nadapter_top = 2"),
            "offsite",
            "leave none of the model's 4 layers",
        ),
        (
            &llm,
            Some("enabled = true\nadapter_bottom = 1\nadapter_top = 1\n[distill]\nsteps = 3"),
            "offsite.distill.data",
            "is required",
        ),
        (
            &format!(
                "{llm}save_adapter = \"out\"\nsplit = {{ kind = \"iid\" }}\nshard = 0\nshards = 2"
            ),
            None,
            "task.save_adapter",
            "is the server's",
        ),
        (
            &format!("{llm}adapter = \"nowhere\""),
            None,
            "task.adapter",
            "is the server's",
        ),
    ];
    for (task, offsite, key, needle) in built {
        let parsed = parse(task, *offsite, &dir).unwrap();
        let e = match parsed.client_trainer() {
            Err(e) => e,
            Ok(_) => parsed.in_process(2, &mut |_| {}).err().unwrap(),
        };
        let (path, reason) = config_path(e);
        assert_eq!(path, *key, "{task} / {offsite:?}: {reason}");
        assert!(
            reason.contains(needle),
            "{task}: expected '{needle}' in: {reason}"
        );
    }
    // The server's side reads the adapter it starts from.
    std::fs::write(dir.join("a-file"), "").unwrap();
    let parsed = parse(
        &format!("{llm}save_adapter = \"a-file/adapters\""),
        None,
        &dir,
    )
    .unwrap();
    let (path, _) = config_path(parsed.in_process(2, &mut |_| {}).err().unwrap());
    assert_eq!(path, "task.save_adapter");
    let server: &[(Option<&str>, &str)] = &[
        (None, "adapter_config.json"),
        (
            Some("enabled = true\nadapter_bottom = 1\nadapter_top = 1"),
            "not implemented with offsite-tuning",
        ),
    ];
    for (offsite, needle) in server {
        let parsed = parse(&format!("{llm}adapter = \"nowhere\""), *offsite, &dir).unwrap();
        let (path, reason) = config_path(parsed.in_process(2, &mut |_| {}).err().unwrap());
        assert_eq!(path, "task.adapter", "{reason}");
        assert!(reason.contains(needle), "expected '{needle}' in: {reason}");
    }
}
