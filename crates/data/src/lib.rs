//! fedveil's data: instruction-tuning records in FederatedScope-LLM's format
//! (`instruction`, `input`, `output`, `category`), read from JSON or JSONL
//! files with errors that name the line and the field ([`records`]); the
//! Alpaca prompt template ([`template`]); and the splitters that deal a
//! dataset out to a federation's clients, `iid`, `dirichlet` and `meta`
//! ([`split`]), seeded and reproducible.

#![forbid(unsafe_code)]
#![deny(missing_debug_implementations)]

pub mod records;
pub mod sources;
pub mod split;
pub mod template;

use thiserror::Error;

pub use records::{Record, load};
pub use split::{Split, Splitter};
pub use template::Template;

/// Everything that can go wrong with data.
#[derive(Debug, Error)]
pub enum DataError {
    /// A file that cannot be read, or is not JSON / JSONL at all.
    #[error("{path}: {why}")]
    File { path: String, why: String },
    /// One record that does not have the format's fields.
    #[error("{path}:{line}: {why}")]
    Record {
        path: String,
        /// 1-based line of the record's start.
        line: usize,
        why: String,
    },
    /// A splitter or template setting that cannot work.
    #[error("{0}")]
    Config(String),
}

impl DataError {
    pub(crate) fn file(path: &std::path::Path, why: impl std::fmt::Display) -> DataError {
        DataError::File {
            path: path.display().to_string(),
            why: why.to_string(),
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
