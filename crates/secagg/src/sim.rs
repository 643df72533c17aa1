//! An in-memory federation: one [`Server`] and its [`Client`]s exchanging
//! encoded messages, with injected dropouts and a simulated clock.
//!
//! [`Cohort`] is the driver. Every message goes through the wire encoding
//! ([`crate::messages::encode`]), so byte counts are real and the decoders are
//! exercised. Clients handle their messages in parallel (rayon) when the
//! `parallel` feature is on; the server runs on the driving thread, as it
//! would behind a network. Tests use the cohort to play a malicious server
//! (take the server's messages, edit them, deliver them), benches to time a
//! single stage, and [`run`] to simulate a whole round of float vectors and
//! check the result independently.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRngCore, RngCore, SeedableRng};
use serde::Serialize;
use thiserror::Error;

use crate::codec::{CodecError, FloatCodec};
use crate::crypto::identity::IdentityKeypair;
use crate::crypto::prg::{MaskStream, Sign};
use crate::messages::{self, ClientMessage, ServerMessage};
use crate::params::RosterEntry;
use crate::server::{Aggregate, StageDeadlines};
use crate::{
    AbortReason, Client, ClientError, ClientId, PROTOCOL_VERSION, ParamsError, Rejected, Server,
    SessionParams, Stage,
};

/// Something that stops a simulation from running at all.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SimError {
    #[error("invalid session: {0}")]
    Params(#[from] ParamsError),
    #[error("invalid codec: {0}")]
    Codec(#[from] CodecError),
    #[error("wire encoding failed: {0}")]
    Wire(String),
    #[error("the clients must be given in roster order; {0} is out of place")]
    ClientOrder(ClientId),
    #[error("the session ended before {0}")]
    EndedBefore(Stage),
    #[error("the session did not finish after {0} steps")]
    Stuck(usize),
}

/// Time and traffic of one stage.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageReport {
    pub stage: String,
    /// Wall-clock time of the stage (clients in parallel, then the server).
    pub wall_s: f64,
    /// Client compute summed over all clients.
    pub clients_total_s: f64,
    /// The slowest single client.
    pub client_max_s: f64,
    /// Server compute: handling the messages, closing the stage, encoding
    /// the next requests.
    pub server_s: f64,
    /// Bytes from clients to the server.
    pub up_bytes: u64,
    /// Bytes from the server to clients.
    pub down_bytes: u64,
}

/// One client in a cohort: its state machine, its RNG, its traffic.
struct Member {
    client: Client,
    rng: ChaCha20Rng,
    up: u64,
    down: u64,
}

/// One client's turn in a batch: replies, refusals and busy time.
type Turn = (Vec<Vec<u8>>, Vec<ClientError>, f64);

/// An encoded server message: recipient, whether it is an `Abort`, bytes.
type Outgoing = (ClientId, bool, Vec<u8>);

fn encode_outgoing(to: ClientId, m: &ServerMessage) -> Result<Outgoing, SimError> {
    let abort = matches!(m, ServerMessage::Abort { .. });
    messages::encode(m)
        .map(|b| (to, abort, b))
        .map_err(|e| SimError::Wire(e.0))
}

/// Clients handled per batch: bounds the replies held at once (64 masked
/// vectors of 400 KB at d = 10^5) and lets freed buffers be reused.
const BATCH: usize = 64;

/// A server and its clients, driven in memory.
pub struct Cohort {
    pub params: SessionParams,
    pub server: Server,
    members: Vec<Member>,
    /// The simulated clock.
    pub now: Duration,
    /// Clients to silence when they are asked for the given stage's message.
    pub drop_plan: BTreeMap<Stage, BTreeSet<ClientId>>,
    drop_counts: BTreeMap<Stage, u32>,
    victims: ChaCha20Rng,
    dead: BTreeMap<ClientId, Stage>,
    /// What clients refused (none in an honest run).
    pub refusals: Vec<(ClientId, ClientError)>,
    /// What the server rejected (none in an honest run).
    pub rejections: Vec<Rejected>,
    /// Every message a client sent, when logging is on.
    pub log: Vec<(ClientId, ClientMessage)>,
    logging: bool,
    stats: BTreeMap<Stage, StageReport>,
    server_sent: u64,
    server_received: u64,
}

