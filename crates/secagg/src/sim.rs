//! An in-memory federation: one [`Server`] and `n` [`Client`]s exchanging
//! encoded messages, with injected dropouts and a simulated clock.
//!
//! Every message goes through the wire encoding ([`crate::messages::encode`]),
//! so byte counts are real and the decoders are exercised. Clients run in
//! parallel (rayon) when the `parallel` feature is on; the server runs on the
//! driving thread, as it would behind a network.
//!
//! After the session, the harness checks the result independently: it
//! regenerates every survivor's input from its seed, recomputes the exact
//! ring sum and the plaintext mean, and compares.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRngCore, SeedableRng};
use serde::Serialize;
use thiserror::Error;

use crate::codec::{CodecError, FloatCodec};
use crate::crypto::identity::IdentityKeypair;
use crate::crypto::prg::{MaskStream, Sign};
use crate::messages::{self, ClientMessage, ServerMessage};
use crate::params::RosterEntry;
use crate::server::{Aggregate, StageDeadlines};
use crate::{ClientError, ClientId, PROTOCOL_VERSION, ParamsError, Server, SessionParams, Stage};

/// What to simulate.
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

/// A configuration that cannot run.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SimError {
    #[error("invalid session: {0}")]
    Params(#[from] ParamsError),
    #[error("invalid codec: {0}")]
    Codec(#[from] CodecError),
    #[error("wire encoding failed: {0}")]
    Wire(String),
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
    /// Server compute, including closing the stage.
    pub server_s: f64,
    /// Bytes from clients to the server.
    pub up_bytes: u64,
    /// Bytes from the server to clients.
    pub down_bytes: u64,
}

/// Traffic statistics over clients.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ByteStats {
    pub up_mean: f64,
    pub up_max: u64,
    pub down_mean: f64,
    pub down_max: u64,
}

/// The result of a simulation.
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
    pub total_s: f64,
    /// True when the session finished, the sum is exact, the mean is within
    /// the bound and nothing was refused.
    pub correct: bool,
    #[serde(skip)]
    pub aggregate: Option<Aggregate>,
}

struct SimClient {
    id: ClientId,
    client: crate::Client,
    rng: ChaCha20Rng,
    alive: bool,
    up: u64,
    down: u64,
}

/// Seeds from which a client's input can be regenerated.
#[derive(Clone, Copy)]
struct InputSeeds {
    values: [u8; 32],
    rounding: [u8; 32],
}

/// A client's synthetic input: uniform in `[-clip, clip)`, from AES-CTR keyed
/// by the client's seed (fast, and reproducible for the final check).
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

/// One client's turn: its id, its encoded replies, its refusals, and how long it took.
type ClientTurn = (ClientId, Vec<Vec<u8>>, Vec<String>, f64);

/// Clients handled per batch, to bound the masked vectors held at once.
const BATCH: usize = 256;

