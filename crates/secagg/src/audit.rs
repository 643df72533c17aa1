//! A malicious server's attacks on one client, run against the real client
//! and server state machines in memory, for `fedveil audit` and its tests
//! (protocols/secagg-plus.md §8).
//!
//! Each attack plays the server: it runs the honest protocol up to a stage
//! with ten clients (k = 6 neighbours, threshold t = 4, 64 coordinates in
//! `Z_{2^32}`), then edits, replaces or replays the server's messages to try
//! to learn the input of client 3, the target. It collects every answer the
//! clients give, reconstructs whatever secrets the shares it obtained allow
//! (checked against the target's commitment and advertised key, exactly
//! as a real attacker would check them), strips every mask it can from the
//! target's masked input, and counts the coordinates of that best estimate
//! that equal the target's true input. Masked values are uniform in the
//! ring, so chance is `dim / 2^32` matching coordinates: an attack that
//! fails recovers none.

use std::collections::{BTreeMap, BTreeSet};

use curve25519_dalek::scalar::Scalar;
use serde::Serialize;

use crate::crypto::identity::SignatureBytes;
use crate::crypto::prg::{self, MaskStream};
use crate::crypto::shamir::{self, Share};
use crate::crypto::{kdf, keys};
use crate::messages::{AdvertisedKeys, ClientMessage, ServerMessage, SurvivorSignature};
use crate::ring::PackedVec;
use crate::sim::{Cohort, CohortSpec, SimError};
use crate::{ClientId, SessionId, ShareKind, Stage};

/// Clients in an attacked session.
pub const CLIENTS: u32 = 10;
/// Each client's neighbours.
pub const DEGREE: u32 = 6;
/// Shares needed to reconstruct a secret.
pub const THRESHOLD: u32 = 4;
/// Coordinates of each input.
pub const DIM: u32 = 64;
/// The attacked client.
pub const TARGET: ClientId = ClientId(3);

/// What an attack achieved.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// The clients' refusals, as their error messages, in delivery order.
    pub refusals: Vec<(u32, String)>,
    /// The target's self-mask and mask-key shares the server collected.
    pub self_mask_shares: usize,
    pub mask_key_shares: usize,
    /// Whether the collected shares reconstruct the target's self-mask seed
    /// and mask seed (each checked against what the target published).
    pub self_seed_recovered: bool,
    pub mask_seed_recovered: bool,
    /// Coordinates of the server's best estimate of the target's input that
    /// equal the input, of `dim`.
    pub recovered_coordinates: usize,
    pub dim: usize,
    /// Coordinates a uniformly random guess matches on average.
    pub chance_coordinates: f64,
}

impl Finding {
    /// Whether the target's input stayed hidden: the server did not get
    /// both secrets, and its estimate matches no more coordinates than a
    /// random guess would (fewer than one in 64 at 2^-32 each).
    pub fn target_hidden(&self) -> bool {
        !(self.self_seed_recovered && self.mask_seed_recovered) && self.recovered_coordinates == 0
    }

    /// One line for a report.
    pub fn evidence(&self) -> String {
        let refused = if self.refusals.is_empty() {
            "no refusal".to_string()
        } else {
            let mut kinds: Vec<&str> = self.refusals.iter().map(|(_, e)| e.as_str()).collect();
            kinds.sort();
            kinds.dedup();
            format!(
                "{} refusals ({})",
                self.refusals.len(),
                kinds.into_iter().take(2).collect::<Vec<_>>().join("; ")
            )
        };
        format!(
            "{refused}; server holds {} self-mask and {} mask-key shares of the target (t = {}); \
             its best estimate matches {} of {} coordinates (chance: {:.1e})",
            self.self_mask_shares,
            self.mask_key_shares,
            THRESHOLD,
            self.recovered_coordinates,
            self.dim,
            self.chance_coordinates
        )
    }
}

/// An attacked session: the cohort, its clients' true inputs, and what the
/// malicious server has collected.
struct Session {
    cohort: Cohort,
    inputs: Vec<Vec<u32>>,
    answers: Vec<(ClientId, ClientMessage)>,
    refusals: Vec<(u32, String)>,
}

impl Session {
    fn new(seed: u64, context_of: impl Fn(ClientId) -> Option<[u8; 32]>) -> Result<Self, SimError> {
        let spec = CohortSpec {
            clients: CLIENTS,
            degree: DEGREE,
            threshold: THRESHOLD,
            dim: DIM,
            bits: 32,
            seed,
            context: [7u8; 32],
            min_survivors: 1,
        };
        let (mut cohort, inputs) = spec.build(context_of)?;
        cohort.enable_log();
        Ok(Session {
            cohort,
            inputs,
            answers: Vec::new(),
            refusals: Vec::new(),
        })
    }