impl std::fmt::Debug for Cohort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cohort")
            .field("server", &self.server)
            .field("clients", &self.members.len())
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

impl Cohort {
    /// A cohort for `params` with `clients` in roster order, each with the
    /// seed of its own RNG.
    pub fn new(
        params: SessionParams,
        clients: Vec<(Client, [u8; 32])>,
        deadlines: StageDeadlines,
    ) -> Result<Cohort, SimError> {
        let server = Server::new(params.clone(), deadlines)?;
        let mut members = Vec::with_capacity(clients.len());
        for ((client, seed), entry) in clients.into_iter().zip(&params.roster) {
            if client.id() != entry.id {
                return Err(SimError::ClientOrder(client.id()));
            }
            members.push(Member {
                client,
                rng: ChaCha20Rng::from_seed(seed),
                up: 0,
                down: 0,
            });
        }
        if members.len() != params.roster.len() {
            return Err(SimError::ClientOrder(ClientId(members.len() as u32)));
        }
        Ok(Cohort {
            params,
            server,
            members,
            now: Duration::ZERO,
            drop_plan: BTreeMap::new(),
            drop_counts: BTreeMap::new(),
            victims: ChaCha20Rng::from_seed([0; 32]),
            dead: BTreeMap::new(),
            refusals: Vec::new(),
            rejections: Vec::new(),
            log: Vec::new(),
            logging: false,
            stats: BTreeMap::new(),
            server_sent: 0,
            server_received: 0,
        })
    }

    /// At each listed stage, silence that many of the clients asked for it,
    /// chosen with a ChaCha20 stream from `seed`.
    pub fn drop_random(&mut self, drops: &[(Stage, u32)], seed: [u8; 32]) {
        for (s, c) in drops {
            *self.drop_counts.entry(*s).or_default() += c;
        }
        self.victims = ChaCha20Rng::from_seed(seed);
    }

    /// Keeps a copy of every client message in [`Cohort::log`].
    pub fn enable_log(&mut self) {
        self.logging = true;
    }

    /// The client with id `id`.
    pub fn client(&self, id: ClientId) -> Option<&Client> {
        let i = self.params.index_of(id)?;
        self.members.get(i).map(|m| &m.client)
    }

    /// All clients, in roster order.
    pub fn clients(&self) -> impl Iterator<Item = &Client> {
        self.members.iter().map(|m| &m.client)
    }

    /// Clients the drop plan silenced, with the stage.
    pub fn dead(&self) -> &BTreeMap<ClientId, Stage> {
        &self.dead
    }

    /// Per-stage time and traffic so far.
    pub fn stage_reports(&self) -> Vec<StageReport> {
        Stage::ALL
            .iter()
            .map(|s| {
                let mut r = self.stats.get(s).cloned().unwrap_or_default();
                r.stage = s.cli_name().to_string();
                r
            })
            .collect()
    }

    /// Per-client bytes sent and received, in roster order.
    pub fn client_bytes(&self) -> Vec<(u64, u64)> {
        self.members.iter().map(|m| (m.up, m.down)).collect()
    }

    /// Bytes the server sent and received.
    pub fn server_bytes(&self) -> (u64, u64) {
        (self.server_sent, self.server_received)
    }

    fn stat(&mut self, s: Stage) -> &mut StageReport {
        self.stats.entry(s).or_default()
    }

    /// Opens the session.
    pub fn start(&mut self) {
        let t = Instant::now();
        self.server.start(self.now);
        let s = t.elapsed().as_secs_f64();
        self.stat(Stage::AdvertiseKeys).server_s += s;
        self.stat(Stage::AdvertiseKeys).wall_s += s;
    }

    /// The server's pending messages, after a trip through the wire encoding.
    pub fn take_outbox(&mut self) -> Result<Vec<(ClientId, ServerMessage)>, SimError> {
        self.take_encoded()?
            .into_iter()
            .map(|(to, _, bytes)| {
                messages::decode(&bytes)
                    .map(|m| (to, m))
                    .map_err(|e| SimError::Wire(e.0))
            })
            .collect()
    }

