//! The server state machine (§6).
//!
//! The server collects one message per client per stage. A stage closes when
//! every expected client has answered, or when the driver reports that its
//! deadline passed ([`Server::handle_timeout`]); a client that missed the
//! deadline has dropped out. Masked inputs are summed as they arrive, so the
//! server holds one vector, not one per client.
//!
//! The server never trusts a client message further than it checks it: a
//! message that fails a check is rejected with a [`Rejected`] error and
//! changes nothing, and the session goes on for everybody else (§6.8).

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use curve25519_dalek::scalar::Scalar;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::envelope::ENVELOPE_LEN;
use crate::crypto::identity::SignatureBytes;
use crate::crypto::prg::{self, MaskStream, Sign};
use crate::crypto::shamir::{self, Share};
use crate::crypto::{kdf, keys};
use crate::graph::Graph;
use crate::messages::{
    AdvertisedKeys, ClientMessage, InboundEnvelope, MaskedInput, RevealedShare, ServerMessage,
    ShareKeys, SurvivorSignature, UnmaskShares, consistency_signed_bytes, survivors_digest,
};
use crate::ring;
use crate::{
    AbortReason, ClientId, ParamsError, Rejected, SessionId, SessionParams, ShareKind, Stage,
};

/// How long the server waits for each stage, measured on the injected clock.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StageDeadlines {
    pub advertise: Duration,
    pub share: Duration,
    pub masked: Duration,
    pub consistency: Duration,
    pub unmask: Duration,
}

impl StageDeadlines {
    /// The same deadline for every stage.
    pub fn uniform(d: Duration) -> Self {
        StageDeadlines {
            advertise: d,
            share: d,
            masked: d,
            consistency: d,
            unmask: d,
        }
    }

    /// The deadline of `stage`.
    pub fn get(&self, stage: Stage) -> Duration {
        match stage {
            Stage::AdvertiseKeys => self.advertise,
            Stage::ShareKeys => self.share,
            Stage::MaskedInput => self.masked,
            Stage::ConsistencyCheck => self.consistency,
            Stage::Unmasking => self.unmask,
        }
    }
}

impl Default for StageDeadlines {
    fn default() -> Self {
        StageDeadlines::uniform(Duration::from_secs(60))
    }
}

/// A client's report that a neighbour's share envelope did not open (§6.3).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Complaint {
    pub reporter: ClientId,
    pub accused: ClientId,
}

/// A share that is inconsistent with the others of the same secret (§6.6).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BadShare {
    pub holder: ClientId,
    pub owner: ClientId,
    pub kind: ShareKind,
}

/// The result of a successful session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregate {
    pub session: SessionId,
    /// `Σ x_u mod 2^b` over the survivors.
    pub sum: Vec<u32>,
    /// The clients whose inputs are in the sum, sorted.
    pub survivors: Vec<ClientId>,
    /// The clients whose inputs are not, with the stage they did not complete.
    pub dropped: Vec<(ClientId, Stage)>,
    /// Survivors that dropped out later (their inputs are in the sum), with
    /// the stage they did not complete.
    pub late: Vec<(ClientId, Stage)>,
    pub complaints: Vec<Complaint>,
    pub bad_shares: Vec<BadShare>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Collecting(Stage),
    Finished,
}

/// What the server knows about one client.
#[derive(Default)]
struct Slot {
    /// The stage whose message the server is waiting for from this client.
    expect: Option<Stage>,
    /// The last stage this client answered.
    answered: Option<Stage>,
    /// The stage this client did not complete, if it dropped or was excluded.
    dropped_at: Option<Stage>,
    keys: Option<AdvertisedKeys>,
    /// Roster indices the client sent envelopes to, sorted, and the envelopes.
    receivers: Vec<u32>,
    envelopes: Vec<Vec<u8>>,
    commitment: [u8; 32],
    shared: bool,
    /// The neighbours the client masks with (mutual share exchange), sorted.
    masked_with: Vec<u32>,
    masked: bool,
    signature: Option<SignatureBytes>,
    /// The unmask request sent to this client: alive and dropped indices.
    request: Option<(Vec<u32>, Vec<u32>)>,
    /// The layer above reported the client gone: it is not waited for again.
    gone: bool,
}

