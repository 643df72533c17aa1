//! The federation client (protocols/federation.md §3, §4).
//!
//! A client connects, proves its key, says hello and then serves rounds
//! until the server says the federation is finished. For each round it
//! checks the parameters against their announced hash and the round against
//! its own policy, trains, encodes its update (with its differential
//! privacy noise) and runs its side of the SecAgg+ session. The session's
//! context is computed from what the client received, so a client sent a
//! different model than its peers cannot join their session (§3.3). When
//! the connection breaks, the client reconnects with exponential backoff;
//! the round in progress is lost to it and it waits for the next.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedveil_net::frame::{read_blob, read_frame, write_blob, write_frame};
use fedveil_net::quinn;
use fedveil_net::{ClientIdentity, Fingerprint, Limits, NetClient, NetError};
use fedveil_secagg::crypto::identity::IdentityKeypair;
use fedveil_secagg::crypto::prg::KeystreamRng;
use fedveil_secagg::messages::{ClientMessage, ServerMessage};
use fedveil_secagg::{Client as SecaggClient, ClientId, Stage};
use tokio::sync::mpsc::UnboundedSender;

use crate::FedError;
use crate::adversary::ClientHooks;
use crate::config::{PlacementName, Policy};
use crate::encoding;
use crate::ledger::ClientLedger;
use crate::metrics::{ClientEvent, Emitter};
use crate::randomness::{Purpose, Randomness};
use crate::trainer::{RecordSteps, Trainer};
use crate::wire::{self, Down, Encoding, MAX_UP_FRAME, RoundSpec, Up, VERSION};

/// A fault to inject, for tests and failure drills: in `round`, when the
/// request of `stage` arrives (for `AdvertiseKeys`, the round itself), the
/// client does not answer. Each fault fires once.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// It drops its connection at once, then reconnects as after any
    /// network failure (the server notices the closed connection).
    Disconnect { round: u64, stage: Stage },
    /// It stays connected and ignores the rest of the session (the
    /// server waits for the stage's deadline).
    Stall { round: u64, stage: Stage },
}

impl Fault {
    fn at(&self) -> (u64, Stage) {
        match *self {
            Fault::Disconnect { round, stage } | Fault::Stall { round, stage } => (round, stage),
        }
    }
}

/// The stage whose request a server message is.
fn request_stage(msg: &ServerMessage) -> Option<Stage> {
    Some(match msg {
        ServerMessage::Setup(_) => Stage::AdvertiseKeys,
        ServerMessage::KeyDirectory { .. } => Stage::ShareKeys,
        ServerMessage::ShareRelay { .. } => Stage::MaskedInput,
        ServerMessage::ConsistencyRequest { .. } => Stage::ConsistencyCheck,
        ServerMessage::UnmaskRequest { .. } => Stage::Unmasking,
        ServerMessage::Abort { .. } => return None,
    })
}

/// Everything a client needs.
pub struct ClientSetup {
    pub server: SocketAddr,
    pub server_name: String,
    pub pin: Fingerprint,
    pub identity: ClientIdentity,
    pub limits: Limits,
    pub trainer: Box<dyn Trainer>,
    pub policy: Policy,
    pub randomness: Randomness,
    /// First reconnect delay; it doubles up to `max_reconnect`.
    pub reconnect: Duration,
    pub max_reconnect: Duration,
    /// Give up after this long without a connection.
    pub give_up_after: Option<Duration>,
    pub events: Option<UnboundedSender<ClientEvent>>,
    /// Share this UDP endpoint (many clients in one process).
    pub endpoint: Option<NetClient>,
    /// Faults to inject (none in operation).
    pub faults: Vec<Fault>,
    /// Where received bundles are kept, by hash, so that a reconnecting or
    /// restarted client does not fetch the same bundle again (none: kept
    /// in memory only).
    pub bundle_cache: Option<PathBuf>,
    /// The largest bundle this client accepts, in bytes.
    pub max_bundle_bytes: u64,
    /// Test and audit hooks (`ClientHooks::default()` in operation).
    pub hooks: ClientHooks,
    /// Where the client keeps its own privacy ledger, one file per
    /// federation (none: in memory, lost when the process ends).
    pub ledger_dir: Option<PathBuf>,
}

/// The default [`ClientSetup::max_bundle_bytes`]: 16 GiB.
pub const MAX_BUNDLE_BYTES: u64 = 16 << 30;

impl std::fmt::Debug for ClientSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSetup")
            .field("server", &self.server)
            .field("key", &self.identity.public())
            .finish_non_exhaustive()
    }
}

