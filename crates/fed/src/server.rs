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
use fedveil_secagg::audit::{Link, View};
use fedveil_secagg::crypto::identity::IdentityPublic;
use fedveil_secagg::messages::{ClientMessage, MaskedInput, ServerMessage};
use fedveil_secagg::params::RosterEntry;
use fedveil_secagg::ring::{PackedVec, packed_len};
use fedveil_secagg::{ClientId, PROTOCOL_VERSION, SessionParams, Stage};
use rand_core::RngCore;
use tokio::sync::{mpsc, watch};

use crate::FedError;
use crate::checkpoint::{Checkpoint, Header, RoundRecord};
use crate::config::{CohortRule, Plan, Resolved, default_threshold};
use crate::connection::{
    self, Bundle, CLOSE_FINISHED, CLOSE_PROTOCOL, Counters, Expect, Inbound, Outbound, Shared,
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

/// Lets a test or `fedveil audit --quic` play a malicious server: one that
/// sends some clients something other than what the others get, or that
/// takes a session over at some stage and speaks to the clients itself.
/// `fedveil server` and `fedveil run` never install one.
pub trait Adversary: Send + 'static {
    /// Called for every cohort member as a round starts, with what it is
    /// about to receive.
    fn tamper(&mut self, _client: ClientId, _spec: &mut RoundSpec, _params: &mut Vec<u8>) {}

    /// Sees every SecAgg+ message a cohort member sends, before the server
    /// handles it (also those it then refuses).
    fn observe(&mut self, _from: ClientId, _msg: &ClientMessage) {}

    /// The stage at which to take over the session of `round`, `attempt`
    /// (none: the session runs honestly).
    fn takeover(&mut self, _round: u64, _attempt: u32) -> Option<Stage> {
        None
    }

    /// Plays the server in a session taken over: `requests` are the
    /// messages the honest server was about to send at the takeover stage,
    /// unsent; `link` reaches the cohort over its connections. It runs on a
    /// blocking thread. Afterwards the session is aborted.
    fn play(
        &mut self,
        _view: View,
        _requests: Vec<(ClientId, ServerMessage)>,
        _link: &mut dyn Link,
    ) {
    }
}

/// A request of an adversary's [`Link`] to the server task.
struct Ask {
    msgs: Vec<(ClientId, ServerMessage)>,
    reply: tokio::sync::oneshot::Sender<Vec<(ClientId, ClientMessage)>>,
}

/// The link of an adversary playing on a blocking thread: each batch goes
/// to the server task, which sends it over the clients' connections and
/// collects their answers.
struct RelayLink {
    tx: mpsc::UnboundedSender<Ask>,
}