/// The server's side of one aggregation session.
pub struct Server {
    params: SessionParams,
    session: SessionId,
    threshold: usize,
    neighbours: Vec<Vec<u32>>,
    deadlines: StageDeadlines,
    phase: Phase,
    deadline: Option<Duration>,
    awaiting: usize,
    slots: Vec<Slot>,
    sum: Vec<u32>,
    survivors: Vec<u32>,
    digest: [u8; 32],
    needed_dropped: Vec<u32>,
    self_shares: Vec<Vec<Share>>,
    mask_shares: Vec<Vec<Share>>,
    complaints: Vec<Complaint>,
    outbox: VecDeque<(ClientId, ServerMessage)>,
    outcome: Option<Result<Aggregate, AbortReason>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("session", &self.session)
            .field("phase", &self.phase)
            .field("awaiting", &self.awaiting)
            .finish_non_exhaustive()
    }
}

/// The intersection of two sorted index lists.
fn intersect(a: &[u32], b: &[u32]) -> Vec<u32> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

/// Parses a revealed share into a field element; `None` if not canonical.
fn parse_share(s: &RevealedShare) -> Option<Scalar> {
    Option::from(Scalar::from_canonical_bytes(s.share))
}

/// Attempts at finding a consistent subset of shares when some are bad.
const RECONSTRUCT_ATTEMPTS: usize = 256;

impl Server {
    /// A server for a session with `params`.
    pub fn new(params: SessionParams, deadlines: StageDeadlines) -> Result<Server, ParamsError> {
        params.validate()?;
        let session = params.session_id();
        let graph = Graph::new(&params, &session).map_err(|_| ParamsError::InvalidDegree {
            degree: params.degree,
            n: params.clients(),
            reason: "graph derivation failed",
        })?;
        let n = params.clients();
        let neighbours = (0..n).map(|i| graph.neighbours_of_index(i)).collect();
        Ok(Server {
            threshold: params.threshold as usize,
            session,
            neighbours,
            deadlines,
            phase: Phase::Created,
            deadline: None,
            awaiting: 0,
            slots: (0..n).map(|_| Slot::default()).collect(),
            sum: Vec::new(),
            survivors: Vec::new(),
            digest: [0; 32],
            needed_dropped: Vec::new(),
            self_shares: (0..n).map(|_| Vec::new()).collect(),
            mask_shares: (0..n).map(|_| Vec::new()).collect(),
            complaints: Vec::new(),
            outbox: VecDeque::new(),
            outcome: None,
            params,
        })
    }

    /// The session id.
    pub fn session_id(&self) -> SessionId {
        self.session
    }

    /// The session parameters.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// The stage being collected, if any.
    pub fn stage(&self) -> Option<Stage> {
        match self.phase {
            Phase::Collecting(s) => Some(s),
            _ => None,
        }
    }

    /// The clients whose masked inputs are in the sum (`U3`, §6.4), once
    /// the masked-input stage has closed; empty before.
    pub fn survivors(&self) -> Vec<ClientId> {
        self.ids(&self.survivors)
    }

    /// The roster neighbours of `id` (what every client computes for itself).
    pub fn neighbours_of(&self, id: ClientId) -> Option<Vec<ClientId>> {
        let i = self.params.index_of(id)?;
        Some(
            self.neighbours
                .get(i)?
                .iter()
                .map(|&j| self.id(j))
                .collect(),
        )
    }

    /// The outcome, once the session is over.
    pub fn outcome(&self) -> Option<&Result<Aggregate, AbortReason>> {
        self.outcome.as_ref()
    }

    /// Takes the outcome, once the session is over.
    pub fn take_outcome(&mut self) -> Option<Result<Aggregate, AbortReason>> {
        self.outcome.take()
    }

    /// When the current stage times out, on the injected clock.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.deadline
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<(ClientId, ServerMessage)> {
        self.outbox.pop_front()
    }

    /// All messages waiting to be sent.
    pub fn drain_transmits(&mut self) -> Vec<(ClientId, ServerMessage)> {
        self.outbox.drain(..).collect()
    }

    fn id(&self, i: u32) -> ClientId {
        self.params
            .roster
            .get(i as usize)
            .map_or(ClientId(u32::MAX), |e| e.id)
    }