/// How a client's federation ended.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientSummary {
    pub client: Option<ClientId>,
    /// Rounds the federation completed.
    pub rounds: u64,
    /// Rounds this client sent its unmasking shares in.
    pub rounds_served: u64,
    pub reason: String,
}

/// Why a connection ended.
enum Ended {
    Finished {
        rounds: u64,
        reason: String,
    },
    /// The server refused this client for good (not on the allow-list, a
    /// protocol version it does not speak).
    Refused(String),
    Broken(String),
}

/// What revealing one session's input costs this client.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cost {
    /// Client-level noise: zCDP `ρ` at the session's survivor floor.
    Zcdp(f64),
    /// Record-level DP-SGD: the round's steps (protocols/dp.md §8).
    Record(RecordSteps),
}

/// A round in progress.
struct Session {
    round: u64,
    attempt: u32,
    /// What revealing this session's input costs; none without
    /// differential privacy.
    cost: Option<Cost>,
    client: SecaggClient,
    rng: KeystreamRng,
}

struct Runner {
    setup: ClientSetup,
    events: Emitter<ClientEvent>,
    id: Option<ClientId>,
    served: u64,
    trainer: Option<Box<dyn Trainer>>,
    /// The hash of the bundle the trainer was built on.
    bundle: Option<[u8; 32]>,
    /// This client's privacy account of the current federation.
    ledger: Option<ClientLedger>,
}

