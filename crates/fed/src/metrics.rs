//! Per-round metrics (one JSON line per round) and the runtime's events.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedveil_secagg::{ClientId, Stage};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::FedError;

/// A client that dropped out, and where.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dropout {
    pub client: u32,
    /// The secure-aggregation stage it did not complete.
    pub stage: String,
}

/// One line of the metrics file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    pub round: u64,
    pub attempt: u32,
    /// `"completed"` or `"aborted"`.
    pub status: String,
    /// Why the session aborted.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub abort_reason: Option<String>,
    /// The evaluation loss after the round.
    pub loss: Option<f64>,
    /// The task's other evaluation metrics.
    pub eval: BTreeMap<String, f64>,
    /// ε spent so far (at `delta`), with differential privacy; with
    /// record-level DP, the largest any client has reported.
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// With record-level DP: the ε each client of this session reported
    /// having spent in the federation (its own account), by client id.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub client_epsilon: BTreeMap<u32, f64>,
    pub cohort: u32,
    pub survivors: u32,
    pub dropouts: Vec<Dropout>,
    /// Clients that declined the round (their policy, a model that did not
    /// match its hash, a training failure).
    pub declined: Vec<u32>,
    /// Application bytes the server sent and received during the round.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Seconds per stage: `train` (broadcast, local training and key
    /// advertisement), `share`, `masked`, `consistency`, `unmask`,
    /// `aggregate` (decoding and the optimiser), `evaluate`, `checkpoint`,
    /// and `total`.
    pub stage_seconds: BTreeMap<String, f64>,
    /// The server process's peak resident memory so far (Linux).
    pub server_peak_rss_bytes: Option<u64>,
}

/// Appends metrics lines to a file, flushing each.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    pub fn open(path: &Path) -> Result<Self, FedError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| FedError::file(dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| FedError::file(path, e))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, m: &RoundMetrics) -> Result<(), FedError> {
        let mut line = serde_json::to_vec(m).map_err(|e| FedError::Internal(e.to_string()))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .map_err(|e| FedError::file(&self.path, e))
    }
}

/// The process's peak resident set size (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What the server is doing, for progress displays, logs and tests.
#[derive(Clone, Debug)]
pub enum Event {
    Listening(SocketAddr),
    /// Resumed from a checkpoint at this round.
    Resumed {
        round: u64,
    },
    /// A connection attempt that did not authenticate.
    Unauthenticated {
        remote: SocketAddr,
        reason: String,
    },
    Connected(ClientId),
    /// A client fetched the task's bundle (`bytes` on the wire).
    BundleSent {
        client: ClientId,
        bytes: u64,
    },
    Disconnected {
        client: ClientId,
        reason: String,
    },
    /// A client's message was refused; it stays connected.
    Rejected {
        client: ClientId,
        reason: String,
    },
    WaitingForClients {
        connected: u32,
        needed: u32,
    },
    RoundStarted {
        round: u64,
        attempt: u32,
        cohort: Vec<ClientId>,
    },
    StageStarted {
        round: u64,
        attempt: u32,
        stage: Stage,
    },
    /// The exact ring sum the session produced (what the server learns).
    Aggregated {
        round: u64,
        survivors: Vec<ClientId>,
        sum: Arc<Vec<u32>>,
        /// Share envelopes that did not open: (reporter, accused).
        complaints: Vec<(ClientId, ClientId)>,
    },
    RoundAborted {
        round: u64,
        attempt: u32,
        reason: String,
    },
    /// The evaluation of the model a new federation starts from.
    InitialEvaluation(crate::trainer::Evaluation),
    RoundCompleted(Box<RoundMetrics>),
    Finished {
        rounds: u64,
        reason: String,
    },
}

/// What a client is doing.
#[derive(Clone, Debug)]
pub enum ClientEvent {
    Connected {
        client: ClientId,
        round: u64,
    },
    /// The client installed the server's bundle: `fetched` bytes came over
    /// the network (0 when it was cached from an earlier connection).
    Bundle {
        hash: [u8; 32],
        bytes: u64,
        fetched: u64,
    },
    Disconnected {
        reason: String,
    },
    Trained {
        round: u64,
        loss: f64,
        samples: u64,
    },
    /// The client's encoded input (its secret), only when the client was
    /// set up to record it (tests).
    Input {
        client: ClientId,
        round: u64,
        ring: Arc<Vec<u32>>,
    },
    /// The client refused a message, or the round; the reason says which.
    Refused {
        round: u64,
        reason: String,
    },
    /// An injected fault fired ([`crate::client::Fault`]).
    Fault {
        round: u64,
        stage: Stage,
    },
    SessionAborted {
        round: u64,
        reason: String,
    },
    /// The client charged a session to its own privacy ledger (just before
    /// its unmasking shares leave); `epsilon` is its total so far.
    Charged {
        round: u64,
        attempt: u32,
        epsilon: f64,
    },
    /// The client sent its unmasking shares: its part of the round is done.
    RoundDone {
        round: u64,
    },
    Finished {
        rounds: u64,
    },
}

/// An optional event channel.
#[derive(Clone, Debug)]
pub(crate) struct Emitter<E>(pub Option<UnboundedSender<E>>);

impl<E> Emitter<E> {
    pub fn emit(&self, e: E) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(e);
        }
    }

    pub fn active(&self) -> bool {
        self.0.is_some()
    }
}

/// The name of a stage in metrics.
pub fn stage_key(stage: Stage) -> &'static str {
    match stage {
        Stage::AdvertiseKeys => "train",
        Stage::ShareKeys => "share",
        Stage::MaskedInput => "masked",
        Stage::ConsistencyCheck => "consistency",
        Stage::Unmasking => "unmask",
    }
}