    fn take_encoded(&mut self) -> Result<Vec<Outgoing>, SimError> {
        let stage = self.server.stage().unwrap_or(Stage::Unmasking);
        let t = Instant::now();
        let out: Vec<Outgoing> = self
            .server
            .drain_transmits()
            .iter()
            .map(|(to, m)| encode_outgoing(*to, m))
            .collect::<Result<_, _>>()?;
        let bytes: u64 = out.iter().map(|(_, _, b)| b.len() as u64).sum();
        let s = t.elapsed().as_secs_f64();
        let st = self.stat(stage);
        st.server_s += s;
        st.wall_s += s;
        st.down_bytes += bytes;
        self.server_sent += bytes;
        Ok(out)
    }

    /// Hands `msg` to client `to` and returns its answer as the client made
    /// it. Nothing reaches the server.
    pub fn handle(
        &mut self,
        to: ClientId,
        msg: ServerMessage,
    ) -> Result<Option<ClientMessage>, ClientError> {
        let Some(m) = self
            .params
            .index_of(to)
            .and_then(|i| self.members.get_mut(i))
        else {
            return Err(ClientError::NotInRoster { client: to });
        };
        m.client.handle(msg, &mut m.rng)
    }

    /// Like [`Cohort::handle`], with the answer passed through the wire
    /// encoding.
    pub fn deliver(
        &mut self,
        to: ClientId,
        msg: ServerMessage,
    ) -> Result<Option<ClientMessage>, ClientError> {
        let out = self.handle(to, msg)?;
        out.map(|r| {
            messages::encode(&r)
                .and_then(|b| messages::decode(&b))
                .map_err(|_| ClientError::Crypto("wire round trip"))
        })
        .transpose()
    }

    /// Delivers `batch` to the live clients (applying the drop plan), in
    /// parallel, and feeds their answers to the server.
    pub fn exchange(&mut self, batch: Vec<(ClientId, ServerMessage)>) -> Result<(), SimError> {
        let encoded = batch
            .iter()
            .map(|(to, m)| encode_outgoing(*to, m))
            .collect::<Result<Vec<_>, _>>()?;
        self.exchange_encoded(encoded);
        Ok(())
    }

    fn exchange_encoded(&mut self, batch: Vec<Outgoing>) {
        let stage = self.server.stage().unwrap_or(Stage::Unmasking);
        let n = self.members.len();
        let mut inbox: Vec<Vec<Vec<u8>>> = (0..n).map(|_| Vec::new()).collect();
        let mut asked = Vec::new();
        for (to, abort, bytes) in batch {
            let Some(i) = self.params.index_of(to) else {
                continue;
            };
            self.members[i].down += bytes.len() as u64;
            if self.dead.contains_key(&to) {
                continue;
            }
            if !abort {
                if self.drop_plan.get(&stage).is_some_and(|d| d.contains(&to)) {
                    self.dead.insert(to, stage);
                    continue;
                }
                asked.push(i);
            }
            inbox[i].push(bytes);
        }
        // Random dropouts: some of the clients asked for this stage go silent.
        if let Some(count) = self.drop_counts.remove(&stage) {
            let count = (count as usize).min(asked.len());
            for k in 0..count {
                let span = (asked.len() - k) as u64;
                let j = k + (self.victims.next_u64() % span) as usize;
                asked.swap(k, j);
                let i = asked[k];
                self.dead.insert(self.members[i].client.id(), stage);
                inbox[i].clear();
            }
        }
        for start in (0..n).step_by(BATCH) {
            let end = (start + BATCH).min(n);
            if inbox[start..end].iter().all(Vec::is_empty) {
                continue;
            }
            let t = Instant::now();
            let work: Vec<(&mut Member, Vec<Vec<u8>>)> = self.members[start..end]
                .iter_mut()
                .zip(inbox[start..end].iter_mut().map(std::mem::take))
                .filter(|(_, msgs)| !msgs.is_empty())
                .collect();
            let turns: Vec<(ClientId, Turn)> = par_map_mut(work, |(m, msgs)| {
                let t = Instant::now();
                let mut replies = Vec::new();
                let mut errors = Vec::new();
                for bytes in msgs {
                    let reply = messages::decode::<ServerMessage>(&bytes)
                        .map_err(|e| ClientError::Malformed {
                            stage,
                            reason: e.to_string(),
                        })
                        .and_then(|msg| m.client.handle(msg, &mut m.rng));
                    match reply {
                        Ok(Some(r)) => match messages::encode(&r) {
                            Ok(b) => replies.push(b),
                            Err(_) => errors.push(ClientError::Crypto("encoding a reply")),
                        },
                        Ok(None) => {}
                        Err(e) => errors.push(e),
                    }
                }
                m.up += replies.iter().map(|r| r.len() as u64).sum::<u64>();
                (m.client.id(), (replies, errors, t.elapsed().as_secs_f64()))
            });
            let clients_wall = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for (from, (replies, errors, busy)) in turns {
                let st = self.stat(stage);
                st.clients_total_s += busy;
                st.client_max_s = st.client_max_s.max(busy);
                self.refusals.extend(errors.into_iter().map(|e| (from, e)));
                for bytes in replies {
                    self.server_received += bytes.len() as u64;
                    self.stat(stage).up_bytes += bytes.len() as u64;
                    match messages::decode::<ClientMessage>(&bytes) {
                        Ok(msg) => {
                            if self.logging {
                                self.log.push((from, msg.clone()));
                            }
                            if let Err(e) = self.server.handle_message(self.now, from, msg) {
                                self.rejections.push(e);
                            }
                        }
                        Err(e) => self.rejections.push(Rejected::Malformed {
                            client: from,
                            stage,
                            reason: e.to_string(),
                        }),
                    }
                }
            }
            let server_s = t.elapsed().as_secs_f64();
            let st = self.stat(stage);
            st.server_s += server_s;
            st.wall_s += clients_wall + server_s;
        }
    }