/// Runs the client until the federation finishes.
pub async fn run(mut setup: ClientSetup) -> Result<ClientSummary, FedError> {
    let events = Emitter(setup.events.take());
    let endpoint = match setup.endpoint.take() {
        Some(e) => e,
        None => NetClient::new(setup.server, setup.pin, setup.limits.clone())?,
    };
    let trainer = Some(std::mem::replace(&mut setup.trainer, Box::new(NoTrainer)));
    let mut runner = Runner {
        setup,
        events,
        id: None,
        served: 0,
        trainer,
        bundle: None,
        ledger: None,
    };
    let mut delay = runner.setup.reconnect;
    let mut last_contact = Instant::now();
    let (server, name) = (runner.setup.server, runner.setup.server_name.clone());
    let identity = ClientIdentity::from_seed(&runner.setup.identity.seed());
    loop {
        let ended = match endpoint.connect(server, &name, &identity).await {
            Ok(auth) => {
                delay = runner.setup.reconnect;
                let ended = runner.serve(auth.connection).await;
                last_contact = Instant::now();
                ended
            }
            Err(NetError::Refused(r)) => Ended::Refused(r),
            Err(e) => Ended::Broken(e.to_string()),
        };
        match ended {
            Ended::Finished { rounds, reason } => {
                runner.events.emit(ClientEvent::Finished { rounds });
                return Ok(ClientSummary {
                    client: runner.id,
                    rounds,
                    rounds_served: runner.served,
                    reason,
                });
            }
            Ended::Refused(r) => {
                return Err(FedError::Net(NetError::Refused(r)));
            }
            Ended::Broken(reason) => {
                tracing::info!("connection lost: {reason}");
                runner.events.emit(ClientEvent::Disconnected {
                    reason: reason.clone(),
                });
                if let Some(limit) = runner.setup.give_up_after
                    && last_contact.elapsed() >= limit
                {
                    return Err(FedError::Stopped(format!(
                        "no connection to the server for {limit:?}; the last error: {reason}"
                    )));
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(runner.setup.max_reconnect);
            }
        }
    }
}

/// A placeholder while the real trainer is lent to a blocking task.
struct NoTrainer;

impl Trainer for NoTrainer {
    fn dim(&self) -> usize {
        0
    }
    fn train(
        &mut self,
        _: &[f32],
        _: &crate::trainer::TrainingConfig,
        _: &mut dyn rand_core::RngCore,
    ) -> Result<crate::trainer::LocalUpdate, crate::trainer::TrainError> {
        Err(crate::trainer::TrainError("no trainer".into()))
    }
}

fn broken(e: impl std::fmt::Display) -> Ended {
    Ended::Broken(e.to_string())
}

impl Runner {
    async fn serve(&mut self, conn: quinn::Connection) -> Ended {
        let limits = self.setup.limits.clone();
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return broken(e),
        };
        if let Err(e) = write_frame(&mut send, &Up::Hello { version: VERSION }, MAX_UP_FRAME).await
        {
            return broken(e);
        }
        let first = tokio::time::timeout(
            limits.handshake_timeout,
            read_frame::<Down>(&mut recv, limits.max_frame),
        )
        .await;
        let welcome = if let Ok(Ok(Down::Bundle { hash, bytes })) = first {
            if let Err(ended) = self.receive_bundle(hash, bytes, &mut send, &mut recv).await {
                return ended;
            }
            tokio::time::timeout(
                limits.handshake_timeout,
                read_frame::<Down>(&mut recv, limits.max_frame),
            )
            .await
        } else {
            first
        };
        if matches!(welcome, Ok(Ok(Down::Welcome { .. })))
            && self.bundle.is_none()
            && self.trainer.as_ref().is_some_and(|t| t.wants_bundle())
        {
            return Ended::Refused(
                "this client's task is built on the server's bundle (offsite-tuning's \
                 emulator), and the server offers none"
                    .into(),
            );
        }
        let (federation, round) = match welcome {
            Ok(Ok(Down::Welcome {
                federation,
                client,
                round,
            })) => {
                self.id = Some(client);
                (federation, round)
            }
            Ok(Ok(Down::Rejected { reason })) => return Ended::Refused(reason),
            Ok(Ok(other)) => return broken(format!("expected Welcome, got {}", other.name())),
            Ok(Err(e)) => return broken(e),
            Err(_) => return broken("no Welcome within the handshake timeout"),
        };
        let Some(id) = self.id else {
            return broken("no client id");
        };
        if let Err(e) = self.open_ledger(&federation) {
            return Ended::Refused(format!("this client's privacy ledger: {e}"));
        }
        tracing::info!(client = %id, round, "connected");
        self.events
            .emit(ClientEvent::Connected { client: id, round });
        let mut session: Option<Session> = None;
        loop {
            let down = match read_frame::<Down>(&mut recv, limits.max_frame).await {
                Ok(d) => d,
                Err(e) => {
                    let why = conn
                        .close_reason()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| e.to_string());
                    return broken(why);
                }
            };
            match down {
                Down::Round(spec) => {
                    let dim = self.trainer_dim();
                    // Read exactly the model this client can hold.
                    let blob = match read_blob(&mut recv, dim.saturating_mul(4)).await {
                        Ok(b) => b,
                        Err(e) => return broken(format!("the round's parameters: {e}")),
                    };
                    session = None;
                    let round = spec.round;
                    match self.fault(round, Stage::AdvertiseKeys) {
                        Some(Fault::Disconnect { .. }) => {
                            conn.close(0u32.into(), b"injected fault");
                            return broken("injected fault: disconnected");
                        }
                        Some(Fault::Stall { .. }) => continue,
                        None => {}
                    }
                    if spec.encoding == Encoding::Unprotected {
                        match self.contribute_unprotected(federation, *spec, blob).await {
                            Ok((head, update)) => {
                                let sent = async {
                                    write_frame(&mut send, &head, MAX_UP_FRAME).await?;
                                    write_blob(&mut send, &update, usize::MAX).await
                                }
                                .await;
                                if let Err(e) = sent {
                                    return broken(e);
                                }
                                self.served += 1;
                                self.events.emit(ClientEvent::RoundDone { round });
                            }
                            Err(reason) => {
                                if let Err(e) = self.decline(&mut send, round, reason).await {
                                    return broken(e);
                                }
                            }
                        }
                        continue;
                    }
                    match self.join(id, federation, *spec, blob).await {
                        Ok((s, first)) => {
                            if let Err(e) = self.send_secagg(&mut send, round, first).await {
                                return broken(e);
                            }
                            session = Some(s);
                        }
                        Err(reason) => {
                            if let Err(e) = self.decline(&mut send, round, reason).await {
                                return broken(e);
                            }
                        }
                    }
                }
                Down::Secagg(msg) => {
                    let Some(s) = session.as_mut() else {
                        // A message for a session this client is not in
                        // (it reconnected, or declined): nothing to do.
                        continue;
                    };
                    let round = s.round;
                    if let Some(stage) = request_stage(&msg) {
                        match self.fault(round, stage) {
                            Some(Fault::Disconnect { .. }) => {
                                conn.close(0u32.into(), b"injected fault");
                                return broken("injected fault: disconnected");
                            }
                            Some(Fault::Stall { .. }) => {
                                session = None;
                                continue;
                            }
                            None => {}
                        }
                    }
                    let aborted = matches!(msg, ServerMessage::Abort { .. });
                    let unmask = matches!(msg, ServerMessage::UnmaskRequest { .. });
                    match s.client.handle(msg, &mut s.rng) {
                        Ok(Some(reply)) => {
                            // The shares reveal the input: the ledger is
                            // charged and saved before they leave.
                            if unmask
                                && let Some(cost) = s.cost
                                && let Err(e) = self.charge(round, s.attempt, cost, &mut send).await
                            {
                                tracing::warn!(round, "not unmasking: {e}");
                                self.events.emit(ClientEvent::Refused {
                                    round,
                                    reason: e.clone(),
                                });
                                session = None;
                                continue;
                            }
                            if let Err(e) = self.send_secagg(&mut send, round, reply).await {
                                return broken(e);
                            }
                            if unmask {
                                self.served += 1;
                                self.events.emit(ClientEvent::RoundDone { round });
                            }
                        }
                        Ok(None) => {
                            if aborted {
                                let reason = s.client.aborted().unwrap_or("").to_string();
                                tracing::info!(round, "the server aborted the session: {reason}");
                                self.events
                                    .emit(ClientEvent::SessionAborted { round, reason });
                                session = None;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(round, "refused a message: {e}");
                            self.events.emit(ClientEvent::Refused {
                                round,
                                reason: e.to_string(),
                            });
                        }
                    }
                }
                Down::Rejected { reason } => {
                    tracing::warn!("the server rejected a message: {reason}");
                    self.events.emit(ClientEvent::Refused {
                        round: session.as_ref().map_or(0, |s| s.round),
                        reason: format!("the server rejected our message: {reason}"),
                    });
                }
                Down::Finished { rounds, reason } => {
                    let _ = send.finish();
                    conn.close(0u32.into(), b"finished");
                    return Ended::Finished { rounds, reason };
                }
                Down::Welcome { .. } => return broken("a second Welcome"),
                Down::Bundle { .. } => return broken("a bundle offer after Welcome"),
            }
        }
    }

    /// Sends a SecAgg+ message of `round` (what an installed adversary
    /// makes of it).
    async fn send_secagg(
        &mut self,
        send: &mut quinn::SendStream,
        round: u64,
        msg: ClientMessage,
    ) -> Result<(), NetError> {
        for m in self.setup.hooks.outgoing(round, msg) {
            send_secagg(send, m).await?;
        }
        Ok(())
    }

    /// Tells the server this client sits `round` out, and why.
    async fn decline(
        &mut self,
        send: &mut quinn::SendStream,
        round: u64,
        reason: String,
    ) -> Result<(), NetError> {
        tracing::warn!(round, "declined the round: {reason}");
        self.events.emit(ClientEvent::Refused {
            round,
            reason: reason.clone(),
        });
        write_frame(send, &Up::Decline { round, reason }, MAX_UP_FRAME)
            .await
            .map(drop)
    }

    /// The fault to inject at `stage` of `round`. Each fires once: a
    /// repeated session of the same round (after an abort or a server
    /// restart) runs without it.
    fn fault(&mut self, round: u64, stage: Stage) -> Option<Fault> {
        let i = self
            .setup
            .faults
            .iter()
            .position(|f| f.at() == (round, stage))?;
        let f = self.setup.faults.remove(i);
        tracing::info!(round, %stage, "injecting {f:?}");
        self.events.emit(ClientEvent::Fault { round, stage });
        Some(f)
    }

    fn trainer_dim(&self) -> usize {
        self.trainer.as_ref().map_or(0, |t| t.dim())
    }

    /// Answers the server's bundle offer (protocols/federation.md §3.4):
    /// the bundle the trainer already holds, or one cached on disk, is
    /// not fetched again; a fetched one must match its hash before it is
    /// cached and installed.
    async fn receive_bundle(
        &mut self,
        hash: [u8; 32],
        bytes: u64,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), Ended> {
        let wants = self.trainer.as_ref().is_some_and(|t| t.wants_bundle());
        let reply = |fetch: bool| Up::BundleReply { hash, fetch };
        if !wants || self.bundle == Some(hash) {
            return write_frame(send, &reply(false), MAX_UP_FRAME)
                .await
                .map(|_| ())
                .map_err(broken);
        }
        let max = self.setup.max_bundle_bytes;
        if bytes > max {
            let _ = write_frame(send, &reply(false), MAX_UP_FRAME).await;
            return Err(Ended::Refused(format!(
                "the server's bundle has {bytes} bytes, more than this client's limit of {max}"
            )));
        }
        let cached = self
            .setup
            .bundle_cache
            .as_deref()
            .map(|d| cache_path(d, &hash));
        let from_disk = match cached.clone() {
            Some(path) => tokio::task::spawn_blocking(move || {
                std::fs::read(&path)
                    .ok()
                    .filter(|b| wire::bundle_hash(b) == hash)
            })
            .await
            .ok()
            .flatten(),
            None => None,
        };
        let fetch = from_disk.is_none();
        write_frame(send, &reply(fetch), MAX_UP_FRAME)
            .await
            .map_err(broken)?;
        let data = match from_disk {
            Some(d) => d,
            None => {
                let len = usize::try_from(bytes)
                    .map_err(|_| Ended::Refused(format!("a {bytes}-byte bundle")))?;
                let blob = read_blob(recv, len)
                    .await
                    .map_err(|e| broken(format!("the bundle: {e}")))?;
                if blob.len() as u64 != bytes || wire::bundle_hash(&blob) != hash {
                    return Err(broken("the bundle does not match its announced hash"));
                }
                blob
            }
        };
        let mut trainer = self
            .trainer
            .take()
            .ok_or_else(|| broken("the trainer is busy"))?;
        let (trainer, installed) = tokio::task::spawn_blocking(move || {
            if fetch
                && let Some(path) = cached
                && let Err(e) = fedveil_net::files::write_atomically(
                    &path,
                    &data,
                    fedveil_net::files::Access::Default,
                )
            {
                tracing::warn!("could not cache the bundle at {}: {e}", path.display());
            }
            let r = trainer.install_bundle(&data);
            (trainer, r)
        })
        .await
        .map_err(|e| broken(format!("installing the bundle: {e}")))?;
        self.trainer = Some(trainer);
        installed.map_err(|e| Ended::Refused(format!("the server's bundle: {e}")))?;
        self.bundle = Some(hash);
        tracing::info!(bytes, fetched = fetch, "installed the server's bundle");
        self.events.emit(ClientEvent::Bundle {
            hash,
            bytes,
            fetched: if fetch { bytes } else { 0 },
        });
        Ok(())
    }
}