    fn ids(&self, list: &[u32]) -> Vec<ClientId> {
        list.iter().map(|&i| self.id(i)).collect()
    }

    /// Starts the session: queues `Setup` for every client and opens R0.
    pub fn start(&mut self, now: Duration) {
        if self.phase != Phase::Created {
            return;
        }
        for i in 0..self.slots.len() {
            let id = self.id(i as u32);
            self.outbox
                .push_back((id, ServerMessage::Setup(self.params.clone())));
            self.slots[i].expect = Some(Stage::AdvertiseKeys);
        }
        self.open(Stage::AdvertiseKeys, now);
    }

    fn open(&mut self, stage: Stage, now: Duration) {
        self.phase = Phase::Collecting(stage);
        self.deadline = Some(now + self.deadlines.get(stage));
        for s in &mut self.slots {
            if s.gone && s.expect == Some(stage) {
                s.expect = None;
                s.dropped_at = Some(stage);
            }
        }
        self.awaiting = self
            .slots
            .iter()
            .filter(|s| s.expect == Some(stage))
            .count();
        // Nobody left to wait for: close now rather than at the deadline.
        if self.awaiting == 0 {
            self.close_stage(now);
        }
    }

    /// Reports that `id` is gone (its connection closed, or it declined
    /// the round): it drops out of the current stage at once instead of at
    /// the deadline, and is not waited for in any later stage. The stage
    /// closes if nobody else is awaited. False if `id` is not in the roster.
    pub fn drop_client(&mut self, now: Duration, id: ClientId) -> bool {
        let Some(i) = self.params.index_of(id) else {
            return false;
        };
        let slot = &mut self.slots[i];
        slot.gone = true;
        if let Phase::Collecting(stage) = self.phase
            && slot.expect == Some(stage)
        {
            slot.expect = None;
            slot.dropped_at = Some(stage);
            self.awaiting = self.awaiting.saturating_sub(1);
            if self.awaiting == 0 {
                self.close_stage(now);
            }
        }
        true
    }