    /// One step: delivers the server's pending messages, or lets the
    /// deadline pass if there are none. False once the session is over (its
    /// last messages, such as aborts, delivered).
    pub fn step(&mut self) -> Result<bool, SimError> {
        let over = self.server.outcome().is_some();
        let out = self.take_encoded()?;
        if over {
            self.exchange_encoded(out);
            return Ok(false);
        }
        if out.is_empty() {
            let stage = self.server.stage().unwrap_or(Stage::Unmasking);
            let t = Instant::now();
            self.now = self.server.poll_timeout().unwrap_or(self.now);
            self.server.handle_timeout(self.now);
            let s = t.elapsed().as_secs_f64();
            let st = self.stat(stage);
            st.server_s += s;
            st.wall_s += s;
        } else {
            self.exchange_encoded(out);
        }
        Ok(true)
    }

    /// Runs the session to its outcome.
    pub fn run(&mut self) -> Result<Result<Aggregate, AbortReason>, SimError> {
        if self.server.stage().is_none() && self.server.outcome().is_none() {
            self.start();
        }
        // Five stages, each at most a delivery and a timeout, plus the aborts.
        const MAX_STEPS: usize = 64;
        for _ in 0..MAX_STEPS {
            if !self.step()? {
                return self.server.take_outcome().ok_or(SimError::Stuck(MAX_STEPS));
            }
        }
        Err(SimError::Stuck(MAX_STEPS))
    }

    /// Runs honestly until the server has just sent the requests of `stage`,
    /// and returns them undelivered.
    pub fn run_until(&mut self, stage: Stage) -> Result<Vec<(ClientId, ServerMessage)>, SimError> {
        if self.server.stage().is_none() && self.server.outcome().is_none() {
            self.start();
        }
        for _ in 0..64 {
            if self.server.stage() == Some(stage) {
                return self.take_outbox();
            }
            if !self.step()? {
                return Err(SimError::EndedBefore(stage));
            }
        }
        Err(SimError::Stuck(64))
    }
}

/// The roster of clients `0..n` with the given identities.
fn roster(identities: &[IdentityKeypair]) -> Vec<RosterEntry> {
    identities
        .iter()
        .enumerate()
        .map(|(i, k)| RosterEntry {
            id: ClientId(i as u32),
            identity: k.public(),
        })
        .collect()
}

/// A cohort of clients `0..clients` holding uniform random vectors in
/// `Z_{2^bits}`, everything derived from `seed` (for tests and benches).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CohortSpec {
    pub clients: u32,
    pub degree: u32,
    pub threshold: u32,
    pub dim: u32,
    pub bits: u8,
    pub seed: u64,
    /// The context (model hash) the session names.
    pub context: [u8; 32],
    /// The session's floor on survivors (1: none).
    pub min_survivors: u32,
}