/// Where a bundle with `hash` is cached in `dir`.
fn cache_path(dir: &Path, hash: &[u8; 32]) -> PathBuf {
    dir.join(format!("{}.bundle", hex::encode(hash)))
}

/// Local training from `params` with the round's training generator
/// for (round, attempt, party).
fn train_locally(
    trainer: &mut dyn Trainer,
    randomness: &Randomness,
    params: &[f32],
    training: &crate::trainer::TrainingConfig,
    (round, attempt, who): (u64, u32, u32),
) -> Result<crate::trainer::LocalUpdate, String> {
    let mut rng = randomness
        .rng(Purpose::Training, round, attempt, who)
        .map_err(|e| e.to_string())?;
    trainer
        .train(params, training, &mut rng)
        .map_err(|e| e.to_string())
}

/// Sends a SecAgg+ message; the masked input as a frame and a blob.
async fn send_secagg(send: &mut quinn::SendStream, msg: ClientMessage) -> Result<(), NetError> {
    match msg {
        ClientMessage::MaskedInput(m) => {
            let head = Up::Masked {
                session: m.session,
                bits: m.masked.bits,
                len: m.masked.len,
                bad_envelopes: m.bad_envelopes,
            };
            write_frame(send, &head, MAX_UP_FRAME).await?;
            write_blob(send, &m.masked.data, m.masked.data.len()).await
        }
        other => write_frame(send, &Up::Secagg(other), MAX_UP_FRAME)
            .await
            .map(|_| ()),
    }
}

