//! Atomic checkpoints (protocols/federation.md §5.2).
//!
//! One file, `checkpoint.fvck`, in the checkpoint directory:
//!
//! ```text
//! "FVCKPT01" ‖ u64 LE header length ‖ header (JSON)
//!            ‖ parameters ‖ first moments ‖ second moments (f32 LE)
//!            ‖ SHA-256 of everything before it
//! ```
//!
//! It is written to a fresh temporary file beside it, flushed to disk, renamed over the
//! old file and the directory is synced: a crash at any moment leaves either
//! the previous checkpoint or the new one, never a mixture. Loading checks
//! the magic, every length against the file size, and the hash.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::FedError;
use crate::ledger::PrivacyLedger;

const MAGIC: &[u8; 8] = b"FVCKPT01";
const FILE: &str = "checkpoint.fvck";
const MAX_HEADER: u64 = 64 << 20;

/// A round's line in the history kept for the summary table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    pub loss: f64,
    pub epsilon: Option<f64>,
    pub survivors: u32,
    pub cohort: u32,
    pub seconds: f64,
}

/// Everything but the vectors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The federation id, hex.
    pub federation: String,
    /// Rounds completed; the next round has this index.
    pub completed_rounds: u64,
    pub dim: u64,
    /// The optimiser kind, whose moments follow.
    pub optimizer: String,
    /// The `[task]` table the federation was started with, as TOML.
    pub task: String,
    pub ledger: PrivacyLedger,
    pub history: Vec<RoundRecord>,
    pub moments: u64,
}

/// A server's state after a completed round.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub header: Header,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

fn err(path: &Path, reason: impl std::fmt::Display) -> FedError {
    FedError::Checkpoint {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The checkpoint file in `dir`.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

fn push_f32s(out: &mut Vec<u8>, v: &[f32]) {
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

impl Checkpoint {
    /// Serialises the checkpoint.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FedError> {
        let d = self.header.dim as usize;
        let k = self.header.moments as usize;
        if self.params.len() != d || self.m.len() != k || self.v.len() != k {
            return Err(FedError::Internal(
                "checkpoint vectors disagree with the header".into(),
            ));
        }
        let header =
            serde_json::to_vec(&self.header).map_err(|e| FedError::Internal(e.to_string()))?;
        let mut out = Vec::with_capacity(56 + header.len() + 4 * (d + 2 * k));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        push_f32s(&mut out, &self.params);
        push_f32s(&mut out, &self.m);
        push_f32s(&mut out, &self.v);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        Ok(out)
    }

    /// Parses a checkpoint read from `path`.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, FedError> {
        if bytes.len() < 48 || &bytes[..8] != MAGIC {
            return Err(err(path, "not a fedveil checkpoint (bad magic)"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(err(
                path,
                "the checksum does not match: the file is damaged",
            ));
        }
        let hlen = u64::from_le_bytes(body[8..16].try_into().map_err(|_| err(path, "truncated"))?);
        if hlen > MAX_HEADER || 16 + hlen > body.len() as u64 {
            return Err(err(path, format!("header length {hlen} is impossible")));
        }
        let hend = 16 + hlen as usize;
        let header: Header = serde_json::from_slice(&body[16..hend])
            .map_err(|e| err(path, format!("header: {e}")))?;
        let floats = &body[hend..];
        let want = header
            .dim
            .checked_add(header.moments.saturating_mul(2))
            .and_then(|n| n.checked_mul(4));
        if want != Some(floats.len() as u64) {
            return Err(err(
                path,
                format!(
                    "{} bytes of vectors, the header describes {} parameters and {} moments",
                    floats.len(),
                    header.dim,
                    header.moments
                ),
            ));
        }
        let mut all = floats
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        let d = header.dim as usize;
        let k = header.moments as usize;
        let params: Vec<f32> = all.by_ref().take(d).collect();
        let m: Vec<f32> = all.by_ref().take(k).collect();
        let v: Vec<f32> = all.take(k).collect();
        Ok(Checkpoint {
            header,
            params,
            m,
            v,
        })
    }

    /// Writes the checkpoint into `dir` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), FedError> {
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        let bytes = self.to_bytes()?;
        let fin = path_in(dir);
        fedveil_net::files::write_atomically(&fin, &bytes, fedveil_net::files::Access::Default)
            .map_err(|e| err(&fin, e))?;
        Ok(())
    }

    /// Loads the checkpoint in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Self>, FedError> {
        let path = path_in(dir);
        match std::fs::read(&path) {
            Ok(bytes) => Self::from_bytes(&path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            header: Header {
                federation: "ab".repeat(32),
                completed_rounds: 4,
                dim: 3,
                optimizer: "fedadam".into(),
                task: "kind = \"synthetic\"\n".into(),
                ledger: PrivacyLedger::default(),
                history: vec![RoundRecord {
                    round: 3,
                    loss: 0.5,
                    epsilon: Some(1.0),
                    survivors: 9,
                    cohort: 10,
                    seconds: 0.1,
                }],
                moments: 3,
            },
            params: vec![1.0, 2.0, 3.0],
            m: vec![0.1, 0.2, 0.3],
            v: vec![1e-6, 2e-6, 3e-6],
        }
    }

    #[test]
    fn round_trips_atomically_and_detects_damage() {
        let dir = std::env::temp_dir().join(format!("fedveil-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(Checkpoint::load(&dir).unwrap(), None);
        let c = sample();
        c.save(&dir).unwrap();
        assert_eq!(Checkpoint::load(&dir).unwrap(), Some(c.clone()));
        // Only the checkpoint: no temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE)]);

        let p = path_in(&dir);
        let good = std::fs::read(&p).unwrap();
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 40] ^= 1;
        let e = Checkpoint::from_bytes(&p, &bad).unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
        let e = Checkpoint::from_bytes(&p, &good[..good.len() - 8])
            .unwrap_err()
            .to_string();
        assert!(e.contains("damaged"), "{e}");
        let e = Checkpoint::from_bytes(&p, b"hello world, not a checkpoint at all......!!")
            .unwrap_err()
            .to_string();
        assert!(e.contains("magic"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