impl Link for RelayLink {
    fn ask_all(&mut self, msgs: Vec<(ClientId, ServerMessage)>) -> Vec<(ClientId, ClientMessage)> {
        let (reply, answers) = tokio::sync::oneshot::channel();
        if self.tx.send(Ask { msgs, reply }).is_err() {
            return Vec::new();
        }
        answers.blocking_recv().unwrap_or_default()
    }
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
    pub adversary: Option<Box<dyn Adversary>>,
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
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
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
    shared: Shared,
    keys: BTreeMap<ClientId, ClientKey>,
    evaluator: Option<Box<dyn Evaluator>>,
    /// The evaluation of the model a new federation starts from, running
    /// beside the first round (it holds the evaluator until it ends).
    initial: Option<tokio::task::JoinHandle<Evaluated>>,
    /// That evaluation, once taken back before the first round's.
    initial_done: Option<Evaluation>,
    randomness: Randomness,
    events: Emitter<Event>,
    adversary: Option<Box<dyn Adversary>>,
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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
            adversary,
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
            tracing::info!(bytes = data.len(), "the task's bundle is {}", hex(&hash));
            Arc::new(Bundle { hash, data })
        });
        let net = Arc::new(NetServer::bind(listen, &identity, allow, limits.clone())?);
        let addr = net.local_addr()?;
        let (hub_tx, hub) = mpsc::channel(1024);
        let (expect, expect_rx) = watch::channel(None);
        let counters = Arc::new(Counters::default());
        let shared = Shared {
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
            randomness,
            events,
            adversary,
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
        let reason = match &result {
            Ok(r) => r.clone(),
            Err(e) => e.to_string(),
        };
        self.finish(&reason).await;
        self.net.close();
        drop(accept);
        let reason = result?;
        let dp = self.resolved.dp.as_ref();
        Ok(Summary {
            rounds: self.state.completed,
            params: self.state.params.clone(),
            initial_evaluation: initial,
            evaluation: self.state.evaluation.clone(),
            epsilon: dp.map(|d| self.state.ledger.epsilon(d.delta)).transpose()?,
            delta: dp.map(|d| d.delta),
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
                let outcome = self.attempt(round, attempt).await?;
                match outcome {
                    Ok(()) => break,
                    Err(reason) => {
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

    /// Why the next session (`round`, `attempt`) may not run: the privacy
    /// it could cost would take the ledger past `epsilon_budget`.
    fn over_budget(&self, round: u64, attempt: u32) -> Result<Option<String>, FedError> {
        let Some(dp) = &self.resolved.dp else {
            return Ok(None);
        };
        let Some(budget) = dp.budget else {
            return Ok(None);
        };
        let worst = self
            .state
            .ledger
            .epsilon_after_worst_round(&dp.noise, dp.delta)?;
        if worst <= budget {
            return Ok(None);
        }
        let spent = self.state.ledger.epsilon(dp.delta)?;
        let session = if attempt == 0 {
            format!("round {round}")
        } else {
            format!("session {} of round {round}", attempt + 1)
        };
        Ok(Some(format!(
            "the privacy budget stops the federation before {session}: ε = {spent:.4} is spent, \
             and the session could take it to {worst:.4}, past the budget of {budget}"
        )))
    }

    /// One session of a round: `Ok(Err(reason))` if it aborted.
    async fn attempt(&mut self, round: u64, attempt: u32) -> Result<Result<(), String>, FedError> {
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
            let reason = format!(
                "the cohort has {} connected clients, a session needs at least {need}",
                cohort.len()
            );
            self.events.emit(Event::RoundAborted {
                round,
                attempt,
                reason: reason.clone(),
            });
            return Ok(Err(reason));
        }
        self.session(round, attempt, cohort).await
    }

    async fn wait_for_clients(&mut self) -> Result<(), FedError> {
        let need = self.resolved.min_clients as usize;
        let until = tokio::time::Instant::now() + self.resolved.wait;
        let mut reported = usize::MAX;
        while self.conns.len() < need {
            if reported != self.conns.len() {
                reported = self.conns.len();
                self.events.emit(Event::WaitingForClients {
                    connected: reported as u32,
                    needed: need as u32,
                });
            }
            match tokio::time::timeout_at(until, self.hub.recv()).await {
                Err(_) => {
                    return Err(FedError::Stopped(format!(
                        "waited {:?} for {need} clients; {} connected",
                        self.resolved.wait,
                        self.conns.len()
                    )));
                }
                Ok(None) => return Err(FedError::Internal("the connection hub closed".into())),
                Ok(Some(m)) => self.between_sessions(m),
            }
        }
        Ok(())
    }

    fn select_cohort(&self, round: u64, attempt: u32) -> Result<Vec<ClientId>, FedError> {
        let mut rng = self.randomness.rng(Purpose::Cohort, round, attempt, 0)?;
        let connected: Vec<ClientId> = self.conns.keys().copied().collect();
        let mut cohort = match self.resolved.cohort {
            CohortRule::Fixed(n) => {
                let mut pool = connected;
                let n = (n as usize).min(pool.len());
                for i in 0..n {
                    let j = i + (rng.next_u64() % (pool.len() - i) as u64) as usize;
                    pool.swap(i, j);
                }
                pool.truncate(n);
                pool
            }
            CohortRule::Poisson(q) => {
                // Every client of the population is sampled, connected or
                // not, so that the sampling is what the accountant assumes;
                // the sampled clients that are not connected drop out.
                let sampled: Vec<ClientId> = self
                    .keys
                    .keys()
                    .copied()
                    .filter(|_| ((rng.next_u64() >> 11) as f64) < q * (1u64 << 53) as f64)
                    .collect();
                sampled
                    .into_iter()
                    .filter(|c| self.conns.contains_key(c))
                    .collect()
            }
        };
        cohort.sort();
        Ok(cohort)
    }

    /// Queues a message for a client; false if it is not connected or its
    /// queue is full (it does not read what it is sent).
    fn send(&self, to: ClientId, out: Outbound) -> bool {
        self.conns
            .get(&to)
            .is_some_and(|c| c.tx.try_send(out).is_ok())
    }

    /// Refuses a client's message. The refusal is dropped if the client's
    /// queue is full; a client that reaches `max_violations` refusals in one
    /// session window is disconnected.
    fn reject(&mut self, to: ClientId, reason: String) {
        let max = self.shared.limits.max_violations;
        let Some(c) = self.conns.get_mut(&to) else {
            return;
        };
        c.violations = c.violations.saturating_add(1);
        if c.violations == max {
            let why = format!("{max} rejected messages; the last: {reason}");
            tracing::info!(client = %to, "disconnecting: {why}");
            c.conn.close(CLOSE_PROTOCOL.into(), why.as_bytes());
            self.events.emit(Event::Rejected {
                client: to,
                reason: why,
            });
            return;
        }
        if c.violations > max {
            return;
        }
        tracing::debug!(client = %to, "rejected: {reason}");
        let refusal = Outbound::Frame(Down::Rejected {
            reason: reason.clone(),
        });
        if c.tx.try_send(refusal).is_ok() {
            self.events.emit(Event::Rejected { client: to, reason });
        }
    }

    /// Registers a client's connection and welcomes it.
    fn hello(
        &mut self,
        id: ClientId,
        generation: u64,
        tx: mpsc::Sender<Outbound>,
        conn: fedveil_net::quinn::Connection,
    ) {
        let welcome = Down::Welcome {
            federation: self.state.federation,
            client: id,
            round: self.state.completed,
        };
        let _ = tx.try_send(Outbound::Frame(welcome));
        // A newer connection replaces an older one, whose writer ends when
        // its sender is dropped here.
        self.conns.insert(
            id,
            Conn {
                generation,
                tx,
                conn,
                violations: 0,
            },
        );
        tracing::debug!(client = %id, "connected");
        self.events.emit(Event::Connected(id));
    }

    /// Unregisters a connection; false if a newer one had replaced it.
    fn gone(&mut self, id: ClientId, generation: u64, reason: String) -> bool {
        if self
            .conns
            .get(&id)
            .is_some_and(|c| c.generation == generation)
        {
            self.conns.remove(&id);
            tracing::debug!(client = %id, "disconnected: {reason}");
            self.events.emit(Event::Disconnected { client: id, reason });
            true
        } else {
            false
        }
    }

    /// Handles a message while no session runs.
    fn between_sessions(&mut self, m: Inbound) {
        match m {
            Inbound::Hello {
                id,
                generation,
                tx,
                conn,
            } => self.hello(id, generation, tx, conn),
            Inbound::Gone {
                id,
                generation,
                reason,
            } => {
                self.gone(id, generation, reason);
            }
            Inbound::Up {
                up: Up::Decline { .. },
                ..
            } => {}
            Inbound::Up { id, generation, .. }
            | Inbound::Masked { id, generation, .. }
            | Inbound::Update { id, generation, .. } => {
                if self
                    .conns
                    .get(&id)
                    .is_some_and(|c| c.generation == generation)
                {
                    self.reject(id, "no session is running".into());
                }
            }
        }
    }

    /// Runs one SecAgg+ session of `round` with `cohort`.
    async fn session(
        &mut self,
        round: u64,
        attempt: u32,
        cohort: Vec<ClientId>,
    ) -> Result<Result<(), String>, FedError> {
        let started = Instant::now();
        let (sent0, received0) = self.counters.snapshot();
        let r = &self.resolved;
        let n = cohort.len() as u32;
        let dim = self.state.params.len();
        let mut rng = self.randomness.rng(Purpose::Session, round, attempt, 0)?;
        let encoding = match &r.dp {
            None if r.unprotected => Encoding::Unprotected,
            None => Encoding::Plain {
                bits: r.bits,
                clamp: r.clamp,
                max_clients: n,
                max_weight: r.max_weight,
            },
            Some(dp) => {
                let mut rotation_seed = [0u8; 32];
                rng.fill_bytes(&mut rotation_seed);
                Encoding::Private {
                    noise: dp.noise.clone(),
                    rotation_seed,
                }
            }
        };
        let mut k = r.degree.unwrap_or(n - 1).min(n - 1);
        if k < n - 1 && k % 2 == 1 && n % 2 == 1 {
            // A Poisson cohort of odd size: the next even degree.
            k += 1;
        }
        let t = r.threshold.unwrap_or_else(|| default_threshold(k));
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let roster = cohort
            .iter()
            .map(|id| RosterEntry {
                id: *id,
                identity: IdentityPublic(self.keys.get(id).map_or([0; 32], |k| k.0)),
            })
            .collect();
        let ring_len = encoding.ring_len(dim);
        let session = SessionParams {
            version: PROTOCOL_VERSION,
            nonce,
            round,
            context: [0; 32],
            dim: u32::try_from(ring_len)
                .map_err(|_| FedError::Internal(format!("{ring_len} ring elements")))?,
            bits: encoding.bits(),
            degree: k,
            threshold: t,
            min_survivors: r.min_survivors,
            roster,
        };
        let blob = Arc::new(wire::params_to_blob(&self.state.params));
        let hash = wire::params_hash(&blob);
        let mut spec = RoundSpec {
            federation: self.state.federation,
            round,
            attempt,
            dim: dim as u64,
            params_hash: hash,
            training: r.training.clone(),
            encoding,
            session,
            bundle: self.shared.bundle.as_ref().map(|b| b.hash),
        };
        spec.session.context = spec
            .context(&hash)
            .map_err(|e| FedError::Internal(e.to_string()))?;
        if self.resolved.unprotected {
            let counters = (sent0, received0);
            return self
                .unprotected_session(round, attempt, cohort, spec, blob, started, counters)
                .await;
        }
        let takeover = self
            .adversary
            .as_mut()
            .and_then(|a| a.takeover(round, attempt));
        // What the cohort sent, for an adversary that takes the session over.
        let mut log: Vec<(ClientId, ClientMessage)> = Vec::new();
        let r = &self.resolved;
        let mut sa = match fedveil_secagg::Server::new(spec.session.clone(), r.stage_deadlines) {
            Ok(sa) => sa,
            // The session's parameters follow from the cohort; a Poisson
            // sample can be too small for the configured threshold or
            // degree. Nothing was sent yet: this session is aborted and the
            // round tried again with a fresh sample.
            Err(e) => {
                let metrics = self.round_metrics(round, attempt, n, Vec::new(), (sent0, received0));
                let reason = format!("a cohort of {n} cannot hold this session: {e}");
                return self.aborted(metrics, started, reason);
            }
        };
        let session_id = sa.session_id();
        let bits = spec.encoding.bits();
        tracing::info!(round, attempt, cohort = n, "round started");
        self.events.emit(Event::RoundStarted {
            round,
            attempt,
            cohort: cohort.clone(),
        });
        let _ = self.expect.send(Some(Expect {
            session: session_id,
            bytes: packed_len(ring_len, bits),
        }));
        sa.start(self.now());
        for (to, msg) in sa.drain_transmits() {
            let delivered = match msg {
                ServerMessage::Setup(_) => match self.adversary.as_mut() {
                    Some(a) => {
                        let mut s = spec.clone();
                        let mut b = blob.as_ref().clone();
                        a.tamper(to, &mut s, &mut b);
                        self.send(
                            to,
                            Outbound::WithBlob(Down::Round(Box::new(s)), Arc::new(b)),
                        )
                    }
                    None => self.send(
                        to,
                        Outbound::WithBlob(Down::Round(Box::new(spec.clone())), Arc::clone(&blob)),
                    ),
                },
                other => self.send(to, Outbound::Frame(Down::Secagg(other))),
            };
            if !delivered {
                sa.drop_client(self.now(), to);
            }
        }

        let mut stage = sa.stage();
        let mut stage_started = Instant::now();
        let mut seconds = BTreeMap::new();
        let mut declined = Vec::new();
        let mut charged = false;
        if let Some(s) = stage {
            self.events.emit(Event::StageStarted {
                round,
                attempt,
                stage: s,
            });
        }
        loop {
            // Stage bookkeeping and the privacy charge come before the
            // stage's requests go out.
            if sa.stage() != stage {
                if let Some(s) = stage {
                    seconds.insert(
                        stage_key(s).to_string(),
                        stage_started.elapsed().as_secs_f64(),
                    );
                }
                stage = sa.stage();
                stage_started = Instant::now();
                // Charge before anything can be unmasked: when the
                // unmasking requests are about to go out, or (if no request
                // was needed) when a sum exists.
                let unmasking =
                    stage == Some(Stage::Unmasking) || matches!(sa.outcome(), Some(Ok(_)));
                if unmasking && !charged {
                    charged = true;
                    self.charge(round, attempt, sa.survivors().len()).await?;
                }
                if let Some(s) = stage {
                    self.events.emit(Event::StageStarted {
                        round,
                        attempt,
                        stage: s,
                    });
                }
            }
            if let Some(s) = takeover
                && stage == Some(s)
            {
                let requests = sa.drain_transmits();
                self.take_over(&sa, s, &cohort, requests, std::mem::take(&mut log))
                    .await?;
                let _ = self.expect.send(None);
                let reason = format!("an adversary took the session over at {s}");
                for to in &cohort {
                    let abort = ServerMessage::Abort {
                        session: session_id,
                        reason: reason.clone(),
                    };
                    self.send(*to, Outbound::Frame(Down::Secagg(abort)));
                }
                let mut metrics =
                    self.round_metrics(round, attempt, n, declined, (sent0, received0));
                metrics.stage_seconds = seconds;
                return self.aborted(metrics, started, reason);
            }
            for (to, msg) in sa.drain_transmits() {
                if !self.send(to, Outbound::Frame(Down::Secagg(msg))) {
                    sa.drop_client(self.now(), to);
                }
            }
            if sa.outcome().is_some() {
                break;
            }
            let deadline = sa
                .poll_timeout()
                .map(|d| tokio::time::Instant::from_std(self.clock + d));
            let inbound = match deadline {
                Some(d) => match tokio::time::timeout_at(d, self.hub.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        sa.handle_timeout(self.now());
                        continue;
                    }
                },
                None => self.hub.recv().await,
            };
            let Some(m) = inbound else {
                return Err(FedError::Internal("the connection hub closed".into()));
            };
            let in_cohort = |id: &ClientId| cohort.binary_search(id).is_ok();
            let current = |s: &Self, id: ClientId, generation: u64| {
                s.conns.get(&id).is_some_and(|c| c.generation == generation)
            };
            match m {
                Inbound::Hello {
                    id,
                    generation,
                    tx,
                    conn,
                } => {
                    // A reconnecting member lost its session state.
                    if in_cohort(&id) {
                        sa.drop_client(self.now(), id);
                    }
                    self.hello(id, generation, tx, conn);
                }
                Inbound::Gone {
                    id,
                    generation,
                    reason,
                } => {
                    if self.gone(id, generation, reason) && in_cohort(&id) {
                        sa.drop_client(self.now(), id);
                    }
                }
                Inbound::Up { id, generation, up } => {
                    if !current(self, id, generation) {
                        continue;
                    }
                    match up {
                        Up::Secagg(msg) if in_cohort(&id) => {
                            if matches!(msg, ClientMessage::MaskedInput(_)) {
                                self.reject(
                                    id,
                                    "masked inputs travel as Masked with a blob".into(),
                                );
                            } else {
                                let log = takeover.is_some().then_some(&mut log);
                                self.hand_over(&mut sa, id, msg, log);
                            }
                        }
                        Up::Secagg(_) => {
                            self.reject(id, format!("{id} is not in round {round}'s cohort"))
                        }
                        Up::Decline { round: r, reason } if r == round && in_cohort(&id) => {
                            tracing::info!(client = %id, round, "declined the round: {reason}");
                            declined.push(id.0);
                            sa.drop_client(self.now(), id);
                        }
                        Up::Decline { .. } => {}
                        Up::Hello { .. } => self.reject(id, "Hello was already received".into()),
                        Up::BundleReply { .. } => {
                            self.reject(id, "the bundle was offered before Welcome".into())
                        }
                        Up::Masked { .. } => {
                            self.reject(id, "internal: masked input without its vector".into())
                        }
                        Up::Update { .. } => self.reject(
                            id,
                            "raw updates are only accepted in unprotected rounds".into(),
                        ),
                    }
                }
                Inbound::Update { id, generation, .. } => {
                    if current(self, id, generation) {
                        self.reject(
                            id,
                            "raw updates are only accepted in unprotected rounds".into(),
                        );
                    }
                }
                Inbound::Masked {
                    id,
                    generation,
                    session,
                    bits,
                    len,
                    bad_envelopes,
                    data,
                } => {
                    if !current(self, id, generation) {
                        continue;
                    }
                    if !in_cohort(&id) {
                        self.reject(id, format!("{id} is not in round {round}'s cohort"));
                        continue;
                    }
                    let msg = ClientMessage::MaskedInput(MaskedInput {
                        session,
                        masked: PackedVec { bits, len, data },
                        bad_envelopes,
                    });
                    let log = takeover.is_some().then_some(&mut log);
                    self.hand_over(&mut sa, id, msg, log);
                }
            }
        }
        let _ = self.expect.send(None);
        let outcome = sa
            .take_outcome()
            .ok_or_else(|| FedError::Internal("the session ended without an outcome".into()))?;
        let mut metrics = self.round_metrics(round, attempt, n, declined, (sent0, received0));
        metrics.stage_seconds = seconds;
        let agg = match outcome {
            Err(reason) => return self.aborted(metrics, started, reason.to_string()),
            Ok(agg) => agg,
        };
        metrics.survivors = agg.survivors.len() as u32;
        metrics.dropouts = agg
            .dropped
            .iter()
            .chain(&agg.late)
            .map(|(c, s)| Dropout {
                client: c.0,
                stage: stage_key(*s).to_string(),
            })
            .collect();
        let sum = Arc::new(agg.sum);
        self.events.emit(Event::Aggregated {
            round,
            survivors: agg.survivors.clone(),
            sum: Arc::clone(&sum),
            complaints: agg
                .complaints
                .iter()
                .map(|c| (c.reporter, c.accused))
                .collect(),
        });

        let t = Instant::now();
        let mut noise_rng = self
            .randomness
            .rng(Purpose::ServerNoise, round, attempt, 0)?;
        let mean = match encoding::decode(
            &spec.encoding,
            &sum,
            agg.survivors.len(),
            dim,
            &mut noise_rng,
        ) {
            Ok(mean) => mean,
            // What the sum holds is the clients' doing (one of them may
            // have forged its weight slot): this session ends, not the
            // federation. Masking hides which client it was.
            Err(FedError::Codec(e)) => {
                let reason = format!("the unmasked sum cannot be decoded: {e}");
                return self.aborted(metrics, started, reason);
            }
            Err(e) => return Err(e),
        };
        self.state.optimizer.step(&mut self.state.params, &mean)?;
        if !charged && self.resolved.dp.is_some() {
            return Err(FedError::Internal(
                "a sum was unmasked without a privacy charge".into(),
            ));
        }
        metrics
            .stage_seconds
            .insert("aggregate".into(), t.elapsed().as_secs_f64());
        self.complete(round, n, metrics, started).await
    }

    /// Hands a member's SecAgg+ message to the session; an installed
    /// adversary sees it first, and `log` keeps it for one that takes the
    /// session over.
    fn hand_over(
        &mut self,
        sa: &mut fedveil_secagg::Server,
        id: ClientId,
        msg: ClientMessage,
        log: Option<&mut Vec<(ClientId, ClientMessage)>>,
    ) {
        if let Some(a) = self.adversary.as_mut() {
            a.observe(id, &msg);
        }
        if let Some(log) = log {
            log.push((id, msg.clone()));
        }
        if let Err(e) = sa.handle_message(self.now(), id, msg) {
            self.reject(id, e.to_string());
        }
    }

    /// Hands a session to the adversary at `stage` and relays its batches
    /// to the cohort until it is done.
    async fn take_over(
        &mut self,
        sa: &fedveil_secagg::Server,
        stage: Stage,
        cohort: &[ClientId],
        requests: Vec<(ClientId, ServerMessage)>,
        log: Vec<(ClientId, ClientMessage)>,
    ) -> Result<(), FedError> {
        let Some(mut adversary) = self.adversary.take() else {
            return Ok(());
        };
        tracing::warn!(%stage, "an adversary takes the session over");
        let view = View {
            session: sa.session_id(),
            bits: sa.params().bits,
            threshold: sa.params().threshold,
            members: cohort.to_vec(),
            neighbours: cohort
                .iter()
                .map(|c| (*c, sa.neighbours_of(*c).unwrap_or_default()))
                .collect(),
            log,
        };
        let (tx, mut asks) = mpsc::unbounded_channel();
        let player = tokio::task::spawn_blocking(move || {
            let mut link = RelayLink { tx };
            adversary.play(view, requests, &mut link);
            adversary
        });
        let wait = self.resolved.stage_deadlines.get(stage);
        // The link closes when the adversary is done.
        while let Some(Ask { msgs, reply }) = asks.recv().await {
            let answers = self.relay(msgs, cohort, wait).await;
            let _ = reply.send(answers);
        }
        let adversary = player
            .await
            .map_err(|e| FedError::Internal(format!("the adversary failed: {e}")))?;
        self.adversary = Some(adversary);
        Ok(())
    }

    /// Sends an adversary's batch and collects one answer per message
    /// (a client that refuses sends none), for at most `wait`.
    async fn relay(
        &mut self,
        msgs: Vec<(ClientId, ServerMessage)>,
        cohort: &[ClientId],
        wait: Duration,
    ) -> Vec<(ClientId, ClientMessage)> {
        let mut pending: BTreeMap<ClientId, usize> = BTreeMap::new();
        for (to, msg) in msgs {
            if cohort.contains(&to) && self.send(to, Outbound::Frame(Down::Secagg(msg))) {
                *pending.entry(to).or_default() += 1;
            }
        }
        let until = tokio::time::Instant::now() + wait;
        let mut answers = Vec::new();
        while !pending.is_empty() {
            let Ok(Some(m)) = tokio::time::timeout_at(until, self.hub.recv()).await else {
                break;
            };
            match m {
                Inbound::Hello {
                    id,
                    generation,
                    tx,
                    conn,
                } => {
                    pending.remove(&id);
                    self.hello(id, generation, tx, conn);
                }
                Inbound::Gone {
                    id,
                    generation,
                    reason,
                } => {
                    // A member that is gone answers nothing more.
                    let gone = self.gone(id, generation, reason);
                    if gone {
                        pending.remove(&id);
                    }
                }
                Inbound::Up {
                    id,
                    generation,
                    up: Up::Secagg(msg),
                } if self
                    .conns
                    .get(&id)
                    .is_some_and(|c| c.generation == generation) =>
                {
                    if let Some(left) = pending.get_mut(&id) {
                        answers.push((id, msg));
                        *left -= 1;
                        if *left == 0 {
                            pending.remove(&id);
                        }
                    }
                }
                _ => {}
            }
        }
        answers
    }

    /// One session of an unprotected round (the insecure baseline,
    /// protocols/federation.md §4.6): the cohort trains and sends raw
    /// updates, which the server averages weighted by samples.
    #[allow(clippy::too_many_arguments)]
    async fn unprotected_session(
        &mut self,
        round: u64,
        attempt: u32,
        cohort: Vec<ClientId>,
        spec: RoundSpec,
        blob: Arc<Vec<u8>>,
        started: Instant,
        (sent0, received0): (u64, u64),
    ) -> Result<Result<(), String>, FedError> {
        let n = cohort.len() as u32;
        let dim = self.state.params.len();
        let max_weight = u64::from(self.resolved.max_weight);
        tracing::info!(round, attempt, cohort = n, "unprotected round started");
        self.events.emit(Event::RoundStarted {
            round,
            attempt,
            cohort: cohort.clone(),
        });
        let _ = self.expect.send(Some(Expect {
            session: fedveil_secagg::SessionId([0; 32]),
            bytes: dim * 4,
        }));
        let mut waiting = std::collections::BTreeSet::new();
        let mut dropouts = Vec::new();
        for &to in &cohort {
            let round_msg = Down::Round(Box::new(spec.clone()));
            if self.send(to, Outbound::WithBlob(round_msg, Arc::clone(&blob))) {
                waiting.insert(to);
            } else {
                dropouts.push(to);
            }
        }
        self.events.emit(Event::StageStarted {
            round,
            attempt,
            stage: Stage::AdvertiseKeys,
        });
        let deadline = tokio::time::Instant::now() + self.resolved.train_deadline;
        let mut sum = vec![0f64; dim];
        let mut weight = 0f64;
        let mut contributed = 0u32;
        let mut declined = Vec::new();
        while !waiting.is_empty() {
            let m = match tokio::time::timeout_at(deadline, self.hub.recv()).await {
                Err(_) => break,
                Ok(None) => return Err(FedError::Internal("the connection hub closed".into())),
                Ok(Some(m)) => m,
            };
            let current = |s: &Self, id: ClientId, generation: u64| {
                s.conns.get(&id).is_some_and(|c| c.generation == generation)
            };
            match m {
                Inbound::Hello {
                    id,
                    generation,
                    tx,
                    conn,
                } => {
                    if waiting.remove(&id) {
                        dropouts.push(id);
                    }
                    self.hello(id, generation, tx, conn);
                }
                Inbound::Gone {
                    id,
                    generation,
                    reason,
                } => {
                    if self.gone(id, generation, reason) && waiting.remove(&id) {
                        dropouts.push(id);
                    }
                }
                Inbound::Update {
                    id,
                    generation,
                    round: r,
                    attempt: a,
                    samples,
                    data,
                } => {
                    if !current(self, id, generation) {
                        continue;
                    }
                    if r != round || a != attempt || !waiting.contains(&id) {
                        self.reject(
                            id,
                            format!("no update for round {r}, session {a} is expected from {id}"),
                        );
                        continue;
                    }
                    waiting.remove(&id);
                    match wire::blob_to_params(&data, dim)
                        .filter(|d| d.iter().all(|v| v.is_finite()))
                    {
                        Some(delta) => {
                            let w = samples.clamp(1, max_weight) as f64;
                            for (acc, d) in sum.iter_mut().zip(&delta) {
                                *acc += w * f64::from(*d);
                            }
                            weight += w;
                            contributed += 1;
                        }
                        None => {
                            self.reject(id, format!("the update is not {dim} finite f32 values"));
                            dropouts.push(id);
                        }
                    }
                }
                Inbound::Up { id, generation, up } => match up {
                    Up::Decline { round: r, reason } if r == round && waiting.remove(&id) => {
                        tracing::info!(client = %id, round, "declined the round: {reason}");
                        declined.push(id.0);
                    }
                    Up::Decline { .. } => {}
                    _ if current(self, id, generation) => {
                        self.reject(id, "an unprotected round expects an Update".into());
                    }
                    _ => {}
                },
                Inbound::Masked { id, generation, .. } => {
                    if current(self, id, generation) {
                        self.reject(id, "an unprotected round expects an Update".into());
                    }
                }
            }
        }
        dropouts.extend(waiting);
        let _ = self.expect.send(None);
        let mut seconds = BTreeMap::new();
        seconds.insert("train".to_string(), started.elapsed().as_secs_f64());
        let mut metrics = self.round_metrics(round, attempt, n, declined, (sent0, received0));
        metrics.stage_seconds = seconds;
        metrics.survivors = contributed;
        metrics.dropouts = dropouts
            .iter()
            .map(|c| Dropout {
                client: c.0,
                stage: "train".into(),
            })
            .collect();
        if contributed == 0 {
            return self.aborted(metrics, started, "no client sent its update".into());
        }
        let t = Instant::now();
        let mean: Vec<f64> = sum.iter().map(|s| s / weight).collect();
        self.state.optimizer.step(&mut self.state.params, &mean)?;
        metrics
            .stage_seconds
            .insert("aggregate".into(), t.elapsed().as_secs_f64());
        self.complete(round, n, metrics, started).await
    }

    /// A session's metrics so far: its traffic since `(sent0, received0)`,
    /// no survivors, no evaluation.
    fn round_metrics(
        &self,
        round: u64,
        attempt: u32,
        cohort: u32,
        declined: Vec<u32>,
        (sent0, received0): (u64, u64),
    ) -> RoundMetrics {
        let (sent1, received1) = self.counters.snapshot();
        RoundMetrics {
            round,
            attempt,
            status: "completed".into(),
            abort_reason: None,
            loss: None,
            eval: BTreeMap::new(),
            epsilon: None,
            delta: self.resolved.dp.as_ref().map(|d| d.delta),
            cohort,
            survivors: 0,
            dropouts: Vec::new(),
            declined,
            bytes_sent: sent1 - sent0,
            bytes_received: received1 - received0,
            stage_seconds: BTreeMap::new(),
            server_peak_rss_bytes: None,
        }
    }

    /// Records an aborted session: its metrics line and event.
    fn aborted(
        &mut self,
        mut metrics: RoundMetrics,
        started: Instant,
        reason: String,
    ) -> Result<Result<(), String>, FedError> {
        let (round, attempt) = (metrics.round, metrics.attempt);
        tracing::warn!(round, attempt, "session aborted: {reason}");
        metrics.status = "aborted".into();
        metrics.abort_reason = Some(reason.clone());
        metrics.epsilon = self.epsilon()?;
        self.finish_metrics(metrics, started)?;
        self.events.emit(Event::RoundAborted {
            round,
            attempt,
            reason: reason.clone(),
        });
        Ok(Err(reason))
    }

    /// The end of a round with an aggregate applied: ε, evaluation, the
    /// checkpoint and the metrics.
    async fn complete(
        &mut self,
        round: u64,
        n: u32,
        mut metrics: RoundMetrics,
        started: Instant,
    ) -> Result<Result<(), String>, FedError> {
        metrics.epsilon = self.epsilon()?;
        let t = Instant::now();
        let evaluation = self.evaluate(round + 1 == self.resolved.rounds).await?;
        metrics
            .stage_seconds
            .insert("evaluate".into(), t.elapsed().as_secs_f64());
        metrics.loss = Some(evaluation.loss);
        metrics.eval = evaluation.metrics.clone();
        self.state.evaluation = Some(evaluation);
        self.state.completed = round + 1;
        self.state.history.push(RoundRecord {
            round,
            loss: metrics.loss.unwrap_or(f64::NAN),
            epsilon: metrics.epsilon,
            survivors: metrics.survivors,
            cohort: n,
            seconds: started.elapsed().as_secs_f64(),
        });
        let t = Instant::now();
        self.checkpoint().await?;
        metrics
            .stage_seconds
            .insert("checkpoint".into(), t.elapsed().as_secs_f64());
        tracing::info!(
            round,
            survivors = metrics.survivors,
            loss = metrics.loss,
            epsilon = metrics.epsilon,
            "round completed"
        );
        let m = self.finish_metrics(metrics, started)?;
        self.events.emit(Event::RoundCompleted(Box::new(m)));
        Ok(Ok(()))
    }

    fn epsilon(&self) -> Result<Option<f64>, FedError> {
        self.resolved
            .dp
            .as_ref()
            .map(|d| self.state.ledger.epsilon(d.delta))
            .transpose()
    }

    /// Charges the round to the ledger and persists the ledger before the
    /// server can learn the sum (§5.3).
    async fn charge(&mut self, round: u64, attempt: u32, survivors: usize) -> Result<(), FedError> {
        let Some(dp) = &self.resolved.dp else {
            return Ok(());
        };
        let rho = self
            .state
            .ledger
            .record(round, attempt, &dp.noise, survivors as u32)?;
        tracing::debug!(
            round,
            survivors,
            rho,
            "charged the round to the privacy ledger"
        );
        self.checkpoint().await
    }

    fn finish_metrics(
        &mut self,
        mut m: RoundMetrics,
        started: Instant,
    ) -> Result<RoundMetrics, FedError> {
        m.stage_seconds
            .insert("total".into(), started.elapsed().as_secs_f64());
        m.server_peak_rss_bytes = peak_rss_bytes();
        if let Some(w) = self.metrics.as_mut() {
            w.write(&m)?;
        }
        Ok(m)
    }

    /// Evaluates the current parameters; `last` asks for the thorough
    /// evaluation of a run's first and last model.
    async fn evaluate(&mut self, last: bool) -> Result<Evaluation, FedError> {
        if let Some(e) = self.take_initial().await? {
            self.initial_done = Some(e);
        }
        let evaluator = self
            .evaluator
            .take()
            .ok_or_else(|| FedError::Internal("the evaluator is gone".into()))?;
        let (evaluator, result) =
            evaluate_in_background(evaluator, self.state.params.clone(), last)
                .await
                .map_err(|e| FedError::Internal(format!("evaluation task: {e}")))?;
        self.evaluator = Some(evaluator);
        Ok(result?)
    }

    /// Waits for the initial evaluation, if one is running or has ended,
    /// and takes the evaluator back.
    async fn take_initial(&mut self) -> Result<Option<Evaluation>, FedError> {
        let Some(task) = self.initial.take() else {
            return Ok(self.initial_done.take());
        };
        let (evaluator, result) = task
            .await
            .map_err(|e| FedError::Internal(format!("evaluation task: {e}")))?;
        self.evaluator = Some(evaluator);
        let e = result?;
        tracing::info!(loss = e.loss, "the initial model");
        self.events.emit(Event::InitialEvaluation(e.clone()));
        Ok(Some(e))
    }

    async fn checkpoint(&mut self) -> Result<(), FedError> {
        let Some(dir) = self.resolved.checkpoint_dir.clone() else {
            return Ok(());
        };
        let s = &self.state;
        let ck = Checkpoint {
            header: Header {
                federation: hex(&s.federation),
                completed_rounds: s.completed,
                dim: s.params.len() as u64,
                optimizer: s.optimizer.hyper().kind.name().into(),
                task: s.task.clone(),
                ledger: s.ledger.clone(),
                history: s.history.clone(),
                moments: s.optimizer.m.len() as u64,
            },
            params: s.params.clone(),
            m: s.optimizer.m.clone(),
            v: s.optimizer.v.clone(),
        };
        tokio::task::spawn_blocking(move || ck.save(&dir))
            .await
            .map_err(|e| FedError::Internal(format!("checkpoint task: {e}")))?
    }

    /// Tells every client the federation is over and lets them go.
    async fn finish(&mut self, reason: &str) {
        let rounds = self.state.completed;
        for (id, c) in &self.conns {
            let last = Outbound::Last(
                Down::Finished {
                    rounds,
                    reason: reason.to_string(),
                },
                CLOSE_FINISHED,
                "federation finished".into(),
            );
            if c.tx.try_send(last).is_err() {
                c.conn.close(CLOSE_FINISHED.into(), b"federation finished");
            }
            tracing::debug!(client = %id, "finished");
        }
        self.events.emit(Event::Finished {
            rounds,
            reason: reason.to_string(),
        });
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while !self.conns.is_empty() {
            match tokio::time::timeout_at(until, self.hub.recv()).await {
                Ok(Some(Inbound::Gone {
                    id,
                    generation,
                    reason,
                })) => {
                    self.gone(id, generation, reason);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
}