impl Runner {
    /// Checks a round, trains, encodes and answers its `Setup`.
    /// Checks the round like [`Self::join`], trains, and returns the raw
    /// update to send in an unprotected round.
    async fn contribute_unprotected(
        &mut self,
        federation: [u8; 32],
        spec: RoundSpec,
        blob: Vec<u8>,
    ) -> Result<(Up, Vec<u8>), String> {
        let (round, attempt) = (spec.round, spec.attempt);
        let (params, _) = self.check_round(federation, &spec, &blob)?;
        let mut trainer = self.trainer.take().ok_or("the trainer is busy")?;
        let randomness = self.setup.randomness.clone();
        let training = spec.training.clone();
        let who = self.id.map_or(0, |c| c.0);
        let (trainer, result) = tokio::task::spawn_blocking(move || {
            let r = train_locally(
                trainer.as_mut(),
                &randomness,
                &params,
                &training,
                (round, attempt, who),
            );
            (trainer, r)
        })
        .await
        .map_err(|e| format!("the training task failed: {e}"))?;
        self.trainer = Some(trainer);
        let u = result?;
        self.events.emit(ClientEvent::Trained {
            round,
            loss: u.loss,
            samples: u.samples,
        });
        let head = Up::Update {
            round,
            attempt,
            samples: u.samples,
        };
        Ok((head, wire::params_to_blob(&u.delta)))
    }