    fn session_id(&self) -> SessionId {
        self.cohort.server.session_id()
    }

    fn neighbours(&self, c: ClientId) -> Vec<ClientId> {
        self.cohort.server.neighbours_of(c).unwrap_or_default()
    }

    /// Sends `msg` to `to`, keeping an answer or the refusal.
    fn ask(&mut self, to: ClientId, msg: ServerMessage) -> Option<ClientMessage> {
        match self.cohort.deliver(to, msg) {
            Ok(Some(answer)) => {
                self.answers.push((to, answer.clone()));
                Some(answer)
            }
            Ok(None) => None,
            Err(e) => {
                self.refusals.push((to.0, e.to_string()));
                None
            }
        }
    }

    /// What client `c` sent the server, found by `pick`.
    fn sent<T>(&self, c: ClientId, pick: impl Fn(&ClientMessage) -> Option<T>) -> Option<T> {
        self.cohort
            .log
            .iter()
            .filter(|(from, _)| *from == c)
            .find_map(|(_, m)| pick(m))
    }

    fn advertised(&self, c: ClientId) -> Option<AdvertisedKeys> {
        self.sent(c, |m| match m {
            ClientMessage::AdvertiseKeys(k) => Some(k.clone()),
            _ => None,
        })
    }

    fn masked_input(&self, c: ClientId) -> Option<PackedVec> {
        self.sent(c, |m| match m {
            ClientMessage::MaskedInput(x) => Some(x.masked.clone()),
            _ => None,
        })
    }

    /// Shares of `owner` of `kind` in everything the clients answered.
    fn loot(&self, owner: ClientId, kind: ShareKind) -> Vec<Share> {
        let mut seen = BTreeSet::new();
        self.answers
            .iter()
            .filter_map(|(holder, m)| {
                let ClientMessage::UnmaskShares(u) = m else {
                    return None;
                };
                let list = match kind {
                    ShareKind::SelfMask => &u.self_mask,
                    ShareKind::MaskKey => &u.mask_key,
                };
                let s = list.iter().find(|s| s.owner == owner)?;
                let value = Option::from(Scalar::from_canonical_bytes(s.share))?;
                seen.insert(*holder).then_some(Share {
                    holder: *holder,
                    value,
                })
            })
            .collect()
    }

    fn recover_self_seed(&self, owner: ClientId, shares: &[Share]) -> Option<Scalar> {
        let t = THRESHOLD as usize;
        if shares.len() < t {
            return None;
        }
        let seed = *shamir::reconstruct(&shares[..t]).ok()?;
        let commitment = self.sent(owner, |m| match m {
            ClientMessage::ShareKeys(s) => Some(s.self_mask_commitment),
            _ => None,
        })?;
        (kdf::commit_self_mask(&self.session_id(), owner, seed.as_bytes()) == commitment)
            .then_some(seed)
    }

    fn recover_mask_seed(&self, owner: ClientId, shares: &[Share]) -> Option<Scalar> {
        let t = THRESHOLD as usize;
        if shares.len() < t {
            return None;
        }
        let seed = *shamir::reconstruct(&shares[..t]).ok()?;
        let sk = keys::mask_secret(&seed, &self.session_id(), owner).ok()?;
        (sk.public().ok()? == self.advertised(owner)?.mask_pk).then_some(seed)
    }

    /// The server's best estimate of `owner`'s input: its masked input
    /// minus every mask the recovered seeds let it compute (or a guess of
    /// zeros when the owner never sent a masked input).
    fn estimate(
        &self,
        owner: ClientId,
        self_seed: Option<Scalar>,
        mask_seed: Option<Scalar>,
    ) -> Vec<u32> {
        let session = self.session_id();
        let Some(mut y) = self.masked_input(owner).and_then(|p| p.unpack().ok()) else {
            return vec![0; DIM as usize];
        };
        let mut streams = Vec::new();
        if let Some(b) = self_seed
            && let Ok(key) = keys::self_mask_key(&b, &session, owner)
            && let Ok(s) = MaskStream::new(&key, prg::Sign::Sub)
        {
            streams.push(s);
        }
        if let Some(s) = mask_seed
            && let Ok(sk) = keys::mask_secret(&s, &session, owner)
            && let Some(mine) = self.advertised(owner)
        {
            for v in self.neighbours(owner) {
                let Some(theirs) = self.advertised(v) else {
                    continue;
                };
                let Some(shared) = sk.agree(&theirs.mask_pk) else {
                    continue;
                };
                if let Ok(key) =
                    keys::pair_mask_key(&shared, &session, owner, &mine.mask_pk, v, &theirs.mask_pk)
                    && let Ok(stream) = MaskStream::new(&key, keys::pair_sign(owner, v).negate())
                {
                    streams.push(stream);
                }
            }
        }
        if prg::apply(&mut y, 0, &streams).is_err() {
            return vec![0; DIM as usize];
        }
        y
    }

