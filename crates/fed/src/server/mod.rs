//! The federation server (protocols/federation.md §4, §5).
//!
//! One task owns all federation state and runs the rounds; connection
//! tasks ([`crate::connection`]) feed it the clients' messages through a
//! bounded channel, so a flood from one client only slows that client.
//! Each round:
//!
//! 1. wait until enough clients are connected, then select the cohort
//!    (a fixed number of connected clients, or Poisson sampling of the
//!    population);
//! 2. send every member the round specification, whose SecAgg+ session
//!    commits to the hash of the parameters that follow it (§3.3);
//! 3. relay the SecAgg+ session; a client that misses a stage's deadline,
//!    disconnects or declines drops out of it;
//! 4. before asking for unmasking shares, charge the round to the privacy
//!    ledger and persist it (§5.3);
//! 5. decode the sum, apply the server optimiser, evaluate, checkpoint
//!    atomically and write the metrics line.
//!
//! A session that aborts reveals nothing; the round is tried again with a
//! fresh session, up to `federation.attempts` times.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedveil_net::{ClientKey, Limits, NetServer, ServerIdentity};
use fedveil_secagg::crypto::identity::IdentityPublic;
use fedveil_secagg::messages::{ClientMessage, MaskedInput, ServerMessage};
use fedveil_secagg::params::RosterEntry;
use fedveil_secagg::ring::packed_len;
use fedveil_secagg::{ClientId, PROTOCOL_VERSION, SessionParams, Stage};
use rand_core::RngCore;
use tokio::sync::{mpsc, watch};

use crate::FedError;
use crate::adversary::ServerHooks;
use crate::checkpoint::{Checkpoint, Header, RoundRecord};
use crate::config::{CohortRule, Plan, Resolved};
use crate::connection::{
    self, Bundle, CLOSE_FINISHED, CLOSE_PROTOCOL, ConnectionContext, Counters, Expect, Inbound,
    Outbound,
};
use crate::encoding;
use crate::ledger::PrivacyLedger;
use crate::metrics::{
    Dropout, Emitter, Event, MetricsWriter, RoundMetrics, peak_rss_bytes, stage_key,
};
use crate::optimizer::ServerOptimizer;
use crate::randomness::{Purpose, Randomness};
use crate::trainer::{Evaluation, Evaluator};
use crate::wire::{self, Down, Encoding, RoundSpec, Up};

mod baseline;
mod record;
mod registry;
mod session;
#[cfg(feature = "adversary")]
mod takeover;

use registry::Heard;

/// Why a session aborted. Nothing was revealed; the round is tried again
/// with a fresh session, up to `federation.attempts` times. The text is
/// what the metrics line's `abort_reason` and the events carry.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Abort {
    #[error("the cohort has {connected} connected clients, a session needs at least {need}")]
    CohortTooSmall { connected: usize, need: usize },
    /// A Poisson sample can be too small for the configured threshold or
    /// degree.
    #[error("a cohort of {cohort} cannot hold this session: {why}")]
    Unworkable {
        cohort: u32,
        why: fedveil_secagg::ParamsError,
    },
    /// The SecAgg+ session itself aborted (protocols/secagg-plus.md §6.9).
    #[error(transparent)]
    Protocol(#[from] fedveil_secagg::AbortReason),
    /// What the sum holds is the clients' doing (one of them may have
    /// forged its weight slot); masking hides which client it was.
    #[error("the unmasked sum cannot be decoded: {0}")]
    Undecodable(fedveil_secagg::codec::CodecError),
    /// No member of an unprotected session sent its update.
    #[error("no client sent its update")]
    NoUpdates,
    /// An installed adversary took the session over (tests and the audit).
    #[error("an adversary took the session over at {0}")]
    TakenOver(Stage),
}

/// How one session of a round ended.
#[derive(Debug)]
enum Ended {
    /// The aggregate was applied and the round recorded.
    Completed,
    Aborted(Abort),
}

/// Everything a server needs.
pub struct ServerSetup {
    pub plan: Plan,
    pub identity: ServerIdentity,
    /// The allowed client keys; client `i` (1-based) is the `i`-th.
    pub allow: Vec<ClientKey>,
    pub listen: SocketAddr,
    pub limits: Limits,
    pub evaluator: Box<dyn Evaluator>,
    pub randomness: Randomness,
    pub events: Option<mpsc::UnboundedSender<Event>>,
    /// Test and audit hooks (`ServerHooks::default()` in operation).
    pub hooks: ServerHooks,
}