    /// The checks every round passes before training: the federation, the
    /// parameters' hash and size, the client's policy. Returns the
    /// parameters and what the round costs this client (`ρ`, with
    /// differential privacy).
    fn check_round(
        &self,
        federation: [u8; 32],
        spec: &RoundSpec,
        blob: &[u8],
    ) -> Result<(Vec<f32>, Option<Cost>), String> {
        if spec.federation != federation {
            return Err("the round belongs to another federation".into());
        }
        if self.trainer.as_ref().is_some_and(|t| t.wants_bundle()) && spec.bundle != self.bundle {
            return Err(
                "the round's bundle hash is not that of the bundle this client holds".into(),
            );
        }
        let hash = wire::params_hash(blob);
        if hash != spec.params_hash {
            return Err("the parameters do not match their announced hash".into());
        }
        let dim = self.trainer_dim();
        let params = wire::blob_to_params(blob, dim)
            .filter(|_| spec.dim == dim as u64)
            .ok_or_else(|| {
                format!(
                    "the model has {} parameters, this client's task {dim}",
                    spec.dim
                )
            })?;
        let cost = check_policy(&self.setup.policy, spec)?;
        Ok((params, cost))
    }

    /// Opens this client's ledger of `federation` (from its directory, if
    /// it has one), unless it is the one already open.
    fn open_ledger(&mut self, federation: &[u8; 32]) -> Result<(), FedError> {
        if self.ledger.as_ref().is_some_and(|l| l.is_for(federation)) {
            return Ok(());
        }
        self.ledger = Some(match &self.setup.ledger_dir {
            Some(dir) => ClientLedger::load(dir, federation)?,
            None => ClientLedger::new(federation),
        });
        Ok(())
    }

    /// The client's own ledger against a round costing `cost`: a session it
    /// already revealed its input in is not run again, and no session may
    /// take it past its budget.
    fn check_ledger(&self, spec: &RoundSpec, cost: Cost) -> Result<(), String> {
        let ledger = self.ledger.as_ref().ok_or("no privacy ledger is open")?;
        if ledger.charged(spec.round, spec.attempt) {
            return Err(format!(
                "this client already revealed its input in session {} of round {}; \
                 a repeated session would average away its noise",
                spec.attempt + 1,
                spec.round
            ));
        }
        let policy = &self.setup.policy;
        if let Some(budget) = policy.epsilon_budget {
            let (spent, after) = self.spent(Some(cost)).map_err(|e| e.to_string())?;
            if after > budget {
                return Err(format!(
                    "this client has spent ε = {spent:.4} in this federation; the round could \
                     take it to {after:.4}, past its budget of {budget}"
                ));
            }
        }
        Ok(())
    }

    /// This client's ε so far and after `cost` more, at its policy's δ
    /// (record-level by its policy's accountant).
    fn spent(&self, cost: Option<Cost>) -> Result<(f64, f64), FedError> {
        let ledger = self
            .ledger
            .as_ref()
            .ok_or_else(|| FedError::Internal("no privacy ledger is open".into()))?;
        let policy = &self.setup.policy;
        let record = |extra: Option<&RecordSteps>| {
            ledger.record_epsilon(extra, policy.delta, policy.accountant)
        };
        match cost {
            Some(Cost::Record(steps)) => Ok((record(None)?, record(Some(&steps))?)),
            Some(Cost::Zcdp(rho)) => Ok((
                ledger.epsilon(policy.delta)?,
                ledger.epsilon_after(rho, policy.delta)?,
            )),
            None if !ledger.record.is_empty() => {
                let e = record(None)?;
                Ok((e, e))
            }
            None => {
                let e = ledger.epsilon(policy.delta)?;
                Ok((e, e))
            }
        }
    }