/// Runs one session. `rng` supplies every random choice (identities, keys,
/// inputs, which clients drop): a seeded CSPRNG makes the run reproducible.
pub fn run<R: CryptoRngCore + ?Sized>(
    config: &SimConfig,
    rng: &mut R,
) -> Result<SimReport, SimError> {
    let started = Instant::now();
    let n = config.clients;
    let degree = config.effective_degree();
    let threshold = config.effective_threshold();
    let codec = FloatCodec::new(config.bits, config.clip, n.max(1), None)?;
    let ring_dim = codec.encoded_len(config.dim as usize) as u32;

    let mut context = [0u8; 32];
    rng.fill_bytes(&mut context);
    let mut seeds = Vec::with_capacity(n as usize);
    let mut identities = Vec::with_capacity(n as usize);
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
    let params = SessionParams {
        version: PROTOCOL_VERSION,
        nonce,
        round: 0,
        context,
        dim: ring_dim,
        bits: config.bits,
        degree: config.degree.unwrap_or(n.saturating_sub(1)),
        threshold,
        roster: (0..n)
            .zip(&identities)
            .map(|(i, k)| RosterEntry {
                id: ClientId(i),
                identity: k.public(),
            })
            .collect(),
    };
    params.validate()?;
    // Quantisation is part of a client's round (Flower's is in its timings):
    // time it, clients in parallel. Making up the inputs is not.
    let floats = par_map(&seeds, |s| client_input(s, config.dim, config.clip));
    let floats: Vec<Vec<f32>> = floats.into_iter().collect::<Result<_, _>>()?;
    let pairs: Vec<(&InputSeeds, &Vec<f32>)> = seeds.iter().zip(&floats).collect();
    let t = Instant::now();
    let inputs = par_map(&pairs, |(s, x)| encode_input(&codec, s, x));
    let quantize_s = t.elapsed().as_secs_f64();
    drop(pairs);
    drop(floats);
    let mut clients = Vec::with_capacity(n as usize);
    for (((i, identity), input), seed) in (0..n).zip(identities).zip(inputs).zip(client_seeds) {
        clients.push(SimClient {
            id: ClientId(i),
            client: crate::Client::new(ClientId(i), identity, context, input?),
            rng: ChaCha20Rng::from_seed(seed),
            alive: true,
            up: 0,
            down: 0,
        });
    }

    let mut server = Server::new(params, StageDeadlines::uniform(Duration::from_secs(1)))?;
    let mut now = Duration::ZERO;
    let mut stages: BTreeMap<Stage, StageReport> = BTreeMap::new();
    let mut drops: BTreeMap<Stage, u32> = BTreeMap::new();
    for (s, c) in &config.drops {
        *drops.entry(*s).or_default() += c;
    }
    let mut client_errors = Vec::new();
    let mut server_rejections = Vec::new();
    let (mut server_sent, mut server_received) = (0u64, 0u64);

    let t0 = Instant::now();
    server.start(now);
    stage_entry(&mut stages, Stage::AdvertiseKeys).server_s += t0.elapsed().as_secs_f64();

    while server.outcome().is_none() {
        let stage = server.stage().unwrap_or(Stage::Unmasking);
        let out = server.drain_transmits();
        if out.is_empty() {
            // Everybody who will answer has answered: let the deadline pass.
            let t = Instant::now();
            now = server.poll_timeout().unwrap_or(now);
            server.handle_timeout(now);
            stage_entry(&mut stages, stage).server_s += t.elapsed().as_secs_f64();
            continue;
        }
        // Encode the server's messages.
        let mut inbox: Vec<Vec<Vec<u8>>> = (0..n).map(|_| Vec::new()).collect();
        let mut recipients = Vec::new();
        for (to, msg) in &out {
            let bytes = messages::encode(msg).map_err(|e| SimError::Wire(e.0))?;
            server_sent += bytes.len() as u64;
            stage_entry(&mut stages, stage).down_bytes += bytes.len() as u64;
            if let Some(c) = clients.get_mut(to.0 as usize) {
                c.down += bytes.len() as u64;
                if !matches!(msg, ServerMessage::Abort { .. }) && c.alive {
                    recipients.push(to.0 as usize);
                }
                inbox[to.0 as usize].push(bytes);
            }
        }
        drop(out);
        // This stage's dropouts: recipients that go silent now.
        if let Some(count) = drops.remove(&stage) {
            let count = (count as usize).min(recipients.len());
            for k in 0..count {
                let span = (recipients.len() - k) as u64;
                let j = k + (rng.next_u64() % span) as usize;
                recipients.swap(k, j);
                clients[recipients[k]].alive = false;
            }
        }
        // Deliver in batches: clients in parallel, then the server.
        for start in (0..n as usize).step_by(BATCH) {
            let end = (start + BATCH).min(n as usize);
            if inbox[start..end].iter().all(Vec::is_empty) {
                continue;
            }
            let t = Instant::now();
            let work: Vec<(&mut SimClient, Vec<Vec<u8>>)> = clients[start..end]
                .iter_mut()
                .zip(inbox[start..end].iter_mut().map(std::mem::take))
                .filter(|(_, msgs)| !msgs.is_empty())
                .collect();
            let results: Vec<ClientTurn> = par_map_mut(work, |(c, msgs)| {
                let t = Instant::now();
                let mut replies = Vec::new();
                let mut errors = Vec::new();
                if c.alive {
                    for bytes in msgs {
                        let reply = messages::decode::<ServerMessage>(&bytes)
                            .map_err(|e| e.to_string())
                            .and_then(|m| {
                                c.client
                                    .handle(m, &mut c.rng)
                                    .map_err(|e: ClientError| e.to_string())
                            });
                        match reply {
                            Ok(Some(r)) => match messages::encode(&r) {
                                Ok(b) => replies.push(b),
                                Err(e) => errors.push(format!("{}: {e}", c.id)),
                            },
                            Ok(None) => {}
                            Err(e) => errors.push(format!("{}: {e}", c.id)),
                        }
                    }
                    c.up += replies.iter().map(|r| r.len() as u64).sum::<u64>();
                }
                (c.id, replies, errors, t.elapsed().as_secs_f64())
            });
            let client_wall = t.elapsed().as_secs_f64();
            let entry = stage_entry(&mut stages, stage);
            entry.wall_s += client_wall;
            let t = Instant::now();
            for (from, replies, errors, busy) in results {
                let entry = stage_entry(&mut stages, stage);
                entry.clients_total_s += busy;
                entry.client_max_s = entry.client_max_s.max(busy);
                client_errors.extend(errors);
                for bytes in replies {
                    server_received += bytes.len() as u64;
                    stage_entry(&mut stages, stage).up_bytes += bytes.len() as u64;
                    match messages::decode::<ClientMessage>(&bytes) {
                        Ok(msg) => {
                            if let Err(e) = server.handle_message(now, from, msg) {
                                server_rejections.push(e.to_string());
                            }
                        }
                        Err(e) => server_rejections.push(format!("{from}: {e}")),
                    }
                }
            }
            let server_time = t.elapsed().as_secs_f64();
            let entry = stage_entry(&mut stages, stage);
            entry.server_s += server_time;
            entry.wall_s += server_time;
        }
    }

    let outcome = server.take_outcome();
    let t = Instant::now();
    let decoded = match &outcome {
        Some(Ok(agg)) => Some(codec.decode_mean(&agg.sum, agg.survivors.len())?),
        _ => None,
    };
    let decode_s = t.elapsed().as_secs_f64();
    let survivors_n;
    let mut dropped = BTreeMap::new();
    let (mut exact_sum, mut max_abs_error) = (false, f64::INFINITY);
    let outcome_text;
    let aggregate = match outcome {
        Some(Ok(agg)) => {
            outcome_text = "ok".to_string();
            survivors_n = agg.survivors.len();
            for (_, s) in &agg.dropped {
                *dropped.entry(s.cli_name().to_string()).or_insert(0) += 1;
            }
            let survivor_seeds: Vec<InputSeeds> =
                agg.survivors.iter().map(|c| seeds[c.0 as usize]).collect();
            let mut ring_sum = vec![0u32; ring_dim as usize];
            let mut float_sum = vec![0f64; config.dim as usize];
            for s in &survivor_seeds {
                let x = client_input(s, config.dim, config.clip)?;
                let enc = encode_input(&codec, s, &x)?;
                for (a, v) in ring_sum.iter_mut().zip(&enc) {
                    *a = a.wrapping_add(*v);
                }
                for (a, v) in float_sum.iter_mut().zip(&x) {
                    *a += f64::from(*v).clamp(-f64::from(config.clip), f64::from(config.clip));
                }
            }
            crate::ring::reduce(&mut ring_sum, config.bits);
            exact_sum = ring_sum == agg.sum;
            let mean = decoded.unwrap_or_default();
            max_abs_error = mean
                .iter()
                .zip(&float_sum)
                .map(|(m, s)| (m - s / survivors_n as f64).abs())
                .fold(0.0, f64::max);
            Some(agg)
        }
        Some(Err(reason)) => {
            outcome_text = reason.to_string();
            survivors_n = 0;
            None
        }
        None => {
            outcome_text = "the session did not finish".into();
            survivors_n = 0;
            None
        }
    };
    let error_bound = codec.mean_error_bound();
    let within = max_abs_error <= error_bound * (1.0 + 1e-9) + 1e-12;
    let correct = aggregate.is_some()
        && exact_sum
        && within
        && client_errors.is_empty()
        && server_rejections.is_empty();
    let (up, down): (Vec<u64>, Vec<u64>) = clients.iter().map(|c| (c.up, c.down)).unzip();
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let stages: Vec<StageReport> = Stage::ALL
        .iter()
        .map(|s| {
            let mut r = stages.remove(s).unwrap_or_default();
            r.stage = s.cli_name().to_string();
            r
        })
        .collect();
    let round_s = quantize_s + stages.iter().map(|s| s.wall_s).sum::<f64>() + decode_s;
    Ok(SimReport {
        clients: n,
        dim: config.dim,
        degree,
        threshold,
        bits: config.bits,
        complete_graph: degree + 1 >= n,
        outcome: outcome_text,
        survivors: survivors_n,
        dropped,
        quantize_s,
        stages,
        decode_s,
        round_s,
        client_bytes: ByteStats {
            up_mean: mean(&up),
            up_max: up.iter().copied().max().unwrap_or(0),
            down_mean: mean(&down),
            down_max: down.iter().copied().max().unwrap_or(0),
        },
        server_sent_bytes: server_sent,
        server_received_bytes: server_received,
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

fn stage_entry(stages: &mut BTreeMap<Stage, StageReport>, s: Stage) -> &mut StageReport {
    stages.entry(s).or_default()
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