    /// Handles the deadline: closes the current stage if it has passed.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.deadline.is_some_and(|d| now >= d) {
            self.close_stage(now);
        }
    }

    /// Handles one message from the authenticated client `from`.
    pub fn handle_message(
        &mut self,
        now: Duration,
        from: ClientId,
        msg: ClientMessage,
    ) -> Result<(), Rejected> {
        let Phase::Collecting(current) = self.phase else {
            return Err(Rejected::SessionOver);
        };
        let i = self
            .params
            .index_of(from)
            .ok_or(Rejected::UnknownClient { client: from })?;
        if msg.session() != self.session {
            return Err(Rejected::WrongSession {
                client: from,
                expected: self.session,
                got: msg.session(),
            });
        }
        if msg.stage() != current {
            return Err(Rejected::OutOfRound {
                client: from,
                current,
                got: msg.stage(),
            });
        }
        let slot = &self.slots[i];
        if slot.expect != Some(current) {
            return Err(if slot.answered == Some(current) {
                Rejected::Duplicate {
                    client: from,
                    stage: current,
                }
            } else {
                Rejected::NotEligible {
                    client: from,
                    stage: current,
                }
            });
        }
        match msg {
            ClientMessage::AdvertiseKeys(m) => self.on_advertise(i, from, m)?,
            ClientMessage::ShareKeys(m) => self.on_share(i, from, m)?,
            ClientMessage::MaskedInput(m) => self.on_masked(i, from, m)?,
            ClientMessage::Consistency(m) => {
                let identity = self.params.roster[i].identity;
                if !identity.verify(
                    &consistency_signed_bytes(&self.session, &self.digest),
                    &m.signature,
                ) {
                    return Err(Rejected::BadSignature {
                        client: from,
                        stage: current,
                    });
                }
                self.slots[i].signature = Some(m.signature);
            }
            ClientMessage::UnmaskShares(m) => self.on_unmask(i, from, m)?,
        }
        let slot = &mut self.slots[i];
        slot.expect = None;
        slot.answered = Some(current);
        self.awaiting = self.awaiting.saturating_sub(1);
        if self.awaiting == 0 {
            self.close_stage(now);
        }
        Ok(())
    }

    fn on_advertise(
        &mut self,
        i: usize,
        from: ClientId,
        m: AdvertisedKeys,
    ) -> Result<(), Rejected> {
        if m.sender != from {
            return Err(Rejected::Malformed {
                client: from,
                stage: Stage::AdvertiseKeys,
                reason: format!("sender field says {}", m.sender),
            });
        }
        if !m.verify(&self.params.roster[i].identity) {
            return Err(Rejected::BadSignature {
                client: from,
                stage: Stage::AdvertiseKeys,
            });
        }
        self.slots[i].keys = Some(m);
        Ok(())
    }

    fn on_share(&mut self, i: usize, from: ClientId, m: ShareKeys) -> Result<(), Rejected> {
        let malformed = |reason: String| Rejected::Malformed {
            client: from,
            stage: Stage::ShareKeys,
            reason,
        };
        let mut envelopes: Vec<(u32, Vec<u8>)> = Vec::with_capacity(m.envelopes.len());
        for e in m.envelopes {
            let Some(j) = self.params.index_of(e.to) else {
                return Err(malformed(format!("envelope for unknown client {}", e.to)));
            };
            let j = j as u32;
            if self.neighbours[i].binary_search(&j).is_err()
                || self.slots[j as usize].keys.is_none()
            {
                return Err(malformed(format!(
                    "envelope for {}, which is not in its key directory",
                    e.to
                )));
            }
            if e.ciphertext.len() != ENVELOPE_LEN {
                return Err(malformed(format!(
                    "envelope for {} has {} bytes, expected {ENVELOPE_LEN}",
                    e.to,
                    e.ciphertext.len()
                )));
            }
            envelopes.push((j, e.ciphertext));
        }
        envelopes.sort_unstable_by_key(|(j, _)| *j);
        if let Some(w) = envelopes.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(malformed(format!("two envelopes for {}", self.id(w[0].0))));
        }
        if envelopes.len() < self.threshold {
            return Err(malformed(format!(
                "{} envelopes, fewer than the threshold {}",
                envelopes.len(),
                self.threshold
            )));
        }
        let slot = &mut self.slots[i];
        (slot.receivers, slot.envelopes) = envelopes.into_iter().unzip();
        slot.commitment = m.self_mask_commitment;
        slot.shared = true;
        Ok(())
    }

    fn on_masked(&mut self, i: usize, from: ClientId, m: MaskedInput) -> Result<(), Rejected> {
        let (bits, dim) = (self.params.bits, self.params.dim);
        if m.masked.bits != bits || m.masked.len != dim {
            return Err(Rejected::WrongLength {
                client: from,
                expected: dim,
                got: m.masked.len,
                expected_bits: bits,
                got_bits: m.masked.bits,
            });
        }
        let malformed = |reason: String| Rejected::Malformed {
            client: from,
            stage: Stage::MaskedInput,
            reason,
        };
        m.masked.check().map_err(|e| malformed(e.to_string()))?;
        let mut accused = BTreeSet::new();
        for a in &m.bad_envelopes {
            let j = self.params.index_of(*a).map(|j| j as u32);
            if j.is_none_or(|j| self.slots[i].masked_with.binary_search(&j).is_err()) {
                return Err(malformed(format!(
                    "complaint about {a}, who sent it no envelope"
                )));
            }
            if !accused.insert(*a) {
                return Err(malformed(format!("two complaints about {a}")));
            }
        }
        if self.sum.len() != dim as usize {
            self.sum = vec![0; dim as usize];
        }
        m.masked
            .add_into(&mut self.sum)
            .map_err(|e| malformed(e.to_string()))?;
        self.complaints
            .extend(accused.into_iter().map(|accused| Complaint {
                reporter: from,
                accused,
            }));
        self.slots[i].masked = true;
        Ok(())
    }

    fn on_unmask(&mut self, i: usize, from: ClientId, m: UnmaskShares) -> Result<(), Rejected> {
        let malformed = |reason: String| Rejected::Malformed {
            client: from,
            stage: Stage::Unmasking,
            reason,
        };
        let Some((alive, dropped)) = &self.slots[i].request else {
            return Err(malformed(
                "no unmask request was sent to this client".into(),
            ));
        };
        let mut parsed: Vec<(u32, ShareKind, Scalar)> = Vec::new();
        let mut seen = BTreeSet::new();
        for (list, allowed, kind) in [
            (&m.self_mask, alive, ShareKind::SelfMask),
            (&m.mask_key, dropped, ShareKind::MaskKey),
        ] {
            for s in list {
                let j = self.params.index_of(s.owner).map(|j| j as u32);
                let Some(j) = j.filter(|j| allowed.binary_search(j).is_ok()) else {
                    return Err(malformed(format!(
                        "unrequested {kind} share of {}",
                        s.owner
                    )));
                };
                if !seen.insert(j) {
                    return Err(malformed(format!("two shares of {}", s.owner)));
                }
                let value = parse_share(s).ok_or_else(|| {
                    malformed(format!("share of {} is not a field element", s.owner))
                })?;
                parsed.push((j, kind, value));
            }
        }
        for (j, kind, value) in parsed {
            let share = Share {
                holder: from,
                value,
            };
            match kind {
                ShareKind::SelfMask => self.self_shares[j as usize].push(share),
                ShareKind::MaskKey => self.mask_shares[j as usize].push(share),
            }
        }
        Ok(())
    }

    /// Closes the current stage now, whoever has not answered yet.
    pub fn close_stage(&mut self, now: Duration) {
        let Phase::Collecting(stage) = self.phase else {
            return;
        };
        for s in &mut self.slots {
            if s.expect == Some(stage) {
                s.expect = None;
                s.dropped_at = Some(stage);
            }
        }
        let result = match stage {
            Stage::AdvertiseKeys => self.close_advertise(),
            Stage::ShareKeys => self.close_share(),
            Stage::MaskedInput => self.close_masked(),
            Stage::ConsistencyCheck => self.close_consistency(),
            Stage::Unmasking => self.close_unmask(),
        };
        match result {
            Err(reason) => self.abort(reason),
            Ok(Some(next)) => self.open(next, now),
            Ok(None) => {}
        }
    }

    fn abort(&mut self, reason: AbortReason) {
        let text = reason.to_string();
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            s.expect = None;
            if s.dropped_at.is_none() && s.answered.is_some() {
                let id = self.id(i as u32);
                self.outbox.push_back((
                    id,
                    ServerMessage::Abort {
                        session: self.session,
                        reason: text.clone(),
                    },
                ));
            }
        }
        self.phase = Phase::Finished;
        self.deadline = None;
        self.outcome = Some(Err(reason));
    }

    /// Tells one client that the session is over for it.
    fn exclude(&mut self, i: usize, stage: Stage, reason: String) {
        self.slots[i].dropped_at = Some(stage);
        self.slots[i].expect = None;
        let id = self.id(i as u32);
        self.outbox.push_back((
            id,
            ServerMessage::Abort {
                session: self.session,
                reason,
            },
        ));
    }

    /// R0 closed: send each client its neighbours' keys (§6.2).
    fn close_advertise(&mut self) -> Result<Option<Stage>, AbortReason> {
        let t = self.threshold;
        for i in 0..self.slots.len() {
            if self.slots[i].keys.is_none() {
                continue;
            }
            let keys: Vec<AdvertisedKeys> = self.neighbours[i]
                .iter()
                .filter_map(|&j| self.slots[j as usize].keys.clone())
                .collect();
            if keys.len() < t {
                let reason = format!(
                    "only {} of your neighbours advertised keys, the threshold is {t}",
                    keys.len()
                );
                self.exclude(i, Stage::ShareKeys, reason);
                continue;
            }
            let id = self.id(i as u32);
            self.outbox.push_back((
                id,
                ServerMessage::KeyDirectory {
                    session: self.session,
                    keys,
                },
            ));
            self.slots[i].expect = Some(Stage::ShareKeys);
        }
        self.next_or_abort(Stage::ShareKeys, Stage::AdvertiseKeys)
    }

    fn next_or_abort(&self, next: Stage, closed: Stage) -> Result<Option<Stage>, AbortReason> {
        if self.slots.iter().any(|s| s.expect == Some(next)) {
            Ok(Some(next))
        } else {
            Err(AbortReason::NoClientsLeft {
                stage: closed,
                answered: self
                    .slots
                    .iter()
                    .filter(|s| s.answered == Some(closed))
                    .count(),
                threshold: self.threshold,
            })
        }
    }

    /// R1 closed: work out who masks with whom and relay the envelopes (§6.3).
    fn close_share(&mut self) -> Result<Option<Stage>, AbortReason> {
        let t = self.threshold;
        let n = self.slots.len();
        // u and v mask with each other iff both shared and each sent the other
        // an envelope: exactly the envelopes both will receive.
        for v in 0..n {
            if !self.slots[v].shared {
                continue;
            }
            let mutual: Vec<u32> = self.slots[v]
                .receivers
                .iter()
                .copied()
                .filter(|&u| {
                    let su = &self.slots[u as usize];
                    su.shared && su.receivers.binary_search(&(v as u32)).is_ok()
                })
                .collect();
            self.slots[v].masked_with = mutual;
        }
        for v in 0..n {
            if !self.slots[v].shared {
                continue;
            }
            if self.slots[v].masked_with.len() < t {
                let reason = format!(
                    "only {} of your neighbours exchanged shares with you, the threshold is {t}",
                    self.slots[v].masked_with.len()
                );
                self.exclude(v, Stage::MaskedInput, reason);
                continue;
            }
            let mut envelopes = Vec::with_capacity(self.slots[v].masked_with.len());
            for k in 0..self.slots[v].masked_with.len() {
                let u = self.slots[v].masked_with[k] as usize;
                let su = &mut self.slots[u];
                if let Ok(pos) = su.receivers.binary_search(&(v as u32)) {
                    let ciphertext = std::mem::take(&mut su.envelopes[pos]);
                    envelopes.push(InboundEnvelope {
                        from: self.params.roster[u].id,
                        ciphertext,
                    });
                }
            }
            let id = self.id(v as u32);
            self.outbox.push_back((
                id,
                ServerMessage::ShareRelay {
                    session: self.session,
                    envelopes,
                },
            ));
            self.slots[v].expect = Some(Stage::MaskedInput);
        }
        for s in &mut self.slots {
            s.envelopes = Vec::new();
        }
        self.next_or_abort(Stage::MaskedInput, Stage::ShareKeys)
    }

    /// R2 closed: fix the survivor set and check that every mask can be
    /// removed (§6.4).
    fn close_masked(&mut self) -> Result<Option<Stage>, AbortReason> {
        let t = self.threshold;
        let survivors: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&i| self.slots[i as usize].masked)
            .collect();
        if survivors.is_empty() {
            return Err(AbortReason::NoClientsLeft {
                stage: Stage::MaskedInput,
                answered: 0,
                threshold: self.threshold,
            });
        }
        if survivors.len() < self.params.min_survivors as usize {
            return Err(AbortReason::BelowMinimumSurvivors {
                stage: Stage::MaskedInput,
                have: survivors.len(),
                need: self.params.min_survivors,
            });
        }
        let mut dropped = BTreeSet::new();
        for &u in &survivors {
            let mw = &self.slots[u as usize].masked_with;
            let have = intersect(mw, &survivors).len();
            if have < t {
                return Err(AbortReason::TooFewSurvivingNeighbours {
                    stage: Stage::MaskedInput,
                    client: self.id(u),
                    kind: ShareKind::SelfMask,
                    have,
                    need: t,
                });
            }
            dropped.extend(
                mw.iter()
                    .copied()
                    .filter(|j| !self.slots[*j as usize].masked),
            );
        }
        for &d in &dropped {
            let have = intersect(&self.slots[d as usize].masked_with, &survivors).len();
            if have < t {
                return Err(AbortReason::TooFewSurvivingNeighbours {
                    stage: Stage::MaskedInput,
                    client: self.id(d),
                    kind: ShareKind::MaskKey,
                    have,
                    need: t,
                });
            }
        }
        let ids = self.ids(&survivors);
        self.digest = survivors_digest(&ids);
        for &u in &survivors {
            self.outbox.push_back((
                self.id(u),
                ServerMessage::ConsistencyRequest {
                    session: self.session,
                    survivors: ids.clone(),
                },
            ));
            self.slots[u as usize].expect = Some(Stage::ConsistencyCheck);
        }
        self.survivors = survivors;
        self.needed_dropped = dropped.into_iter().collect();
        Ok(Some(Stage::ConsistencyCheck))
    }

    /// R3 closed: ask the signers that can pass their own checks for shares
    /// (§6.5).
    fn close_consistency(&mut self) -> Result<Option<Stage>, AbortReason> {
        let t = self.threshold;
        let signers: Vec<u32> = self
            .survivors
            .iter()
            .copied()
            .filter(|&i| self.slots[i as usize].signature.is_some())
            .collect();
        // A signer refuses to unmask unless t of its neighbours signed too.
        let responders: Vec<u32> = signers
            .iter()
            .copied()
            .filter(|&v| intersect(&self.slots[v as usize].masked_with, &signers).len() >= t)
            .collect();
        for (list, kind) in [
            (&self.survivors, ShareKind::SelfMask),
            (&self.needed_dropped, ShareKind::MaskKey),
        ] {
            for &u in list {
                let have = intersect(&self.slots[u as usize].masked_with, &responders).len();
                if have < t {
                    return Err(AbortReason::TooFewSurvivingNeighbours {
                        stage: Stage::ConsistencyCheck,
                        client: self.id(u),
                        kind,
                        have,
                        need: t,
                    });
                }
            }
        }
        for &v in &responders {
            let mw = &self.slots[v as usize].masked_with;
            // The client needs t valid neighbour signatures; more cost it time
            // and prove nothing further.
            let signatures: Vec<SurvivorSignature> = intersect(mw, &signers)
                .into_iter()
                .take(t)
                .filter_map(|j| {
                    self.slots[j as usize]
                        .signature
                        .map(|signature| SurvivorSignature {
                            client: self.id(j),
                            signature,
                        })
                })
                .collect();
            let alive = intersect(mw, &self.survivors);
            let dropped = intersect(mw, &self.needed_dropped);
            self.outbox.push_back((
                self.id(v),
                ServerMessage::UnmaskRequest {
                    session: self.session,
                    signatures,
                    alive: self.ids(&alive),
                    dropped: self.ids(&dropped),
                },
            ));
            let slot = &mut self.slots[v as usize];
            slot.request = Some((alive, dropped));
            slot.expect = Some(Stage::Unmasking);
        }
        Ok(Some(Stage::Unmasking))
    }

    /// R4 closed: reconstruct the seeds, remove the masks, publish the sum (§6.6).
    fn close_unmask(&mut self) -> Result<Option<Stage>, AbortReason> {
        let t = self.threshold;
        let session = self.session;
        let mut streams = Vec::new();
        let mut bad_shares = Vec::new();
        let crypto = |e: crate::crypto::CryptoFailure| AbortReason::Crypto(e.0);

        for k in 0..self.survivors.len() {
            let u = self.survivors[k];
            let owner = self.id(u);
            let commitment = self.slots[u as usize].commitment;
            let shares = &self.self_shares[u as usize];
            let (seed, bad) =
                reconstruct_verified(&session, owner, ShareKind::SelfMask, shares, t, |seed| {
                    kdf::commit_self_mask(&session, owner, seed.as_bytes()) == commitment
                })?;
            bad_shares.extend(bad);
            let key = keys::self_mask_key(&seed, &session, owner).map_err(crypto)?;
            streams.push(MaskStream::new(&key, Sign::Sub).map_err(crypto)?);
        }
        for k in 0..self.needed_dropped.len() {
            let d = self.needed_dropped[k];
            let owner = self.id(d);
            let Some(dk) = self.slots[d as usize].keys.clone() else {
                return Err(AbortReason::Crypto("dropped client without keys"));
            };
            let shares = &self.mask_shares[d as usize];
            let (seed, bad) =
                reconstruct_verified(&session, owner, ShareKind::MaskKey, shares, t, |seed| {
                    keys::mask_secret(seed, &session, owner)
                        .and_then(|sk| sk.public())
                        .is_ok_and(|pk| pk == dk.mask_pk)
                })?;
            bad_shares.extend(bad);
            let sk = keys::mask_secret(&seed, &session, owner).map_err(crypto)?;
            for &w in &intersect(&self.slots[d as usize].masked_with, &self.survivors) {
                let Some(wk) = &self.slots[w as usize].keys else {
                    return Err(AbortReason::Crypto("survivor without keys"));
                };
                let shared = sk
                    .agree(&wk.mask_pk)
                    .ok_or(AbortReason::Crypto("low-order mask key of a survivor"))?;
                let key = keys::pair_mask_key(
                    &shared,
                    &session,
                    owner,
                    &dk.mask_pk,
                    self.id(w),
                    &wk.mask_pk,
                )
                .map_err(crypto)?;
                // Survivor w applied this mask with pair_sign(w, d); undo it.
                let sign = keys::pair_sign(self.id(w), owner).negate();
                streams.push(MaskStream::new(&key, sign).map_err(crypto)?);
            }
        }
        let mut sum = std::mem::take(&mut self.sum);
        prg::apply_parallel(&mut sum, &streams).map_err(crypto)?;
        ring::reduce(&mut sum, self.params.bits);

        let dropped = (0..self.slots.len())
            .filter(|&i| !self.slots[i].masked)
            .map(|i| {
                let s = &self.slots[i];
                (
                    self.id(i as u32),
                    s.dropped_at.unwrap_or(Stage::AdvertiseKeys),
                )
            })
            .collect();
        let late = (0..self.slots.len())
            .filter_map(|i| {
                let s = &self.slots[i];
                s.dropped_at
                    .filter(|_| s.masked)
                    .map(|stage| (self.id(i as u32), stage))
            })
            .collect();
        self.phase = Phase::Finished;
        self.deadline = None;
        self.outcome = Some(Ok(Aggregate {
            session,
            sum,
            survivors: self.ids(&self.survivors),
            dropped,
            late,
            complaints: std::mem::take(&mut self.complaints),
            bad_shares,
        }));
        for s in &mut self.self_shares {
            s.clear();
        }
        for s in &mut self.mask_shares {
            s.clear();
        }
        Ok(None)
    }
}