    /// What the attack achieved against the target.
    fn finding(&self) -> Finding {
        let b = self.loot(TARGET, ShareKind::SelfMask);
        let s = self.loot(TARGET, ShareKind::MaskKey);
        let self_seed = self.recover_self_seed(TARGET, &b);
        let mask_seed = self.recover_mask_seed(TARGET, &s);
        let estimate = self.estimate(TARGET, self_seed, mask_seed);
        let truth = &self.inputs[TARGET.0 as usize];
        Finding {
            refusals: self.refusals.clone(),
            self_mask_shares: b.len(),
            mask_key_shares: s.len(),
            self_seed_recovered: self_seed.is_some(),
            mask_seed_recovered: mask_seed.is_some(),
            recovered_coordinates: estimate.iter().zip(truth).filter(|(a, b)| a == b).count(),
            dim: DIM as usize,
            chance_coordinates: f64::from(DIM) / 2f64.powi(32),
        }
    }

    /// Runs honestly until the server has just sent `stage`'s requests.
    fn until(&mut self, stage: Stage) -> Result<Vec<(ClientId, ServerMessage)>, SimError> {
        self.cohort.run_until(stage)
    }

    /// Signatures of the survivor set `survivors` from every client in
    /// `from` that signs it.
    fn signatures(
        &mut self,
        from: &[ClientId],
        survivors: &[ClientId],
    ) -> BTreeMap<ClientId, SignatureBytes> {
        let session = self.session_id();
        let mut sigs = BTreeMap::new();
        for &to in from {
            let msg = ServerMessage::ConsistencyRequest {
                session,
                survivors: survivors.to_vec(),
            };
            if let Some(ClientMessage::Consistency(c)) = self.ask(to, msg) {
                sigs.insert(to, c.signature);
            }
        }
        sigs
    }

    /// An unmask request to `v` carrying the signatures of its neighbours.
    fn unmask_request(
        &self,
        v: ClientId,
        sigs: &BTreeMap<ClientId, SignatureBytes>,
        alive: Vec<ClientId>,
        dropped: Vec<ClientId>,
    ) -> ServerMessage {
        let signatures = self
            .neighbours(v)
            .iter()
            .filter_map(|c| {
                sigs.get(c).map(|s| SurvivorSignature {
                    client: *c,
                    signature: *s,
                })
            })
            .collect();
        ServerMessage::UnmaskRequest {
            session: self.session_id(),
            signatures,
            alive,
            dropped,
        }
    }
}

impl Session {
    /// Runs honestly to the consistency check, gets every other client's
    /// signature of a survivor set without the target, and returns the
    /// legitimate unmask requests for the target's neighbours that a
    /// target which really dropped would lead to.
    fn target_dropped(&mut self) -> Result<Vec<(ClientId, ServerMessage)>, SimError> {
        let consistency = self.until(Stage::ConsistencyCheck)?;
        let others = |c: &ClientId| *c != TARGET;
        let without: Vec<ClientId> = (0..CLIENTS).map(ClientId).filter(others).collect();
        let from: Vec<ClientId> = consistency.iter().map(|(c, _)| *c).filter(others).collect();
        let sigs = self.signatures(&from, &without);
        Ok(self
            .neighbours(TARGET)
            .into_iter()
            .map(|v| {
                let alive = self.neighbours(v).into_iter().filter(others).collect();
                (v, self.unmask_request(v, &sigs, alive, vec![TARGET]))
            })
            .collect())
    }
}

/// The lists of an unmask request, edited by `f(alive, dropped)`.
fn edited(
    msg: ServerMessage,
    f: impl FnOnce(&mut Vec<ClientId>, &mut Vec<ClientId>),
) -> ServerMessage {
    match msg {
        ServerMessage::UnmaskRequest {
            session,
            signatures,
            mut alive,
            mut dropped,
        } => {
            f(&mut alive, &mut dropped);
            ServerMessage::UnmaskRequest {
                session,
                signatures,
                alive,
                dropped,
            }
        }
        other => other,
    }
}

/// §6.7 rule 2, §8.2 (Flower's flaw): every neighbour of the target is
/// asked for both of its shares by listing it as alive and dropped; then
/// the server asks honestly and takes what it gets.
pub fn alive_and_dropped(seed: u64) -> Result<Finding, SimError> {
    let mut s = Session::new(seed, |_| None)?;
    let requests = s.until(Stage::Unmasking)?;
    let neighbours = s.neighbours(TARGET);
    for (to, msg) in requests.iter().filter(|(to, _)| neighbours.contains(to)) {
        let attack = edited(msg.clone(), |_, dropped| {
            dropped.push(TARGET);
            dropped.sort();
        });
        s.ask(*to, attack);
    }
    for (to, msg) in requests {
        s.ask(to, msg);
    }
    Ok(s.finding())
}

