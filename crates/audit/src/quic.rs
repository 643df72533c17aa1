//! `fedveil audit --quic`: the protocol attacks of [`crate::secagg`],
//! played over real QUIC on loopback by the
//! federation server against the federation's clients (and by malicious
//! federation clients against the server).
//!
//! Each case runs a federation of ten clients (k = 6 neighbours, threshold
//! t = 4, `Z_{2^32}`, the synthetic task with 64 coordinates) with
//! [`fedveil_fed::server::Server`] and [`fedveil_fed::client::run`], every message
//! through the wire encoding, TLS and the connection tasks:
//!
//! - a malicious server runs the honest protocol up to the attack's stage,
//!   then the attack takes the session over ([`Adversary::play`]) and
//!   speaks to the real clients over their connections; the clients'
//!   refusals are what their event streams report;
//! - a malicious client ([`ClientAdversary`]) rewrites what it sends; the
//!   server's rejections, the complaints and the unmasked sum come from the
//!   server's events, and the true inputs from the clients' (recorded for
//!   the audit only);
//! - the transcript test runs two federations whose inputs have the same
//!   sum, and compares the masked inputs the server received.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::secagg::{
    self as attacks, ATTACKER, ClientFinding, Finding, ServerAttack, ServerAttackKind, TARGET,
    TranscriptFinding,
};
use fedveil_fed::adversary::{Adversary, ClientAdversary, ClientHooks, Link, ServerHooks, View};
use fedveil_fed::net::{ClientIdentity, Limits, ServerIdentity};
use fedveil_fed::secagg::crypto::identity::SignatureBytes;
use fedveil_fed::secagg::messages::{ClientMessage, ConsistencySignature, ServerMessage};
use fedveil_fed::secagg::ring::PackedVec;
use fedveil_fed::secagg::{ClientId, SessionId, Stage};
use rand_core::OsRng;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use fedveil_fed::FedError;
use fedveil_fed::client::{self, ClientSetup, ClientSummary};
use fedveil_fed::config::{Plan, Policy, RunFile};
use fedveil_fed::metrics::{ClientEvent, Event};
use fedveil_fed::randomness::Randomness;
use fedveil_fed::server::{Server, ServerSetup, Summary};
use fedveil_fed::trainer::{LocalUpdate, TrainError, Trainer, TrainingConfig};
use fedveil_fed::wire::{self, RoundSpec};
use fedveil_task::synthetic::{SyntheticConfig, SyntheticEvaluator, SyntheticTrainer};

/// Clients of every audited federation.
pub const CLIENTS: usize = attacks::CLIENTS as usize;
/// Coordinates of the synthetic task.
const DIM: u32 = attacks::DIM;
const NAME: &str = "localhost";

/// The plan of an audited federation: `rounds` rounds, `attempts`
/// sessions per round.
fn plan(rounds: u64, attempts: u32) -> Result<Plan, FedError> {
    let text = format!(
        r#"
[run]
clients = {CLIENTS}
[federation]
rounds = {rounds}
attempts = {attempts}
wait_s = 20
[secagg]
degree = {}
threshold = {}
bits = 32
[deadlines]
train = 3
share = 1.5
masked = 1.5
consistency = 1.5
unmask = 1.5
[task]
kind = "synthetic"
dim = {DIM}
"#,
        attacks::DEGREE,
        attacks::THRESHOLD
    );
    Ok(RunFile::parse(Path::new("audit.toml"), &text)?.plan())
}

fn limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(10),
        ..Limits::default()
    }
}

/// The parties: one server identity and the clients' (client `i + 1` is
/// the `i`-th).
struct Cast {
    server: ServerIdentity,
    clients: Vec<ClientIdentity>,
}

impl Cast {
    fn new() -> Result<Cast, FedError> {
        Ok(Cast {
            server: ServerIdentity::generate(&[NAME.to_string()])?,
            clients: (0..CLIENTS)
                .map(|_| ClientIdentity::generate(&mut OsRng))
                .collect(),
        })
    }
}

