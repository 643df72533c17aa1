//! A deterministic in-memory federation for tests: real clients, a real
//! server, every message through the wire encoding, dropouts chosen by the
//! test, and the server's outgoing messages open to inspection and tampering
//! (the tests play the malicious server by editing or replacing them).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fedveil_secagg::crypto::identity::IdentityKeypair;
use fedveil_secagg::messages::{self, ClientMessage, ServerMessage};
use fedveil_secagg::params::RosterEntry;
use fedveil_secagg::server::{Aggregate, StageDeadlines};
use fedveil_secagg::{
    AbortReason, Client, ClientError, ClientId, PROTOCOL_VERSION, Rejected, Server, SessionParams,
    Stage,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

pub struct Fed {
    pub params: SessionParams,
    pub server: Server,
    pub clients: Vec<Client>,
    pub rngs: Vec<ChaCha20Rng>,
    pub inputs: Vec<Vec<u32>>,
    pub now: Duration,
    /// Clients that stopped talking, with the stage they went silent at.
    pub dead: BTreeMap<ClientId, Stage>,
    /// Clients to silence when they are asked for the given stage's message.
    pub drop_plan: BTreeMap<Stage, BTreeSet<ClientId>>,
    pub refusals: Vec<(ClientId, ClientError)>,
    pub rejections: Vec<Rejected>,
    /// Every message a client sent, as the server saw it.
    pub sent: Vec<(ClientId, ClientMessage)>,
}

pub fn ids(v: &[u32]) -> Vec<ClientId> {
    v.iter().map(|&i| ClientId(i)).collect()
}

impl Fed {
    /// `n` clients with ids `0..n`, random inputs in `Z_2^bits`.
    pub fn new(n: u32, degree: u32, threshold: u32, dim: u32, bits: u8, seed: u64) -> Fed {
        Self::with_context(n, degree, threshold, dim, bits, seed, |_| [7u8; 32])
    }

    /// Like [`Fed::new`], with each client's own context (model hash).
    pub fn with_context(
        n: u32,
        degree: u32,
        threshold: u32,
        dim: u32,
        bits: u8,
        seed: u64,
        context_of: impl Fn(ClientId) -> [u8; 32],
    ) -> Fed {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let identities: Vec<IdentityKeypair> = (0..n)
            .map(|_| IdentityKeypair::generate(&mut rng))
            .collect();
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let params = SessionParams {
            version: PROTOCOL_VERSION,
            nonce,
            round: 1,
            context: [7u8; 32],
            dim,
            bits,
            degree,
            threshold,
            roster: identities
                .iter()
                .enumerate()
                .map(|(i, k)| RosterEntry {
                    id: ClientId(i as u32),
                    identity: k.public(),
                })
                .collect(),
        };
        let mask = if bits == 32 {
            u32::MAX
        } else {
            (1u32 << bits) - 1
        };
        let inputs: Vec<Vec<u32>> = (0..n)
            .map(|_| (0..dim).map(|_| rng.next_u32() & mask).collect())
            .collect();
        let clients = identities
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                let id = ClientId(i as u32);
                Client::new(id, k, context_of(id), inputs[i].clone())
            })
            .collect();
        let rngs = (0..n)
            .map(|i| ChaCha20Rng::seed_from_u64(seed ^ (0x9e37_79b9_7f4a_7c15 + u64::from(i))))
            .collect();
        let server = Server::new(
            params.clone(),
            StageDeadlines::uniform(Duration::from_secs(10)),
        )
        .expect("valid parameters");
        Fed {
            params,
            server,
            clients,
            rngs,
            inputs,
            now: Duration::ZERO,
            dead: BTreeMap::new(),
            drop_plan: BTreeMap::new(),
            refusals: Vec::new(),
            rejections: Vec::new(),
            sent: Vec::new(),
        }
    }

    pub fn start(&mut self) {
        self.server.start(self.now);
    }

    /// The server's pending messages (after a wire round trip).
    pub fn take_outbox(&mut self) -> Vec<(ClientId, ServerMessage)> {
        self.server
            .drain_transmits()
            .into_iter()
            .map(|(to, m)| {
                let bytes = messages::encode(&m).expect("encode");
                (to, messages::decode(&bytes).expect("decode"))
            })
            .collect()
    }

    /// Hands `msg` to client `to` and returns its answer (wire round trip).
    pub fn deliver(
        &mut self,
        to: ClientId,
        msg: ServerMessage,
    ) -> Result<Option<ClientMessage>, ClientError> {
        let i = to.0 as usize;
        let out = self.clients[i].handle(msg, &mut self.rngs[i])?;
        Ok(out.map(|m| {
            let bytes = messages::encode(&m).expect("encode");
            messages::decode(&bytes).expect("decode")
        }))
    }

    /// Delivers `batch` to the live clients, applying the drop plan, and
    /// feeds their answers to the server.
    pub fn exchange(&mut self, batch: Vec<(ClientId, ServerMessage)>) {
        let stage = self.server.stage();
        let mut replies = Vec::new();
        for (to, msg) in batch {
            if self.dead.contains_key(&to) {
                continue;
            }
            let is_abort = matches!(msg, ServerMessage::Abort { .. });
            if let Some(s) = stage
                && !is_abort
                && self.drop_plan.get(&s).is_some_and(|d| d.contains(&to))
            {
                self.dead.insert(to, s);
                continue;
            }
            match self.deliver(to, msg) {
                Ok(Some(r)) => replies.push((to, r)),
                Ok(None) => {}
                Err(e) => self.refusals.push((to, e)),
            }
        }
        for (from, r) in replies {
            self.sent.push((from, r.clone()));
            if let Err(e) = self.server.handle_message(self.now, from, r) {
                self.rejections.push(e);
            }
        }
    }

    /// Runs one step: delivers the server's pending messages, or lets the
    /// deadline pass if there are none. False once the session is over.
    pub fn step(&mut self) -> bool {
        if self.server.outcome().is_some() {
            let out = self.take_outbox();
            self.exchange(out);
            return false;
        }
        let out = self.take_outbox();
        if out.is_empty() {
            self.now = self.server.poll_timeout().unwrap_or(self.now);
            self.server.handle_timeout(self.now);
        } else {
            self.exchange(out);
        }
        true
    }

    /// Runs until the server has an outcome.
    pub fn run(&mut self) -> Result<Aggregate, AbortReason> {
        if self.server.stage().is_none() && self.server.outcome().is_none() {
            self.start();
        }
        let mut guard = 0;
        while self.step() {
            guard += 1;
            assert!(guard < 100, "the session does not finish");
        }
        self.server.take_outcome().expect("finished")
    }

    /// Runs honestly until the server has just sent the requests of `stage`,
    /// and returns them undelivered.
    pub fn run_until(&mut self, stage: Stage) -> Vec<(ClientId, ServerMessage)> {
        if self.server.stage().is_none() && self.server.outcome().is_none() {
            self.start();
        }
        let mut guard = 0;
        loop {
            if self.server.stage() == Some(stage) {
                return self.take_outbox();
            }
            assert!(self.step(), "the session ended before {stage}");
            guard += 1;
            assert!(guard < 100, "never reached {stage}");
        }
    }

    /// The exact ring sum of the given clients' inputs.
    pub fn sum_of(&self, who: &[ClientId]) -> Vec<u32> {
        let mask = if self.params.bits == 32 {
            u32::MAX
        } else {
            (1u32 << self.params.bits) - 1
        };
        let mut acc = vec![0u32; self.params.dim as usize];
        for c in who {
            for (a, x) in acc.iter_mut().zip(&self.inputs[c.0 as usize]) {
                *a = a.wrapping_add(*x);
            }
        }
        acc.iter().map(|v| v & mask).collect()
    }

    pub fn neighbours(&self, c: ClientId) -> Vec<ClientId> {
        self.server.neighbours_of(c).expect("in roster")
    }
}