impl CohortSpec {
    /// Builds the cohort with uniform random inputs and returns it with
    /// them. A client holds the session's context unless `context_of` gives
    /// it another.
    pub fn build(
        &self,
        context_of: impl Fn(ClientId) -> Option<[u8; 32]>,
    ) -> Result<(Cohort, Vec<Vec<u32>>), SimError> {
        // Inputs come from their own ChaCha stream of the seed; identities and
        // keys from stream 0 (in `build_with_inputs`).
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed);
        rng.set_stream(1);
        let mask = crate::ring::modulus_mask(self.bits);
        let inputs: Vec<Vec<u32>> = (0..self.clients)
            .map(|_| (0..self.dim).map(|_| rng.next_u32() & mask).collect())
            .collect();
        let cohort = self.build_with_inputs(inputs.clone(), context_of)?;
        Ok((cohort, inputs))
    }

    /// Builds the cohort with the given inputs, one per client in id order
    /// (each of length `dim`, elements of `Z_{2^bits}`).
    pub fn build_with_inputs(
        &self,
        inputs: Vec<Vec<u32>>,
        context_of: impl Fn(ClientId) -> Option<[u8; 32]>,
    ) -> Result<Cohort, SimError> {
        if inputs.len() != self.clients as usize {
            return Err(SimError::ClientOrder(ClientId(inputs.len() as u32)));
        }
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed);
        let identities: Vec<IdentityKeypair> = (0..self.clients)
            .map(|_| IdentityKeypair::generate(&mut rng))
            .collect();
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let params = SessionParams {
            version: PROTOCOL_VERSION,
            nonce,
            round: 0,
            context: self.context,
            dim: self.dim,
            bits: self.bits,
            degree: self.degree,
            threshold: self.threshold,
            min_survivors: self.min_survivors,
            roster: roster(&identities),
        };
        let mut clients = Vec::with_capacity(inputs.len());
        for ((i, identity), input) in (0..self.clients).zip(identities).zip(inputs) {
            let id = ClientId(i);
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            let context = context_of(id).unwrap_or(self.context);
            clients.push((Client::new(id, identity, context, input), seed));
        }
        Cohort::new(
            params,
            clients,
            StageDeadlines::uniform(Duration::from_secs(10)),
        )
    }
}

/// What to simulate with [`run`].
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub clients: u32,
    /// Length of each client's float vector.
    pub dim: u32,
    /// Neighbours per client; `None` for the complete graph.
    pub degree: Option<u32>,
    /// Shamir threshold; `None` for `⌊k/2⌋ + 1`.
    pub threshold: Option<u32>,
    pub bits: u8,
    /// Dropouts: at each listed stage, that many clients do not send their message.
    pub drops: Vec<(Stage, u32)>,
    /// Inputs are uniform in `[-clip, clip]` and the codec clamps at `clip`.
    pub clip: f32,
}

impl SimConfig {
    /// A configuration without dropouts.
    pub fn new(clients: u32, dim: u32, degree: Option<u32>, bits: u8) -> Self {
        SimConfig {
            clients,
            dim,
            degree,
            threshold: None,
            bits,
            drops: Vec::new(),
            clip: 1.0,
        }
    }

    /// The degree actually used.
    pub fn effective_degree(&self) -> u32 {
        self.degree
            .unwrap_or(u32::MAX)
            .min(self.clients.saturating_sub(1))
    }

    /// The threshold actually used.
    pub fn effective_threshold(&self) -> u32 {
        self.threshold.unwrap_or(self.effective_degree() / 2 + 1)
    }
}

/// Traffic statistics over clients.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ByteStats {
    pub up_mean: f64,
    pub up_max: u64,
    pub down_mean: f64,
    pub down_max: u64,
}