impl std::fmt::Debug for ServerSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSetup")
            .field("listen", &self.listen)
            .field("clients", &self.allow.len())
            .finish_non_exhaustive()
    }
}

/// How a federation ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Rounds completed, in total (across restarts).
    pub rounds: u64,
    pub params: Vec<f32>,
    /// The evaluation of the model the federation started from (a
    /// federation that resumed from a checkpoint has none).
    pub initial_evaluation: Option<Evaluation>,
    /// The evaluation of the final model.
    pub evaluation: Option<Evaluation>,
    /// ε: the server's account with client-level DP; with record-level
    /// DP the largest any client reported (`client_epsilon` has each).
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// With record-level DP: each client's reported ε, by client id.
    pub client_epsilon: BTreeMap<u32, f64>,
    pub history: Vec<RoundRecord>,
    pub reason: String,
    pub server_peak_rss_bytes: Option<u64>,
}

/// One connected client.
#[derive(Debug)]
struct Conn {
    generation: u64,
    tx: mpsc::Sender<Outbound>,
    conn: fedveil_net::quinn::Connection,
    /// Messages rejected since the last session started.
    violations: u32,
}

/// The state a checkpoint holds.
#[derive(Debug)]
struct State {
    federation: [u8; 32],
    completed: u64,
    params: Vec<f32>,
    optimizer: ServerOptimizer,
    ledger: PrivacyLedger,
    history: Vec<RoundRecord>,
    task: String,
    evaluation: Option<Evaluation>,
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A bound server, ready to run.
pub struct Server {
    resolved: Resolved,
    net: Arc<NetServer>,
    addr: SocketAddr,
    shared: ConnectionContext,
    keys: BTreeMap<ClientId, ClientKey>,
    evaluator: Option<Box<dyn Evaluator>>,
    /// The evaluation of the model a new federation starts from, running
    /// beside the first round (it holds the evaluator until it ends).
    initial: Option<tokio::task::JoinHandle<Evaluated>>,
    /// That evaluation, once taken back before the first round's.
    initial_done: Option<Evaluation>,
    /// Whether the final model was handed to the evaluator to save.
    saved_final: bool,
    randomness: Randomness,
    events: Emitter<Event>,
    hooks: ServerHooks,
    state: State,
    metrics: Option<MetricsWriter>,
    hub: mpsc::Receiver<Inbound>,
    expect: watch::Sender<Option<Expect>>,
    counters: Arc<Counters>,
    conns: BTreeMap<ClientId, Conn>,
    clock: Instant,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("completed", &self.state.completed)
            .field("connected", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Server {
    /// A server dropped mid-run (its task aborted) closes every connection,
    /// so that no connection outlives it and its clients learn at once.
    fn drop(&mut self) {
        self.net.close();
    }
}

/// An evaluator handed back with its result.
type Evaluated = (
    Box<dyn Evaluator>,
    Result<Evaluation, crate::trainer::TrainError>,
);

/// Evaluates `params` on a blocking thread.
fn evaluate_in_background(
    mut evaluator: Box<dyn Evaluator>,
    params: Vec<f32>,
    last: bool,
) -> tokio::task::JoinHandle<Evaluated> {
    tokio::task::spawn_blocking(move || {
        let r = if last {
            evaluator.evaluate_final(&params)
        } else {
            evaluator.evaluate(&params)
        };
        (evaluator, r)
    })
}

impl Server {
    /// Validates the plan, resumes from the checkpoint if there is one, and
    /// listens. Must be called within a tokio runtime.
    pub fn bind(setup: ServerSetup) -> Result<Server, FedError> {
        let ServerSetup {
            plan,
            identity,
            allow,
            listen,
            limits,
            mut evaluator,
            randomness,
            events,
            hooks,
        } = setup;
        let events = Emitter(events);
        let population = u32::try_from(allow.len())
            .map_err(|_| FedError::config("allow_list", "too many clients"))?;
        let mut ids = HashMap::new();
        let mut keys = BTreeMap::new();
        for (i, k) in allow.iter().enumerate() {
            let id = ClientId(i as u32 + 1);
            if ids.insert(*k, id).is_some() {
                return Err(FedError::config(
                    "allow_list",
                    format!("{k} is listed twice"),
                ));
            }
            keys.insert(id, *k);
        }
        let dim = evaluator.dim();
        let resolved = plan.resolve(population, dim)?;
        if resolved.dp.is_some() && resolved.checkpoint_dir.is_none() {
            tracing::warn!(
                "differential privacy without federation.checkpoint_dir: the privacy ledger \
                 is lost if the server stops, and a restart starts a new account"
            );
        }
        // The checkpoint binds the task (and its offsite-tuning split).
        let task = match &plan.offsite {
            None => toml::to_string(&plan.task),
            Some(offsite) => {
                let mut both = toml::Table::new();
                both.insert("task".into(), toml::Value::Table(plan.task.clone()));
                both.insert("offsite".into(), toml::Value::Table(offsite.clone()));
                toml::to_string(&both)
            }
        }
        .map_err(|e| FedError::Internal(e.to_string()))?;
        let state = match resolved
            .checkpoint_dir
            .as_deref()
            .map(Checkpoint::load)
            .transpose()?
            .flatten()
        {
            Some(ck) => {
                let path = crate::checkpoint::path_in(
                    resolved
                        .checkpoint_dir
                        .as_deref()
                        .unwrap_or(std::path::Path::new(".")),
                );
                let bad = |why: String| FedError::Checkpoint {
                    path: path.display().to_string(),
                    reason: format!(
                        "{why}; remove it, or point federation.checkpoint_dir elsewhere, to start a new federation"
                    ),
                };
                let h = &ck.header;
                if h.task != task {
                    return Err(bad(format!("it was written for another task:\n{}", h.task)));
                }
                if h.dim != dim as u64 {
                    return Err(bad(format!(
                        "it holds {} parameters, the task has {dim}",
                        h.dim
                    )));
                }
                if h.optimizer != resolved.optimizer.kind.name() {
                    return Err(bad(format!(
                        "it was written by {}, the plan uses {}",
                        h.optimizer,
                        resolved.optimizer.kind.name()
                    )));
                }
                let mut federation = [0u8; 32];
                if h.federation.len() != 64 {
                    return Err(bad("its federation id is malformed".into()));
                }
                for (i, f) in federation.iter_mut().enumerate() {
                    *f = u8::from_str_radix(&h.federation[2 * i..2 * i + 2], 16)
                        .map_err(|_| bad("its federation id is malformed".into()))?;
                }
                let optimizer = ServerOptimizer::resume(resolved.optimizer, dim, ck.m, ck.v)?;
                events.emit(Event::Resumed {
                    round: h.completed_rounds,
                });
                tracing::info!(
                    round = h.completed_rounds,
                    "resumed from {}",
                    path.display()
                );
                State {
                    federation,
                    completed: h.completed_rounds,
                    params: ck.params,
                    optimizer,
                    ledger: ck.header.ledger,
                    history: ck.header.history,
                    task,
                    evaluation: None,
                }
            }
            None => {
                let params = evaluator.initial_params()?;
                if params.len() != dim {
                    return Err(FedError::Internal(format!(
                        "the task's initial model has {} parameters, not {dim}",
                        params.len()
                    )));
                }
                let mut federation = [0u8; 32];
                randomness
                    .rng(Purpose::Federation, 0, 0, 0)?
                    .fill_bytes(&mut federation);
                State {
                    federation,
                    completed: 0,
                    params,
                    optimizer: ServerOptimizer::new(resolved.optimizer, dim),
                    ledger: PrivacyLedger::default(),
                    history: Vec::new(),
                    task,
                    evaluation: None,
                }
            }
        };
        let metrics = resolved
            .metrics
            .as_deref()
            .map(MetricsWriter::open)
            .transpose()?;
        let bundle = evaluator.client_bundle()?.map(|data| {
            let hash = wire::bundle_hash(&data);
            tracing::info!(
                bytes = data.len(),
                "the task's bundle is {}",
                hex::encode(hash)
            );
            Arc::new(Bundle { hash, data })
        });
        let net = Arc::new(NetServer::bind(listen, &identity, allow, limits.clone())?);
        let addr = net.local_addr()?;
        let (hub_tx, hub) = mpsc::channel(1024);
        let (expect, expect_rx) = watch::channel(None);
        let counters = Arc::new(Counters::default());
        let shared = ConnectionContext {
            ids: Arc::new(ids),
            bundle,
            hub: hub_tx,
            expect: expect_rx,
            counters: Arc::clone(&counters),
            limits,
            events: events.clone(),
        };
        Ok(Server {
            resolved,
            net,
            addr,
            shared,
            keys,
            evaluator: Some(evaluator),
            initial: None,
            initial_done: None,
            saved_final: false,
            randomness,
            events,
            hooks,
            state,
            metrics,
            hub,
            expect,
            counters,
            conns: BTreeMap::new(),
            clock: Instant::now(),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The validated plan.
    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    /// Rounds completed so far (a resumed server starts above zero).
    pub fn completed_rounds(&self) -> u64 {
        self.state.completed
    }

    /// Runs the federation to its end. Dropping the future stops the server
    /// and closes every connection, as a crash would (the checkpoint holds
    /// the last completed round).
    pub async fn run(mut self) -> Result<Summary, FedError> {
        let accept = AbortOnDrop(tokio::spawn(connection::accept_loop(
            Arc::clone(&self.net),
            self.shared.clone(),
        )));
        self.events.emit(Event::Listening(self.addr));
        tracing::info!(addr = %self.addr, "listening");
        // A new federation scores the model it starts from, beside its
        // first round: the hub goes on serving connections meanwhile.
        if self.state.completed == 0
            && self.resolved.rounds > 0
            && let Some(evaluator) = self.evaluator.take()
        {
            self.initial = Some(evaluate_in_background(
                evaluator,
                self.state.params.clone(),
                true,
            ));
        }
        let mut result = self.rounds().await;
        let initial = match self.take_initial().await {
            Ok(e) => e,
            Err(e) => {
                if result.is_ok() {
                    result = Err(e);
                }
                None
            }
        };
        // A server that resumed with nothing left to do still reports the
        // model it holds.
        if result.is_ok() && self.state.evaluation.is_none() && self.state.completed > 0 {
            match self.evaluate(true).await {
                Ok(e) => self.state.evaluation = Some(e),
                Err(e) => result = Err(e),
            }
        }
        // A federation that ended before its last round (its privacy
        // budget spent) or resumed with nothing left to do still saves the
        // model it ends with.
        if result.is_ok() && self.state.completed > 0 && !self.saved_final {
            self.save_model(self.state.completed, true).await;
        }
        let reason = match &result {
            Ok(r) => r.clone(),
            Err(e) => e.to_string(),
        };
        self.finish(&reason).await;
        self.net.close();
        drop(accept);
        let reason = result?;
        Ok(Summary {
            rounds: self.state.completed,
            params: self.state.params.clone(),
            initial_evaluation: initial,
            evaluation: self.state.evaluation.clone(),
            epsilon: self.epsilon()?,
            delta: self.delta(),
            client_epsilon: self.state.ledger.clients.clone(),
            history: self.state.history.clone(),
            reason,
            server_peak_rss_bytes: peak_rss_bytes(),
        })
    }

    fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    async fn rounds(&mut self) -> Result<String, FedError> {
        while self.state.completed < self.resolved.rounds {
            let round = self.state.completed;
            // A server restarted mid-round goes on after the sessions it
            // already charged: their numbers are never used twice.
            let first = self.state.ledger.next_attempt(round);
            let mut attempt = first;
            loop {
                // Every session may be charged (a session that aborts after
                // the charge still cost its privacy), so the budget is
                // checked before each one, retries included.
                if let Some(reason) = self.over_budget(round, attempt)? {
                    tracing::warn!("{reason}");
                    return Ok(reason);
                }
                match self.attempt(round, attempt).await? {
                    Ended::Completed => break,
                    Ended::Aborted(reason) => {
                        attempt += 1;
                        let tried = attempt - first;
                        if tried >= self.resolved.attempts {
                            return Err(FedError::Stopped(format!(
                                "round {round} failed in {tried} sessions; the last: {reason}"
                            )));
                        }
                        tracing::warn!(round, attempt, "trying the round again: {reason}");
                    }
                }
            }
        }
        Ok(format!("completed {} rounds", self.state.completed))
    }

    /// One session of a round.
    async fn attempt(&mut self, round: u64, attempt: u32) -> Result<Ended, FedError> {
        self.wait_for_clients().await?;
        for c in self.conns.values_mut() {
            c.violations = 0;
        }
        let cohort = self.select_cohort(round, attempt)?;
        // A session needs 3 members, its survivor floor, and (on the
        // complete graph) one more member than its threshold; a Poisson
        // sample can fall short of any of them.
        let r = &self.resolved;
        let need = r.min_survivors.max(3).max(r.threshold.map_or(0, |t| t + 1)) as usize;
        if cohort.len() < need {
            let reason = Abort::CohortTooSmall {
                connected: cohort.len(),
                need,
            };
            self.events.emit(Event::RoundAborted {
                round,
                attempt,
                reason: reason.to_string(),
            });
            return Ok(Ended::Aborted(reason));
        }
        self.session(round, attempt, cohort).await
    }
}
