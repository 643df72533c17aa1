//! Small file helpers shared by the loaders and writers: bounded JSON
//! reads and atomic writes.

use std::path::Path;

use crate::{ModelError, Result};

/// The largest `config.json` or index read (weights are not bounded here:
/// their sizes come from the config, checked shape by shape).
const MAX_JSON_BYTES: u64 = 16 << 20;

/// A JSON file of at most `MAX_JSON_BYTES`, size checked before reading.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::file(path, e))?;
    if meta.len() > MAX_JSON_BYTES {
        return Err(ModelError::file(
            path,
            format!("{} bytes is too large", meta.len()),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::file(path, format!("not valid JSON: {e}")))
}

/// Writes through [`fedveil_files::write_atomically`]: a reader never sees
/// a half-written file, and a crash leaves none in its place.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    fedveil_files::write_atomically(path, bytes, fedveil_files::Access::Default)
        .map_err(|e| ModelError::file(path, e))
}