/// The result of [`run`].
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    pub clients: u32,
    pub dim: u32,
    pub degree: u32,
    pub threshold: u32,
    pub bits: u8,
    pub complete_graph: bool,
    /// `"ok"`, or the server's abort reason.
    pub outcome: String,
    pub survivors: usize,
    /// Dropped clients per stage they did not complete.
    pub dropped: BTreeMap<String, usize>,
    /// Clients quantising their float inputs into the ring, in parallel.
    pub quantize_s: f64,
    pub stages: Vec<StageReport>,
    /// The server decoding the sum into the mean.
    pub decode_s: f64,
    /// The round end to end: quantisation, all five stages and decoding.
    pub round_s: f64,
    pub client_bytes: ByteStats,
    pub server_sent_bytes: u64,
    pub server_received_bytes: u64,
    /// Whether the aggregate equals the exact ring sum over the survivors.
    pub exact_sum: bool,
    /// Largest absolute error of the decoded mean against the plaintext mean.
    pub max_abs_error: f64,
    /// The codec's guaranteed bound on that error.
    pub error_bound: f64,
    /// Client refusals (none in an honest run).
    pub client_errors: Vec<String>,
    /// Server rejections (none in an honest run).
    pub server_rejections: Vec<String>,
    /// Everything, including making up inputs and checking the result.
    pub total_s: f64,
    /// True when the session finished, the sum is exact, the mean is within
    /// the bound and nothing was refused.
    pub correct: bool,
    #[serde(skip)]
    pub aggregate: Option<Aggregate>,
}

/// Seeds from which a client's input can be regenerated.
#[derive(Clone, Copy)]
struct InputSeeds {
    values: [u8; 32],
    rounding: [u8; 32],
}

/// A client's synthetic input: uniform in `[-clip, clip)`, from the mask PRG
/// keyed by the client's seed (fast, and reproducible for the final check).
fn client_input(seeds: &InputSeeds, dim: u32, clip: f32) -> Result<Vec<f32>, SimError> {
    let mut key = zeroize::Zeroizing::new([0u8; 16]);
    key.copy_from_slice(&seeds.values[..16]);
    let stream = MaskStream::new(&key, Sign::Add).map_err(|e| SimError::Wire(e.0.into()))?;
    let mut words = vec![0u32; dim as usize];
    stream
        .keystream(0, &mut words)
        .map_err(|e| SimError::Wire(e.0.into()))?;
    let scale = 2.0 * clip / (1u64 << 24) as f32;
    Ok(words
        .into_iter()
        .map(|w| (w >> 8) as f32 * scale - clip)
        .collect())
}

fn encode_input(codec: &FloatCodec, seeds: &InputSeeds, x: &[f32]) -> Result<Vec<u32>, CodecError> {
    codec.encode(x, None, &mut ChaCha20Rng::from_seed(seeds.rounding))
}

/// A simulation ready to run: identities, parameters and float inputs made,
/// nothing timed yet.
pub struct Prepared {
    config: SimConfig,
    codec: FloatCodec,
    params: SessionParams,
    identities: Vec<IdentityKeypair>,
    seeds: Vec<InputSeeds>,
    client_seeds: Vec<[u8; 32]>,
    floats: Vec<Vec<f32>>,
    victims: [u8; 32],
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The timed part of a simulated round.
#[derive(Debug)]
pub struct Round {
    pub outcome: Result<Aggregate, AbortReason>,
    /// The decoded mean, when the session finished.
    pub mean: Option<Vec<f64>>,
    pub quantize_s: f64,
    pub decode_s: f64,
    pub cohort: Cohort,
}

impl Round {
    /// Quantisation, the five stages and decoding.
    pub fn round_s(&self) -> f64 {
        self.quantize_s
            + self
                .cohort
                .stage_reports()
                .iter()
                .map(|s| s.wall_s)
                .sum::<f64>()
            + self.decode_s
    }
}

/// Makes identities, parameters and inputs for `config`. `rng` supplies every
/// random choice: a seeded CSPRNG makes the run reproducible.
pub fn prepare<R: CryptoRngCore + ?Sized>(
    config: &SimConfig,
    rng: &mut R,
) -> Result<Prepared, SimError> {
    let n = config.clients;
    let codec = FloatCodec::new(config.bits, config.clip, n.max(1), None)?;
    let mut context = [0u8; 32];
    rng.fill_bytes(&mut context);
    let mut identities = Vec::with_capacity(n as usize);
    let mut seeds = Vec::with_capacity(n as usize);
    let mut client_seeds = Vec::with_capacity(n as usize);
    for _ in 0..n {
        identities.push(IdentityKeypair::generate(rng));
        let mut s = InputSeeds {
            values: [0; 32],
            rounding: [0; 32],
        };
        rng.fill_bytes(&mut s.values);
        rng.fill_bytes(&mut s.rounding);
        seeds.push(s);
        let mut c = [0u8; 32];
        rng.fill_bytes(&mut c);
        client_seeds.push(c);
    }
    let mut nonce = [0u8; 32];
    rng.fill_bytes(&mut nonce);
    let mut victims = [0u8; 32];
    rng.fill_bytes(&mut victims);
    let params = SessionParams {
        version: PROTOCOL_VERSION,
        nonce,
        round: 0,
        context,
        dim: codec.encoded_len(config.dim as usize) as u32,
        bits: config.bits,
        degree: config.degree.unwrap_or(n.saturating_sub(1)),
        threshold: config.effective_threshold(),
        min_survivors: 1,
        roster: roster(&identities),
    };
    params.validate()?;
    let floats = par_map(&seeds, |s| client_input(s, config.dim, config.clip))
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Prepared {
        config: config.clone(),
        codec,
        params,
        identities,
        seeds,
        client_seeds,
        floats,
        victims,
    })
}