/// Who runs what in one federation.
struct Roles {
    randomness: Randomness,
    server: Option<Box<dyn Adversary>>,
    /// The malicious client, by index.
    client: Option<(usize, Box<dyn ClientAdversary>)>,
    /// The clients' trainers (default: the synthetic task's shards).
    trainers: Option<Vec<Box<dyn Trainer>>>,
}

/// What a federation showed.
struct Played {
    server: Result<Summary, FedError>,
    events: Vec<Event>,
    /// Each client's events, client `i + 1` at index `i`.
    clients: Vec<Vec<ClientEvent>>,
}

impl Played {
    /// The last input client `c` encoded.
    fn input(&self, c: ClientId) -> Option<Vec<u32>> {
        let events = self.clients.get((c.0 as usize).checked_sub(1)?)?;
        events.iter().rev().find_map(|e| match e {
            ClientEvent::Input { ring, .. } => Some(ring.as_ref().clone()),
            _ => None,
        })
    }

    /// The input client `c` encoded in `round`.
    fn input_of_round(&self, c: ClientId, round: u64) -> Option<&[u32]> {
        let events = self.clients.get((c.0 as usize).checked_sub(1)?)?;
        events.iter().rev().find_map(|e| match e {
            ClientEvent::Input { ring, round: r, .. } if *r == round => Some(ring.as_slice()),
            _ => None,
        })
    }

    /// What the clients refused of the server's messages (not the
    /// server's rejections of theirs, which they also report).
    fn refusals(&self) -> Vec<(u32, String)> {
        self.clients
            .iter()
            .enumerate()
            .flat_map(|(i, events)| {
                events.iter().filter_map(move |e| match e {
                    ClientEvent::Refused { reason, .. }
                        if !reason.starts_with("the server rejected") =>
                    {
                        Some((i as u32 + 1, reason.clone()))
                    }
                    _ => None,
                })
            })
            .collect()
    }

    /// Whether every aggregate the server unmasked is exactly the sum of
    /// its survivors' inputs, and how many there were.
    fn sums_exact(&self) -> (bool, usize) {
        let mut exact = true;
        let mut count = 0;
        for e in &self.events {
            if let Event::Aggregated {
                round,
                survivors,
                sum,
                ..
            } = e
            {
                count += 1;
                let mut expected = vec![0u32; sum.len()];
                for c in survivors {
                    match self.input_of_round(*c, *round) {
                        Some(x) if x.len() == expected.len() => {
                            for (a, v) in expected.iter_mut().zip(x) {
                                *a = a.wrapping_add(*v);
                            }
                        }
                        _ => exact = false,
                    }
                }
                exact &= expected == **sum;
            }
        }
        (exact, count)
    }
}

/// Drains a channel of events.
fn drain<T>(rx: &mut UnboundedReceiver<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

/// Runs one federation over loopback QUIC to its end.
async fn federate(cast: &Cast, plan: Plan, roles: Roles) -> Result<Played, FedError> {
    let task = SyntheticConfig::from_table(&plan.task)?;
    let (tx, mut server_events) = unbounded_channel();
    let server = Server::bind(ServerSetup {
        plan,
        identity: cast.server.clone(),
        allow: cast.clients.iter().map(ClientIdentity::public).collect(),
        listen: (Ipv4Addr::LOCALHOST, 0).into(),
        limits: limits(),
        evaluator: Box::new(SyntheticEvaluator::new(&task, CLIENTS as u32)?),
        randomness: roles.randomness.clone(),
        events: Some(tx),
        hooks: ServerHooks {
            adversary: roles.server,
        },
    })?;
    let addr: SocketAddr = server.local_addr();
    let server = tokio::spawn(server.run());
    let mut trainers = roles.trainers.unwrap_or_default().into_iter();
    let mut bad = roles.client;
    let mut clients = Vec::new();
    for (i, identity) in cast.clients.iter().enumerate() {
        let trainer: Box<dyn Trainer> = match trainers.next() {
            Some(t) => t,
            None => Box::new(SyntheticTrainer::new(&task, i as u32)?),
        };
        let adversary = if bad.as_ref().is_some_and(|(j, _)| *j == i) {
            bad.take().map(|(_, a)| a)
        } else {
            None
        };
        let (tx, rx) = unbounded_channel();
        let setup = ClientSetup {
            server: addr,
            server_name: NAME.into(),
            pin: cast.server.fingerprint(),
            identity: ClientIdentity::from_seed(&identity.seed()),
            limits: limits(),
            trainer,
            policy: Policy::trusting(),
            randomness: roles.randomness.clone(),
            reconnect: Duration::from_millis(100),
            max_reconnect: Duration::from_millis(500),
            give_up_after: Some(Duration::from_secs(20)),
            events: Some(tx),
            endpoint: None,
            faults: Vec::new(),
            bundle_cache: None,
            max_bundle_bytes: client::MAX_BUNDLE_BYTES,
            hooks: ClientHooks {
                adversary,
                record_inputs: true,
            },
            ledger_dir: None,
        };
        clients.push((tokio::spawn(client::run(setup)), rx));
    }
    let server = match tokio::time::timeout(Duration::from_secs(120), server).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(FedError::Internal(format!("the server task failed: {e}"))),
        Err(_) => {
            return Err(FedError::Internal(
                "the audited federation did not end within 120 s".into(),
            ));
        }
    };
    let mut client_events = Vec::new();
    for (handle, mut rx) in clients {
        let abort = handle.abort_handle();
        let ended: Option<Result<ClientSummary, FedError>> =
            tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .ok()
                .and_then(Result::ok);
        if ended.is_none() {
            abort.abort();
        }
        client_events.push(drain(&mut rx));
    }
    Ok(Played {
        server,
        events: drain(&mut server_events),
        clients: client_events,
    })
}