/// §8.3: the server tells t of the target's neighbours that it survived
/// and the other k − t that it dropped, to collect self-mask shares from
/// the first group and mask-key shares from the second. Each group signed
/// its own survivor set, so each answers; but 2t > k leaves the second
/// group too small to reach t mask-key shares.
pub fn equivocation(seed: u64) -> Result<Finding, SimError> {
    let mut s = Session::new(seed, |_| None)?;
    let consistency = s.until(Stage::ConsistencyCheck)?;
    let nb = s.neighbours(TARGET);
    let all: Vec<ClientId> = (0..CLIENTS).map(ClientId).collect();
    let without: Vec<ClientId> = all.iter().copied().filter(|c| *c != TARGET).collect();
    let group_b: Vec<ClientId> = nb[THRESHOLD as usize..].to_vec();
    let (a, b): (Vec<ClientId>, Vec<ClientId>) = consistency
        .iter()
        .map(|(to, _)| *to)
        .filter(|to| *to != TARGET || !group_b.contains(to))
        .partition(|to| !group_b.contains(to));
    let sig_a = s.signatures(&a, &all);
    let sig_b = s.signatures(&b, &without);
    for v in nb {
        let msg = if group_b.contains(&v) {
            let alive = s
                .neighbours(v)
                .into_iter()
                .filter(|c| *c != TARGET)
                .collect();
            s.unmask_request(v, &sig_b, alive, vec![TARGET])
        } else {
            s.unmask_request(v, &sig_a, s.neighbours(v), vec![])
        };
        s.ask(v, msg);
    }
    Ok(s.finding())
}

/// §6.7 rule 3: the server asks clients that are not the target's
/// neighbours for the target's shares (they hold none, and must not be
/// led to answer for a client they never masked with).
pub fn non_neighbour(seed: u64) -> Result<Finding, SimError> {
    let mut s = Session::new(seed, |_| None)?;
    let requests = s.until(Stage::Unmasking)?;
    let neighbours = s.neighbours(TARGET);
    for (to, msg) in requests {
        if to == TARGET || neighbours.contains(&to) {
            continue;
        }
        let attack = edited(msg, |alive, _| {
            alive.push(TARGET);
            alive.sort();
        });
        s.ask(to, attack);
    }
    Ok(s.finding())
}

/// §6.7, §6.8: the server replays an earlier round's unmask requests,
/// which named the target as dropped, in the current round where the
/// target survived, after collecting the current round's self-mask shares.
pub fn replay(seed: u64) -> Result<Finding, SimError> {
    // The earlier round: the same clients, with the target dropped.
    let old = Session::new(seed.wrapping_add(1), |_| None)?.target_dropped()?;
    // The current round, attacked with them.
    let mut s = Session::new(seed, |_| None)?;
    let requests = s.until(Stage::Unmasking)?;
    for (to, msg) in requests {
        s.ask(to, msg);
    }
    for (to, msg) in old {
        s.ask(to, msg);
    }
    Ok(s.finding())
}

/// §6.7 rule 6, §2.1: the server fixes a survivor set with fewer than t
/// of a client's neighbours, to unmask a sum of too few inputs, then asks
/// for shares under it.
pub fn too_few_survivors(seed: u64) -> Result<Finding, SimError> {
    let mut s = Session::new(seed, |_| None)?;
    let consistency = s.until(Stage::ConsistencyCheck)?;
    let nb = s.neighbours(TARGET);
    // The target and t − 1 of its neighbours: nearly the target alone.
    let mut survivors: Vec<ClientId> = nb[..THRESHOLD as usize - 1].to_vec();
    survivors.push(TARGET);
    survivors.sort();
    let from: Vec<ClientId> = consistency.iter().map(|(c, _)| *c).collect();
    let sigs = s.signatures(&from, &survivors);
    for v in survivors.clone() {
        let alive = s
            .neighbours(v)
            .into_iter()
            .filter(|c| survivors.contains(c))
            .collect();
        let dropped = s
            .neighbours(v)
            .into_iter()
            .filter(|c| !survivors.contains(c))
            .collect();
        let msg = s.unmask_request(v, &sigs, alive, dropped);
        s.ask(v, msg);
    }
    Ok(s.finding())
}