impl Prepared {
    /// Runs the round: quantisation, the protocol, decoding. Everything here
    /// is what a federated round costs; nothing else is.
    pub fn round(self) -> Result<(Round, Checker), SimError> {
        let Prepared {
            config,
            codec,
            params,
            identities,
            seeds,
            client_seeds,
            floats,
            victims,
        } = self;
        // Quantisation is part of a client's round (Flower's is in its timings).
        let t = Instant::now();
        let pairs: Vec<(&InputSeeds, &Vec<f32>)> = seeds.iter().zip(&floats).collect();
        let inputs = par_map(&pairs, |(s, x)| encode_input(&codec, s, x));
        let quantize_s = t.elapsed().as_secs_f64();
        drop(pairs);
        drop(floats);
        let context = params.context;
        let mut clients = Vec::with_capacity(identities.len());
        for (((entry, identity), input), seed) in params
            .roster
            .iter()
            .zip(identities)
            .zip(inputs)
            .zip(client_seeds)
        {
            clients.push((Client::new(entry.id, identity, context, input?), seed));
        }
        let mut cohort = Cohort::new(
            params,
            clients,
            StageDeadlines::uniform(Duration::from_secs(1)),
        )?;
        cohort.drop_random(&config.drops, victims);
        let outcome = cohort.run()?;
        let t = Instant::now();
        let mean = match &outcome {
            Ok(agg) => Some(codec.decode_mean(&agg.sum, agg.survivors.len())?),
            Err(_) => None,
        };
        let decode_s = t.elapsed().as_secs_f64();
        Ok((
            Round {
                outcome,
                mean,
                quantize_s,
                decode_s,
                cohort,
            },
            Checker {
                config,
                codec,
                seeds,
            },
        ))
    }
}

/// Recomputes the survivors' inputs to check a round independently.
pub struct Checker {
    config: SimConfig,
    codec: FloatCodec,
    seeds: Vec<InputSeeds>,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker").finish_non_exhaustive()
    }
}

impl Checker {
    /// Whether `agg` is the exact ring sum of the survivors' encoded inputs,
    /// and the largest error of `mean` against their plaintext mean.
    pub fn check(&self, agg: &Aggregate, mean: &[f64]) -> Result<(bool, f64), SimError> {
        let c = &self.config;
        let mut ring_sum = vec![0u32; self.codec.encoded_len(c.dim as usize)];
        let mut float_sum = vec![0f64; c.dim as usize];
        let clip = f64::from(c.clip);
        for id in &agg.survivors {
            let Some(s) = self.seeds.get(id.0 as usize) else {
                return Ok((false, f64::INFINITY));
            };
            let x = client_input(s, c.dim, c.clip)?;
            let enc = encode_input(&self.codec, s, &x)?;
            for (a, v) in ring_sum.iter_mut().zip(&enc) {
                *a = a.wrapping_add(*v);
            }
            for (a, v) in float_sum.iter_mut().zip(&x) {
                *a += f64::from(*v).clamp(-clip, clip);
            }
        }
        crate::ring::reduce(&mut ring_sum, c.bits);
        let n = agg.survivors.len() as f64;
        let err = mean
            .iter()
            .zip(&float_sum)
            .map(|(m, s)| (m - s / n).abs())
            .fold(0.0, f64::max);
        Ok((ring_sum == agg.sum, err))
    }