/// The malicious server: the shared attack, played at its takeover stages.
struct Hijack(Arc<Mutex<ServerAttack>>);

impl Hijack {
    fn attack(&self) -> std::sync::MutexGuard<'_, ServerAttack> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Adversary for Hijack {
    fn tamper(&mut self, client: ClientId, spec: &mut RoundSpec, params: &mut Vec<u8>) {
        // The target gets another model, and a round specification that
        // is consistent with it (so that it joins a session of its own).
        if self.attack().kind.different_model()
            && client == TARGET
            && let Some(b) = params.first_mut()
        {
            *b ^= 0x40;
            spec.params_hash = wire::params_hash(params);
            if let Ok(context) = spec.context(&spec.params_hash) {
                spec.session.context = context;
            }
        }
    }

    fn takeover(&mut self, _round: u64, _attempt: u32) -> Option<Stage> {
        self.attack().next_takeover()
    }

    fn play(&mut self, view: View, requests: Vec<(ClientId, ServerMessage)>, link: &mut dyn Link) {
        self.attack().play(view, requests, link);
    }
}

/// A malicious-server attack over QUIC.
pub async fn server_attack(kind: ServerAttackKind) -> Result<Finding, FedError> {
    let cast = Cast::new()?;
    let attack = Arc::new(Mutex::new(ServerAttack::new(kind)));
    // The control runs one deterministic federation twice (what fresh
    // randomness per session prevents in operation); the replay plays two
    // sessions of one round.
    let (federations, attempts, randomness) = if kind.repeats_session() {
        let mut seed = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut OsRng, &mut seed);
        (kind.sessions(), 1, Randomness::seeded(seed))
    } else {
        (1, kind.sessions() as u32, Randomness::os())
    };
    let mut refusals = Vec::new();
    let mut truth = None;
    for _ in 0..federations {
        let roles = Roles {
            randomness: randomness.clone(),
            server: Some(Box::new(Hijack(Arc::clone(&attack)))),
            client: None,
            trainers: None,
        };
        let outcome = federate(&cast, plan(1, attempts)?, roles).await?;
        refusals.extend(outcome.refusals());
        truth = outcome.input(TARGET).or(truth);
    }
    let truth = truth.ok_or_else(|| {
        FedError::Internal(format!(
            "{}: the target never encoded an input",
            kind.name()
        ))
    })?;
    let attack = attack.lock().unwrap_or_else(PoisonError::into_inner);
    if attack.played() < kind.sessions() {
        return Err(FedError::Internal(format!(
            "{}: the attack took over {} of its {} sessions",
            kind.name(),
            attack.played(),
            kind.sessions()
        )));
    }
    attack
        .finding(&truth, refusals)
        .ok_or_else(|| FedError::Internal(format!("{}: no session was taken over", kind.name())))
}