/// §6.1, §8.4 (Pasquini et al. 2022): the server sends the target a
/// different model than its peers (a model crafted so that the target's
/// update stands out), in the hope that its update enters the sum alone.
/// The target's session context commits to its model, so it ends up in
/// another session; the server's relabelling of its keys is refused.
pub fn different_model(seed: u64) -> Result<Finding, SimError> {
    let mut s = Session::new(seed, |c| (c == TARGET).then_some([9u8; 32]))?;
    s.cohort.start();
    let setup = s.cohort.take_outbox()?;
    let mut adverts = BTreeMap::new();
    for (to, msg) in setup {
        // The target is told the truth about its (different) model.
        let msg = match msg {
            ServerMessage::Setup(mut p) if to == TARGET => {
                p.context = [9u8; 32];
                ServerMessage::Setup(p)
            }
            other => other,
        };
        if let Some(ClientMessage::AdvertiseKeys(k)) = s.ask(to, msg) {
            adverts.insert(to, k);
        }
    }
    // The server relabels the target's keys with the common session and
    // hands them to the target's neighbours.
    let common = s.session_id();
    for v in s.neighbours(TARGET) {
        let keys: Vec<AdvertisedKeys> = s
            .neighbours(v)
            .iter()
            .filter_map(|c| adverts.get(c).cloned())
            .map(|mut k| {
                k.session = common;
                k
            })
            .collect();
        s.ask(
            v,
            ServerMessage::KeyDirectory {
                session: common,
                keys,
            },
        );
    }
    Ok(s.finding())
}

/// The control that shows the measurement can detect a leak: the same
/// deterministic session run twice, the target alive in the first (its
/// self-mask seed legitimately recovered) and declared dropped in the
/// second (its mask seed legitimately recovered). One session never yields
/// both; two sessions with the same keys and input do, and the estimate
/// then matches every coordinate. This is why keys are fresh per session
/// (§5.1) and why a client answers one request per session (§6.7).
pub fn control(seed: u64) -> Result<Finding, SimError> {
    let mut alive = Session::new(seed, |_| None)?;
    let requests = alive.until(Stage::Unmasking)?;
    for (to, msg) in requests {
        alive.ask(to, msg);
    }
    let mut dropped = Session::new(seed, |_| None)?;
    for (v, msg) in dropped.target_dropped()? {
        dropped.ask(v, msg);
    }
    // Pool what the two sessions gave.
    let mut pooled = alive;
    pooled.answers.extend(dropped.answers);
    pooled.refusals.extend(dropped.refusals);
    Ok(pooled.finding())
}

/// What a malicious client achieved against the server.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientFinding {
    /// The server's rejections of the attacker's messages.
    pub rejected: Vec<String>,
    /// Complaints honest clients filed (a tampered envelope).
    pub complaints: usize,
    /// Whether the round ended with a sum, and over how many clients.
    pub completed: bool,
    pub survivors: usize,
    /// Whether the sum is exactly that of the survivors' inputs.
    pub sum_exact: bool,
    /// Whether every honest client is among the survivors.
    pub honest_served: bool,
}

impl ClientFinding {
    /// The attack was noticed (rejected or reported), and the round still
    /// completed with the exact sum, every honest client in it.
    pub fn held(&self) -> bool {
        (!self.rejected.is_empty() || self.complaints > 0)
            && self.completed
            && self.sum_exact
            && self.honest_served
    }

    pub fn evidence(&self) -> String {
        let mut kinds: Vec<&str> = self.rejected.iter().map(String::as_str).collect();
        kinds.dedup();
        format!(
            "{} rejected{}; {} complaint(s); the round {} with {} of {} clients, sum {}, every \
             honest client served: {}",
            self.rejected.len(),
            if kinds.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    kinds.into_iter().take(3).collect::<Vec<_>>().join("; ")
                )
            },
            self.complaints,
            if self.completed {
                "completed"
            } else {
                "did NOT complete"
            },
            self.survivors,
            CLIENTS,
            if self.sum_exact { "exact" } else { "WRONG" },
            self.honest_served
        )
    }
}

/// The malicious client of the client attacks.
pub const ATTACKER: ClientId = ClientId(2);

impl Session {
    /// Hands the attacker's message straight to the server, keeping the
    /// rejection.
    fn inject(&mut self, msg: ClientMessage) {
        let now = self.cohort.now;
        if let Err(e) = self.cohort.server.handle_message(now, ATTACKER, msg) {
            self.refusals.push((ATTACKER.0, e.to_string()));
        }
    }

