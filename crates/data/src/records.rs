//! Records in FederatedScope-LLM's format and the files that hold them.
//!
//! A record is a JSON object with a string `instruction` and `output`, an
//! optional string `input` (context for the instruction) and an optional
//! `category` (a string, or an integer taken as its decimal text). A
//! multiple-choice record adds `choices` (the continuations scored after
//! the prompt, each with the text that joins it, usually a leading space)
//! and `gold` (the index of the right one); its `output` may be left out,
//! and is then the gold choice. Other keys are ignored. A file holds either one JSON array of records (FS-LLM's
//! `.json` files) or one record per line (JSONL; blank lines are skipped):
//! the first character that is not white space decides. An error names the
//! file, the line where the offending record starts, and the field.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::{DataError, Result};

/// The largest file read (records are held in memory).
pub const MAX_FILE_BYTES: u64 = 4 << 30;

/// One instruction-tuning example.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub instruction: String,
    /// Context for the instruction; empty when there is none.
    #[serde(default)]
    pub input: String,
    pub output: String,
    /// What the record is about (the `dirichlet` and `meta` splitters group
    /// by it); empty when the file gives none.
    #[serde(default)]
    pub category: String,
    /// For code: Python that checks a solution (run after the prompt and
    /// the generated completion; see `fedveil_model::eval`). Not part of
    /// FS-LLM's format: an extra key its loaders ignore.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub test: String,
    /// For multiple choice: every continuation of the prompt that is
    /// scored, verbatim (with the space that joins it to the prompt);
    /// empty otherwise. Not part of FS-LLM's format.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// For multiple choice: the index in `choices` of the right answer
    /// (which is then also `output`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold: Option<usize>,
}

impl Record {
    /// Whether the record is a multiple-choice question.
    pub fn is_multiple_choice(&self) -> bool {
        !self.choices.is_empty()
    }
}

/// Reads every record of a JSON or JSONL file.
pub fn load(path: &Path) -> Result<Vec<Record>> {
    let meta = std::fs::metadata(path).map_err(|e| DataError::file(path, e))?;
    if meta.is_dir() {
        return Err(DataError::file(
            path,
            "is a directory, not a JSON or JSONL file",
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(DataError::file(
            path,
            format!(
                "{} bytes is more than the {MAX_FILE_BYTES} this reader takes",
                meta.len()
            ),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::file(path, e))?;
    parse(&path.display().to_string(), &text)
}

/// Parses the text of a JSON or JSONL file; `name` is used in errors.
pub fn parse(name: &str, text: &str) -> Result<Vec<Record>> {
    let body = text.trim_start_matches('\u{feff}');
    if body.trim_start().starts_with('[') {
        parse_array(name, text)
    } else {
        parse_lines(name, body)
    }
}

fn parse_lines(name: &str, text: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| DataError::Record {
            path: name.into(),
            line: line_no,
            why: format!("not a JSON value: {e}"),
        })?;
        out.push(record(&value).map_err(|why| DataError::Record {
            path: name.into(),
            line: line_no,
            why,
        })?);
    }
    Ok(out)
}

fn parse_array(name: &str, text: &str) -> Result<Vec<Record>> {
    let raws: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| DataError::Record {
        path: name.into(),
        line: e.line().max(1),
        why: format!("not a JSON array of records: {e}"),
    })?;
    let base = text.as_ptr() as usize;
    let (mut line, mut scanned) = (1usize, 0usize);
    let mut out = Vec::with_capacity(raws.len());
    for (i, raw) in raws.iter().enumerate() {
        // Each raw value borrows from `text`: its offset gives its line.
        let at = (raw.get().as_ptr() as usize)
            .saturating_sub(base)
            .min(text.len());
        line += text.as_bytes()[scanned..at]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        scanned = at;
        let value: Value = serde_json::from_str(raw.get()).map_err(|e| DataError::Record {
            path: name.into(),
            line,
            why: format!("record {}: {e}", i + 1),
        })?;
        out.push(record(&value).map_err(|why| DataError::Record {
            path: name.into(),
            line,
            why: format!("record {}: {why}", i + 1),
        })?);
    }
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string(obj: &Map<String, Value>, field: &str, required: bool) -> Result<String, String> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) if !required => Ok(String::new()),
        None => Err(format!("field '{field}' is missing")),
        Some(other) => Err(format!(
            "field '{field}' must be a string, got {}",
            kind(other)
        )),
    }
}