/// The malicious clients' attacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAttackKind {
    ForgedSignature,
    TamperedCiphertext,
    WrongLength,
    OutOfRound,
}

impl ClientAttackKind {
    pub const ALL: [ClientAttackKind; 4] = [
        ClientAttackKind::ForgedSignature,
        ClientAttackKind::TamperedCiphertext,
        ClientAttackKind::WrongLength,
        ClientAttackKind::OutOfRound,
    ];

    /// The name of the in-memory attack it corresponds to.
    pub fn name(self) -> &'static str {
        match self {
            ClientAttackKind::ForgedSignature => "forged_signature",
            ClientAttackKind::TamperedCiphertext => "tampered_ciphertext",
            ClientAttackKind::WrongLength => "wrong_length",
            ClientAttackKind::OutOfRound => "out_of_round",
        }
    }
}

/// A malicious client: it rewrites its own messages.
struct Rogue(ClientAttackKind);

impl ClientAdversary for Rogue {
    fn outgoing(&mut self, _round: u64, msg: ClientMessage) -> Vec<ClientMessage> {
        match (self.0, msg) {
            // Keys changed after signing.
            (ClientAttackKind::ForgedSignature, ClientMessage::AdvertiseKeys(mut k)) => {
                k.cipher_pk[0] ^= 1;
                vec![ClientMessage::AdvertiseKeys(k)]
            }
            // One bit of the first share envelope flipped.
            (ClientAttackKind::TamperedCiphertext, ClientMessage::ShareKeys(mut s)) => {
                if let Some(b) = s
                    .envelopes
                    .first_mut()
                    .and_then(|e| e.ciphertext.get_mut(7))
                {
                    *b ^= 0x40;
                }
                vec![ClientMessage::ShareKeys(s)]
            }
            // A short vector, a 16-bit one and a truncated encoding; never
            // the real one.
            (ClientAttackKind::WrongLength, ClientMessage::MaskedInput(m)) => {
                let mut out = Vec::new();
                let mut short = m.clone();
                if let Ok(p) = PackedVec::pack(&[1, 2, 3], 32) {
                    short.masked = p;
                    out.push(ClientMessage::MaskedInput(short));
                }
                let mut wide = m.clone();
                if let Ok(p) = PackedVec::pack(&vec![0; m.masked.len as usize], 16) {
                    wide.masked = p;
                    out.push(ClientMessage::MaskedInput(wide));
                }
                let mut truncated = m;
                truncated.masked.data.pop();
                out.push(ClientMessage::MaskedInput(truncated));
                out
            }
            // A later stage's message early, its keys under another session,
            // then its genuine keys twice.
            (ClientAttackKind::OutOfRound, ClientMessage::AdvertiseKeys(k)) => {
                let early = ClientMessage::Consistency(ConsistencySignature {
                    session: k.session,
                    signature: SignatureBytes([0; 64]),
                });
                let mut other = k.clone();
                other.session = SessionId([1; 32]);
                vec![
                    early,
                    ClientMessage::AdvertiseKeys(other),
                    ClientMessage::AdvertiseKeys(k.clone()),
                    ClientMessage::AdvertiseKeys(k),
                ]
            }
            (_, other) => vec![other],
        }
    }
}