    /// Runs the session to its end and reports what the attacker achieved.
    fn client_finding(mut self) -> Result<ClientFinding, SimError> {
        let outcome = self.cohort.run()?;
        let honest: Vec<ClientId> = (0..CLIENTS)
            .map(ClientId)
            .filter(|c| *c != ATTACKER)
            .collect();
        let (completed, survivors, sum_exact, honest_served, complaints) = match outcome {
            Ok(agg) => {
                let mut sum = vec![0u32; DIM as usize];
                for c in &agg.survivors {
                    for (a, x) in sum.iter_mut().zip(&self.inputs[c.0 as usize]) {
                        *a = a.wrapping_add(*x);
                    }
                }
                (
                    true,
                    agg.survivors.len(),
                    sum == agg.sum,
                    honest.iter().all(|c| agg.survivors.contains(c)),
                    agg.complaints.len(),
                )
            }
            Err(_) => (false, 0, false, false, 0),
        };
        Ok(ClientFinding {
            rejected: self.refusals.into_iter().map(|(_, e)| e).collect(),
            complaints,
            completed,
            survivors,
            sum_exact,
            honest_served,
        })
    }

    /// Starts the session and collects every client's AdvertiseKeys,
    /// undelivered to the server.
    fn adverts(&mut self) -> Result<Vec<(ClientId, ClientMessage)>, SimError> {
        self.cohort.start();
        let setup = self.cohort.take_outbox()?;
        Ok(setup
            .into_iter()
            .filter_map(|(to, msg)| match self.cohort.deliver(to, msg) {
                Ok(Some(m)) => Some((to, m)),
                _ => None,
            })
            .collect())
    }
}

/// §6.2, §6.8: the attacker's key advertisement carries a forged signature
/// (its keys changed after signing), then another client's keys under its
/// own name. Both are rejected; it never gets into the session, and the
/// others finish without it.
pub fn forged_signature(seed: u64) -> Result<ClientFinding, SimError> {
    let mut s = Session::new(seed, |_| None)?;
    let adverts = s.adverts()?;
    let now = s.cohort.now;
    let someone_elses = adverts
        .iter()
        .find(|(from, _)| *from != ATTACKER)
        .map(|(_, m)| m.clone());
    for (from, msg) in adverts {
        if from != ATTACKER {
            s.cohort
                .server
                .handle_message(now, from, msg)
                .map_err(|_| SimError::ClientOrder(from))?;
            continue;
        }
        if let ClientMessage::AdvertiseKeys(mut forged) = msg {
            forged.cipher_pk[0] ^= 1;
            s.inject(ClientMessage::AdvertiseKeys(forged));
        }
    }
    if let Some(m) = someone_elses {
        s.inject(m);
    }
    s.client_finding()
}

/// §5.4, §6.3: the network (or the server relaying) flips a bit of a share
/// envelope. The recipient cannot open it, reports it, and the round still
/// completes with every client.
pub fn tampered_ciphertext(seed: u64) -> Result<ClientFinding, SimError> {
    let mut s = Session::new(seed, |_| None)?;
    let mut relays = s.until(Stage::MaskedInput)?;
    if let Some((_, ServerMessage::ShareRelay { envelopes, .. })) = relays.get_mut(4)
        && let Some(e) = envelopes.first_mut()
        && let Some(byte) = e.ciphertext.get_mut(7)
    {
        *byte ^= 0x40;
    }
    s.cohort.exchange(relays)?;
    s.client_finding()
}

/// §6.8: the attacker sends a masked vector of the wrong length, then one
/// of the wrong width, then a truncated encoding, and never a valid one.
/// Each is rejected; it counts as dropped, its masks are removed, and the
/// others' sum is exact.
pub fn wrong_length(seed: u64) -> Result<ClientFinding, SimError> {
    let mut s = Session::new(seed, |_| None)?;
    let relays = s.until(Stage::MaskedInput)?;
    let now = s.cohort.now;
    for (to, msg) in relays {
        let Ok(Some(ClientMessage::MaskedInput(m))) = s.cohort.deliver(to, msg) else {
            continue;
        };
        if to != ATTACKER {
            s.cohort
                .server
                .handle_message(now, to, ClientMessage::MaskedInput(m))
                .map_err(|_| SimError::ClientOrder(to))?;
            continue;
        }
        let mut short = m.clone();
        short.masked = PackedVec::pack(&[1, 2, 3], 32).map_err(|_| SimError::ClientOrder(to))?;
        s.inject(ClientMessage::MaskedInput(short));
        let mut wide = m.clone();
        wide.masked =
            PackedVec::pack(&vec![0; DIM as usize], 16).map_err(|_| SimError::ClientOrder(to))?;
        s.inject(ClientMessage::MaskedInput(wide));
        let mut truncated = m;
        truncated.masked.data.pop();
        s.inject(ClientMessage::MaskedInput(truncated));
    }
    s.client_finding()
}