    /// Charges a revealed session to the ledger and saves it; with
    /// record-level DP, reports the ε this client has now spent to the
    /// server (protocols/federation.md §5.3).
    async fn charge(
        &mut self,
        round: u64,
        attempt: u32,
        cost: Cost,
        send: &mut quinn::SendStream,
    ) -> Result<(), String> {
        let mut ledger = self.ledger.take().ok_or("no privacy ledger is open")?;
        match &cost {
            Cost::Zcdp(rho) => ledger.charge(round, attempt, *rho),
            Cost::Record(steps) => ledger.charge_record(round, attempt, steps),
        }
        let dir = self.setup.ledger_dir.clone();
        let (ledger, saved) = tokio::task::spawn_blocking(move || {
            let r = dir.as_deref().map_or(Ok(()), |d| ledger.save(d));
            (ledger, r)
        })
        .await
        .map_err(|e| format!("saving the privacy ledger: {e}"))?;
        self.ledger = Some(ledger);
        saved.map_err(|e| format!("saving the privacy ledger: {e}"))?;
        let (epsilon, _) = self.spent(None).map_err(|e| e.to_string())?;
        self.events.emit(ClientEvent::Charged {
            round,
            attempt,
            epsilon,
        });
        if matches!(cost, Cost::Record(_)) {
            let spent = Up::Spent {
                round,
                attempt,
                epsilon,
            };
            write_frame(send, &spent, MAX_UP_FRAME)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn join(
        &mut self,
        id: ClientId,
        federation: [u8; 32],
        spec: RoundSpec,
        blob: Vec<u8>,
    ) -> Result<(Session, ClientMessage), String> {
        let round = spec.round;
        let (params, cost) = self.check_round(federation, &spec, &blob)?;
        if let Some(cost) = cost {
            self.check_ledger(&spec, cost)?;
        }
        // The commitment is computed from what this client received.
        let hash = wire::params_hash(&blob);
        let context = spec.context(&hash).map_err(|e| e.to_string())?;

        let mut trainer = self.trainer.take().ok_or("the trainer is busy")?;
        let randomness = self.setup.randomness.clone();
        let training = spec.training.clone();
        let encoding_spec = spec.encoding.clone();
        let who = id.0;
        let attempt = spec.attempt;
        let work = tokio::task::spawn_blocking(move || {
            let result = train_locally(
                trainer.as_mut(),
                &randomness,
                &params,
                &training,
                (round, attempt, who),
            )
            .and_then(|u| {
                // The task must have trained exactly as the round's
                // record-level DP says, or nothing leaves this client.
                if let Some(Cost::Record(expected)) = cost
                    && u.record_steps != Some(expected)
                {
                    return Err(format!(
                        "the round asks for record-level DP-SGD ({expected:?}), and the task \
                         trained with {:?}; nothing is sent",
                        u.record_steps
                    ));
                }
                let mut prng = randomness
                    .rng(Purpose::Privacy, round, attempt, who)
                    .map_err(|e| e.to_string())?;
                let encoded =
                    encoding::encode(&encoding_spec, &u, &mut prng).map_err(|e| e.to_string())?;
                Ok((u.loss, u.samples, encoded, prng))
            });
            (trainer, result)
        })
        .await
        .map_err(|e| format!("the training task failed: {e}"))?;
        let (trainer, result) = work;
        self.trainer = Some(trainer);
        let (loss, samples, mut encoded, mut rng) = result?;
        self.events.emit(ClientEvent::Trained {
            round,
            loss,
            samples,
        });
        if self.setup.hooks.record_inputs() && self.events.active() {
            self.events.emit(ClientEvent::Input {
                client: id,
                round,
                ring: Arc::new(encoded.ring.clone()),
            });
        }
        let identity = IdentityKeypair::from_secret_bytes(&self.setup.identity.seed());
        let mut client =
            SecaggClient::new(id, identity, context, std::mem::take(&mut encoded.ring));
        let first = client
            .handle(ServerMessage::Setup(spec.session), &mut rng)
            .map_err(|e| e.to_string())?
            .ok_or("the session's Setup produced no keys")?;
        Ok((
            Session {
                round,
                attempt,
                cost,
                client,
                rng,
            },
            first,
        ))
    }
}

/// The client's policy against the round (protocols/federation.md §4.4).
/// With differential privacy, returns what revealing this client's input in
/// the round costs it: `ρ` computed from everything the server sent, at the
/// session's survivor floor (the protocol never unmasks with fewer).
fn check_policy(policy: &Policy, spec: &RoundSpec) -> Result<Option<Cost>, String> {
    let no_dp = "the round has no differential privacy, and this client's policy requires it";
    if let Some(dp) = &spec.training.record_dp {
        if !matches!(spec.encoding, Encoding::Plain { .. }) {
            return Err(
                "the round asks for record-level DP-SGD together with another encoding than \
                 secure aggregation's plain sum, which fedveil does not run"
                    .into(),
            );
        }
        return check_record_policy(policy, spec, dp).map(|steps| Some(Cost::Record(steps)));
    }
    let rho = match &spec.encoding {
        Encoding::Unprotected => {
            if !policy.allow_unprotected {
                return Err(
                    "the round is unprotected (raw updates to the server, no secure \
                     aggregation), which this client's policy refuses"
                        .into(),
                );
            }
            if policy.require_dp {
                return Err(no_dp.into());
            }
            return Ok(None);
        }
        Encoding::Plain { .. } => {
            if policy.require_dp {
                return Err(no_dp.into());
            }
            if policy.max_round_epsilon.is_some() || policy.epsilon_budget.is_some() {
                return Err(
                    "the round has no differential privacy (ε = ∞), and this client's policy \
                     limits ε"
                        .into(),
                );
            }
            None
        }
        Encoding::Private { noise, .. } => {
            if policy
                .refuse_placements
                .contains(&PlacementName::from(noise.placement))
            {
                return Err(format!(
                    "the round uses {} noise, which this client's policy refuses",
                    noise.placement.name()
                ));
            }
            check_knobs(policy, noise.noise_multiplier, noise.clip)?;
            if noise.min_survivors != spec.session.min_survivors {
                return Err(format!(
                    "the noise assumes {} survivors, the session's floor is {}",
                    noise.min_survivors, spec.session.min_survivors
                ));
            }
            if noise.bits != spec.session.bits || noise.dim as u64 != spec.dim {
                return Err(format!(
                    "the noise is set for {} values in a {}-bit ring, the round has {} in {} bits",
                    noise.dim, noise.bits, spec.dim, spec.session.bits
                ));
            }
            let rho = fedveil_dp::zcdp::round_rho(noise, spec.session.min_survivors)
                .map_err(|e| format!("the round's noise: {e}"))?;
            if let Some(max) = policy.max_round_epsilon {
                let eps = fedveil_dp::zcdp::epsilon(rho, policy.delta)
                    .map_err(|e| format!("the round's ε: {e}"))?;
                if eps > max {
                    return Err(format!(
                        "the round costs this client ε = {eps:.4} at δ = {} (noise multiplier {}, \
                         clip {}, granularity {}, {} survivors), above its per-round limit of {max}",
                        policy.delta,
                        noise.noise_multiplier,
                        noise.clip,
                        noise.granularity,
                        noise.min_survivors
                    ));
                }
            }
            Some(rho)
        }
    };
    check_session_policy(policy, spec)?;
    Ok(rho.map(Cost::Zcdp))
}

/// The policy against a round with record-level DP-SGD: its noise
/// multiplier, clip norm and one round's ε (`local_steps` steps at its
/// sampling rate, by the policy's accountant). Returns the steps to charge.
fn check_record_policy(
    policy: &Policy,
    spec: &RoundSpec,
    dp: &crate::trainer::RecordDp,
) -> Result<RecordSteps, String> {
    check_knobs(policy, dp.noise_multiplier, dp.clip)?;
    let steps = RecordSteps {
        noise_multiplier: dp.noise_multiplier,
        sampling_rate: dp.sampling_rate,
        steps: u64::from(spec.training.local_steps),
    };
    if let Some(max) = policy.max_round_epsilon {
        let eps = fedveil_dp::SubsampledGaussian {
            noise_multiplier: steps.noise_multiplier,
            sampling_rate: steps.sampling_rate,
            steps: steps.steps,
        }
        .epsilon(policy.delta, policy.accountant)
        .map_err(|e| format!("the round's ε: {e}"))?;
        if eps > max {
            return Err(format!(
                "the round costs each of this client's records ε = {eps:.4} at δ = {} ({} DP-SGD \
                 steps, noise multiplier {}, sampling rate {}), above its per-round limit of {max}",
                policy.delta, steps.steps, steps.noise_multiplier, steps.sampling_rate
            ));
        }
    }
    check_session_policy(policy, spec)?;
    Ok(steps)
}

/// The policy's floor on the noise multiplier and ceiling on the clip norm
/// (of the update, or with record-level DP of each record).
fn check_knobs(policy: &Policy, noise_multiplier: f64, clip: f64) -> Result<(), String> {
    if noise_multiplier < policy.min_noise_multiplier {
        return Err(if noise_multiplier == 0.0 {
            "the round adds no noise (noise multiplier 0), which this client's policy \
             refuses unless it sets min_noise_multiplier = 0"
                .to_string()
        } else {
            format!(
                "the noise multiplier {noise_multiplier} is below this client's minimum {}",
                policy.min_noise_multiplier
            )
        });
    }
    if let Some(c) = policy.max_clip
        && clip > c
    {
        return Err(format!(
            "the clip norm {clip} exceeds this client's maximum {c}"
        ));
    }
    Ok(())
}

/// The policy's limits on the secure-aggregation session itself.
fn check_session_policy(policy: &Policy, spec: &RoundSpec) -> Result<(), String> {
    let s = &spec.session;
    if s.min_survivors < policy.min_survivors {
        return Err(format!(
            "the session's survivor floor {} is below this client's minimum {}",
            s.min_survivors, policy.min_survivors
        ));
    }
    let k = s.effective_degree();
    if k < policy.min_degree {
        return Err(format!(
            "the session gives each client {k} neighbours, below this client's minimum {}",
            policy.min_degree
        ));
    }
    if s.threshold < policy.min_threshold {
        return Err(format!(
            "the session's threshold {} is below this client's minimum {}",
            s.threshold, policy.min_threshold
        ));
    }
    Ok(())
}