/// A malicious-client attack over QUIC: client 2 misbehaves in a one-round
/// federation.
pub async fn client_attack(kind: ClientAttackKind) -> Result<ClientFinding, FedError> {
    let cast = Cast::new()?;
    let roles = Roles {
        randomness: Randomness::os(),
        server: None,
        client: Some((ATTACKER.0 as usize - 1, Box::new(Rogue(kind)))),
        trainers: None,
    };
    let outcome = federate(&cast, plan(1, 1)?, roles).await?;
    let rejected = outcome
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Rejected { client, reason } if *client == ATTACKER => Some(reason.clone()),
            _ => None,
        })
        .collect();
    let aggregate = outcome.events.iter().find_map(|e| match e {
        Event::Aggregated {
            survivors,
            complaints,
            ..
        } => Some((survivors.clone(), complaints.len())),
        _ => None,
    });
    let (sum_exact, sums) = outcome.sums_exact();
    let honest = (1..=CLIENTS as u32)
        .map(ClientId)
        .filter(|c| *c != ATTACKER);
    Ok(match aggregate {
        Some((survivors, complaints)) if outcome.server.is_ok() => ClientFinding {
            rejected,
            complaints,
            completed: true,
            honest_served: honest.into_iter().all(|c| survivors.contains(&c)),
            survivors: survivors.len(),
            sum_exact: sum_exact && sums == 1,
        },
        _ => ClientFinding {
            rejected,
            complaints: 0,
            completed: false,
            survivors: 0,
            sum_exact: false,
            honest_served: false,
        },
    })
}

/// A trainer whose update is a fixed vector.
struct Fixed(Vec<f32>);

impl Trainer for Fixed {
    fn dim(&self) -> usize {
        self.0.len()
    }

    fn train(
        &mut self,
        _global: &[f32],
        _config: &TrainingConfig,
        _rng: &mut dyn rand_core::RngCore,
    ) -> Result<LocalUpdate, TrainError> {
        Ok(LocalUpdate {
            delta: self.0.clone(),
            samples: 1,
            loss: 0.0,
            record_steps: None,
        })
    }
}

/// The server that only watches: the masked inputs of clients 1 and 2.
struct Watch(Arc<Mutex<Vec<u32>>>);

impl Adversary for Watch {
    fn observe(&mut self, from: ClientId, msg: &ClientMessage) {
        if let ClientMessage::MaskedInput(m) = msg
            && from.0 <= 2
            && let Ok(v) = m.masked.unpack()
        {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(v);
        }
    }
}

/// The transcript test over QUIC: two federations of `sessions` rounds.
/// In the first, client 1's update is +0.5 on every coordinate and client
/// 2's is −0.5; in the second both are 0, so the sum is the same. The
/// masked inputs the server received from the two must be distributed the
/// same, while the encoded inputs themselves (the control) differ.
pub async fn transcript(sessions: usize) -> Result<TranscriptFinding, FedError> {
    let cast = Cast::new()?;
    let rounds = sessions as u64;
    let mut views = Vec::new();
    let mut raw = Vec::new();
    let mut exact = true;
    for zeros in [false, true] {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let trainers: Vec<Box<dyn Trainer>> = (0..CLIENTS)
            .map(|i| {
                let v = match (i, zeros) {
                    (0 | 1, true) => 0.0,
                    (0, false) => 0.5,
                    (1, false) => -0.5,
                    _ => 0.1 * i as f32 - 0.4,
                };
                Box::new(Fixed(vec![v; DIM as usize])) as Box<dyn Trainer>
            })
            .collect();
        let roles = Roles {
            randomness: Randomness::os(),
            server: Some(Box::new(Watch(Arc::clone(&seen)))),
            client: None,
            trainers: Some(trainers),
        };
        let outcome = federate(&cast, plan(rounds, 1)?, roles).await?;
        if let Err(e) = &outcome.server {
            return Err(FedError::Internal(format!(
                "the transcript federation failed: {e}"
            )));
        }
        let (sums_exact, sums) = outcome.sums_exact();
        exact &= sums_exact && sums == sessions;
        let mut unmasked = Vec::new();
        for round in 0..rounds {
            for c in [ClientId(1), ClientId(2)] {
                unmasked.extend_from_slice(outcome.input_of_round(c, round).unwrap_or(&[]));
            }
        }
        raw.push(unmasked);
        views.push(std::mem::take(
            &mut *seen.lock().unwrap_or_else(PoisonError::into_inner),
        ));
    }
    Ok(TranscriptFinding {
        sessions,
        masked: attacks::homogeneity(&views[0], &views[1]),
        unmasked: attacks::homogeneity(&raw[0], &raw[1]),
        sums_equal: exact,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_plan_is_valid() {
        let p = plan(1, 2).unwrap();
        assert_eq!(p.federation.attempts, 2);
        assert_eq!(p.secagg.degree, Some(attacks::DEGREE));
    }
}