/// §6.8: the attacker sends a later stage's message early, a message of
/// another session, and its key advertisement twice (a replay). Each is
/// rejected, its genuine messages are still accepted, and the round
/// completes with every client.
pub fn out_of_round(seed: u64) -> Result<ClientFinding, SimError> {
    let mut s = Session::new(seed, |_| None)?;
    let adverts = s.adverts()?;
    let now = s.cohort.now;
    let session = s.session_id();
    s.inject(ClientMessage::Consistency(
        crate::messages::ConsistencySignature {
            session,
            signature: SignatureBytes([0; 64]),
        },
    ));
    for (from, msg) in adverts {
        if from == ATTACKER
            && let ClientMessage::AdvertiseKeys(k) = &msg
        {
            let mut other = k.clone();
            other.session = SessionId([1; 32]);
            s.inject(ClientMessage::AdvertiseKeys(other));
            s.cohort
                .server
                .handle_message(now, from, msg.clone())
                .map_err(|_| SimError::ClientOrder(from))?;
            s.inject(msg);
            continue;
        }
        s.cohort
            .server
            .handle_message(now, from, msg)
            .map_err(|_| SimError::ClientOrder(from))?;
    }
    s.client_finding()
}

/// A malicious client's attack.
pub type ClientAttack = fn(u64) -> Result<ClientFinding, SimError>;

/// The malicious-client attacks: (name, spec section, attack).
pub const CLIENT_ATTACKS: &[(&str, &str, ClientAttack)] = &[
    ("forged_signature", "§6.2, §6.8", forged_signature),
    ("tampered_ciphertext", "§5.4, §6.3", tampered_ciphertext),
    ("wrong_length", "§6.8", wrong_length),
    ("out_of_round", "§6.8", out_of_round),
];

/// A two-sample chi-square test of homogeneity between two views.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Homogeneity {
    /// Values per view.
    pub samples: usize,
    /// Bins (the values' top bits).
    pub bins: usize,
    pub chi_square: f64,
    /// The p-value (Wilson–Hilferty's normal approximation to the
    /// chi-square tail, accurate to about 10^-3 at these degrees of
    /// freedom).
    pub p_value: f64,
}

/// What the server saw in the two federations of [`transcript`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TranscriptFinding {
    /// Sessions run with each input set.
    pub sessions: usize,
    /// The server's view: the masked inputs of the two clients whose
    /// inputs differ between the sets.
    pub masked: Homogeneity,
    /// The control: the same test on those clients' unmasked inputs,
    /// which a leak would expose; it must tell the sets apart.
    pub unmasked: Homogeneity,
    /// Whether every session unmasked the same (correct) sum.
    pub sums_equal: bool,
}

impl TranscriptFinding {
    /// The view is indistinguishable at the 0.1 % level while the control
    /// distinguishes the inputs at 10^-9, and both sets sum the same.
    pub fn held(&self) -> bool {
        self.sums_equal && self.masked.p_value > 1e-3 && self.unmasked.p_value < 1e-9
    }

    pub fn evidence(&self) -> String {
        format!(
            "{} sessions per input set: masked inputs χ² = {:.1} on {} bins, p = {:.3}; the \
             same test on the unmasked inputs: χ² = {:.0}, p = {:.1e}; every sum unmasked \
             equal and correct: {}",
            self.sessions,
            self.masked.chi_square,
            self.masked.bins,
            self.masked.p_value,
            self.unmasked.chi_square,
            self.unmasked.p_value,
            self.sums_equal
        )
    }
}