fn record(value: &Value) -> Result<Record, String> {
    let Value::Object(obj) = value else {
        return Err(format!(
            "a record must be a JSON object with 'instruction' and 'output', got {}",
            kind(value)
        ));
    };
    let category = match obj.get("category") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(other) => {
            return Err(format!(
                "field 'category' must be a string or an integer, got {}",
                kind(other)
            ));
        }
    };
    let (choices, gold) = choices(obj)?;
    let output = match gold {
        None => string(obj, "output", true)?,
        Some(g) => {
            let output = string(obj, "output", false)?;
            if obj.contains_key("output") && output != choices[g] {
                return Err(format!(
                    "field 'output' is {output:?}, but the gold choice ({g}) is {:?}",
                    choices[g]
                ));
            }
            choices[g].clone()
        }
    };
    Ok(Record {
        instruction: string(obj, "instruction", true)?,
        input: string(obj, "input", false)?,
        output,
        category,
        test: string(obj, "test", false)?,
        choices,
        gold,
    })
}

/// A multiple-choice record's `choices` (two or more strings) and `gold`
/// (an index into them), both or neither.
fn choices(obj: &Map<String, Value>) -> Result<(Vec<String>, Option<usize>), String> {
    let list = match obj.get("choices") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|c| match c {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "field 'choices' must hold strings, got {}",
                    kind(other)
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(format!(
                "field 'choices' must be an array of strings, got {}",
                kind(other)
            ));
        }
    };
    let gold = match obj.get("gold") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_u64()
                .and_then(|g| usize::try_from(g).ok())
                .ok_or_else(|| format!("field 'gold' must be an index, got {n}"))?,
        ),
        Some(other) => {
            return Err(format!(
                "field 'gold' must be an integer, got {}",
                kind(other)
            ));
        }
    };
    match (list.len(), gold) {
        (0, None) => Ok((list, None)),
        (0, Some(_)) => Err("field 'gold' without 'choices'".into()),
        (_, None) => Err("field 'choices' without 'gold' (the right choice's index)".into()),
        (1, _) => Err("field 'choices' must hold two or more choices".into()),
        (n, Some(g)) if g >= n => Err(format!(
            "field 'gold' is {g}, but there are only {n} choices"
        )),
        (_, Some(g)) => Ok((list, Some(g))),
    }
}