/// Reconstructs a secret from `shares` and checks it with `verify` against
/// the owner's public commitment. If the first `t` shares do not verify, some
/// holder lied: try other `t`-subsets (chosen deterministically from the
/// session and owner), and name the holders whose shares are off the
/// polynomial of the subset that verifies (§6.6).
fn reconstruct_verified(
    session: &SessionId,
    owner: ClientId,
    kind: ShareKind,
    shares: &[Share],
    t: usize,
    verify: impl Fn(&Scalar) -> bool,
) -> Result<(Zeroizing<Scalar>, Vec<BadShare>), AbortReason> {
    let holders = || shares.iter().map(|s| s.holder).collect::<Vec<_>>();
    if shares.len() < t {
        return Err(AbortReason::MissingShares {
            client: owner,
            kind,
            have: shares.len(),
            need: t,
            holders: holders(),
        });
    }
    let crypto = |e: crate::crypto::CryptoFailure| AbortReason::Crypto(e.0);
    let first = shamir::reconstruct(&shares[..t]).map_err(crypto)?;
    if verify(&first) {
        return Ok((first, Vec::new()));
    }
    let mut h = Sha256::new();
    h.update(kdf::DOMAIN);
    h.update(b"reconstruct\0");
    h.update(session.0);
    h.update(kdf::id_bytes(owner));
    h.update([kind as u8]);
    let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
    let mut order: Vec<usize> = (0..shares.len()).collect();
    for _ in 0..RECONSTRUCT_ATTEMPTS {
        // A uniformly random t-subset: a partial Fisher–Yates shuffle.
        for i in 0..t {
            let span = (order.len() - i) as u64;
            let j = i + (rand_core::RngCore::next_u64(&mut rng) % span) as usize;
            order.swap(i, j);
        }
        let subset: Vec<Share> = order[..t].iter().map(|&i| shares[i].clone()).collect();
        let secret = shamir::reconstruct(&subset).map_err(crypto)?;
        if !verify(&secret) {
            continue;
        }
        let mut bad = Vec::new();
        for &i in &order[t..] {
            let s = &shares[i];
            let predicted =
                shamir::interpolate_at(&shamir::eval_point(s.holder), &subset).map_err(crypto)?;
            if predicted != s.value {
                bad.push(BadShare {
                    holder: s.holder,
                    owner,
                    kind,
                });
            }
        }
        return Ok((secret, bad));
    }
    Err(AbortReason::Unrecoverable {
        client: owner,
        kind,
        shares: shares.len(),
        holders: holders(),
    })
}
