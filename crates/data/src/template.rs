//! Prompt templates: how a record becomes the text a model conditions on
//! (the prompt, excluded from the loss) and the text it learns to produce
//! (the completion).

use serde::{Deserialize, Serialize};

use crate::Record;

/// A prompt template.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    /// Stanford Alpaca's, as FederatedScope-LLM uses it: a preamble, then
    /// `### Instruction:`, `### Input:` (when the record has one) and
    /// `### Response:`. The completion is the output.
    #[default]
    Alpaca,
    /// No template: the prompt is the instruction (and the input on the
    /// next line), the completion the output. For raw text and language
    /// modelling data.
    Plain,
}

const ALPACA_INPUT: &str = "Below is an instruction that describes a task, paired with an input \
                            that provides further context. Write a response that appropriately \
                            completes the request.\n\n";
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response \
                               that appropriately completes the request.\n\n";

impl Template {
    /// `alpaca` or `plain`.
    pub fn from_name(name: &str) -> Option<Template> {
        match name {
            "alpaca" => Some(Template::Alpaca),
            "plain" => Some(Template::Plain),
            _ => None,
        }
    }

    /// The prompt for `record`.
    pub fn prompt(self, record: &Record) -> String {
        match self {
            Template::Alpaca if record.input.is_empty() => format!(
                "{ALPACA_NO_INPUT}### Instruction:\n{}\n\n### Response:",
                record.instruction
            ),
            Template::Alpaca => format!(
                "{ALPACA_INPUT}### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:",
                record.instruction, record.input
            ),
            Template::Plain if record.input.is_empty() => record.instruction.clone(),
            Template::Plain => format!("{}\n{}", record.instruction, record.input),
        }
    }

    /// The completion the model learns for `record` (the tokenizer's end
    /// of sequence token follows it).
    pub fn completion(self, record: &Record) -> String {
        // FS-LLM's target is the output itself, right after "### Response:".
        match self {
            Template::Alpaca | Template::Plain => record.output.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpaca_with_and_without_input() {
        let mut r = Record {
            instruction: "Add the numbers.".into(),
            input: String::new(),
            output: "5".into(),
            category: String::new(),
            test: String::new(),
            ..Default::default()
        };
        let p = Template::Alpaca.prompt(&r);
        assert!(p.starts_with("Below is an instruction that describes a task. Write"));
        assert!(p.ends_with("### Instruction:\nAdd the numbers.\n\n### Response:"));
        assert!(!p.contains("### Input:"));
        r.input = "2 and 3".into();
        let p = Template::Alpaca.prompt(&r);
        assert!(p.contains("paired with an input"));
        assert!(p.ends_with("### Input:\n2 and 3\n\n### Response:"));
        assert_eq!(Template::Alpaca.completion(&r), "5");
        assert_eq!(Template::Plain.prompt(&r), "Add the numbers.\n2 and 3");
        assert_eq!(Template::from_name("alpaca"), Some(Template::Alpaca));
        assert_eq!(Template::from_name("dolly"), None);
    }
}