/// Writes records as JSONL (one object per line), the format `load` reads.
pub fn to_jsonl(records: &[Record]) -> String {
    let mut out = String::new();
    for r in records {
        // A struct of strings always serialises.
        if let Ok(line) = serde_json::to_string(r) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_and_arrays_read_the_same_records() {
        let lines = "{\"instruction\":\"a\",\"output\":\"b\",\"category\":\"x\"}\n\n\
                     {\"instruction\":\"c\",\"input\":\"ctx\",\"output\":\"d\",\"extra\":1}\n";
        let array = "[\n {\"instruction\":\"a\",\"output\":\"b\",\"category\":\"x\"},\n \
                     {\"instruction\":\"c\",\"input\":\"ctx\",\"output\":\"d\",\"extra\":1}\n]";
        let a = parse("l", lines).unwrap();
        let b = parse("a", array).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[1].input, "ctx");
        assert_eq!(a[1].category, "");
        assert_eq!(parse("r", &to_jsonl(&a)).unwrap(), a);
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let text =
            "{\"instruction\":\"a\",\"output\":\"b\"}\n\n{\"instruction\":\"a\",\"output\":3}\n";
        let e = parse("f.jsonl", text).unwrap_err().to_string();
        assert_eq!(
            e,
            "f.jsonl:3: field 'output' must be a string, got a number"
        );

        let e = parse("f.jsonl", "{\"output\":\"b\"}")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "f.jsonl:1: field 'instruction' is missing");

        let e = parse("f.jsonl", "{\"instruction\":\"a\",\"output\":\"b\"}\n{oops")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.jsonl:2: not a JSON value"), "{e}");

        let array = "[\n{\"instruction\":\"a\",\"output\":\"b\"},\n\n{\"instruction\":[],\"output\":\"b\"}]";
        let e = parse("f.json", array).unwrap_err().to_string();
        assert_eq!(
            e,
            "f.json:4: record 2: field 'instruction' must be a string, got an array"
        );

        let e = parse("f.json", "[1]").unwrap_err().to_string();
        assert!(e.contains("must be a JSON object"), "{e}");
        let e = parse("f.json", "[{\"instruction\":\"a\",\"output\":\"b\"},")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("f.json:1: not a JSON array of records"),
            "{e}"
        );
    }

    #[test]
    fn integer_categories_are_text() {
        let r = parse(
            "f",
            "{\"instruction\":\"a\",\"output\":\"b\",\"category\":7}",
        )
        .unwrap();
        assert_eq!(r[0].category, "7");
        assert!(
            parse(
                "f",
                "{\"instruction\":\"a\",\"output\":\"b\",\"category\":0.5}"
            )
            .is_err()
        );
    }

    #[test]
    fn missing_files_say_so() {
        let e = load(Path::new("/nonexistent/data.jsonl")).unwrap_err();
        assert!(
            e.to_string().starts_with("/nonexistent/data.jsonl: "),
            "{e}"
        );
    }

    #[test]
    fn multiple_choice_records_carry_their_choices() {
        let text = concat!(
            "{\"instruction\":\"Q: 2+2?\\nA:\",\"choices\":[\" 3\",\" 4\"],\"gold\":1}\n",
            "{\"instruction\":\"Q\",\"output\":\" b\",\"choices\":[\" a\",\" b\"],\"gold\":1}\n",
        );
        let r = parse("mc", text).unwrap();
        assert_eq!(r[0].choices, [" 3", " 4"]);
        assert_eq!((r[0].gold, r[0].output.as_str()), (Some(1), " 4"));
        assert!(r[0].is_multiple_choice());
        // Written and read back unchanged; a plain record gains no keys.
        assert_eq!(parse("again", &to_jsonl(&r)).unwrap(), r);
        let plain = parse("p", "{\"instruction\":\"a\",\"output\":\"b\"}").unwrap();
        assert!(!plain[0].is_multiple_choice());
        assert_eq!(
            to_jsonl(&plain),
            "{\"instruction\":\"a\",\"input\":\"\",\"output\":\"b\",\"category\":\"\"}\n"
        );
        for (bad, why) in [
            (
                r#"{"instruction":"q","choices":[" a"," b"]}"#,
                "without 'gold'",
            ),
            (
                r#"{"instruction":"q","output":"x","gold":0}"#,
                "'gold' without 'choices'",
            ),
            (
                r#"{"instruction":"q","choices":[" a"],"gold":0}"#,
                "two or more",
            ),
            (
                r#"{"instruction":"q","choices":[" a"," b"],"gold":2}"#,
                "only 2 choices",
            ),
            (
                r#"{"instruction":"q","choices":[" a"," b"],"gold":-1}"#,
                "an index",
            ),
            (
                r#"{"instruction":"q","choices":[" a",3],"gold":0}"#,
                "must hold strings",
            ),
            (
                r#"{"instruction":"q","output":" b","choices":[" a"," b"],"gold":0}"#,
                "gold choice (0)",
            ),
            (r#"{"instruction":"q","output":"x"}"#, ""),
        ] {
            match parse("bad", bad) {
                Ok(_) => assert!(why.is_empty(), "{bad} was accepted"),
                Err(e) => assert!(!why.is_empty() && e.to_string().contains(why), "{bad}: {e}"),
            }
        }
    }
}
