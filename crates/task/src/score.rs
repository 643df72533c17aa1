//! Scoring a model (with an adapter or without) on a set of records, as
//! `fedveil model eval` and the server's evaluator do: multiple-choice
//! records by accuracy ([`fedveil_model::choice`]), every other record by
//! the loss and perplexity of its completion.

use fedveil_data::{Record, Template};
use fedveil_model::choice::{Accuracy, Question, accuracy};
use fedveil_model::train::evaluate;
use fedveil_model::{Adapter, EvalResult, Llama, ModelError};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::llm::{encode, eos_of};

/// What a set of records scored.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Score {
    /// Multiple-choice records: accuracy by log-likelihood.
    MultipleChoice(Accuracy),
    /// Other records: the completions' loss and perplexity.
    Completion(EvalResult),
}

/// The multiple-choice questions of `records` with `template`'s prompts as
/// their contexts; `None` when no record is one, an error when only some
/// are.
pub fn questions(records: &[Record], template: Template) -> Result<Option<Vec<Question>>, String> {
    let choice = records.iter().filter(|r| r.is_multiple_choice()).count();
    if choice == 0 {
        return Ok(None);
    }
    if choice != records.len() {
        return Err(format!(
            "{choice} of {} records are multiple-choice questions: score either kind, not both at once",
            records.len()
        ));
    }
    Ok(Some(
        records
            .iter()
            .map(|r| Question {
                context: template.prompt(r),
                choices: r.choices.clone(),
                gold: r.gold.unwrap_or_default(),
            })
            .collect(),
    ))
}

/// Scores `records` with `model` and `adapter`: the choices' log-likelihoods
/// after `template`'s prompt, or the completions' loss.
pub fn score(
    model: &Llama,
    adapter: Option<&Adapter>,
    tokenizer: &Tokenizer,
    records: &[Record],
    template: Template,
    batch_size: usize,
    max_len: usize,
) -> Result<Score, ModelError> {
    if let Some(questions) = questions(records, template).map_err(ModelError::Input)? {
        return Ok(Score::MultipleChoice(accuracy(
            model, adapter, tokenizer, &questions, batch_size, max_len,
        )?));
    }
    let examples = encode(
        tokenizer,
        template,
        records,
        eos_of(model, tokenizer),
        max_len,
    )
    .map_err(|e| ModelError::Input(e.to_string()))?;
    Ok(Score::Completion(evaluate(
        model, adapter, &examples, batch_size, max_len,
    )?))
}