/// §8.1, transcript privacy: the same federation run with two input sets
/// that have the same sum (clients 0 and 1 trade `2^31` on every
/// coordinate), each over `sessions` fresh sessions (new keys, masks and
/// graph). The server's view of the two clients' masked inputs must be
/// distributed the same in both: a chi-square test on the values' top
/// four bits.
pub fn transcript(sessions: usize, seed: u64) -> Result<TranscriptFinding, SimError> {
    let spec = |s: u64| CohortSpec {
        clients: CLIENTS,
        degree: DEGREE,
        threshold: THRESHOLD,
        dim: DIM,
        bits: 32,
        seed: s,
        context: [7u8; 32],
        min_survivors: 1,
    };
    // Set A: the spec's random inputs; set B: clients 0 and 1 trade 2^31.
    let (_, base) = spec(seed).build(|_| None)?;
    let mut shifted = base.clone();
    let (first, rest) = shifted.split_at_mut(1);
    for (a, b) in first[0].iter_mut().zip(rest[0].iter_mut()) {
        *a = a.wrapping_add(1 << 31);
        *b = b.wrapping_sub(1 << 31);
    }
    let mut views = [Vec::new(), Vec::new()];
    let mut sums = Vec::new();
    for (which, inputs) in [&base, &shifted].into_iter().enumerate() {
        for i in 0..sessions {
            // Every session its own keys and masks.
            let session_seed = seed.wrapping_add(1 + (which * sessions + i) as u64);
            let mut cohort = spec(session_seed).build_with_inputs(inputs.clone(), |_| None)?;
            cohort.enable_log();
            let agg = cohort.run()?.map_err(|_| SimError::ClientOrder(TARGET))?;
            sums.push(agg.sum);
            for (from, m) in &cohort.log {
                if let ClientMessage::MaskedInput(x) = m
                    && from.0 < 2
                    && let Ok(v) = x.masked.unpack()
                {
                    views[which].extend(v);
                }
            }
        }
    }
    let expected: Vec<u32> = (0..DIM as usize)
        .map(|j| base.iter().fold(0u32, |acc, x| acc.wrapping_add(x[j])))
        .collect();
    let raw = |inputs: &Vec<Vec<u32>>| -> Vec<u32> {
        (0..sessions)
            .flat_map(|_| inputs[0].iter().chain(&inputs[1]).copied())
            .collect()
    };
    Ok(TranscriptFinding {
        sessions,
        masked: homogeneity(&views[0], &views[1]),
        unmasked: homogeneity(&raw(&base), &raw(&shifted)),
        sums_equal: sums.iter().all(|s| *s == expected),
    })
}

/// The chi-square test of homogeneity of two samples over 16 bins (the
/// top four bits of each value).
fn homogeneity(a: &[u32], b: &[u32]) -> Homogeneity {
    const BINS: usize = 16;
    let count = |v: &[u32]| {
        let mut c = [0f64; BINS];
        v.iter().for_each(|x| c[(x >> 28) as usize] += 1.0);
        c
    };
    let (ca, cb) = (count(a), count(b));
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let mut chi = 0.0;
    let mut used = 0usize;
    for j in 0..BINS {
        let total = ca[j] + cb[j];
        if total == 0.0 {
            continue;
        }
        used += 1;
        let ea = total * na / (na + nb);
        let eb = total * nb / (na + nb);
        chi += (ca[j] - ea).powi(2) / ea + (cb[j] - eb).powi(2) / eb;
    }
    let dof = used.saturating_sub(1).max(1) as f64;
    // Wilson–Hilferty: (χ²/k)^(1/3) is nearly normal.
    let z = ((chi / dof).cbrt() - (1.0 - 2.0 / (9.0 * dof))) / (2.0 / (9.0 * dof)).sqrt();
    Homogeneity {
        samples: a.len(),
        bins: BINS,
        chi_square: chi,
        p_value: 0.5 * libm::erfc(z / std::f64::consts::SQRT_2),
    }
}

/// Every attack, by name, with the section of the spec whose claim it tests.
pub type Attack = fn(u64) -> Result<Finding, SimError>;

/// The malicious-server attacks: (name, spec section, attack).
pub const ATTACKS: &[(&str, &str, Attack)] = &[
    ("alive_and_dropped", "§6.7 rule 2, §8.2", alive_and_dropped),
    ("equivocation", "§8.3", equivocation),
    ("non_neighbour", "§6.7 rule 3", non_neighbour),
    ("replay", "§6.7, §6.8", replay),
    ("too_few_survivors", "§6.7 rule 6, §2.1", too_few_survivors),
    ("different_model", "§6.1, §8.4", different_model),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_recovers_the_input_so_the_measurement_can_fail() {
        let f = control(11).unwrap();
        assert!(f.self_seed_recovered && f.mask_seed_recovered, "{f:?}");
        assert_eq!(f.recovered_coordinates, DIM as usize);
        assert!(!f.target_hidden());
    }

    #[test]
    fn malicious_clients_are_rejected_and_the_honest_ones_finish() {
        for (name, _, attack) in CLIENT_ATTACKS {
            let f = attack(12).unwrap();
            eprintln!("{name}: {}", f.evidence());
            assert!(f.held(), "{name}: {f:?}");
        }
    }

    #[test]
    fn the_transcript_does_not_depend_on_the_inputs_beyond_their_sum() {
        let f = transcript(24, 5).unwrap();
        eprintln!("transcript: {}", f.evidence());
        assert!(f.held(), "{f:?}");
    }

    #[test]
    fn every_attack_is_refused_and_the_target_stays_hidden() {
        for (name, _, attack) in ATTACKS {
            let f = attack(11).unwrap();
            eprintln!("{name}: {}", f.evidence());
            assert!(f.target_hidden(), "{name}: {f:?}");
            // Equivocation is answered, and fails on the threshold alone.
            if *name != "equivocation" {
                assert!(!f.refusals.is_empty(), "{name} was not refused: {f:?}");
            }
        }
    }
}