    /// The codec's guaranteed bound on the mean's error.
    pub fn error_bound(&self) -> f64 {
        self.codec.mean_error_bound()
    }
}

/// Runs one round of `config` and checks it.
pub fn run<R: CryptoRngCore + ?Sized>(
    config: &SimConfig,
    rng: &mut R,
) -> Result<SimReport, SimError> {
    let started = Instant::now();
    let prepared = prepare(config, rng)?;
    let (round, checker) = prepared.round()?;
    let round_s = round.round_s();
    let cohort = &round.cohort;
    let mut dropped = BTreeMap::new();
    let (mut exact_sum, mut max_abs_error, survivors, outcome_text, aggregate) =
        match &round.outcome {
            Ok(agg) => {
                for (_, s) in &agg.dropped {
                    *dropped.entry(s.cli_name().to_string()).or_insert(0) += 1;
                }
                (
                    false,
                    f64::INFINITY,
                    agg.survivors.len(),
                    "ok".to_string(),
                    Some(agg.clone()),
                )
            }
            Err(reason) => (false, f64::INFINITY, 0, reason.to_string(), None),
        };
    if let (Some(agg), Some(mean)) = (&aggregate, &round.mean) {
        (exact_sum, max_abs_error) = checker.check(agg, mean)?;
    }
    let error_bound = checker.error_bound();
    let within = max_abs_error <= error_bound * (1.0 + 1e-9) + 1e-12;
    let client_errors: Vec<String> = cohort
        .refusals
        .iter()
        .map(|(c, e)| format!("{c}: {e}"))
        .collect();
    let server_rejections: Vec<String> = cohort.rejections.iter().map(|e| e.to_string()).collect();
    let correct = aggregate.is_some()
        && exact_sum
        && within
        && client_errors.is_empty()
        && server_rejections.is_empty();
    let (up, down): (Vec<u64>, Vec<u64>) = cohort.client_bytes().into_iter().unzip();
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let (server_sent_bytes, server_received_bytes) = cohort.server_bytes();
    let degree = config.effective_degree();
    Ok(SimReport {
        clients: config.clients,
        dim: config.dim,
        degree,
        threshold: config.effective_threshold(),
        bits: config.bits,
        complete_graph: degree + 1 >= config.clients,
        outcome: outcome_text,
        survivors,
        dropped,
        quantize_s: round.quantize_s,
        stages: cohort.stage_reports(),
        decode_s: round.decode_s,
        round_s,
        client_bytes: ByteStats {
            up_mean: mean(&up),
            up_max: up.iter().copied().max().unwrap_or(0),
            down_mean: mean(&down),
            down_max: down.iter().copied().max().unwrap_or(0),
        },
        server_sent_bytes,
        server_received_bytes,
        exact_sum,
        max_abs_error,
        error_bound,
        client_errors,
        server_rejections,
        total_s: started.elapsed().as_secs_f64(),
        correct,
        aggregate,
    })
}

#[cfg(feature = "parallel")]
fn par_map<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> U + Sync + Send) -> Vec<U> {
    use rayon::prelude::*;
    items.par_iter().map(f).collect()
}

#[cfg(not(feature = "parallel"))]
fn par_map<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> U + Sync + Send) -> Vec<U> {
    items.iter().map(f).collect()
}

#[cfg(feature = "parallel")]
fn par_map_mut<T: Send, U: Send>(items: Vec<T>, f: impl Fn(T) -> U + Sync + Send) -> Vec<U> {
    use rayon::prelude::*;
    items.into_par_iter().map(f).collect()
}

#[cfg(not(feature = "parallel"))]
fn par_map_mut<T: Send, U: Send>(items: Vec<T>, f: impl Fn(T) -> U + Sync + Send) -> Vec<U> {
    items.into_iter().map(f).collect()
}
