//! The client state machine (§6).
//!
//! ```text
//!  Idle --Setup--> Advertised --KeyDirectory--> Shared --ShareRelay--> Masked
//!       --ConsistencyRequest--> Signed --UnmaskRequest (any number)--> Signed
//!  any --Abort--> Aborted
//! ```
//!
//! Every message is checked completely before anything changes: a refused
//! message leaves the state as it was and reveals nothing (§6.7). In `Signed`
//! the client may answer several unmask requests (a server that lost a reply
//! asks again), but for each neighbour it reveals at most one kind of share,
//! ever: the first request that names a neighbour fixes the kind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use curve25519_dalek::scalar::Scalar;
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::crypto::envelope::{self, EnvelopeKey, PLAINTEXT_LEN};
use crate::crypto::identity::{self, IdentityKeypair};
use crate::crypto::keys::{self, AgreementSecret};
use crate::crypto::prg::{self, MASK_KEY_LEN, MaskStream, Sign};
use crate::crypto::{kdf, shamir};
use crate::graph::Graph;
use crate::messages::{
    AdvertisedKeys, ClientMessage, ConsistencySignature, InboundEnvelope, MaskedInput,
    OutboundEnvelope, RevealedShare, ServerMessage, ShareKeys, SurvivorSignature, UnmaskShares,
    consistency_signed_bytes, survivors_digest,
};
use crate::ring::{self, PackedVec, modulus_mask};
use crate::{ClientError, ClientId, SessionId, SessionParams, ShareKind, Stage};

/// One client's side of one aggregation session.
pub struct Client {
    id: ClientId,
    identity: IdentityKeypair,
    context: [u8; 32],
    input: Option<Zeroizing<Vec<u32>>>,
    state: State,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("state", &self.state_name())
            .finish_non_exhaustive()
    }
}

/// What every state after `Setup` knows about the session.
struct Session {
    params: SessionParams,
    id: SessionId,
    /// The graph neighbours, sorted: computed by the client itself.
    neighbours: Vec<ClientId>,
    threshold: usize,
}

impl Session {
    fn check(&self, got: SessionId) -> Result<(), ClientError> {
        if got == self.id {
            Ok(())
        } else {
            Err(ClientError::WrongSession {
                expected: self.id,
                got,
            })
        }
    }

    fn is_neighbour(&self, c: ClientId) -> bool {
        self.neighbours.binary_search(&c).is_ok()
    }

    /// The error for a client id that is not where it should be.
    fn stranger(&self, stage: Stage, client: ClientId) -> ClientError {
        if self.params.index_of(client).is_some() {
            ClientError::NonNeighbour { stage, client }
        } else {
            ClientError::UnknownClient { stage, client }
        }
    }
}

struct Advertised {
    session: Arc<Session>,
    cipher_sk: AgreementSecret,
    cipher_pk: [u8; 32],
    mask_seed: Zeroizing<Scalar>,
    mask_sk: AgreementSecret,
    mask_pk: [u8; 32],
}

/// What a client keeps about one accepted neighbour after R1.
struct Peer {
    envelope_in: EnvelopeKey,
    pair_mask: Zeroizing<[u8; MASK_KEY_LEN]>,
}

struct Shared {
    session: Arc<Session>,
    self_seed: Zeroizing<Scalar>,
    peers: BTreeMap<ClientId, Peer>,
}

/// A neighbour's two shares, as held by this client.
struct Held {
    self_mask: Zeroizing<Scalar>,
    mask_key: Zeroizing<Scalar>,
}

struct Masked {
    session: Arc<Session>,
    /// The neighbours whose pairwise masks this client applied, sorted.
    masked_with: Vec<ClientId>,
    held: BTreeMap<ClientId, Held>,
}

struct Signed {
    masked: Masked,
    survivors: Vec<ClientId>,
    digest: [u8; 32],
    revealed: BTreeMap<ClientId, ShareKind>,
}

enum State {
    Idle,
    Advertised(Box<Advertised>),
    Shared(Box<Shared>),
    Masked(Box<Masked>),
    Signed(Box<Signed>),
    Aborted(String),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Advertised(_) => "waiting for the key directory",
            State::Shared(_) => "waiting for the share relay",
            State::Masked(_) => "waiting for the consistency request",
            State::Signed(_) => "waiting for unmask requests",
            State::Aborted(_) => "aborted",
        }
    }

    fn session(&self) -> Option<&Session> {
        match self {
            State::Idle | State::Aborted(_) => None,
            State::Advertised(s) => Some(&s.session),
            State::Shared(s) => Some(&s.session),
            State::Masked(s) => Some(&s.session),
            State::Signed(s) => Some(&s.masked.session),
        }
    }
}

/// `|a ∩ b|` for two sorted lists.
fn intersection_len(a: &[ClientId], b: &[ClientId]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

fn crypto(e: crate::crypto::CryptoFailure) -> ClientError {
    ClientError::Crypto(e.0)
}

impl Client {
    /// A client with identity `identity`, holding `input` (elements of
    /// `Z_{2^b}`, checked against the session at `Setup`). `context` is the
    /// hash of the model, config and round this client actually received;
    /// the client refuses a session whose parameters name another.
    pub fn new(
        id: ClientId,
        identity: IdentityKeypair,
        context: [u8; 32],
        input: Vec<u32>,
    ) -> Self {
        Client {
            id,
            identity,
            context,
            input: Some(Zeroizing::new(input)),
            state: State::Idle,
        }
    }

    /// This client's id.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// A human-readable name of the current state.
    pub fn state_name(&self) -> &'static str {
        self.state.name()
    }

    /// The session this client is in, once set up.
    pub fn session_id(&self) -> Option<SessionId> {
        self.state.session().map(|s| s.id)
    }

    /// The client's graph neighbours, once set up.
    pub fn neighbours(&self) -> Option<&[ClientId]> {
        self.state.session().map(|s| s.neighbours.as_slice())
    }

    /// Whether the session was aborted, and why.
    pub fn aborted(&self) -> Option<&str> {
        match &self.state {
            State::Aborted(r) => Some(r),
            _ => None,
        }
    }

    /// Handles one message from the server. `Ok(Some(m))`: send `m` back;
    /// `Ok(None)`: nothing to send. On `Err`, the state is unchanged.
    pub fn handle<R: CryptoRngCore + ?Sized>(
        &mut self,
        msg: ServerMessage,
        rng: &mut R,
    ) -> Result<Option<ClientMessage>, ClientError> {
        let message = msg.name();
        let state = std::mem::replace(&mut self.state, State::Idle);
        let (next, result) = match (state, msg) {
            (state, ServerMessage::Abort { session, reason }) => {
                match state.session().map(|s| s.check(session)) {
                    Some(Err(e)) => (state, Err(e)),
                    _ => {
                        // Dropping the old state zeroizes every secret it held.
                        self.input = None;
                        (State::Aborted(reason), Ok(None))
                    }
                }
            }
            (State::Idle, ServerMessage::Setup(params)) => match self.on_setup(params, rng) {
                Ok((st, out)) => (State::Advertised(Box::new(st)), Ok(Some(out))),
                Err(e) => (State::Idle, Err(e)),
            },
            (State::Advertised(st), ServerMessage::KeyDirectory { session, keys }) => {
                match self.on_directory(&st, session, &keys, rng) {
                    Ok((next, out)) => (State::Shared(Box::new(next)), Ok(Some(out))),
                    Err(e) => (State::Advertised(st), Err(e)),
                }
            }
            (State::Shared(st), ServerMessage::ShareRelay { session, envelopes }) => {
                match self.on_relay(&st, session, &envelopes) {
                    Ok((next, out)) => (State::Masked(Box::new(next)), Ok(Some(out))),
                    Err(e) => (State::Shared(st), Err(e)),
                }
            }
            (State::Masked(st), ServerMessage::ConsistencyRequest { session, survivors }) => {
                match self.on_consistency(&st, session, &survivors) {
                    Ok((digest, out)) => (
                        State::Signed(Box::new(Signed {
                            masked: *st,
                            survivors,
                            digest,
                            revealed: BTreeMap::new(),
                        })),
                        Ok(Some(out)),
                    ),
                    Err(e) => (State::Masked(st), Err(e)),
                }
            }
            (
                State::Signed(mut st),
                ServerMessage::UnmaskRequest {
                    session,
                    signatures,
                    alive,
                    dropped,
                },
            ) => {
                let out = self.on_unmask(&mut st, session, &signatures, &alive, &dropped);
                (State::Signed(st), out.map(Some))
            }
            (state, _) => {
                let e = ClientError::UnexpectedMessage {
                    state: state.name(),
                    message,
                };
                (state, Err(e))
            }
        };
        self.state = next;
        result
    }

    /// Setup → R0 (§6.1).
    fn on_setup<R: CryptoRngCore + ?Sized>(
        &self,
        params: SessionParams,
        rng: &mut R,
    ) -> Result<(Advertised, ClientMessage), ClientError> {
        params.validate()?;
        let me = self.id;
        let listed = params
            .identity_of(me)
            .ok_or(ClientError::NotInRoster { client: me })?;
        if *listed != self.identity.public() {
            return Err(ClientError::IdentityMismatch { client: me });
        }
        if params.context != self.context {
            return Err(ClientError::ContextMismatch);
        }
        let input = self.input.as_deref().map(Vec::as_slice).unwrap_or(&[]);
        if input.len() != params.dim as usize {
            return Err(ClientError::InputLength {
                expected: params.dim,
                got: input.len(),
            });
        }
        let m = modulus_mask(params.bits);
        if let Some((index, &value)) = input.iter().enumerate().find(|(_, v)| **v & !m != 0) {
            return Err(ClientError::InputOutOfRing {
                index,
                value,
                bits: params.bits,
            });
        }
        let id = params.session_id();
        let graph = Graph::new(&params, &id).map_err(crypto)?;
        let neighbours = graph
            .neighbours(&params, me)
            .ok_or(ClientError::NotInRoster { client: me })?;
        let threshold = params.threshold as usize;

        let mut cipher_bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(cipher_bytes.as_mut());
        let cipher_sk = AgreementSecret::from_bytes(&cipher_bytes).map_err(crypto)?;
        let cipher_pk = cipher_sk.public().map_err(crypto)?;
        let mask_seed = shamir::random_scalar(rng);
        let mask_sk = keys::mask_secret(&mask_seed, &id, me).map_err(crypto)?;
        let mask_pk = mask_sk.public().map_err(crypto)?;
        let signature = self
            .identity
            .sign(&AdvertisedKeys::signed_bytes(&id, me, &cipher_pk, &mask_pk));
        let out = ClientMessage::AdvertiseKeys(AdvertisedKeys {
            session: id,
            sender: me,
            cipher_pk,
            mask_pk,
            signature,
        });
        let session = Arc::new(Session {
            params,
            id,
            neighbours,
            threshold,
        });
        Ok((
            Advertised {
                session,
                cipher_sk,
                cipher_pk,
                mask_seed,
                mask_sk,
                mask_pk,
            },
            out,
        ))
    }

    /// KeyDirectory → R1 (§6.2).
    fn on_directory<R: CryptoRngCore + ?Sized>(
        &self,
        st: &Advertised,
        session: SessionId,
        keys: &[AdvertisedKeys],
        rng: &mut R,
    ) -> Result<(Shared, ClientMessage), ClientError> {
        const STAGE: Stage = Stage::ShareKeys;
        let s = &st.session;
        s.check(session)?;
        let me = self.id;
        let mut seen = BTreeSet::new();
        let mut signed = Vec::with_capacity(keys.len());
        for k in keys {
            s.check(k.session)?;
            let v = k.sender;
            if !s.is_neighbour(v) {
                return Err(s.stranger(STAGE, v));
            }
            if !seen.insert(v) {
                return Err(ClientError::RepeatedId {
                    stage: STAGE,
                    client: v,
                });
            }
            let identity = s.params.identity_of(v).ok_or(ClientError::UnknownClient {
                stage: STAGE,
                client: v,
            })?;
            signed.push((
                identity,
                AdvertisedKeys::signed_bytes(&k.session, v, &k.cipher_pk, &k.mask_pk),
                &k.signature,
            ));
        }
        let items: Vec<_> = signed
            .iter()
            .map(|(id, m, sig)| (*id, m.as_slice(), *sig))
            .collect();
        if let Err(i) = identity::verify_all(&items) {
            let client = keys.get(i).map_or(me, |k| k.sender);
            return Err(ClientError::BadSignature {
                stage: STAGE,
                client,
            });
        }
        let mut peers = BTreeMap::new();
        let mut outbound_keys = BTreeMap::new();
        for k in keys {
            let v = k.sender;
            let bad_key = ClientError::BadPublicKey {
                stage: STAGE,
                client: v,
            };
            let cipher_shared = st.cipher_sk.agree(&k.cipher_pk).ok_or(bad_key.clone())?;
            let mask_shared = st.mask_sk.agree(&k.mask_pk).ok_or(bad_key)?;
            let envelope_out =
                envelope::envelope_key(&cipher_shared, &s.id, me, v, &st.cipher_pk, &k.cipher_pk)
                    .map_err(crypto)?;
            let envelope_in =
                envelope::envelope_key(&cipher_shared, &s.id, v, me, &k.cipher_pk, &st.cipher_pk)
                    .map_err(crypto)?;
            let pair_mask =
                keys::pair_mask_key(&mask_shared, &s.id, me, &st.mask_pk, v, &k.mask_pk)
                    .map_err(crypto)?;
            outbound_keys.insert(v, envelope_out);
            peers.insert(
                v,
                Peer {
                    envelope_in,
                    pair_mask,
                },
            );
        }
        if peers.len() < s.threshold {
            return Err(ClientError::TooFewNeighbours {
                stage: STAGE,
                have: peers.len(),
                need: s.threshold,
            });
        }
        let holders: Vec<ClientId> = peers.keys().copied().collect();
        let self_seed = shamir::random_scalar(rng);
        let self_shares = shamir::split(&self_seed, s.threshold, &holders, rng).map_err(crypto)?;
        let mask_shares =
            shamir::split(&st.mask_seed, s.threshold, &holders, rng).map_err(crypto)?;
        let mut envelopes = Vec::with_capacity(holders.len());
        for ((v, b), m) in holders.iter().zip(&self_shares).zip(&mask_shares) {
            let mut plain = Zeroizing::new([0u8; PLAINTEXT_LEN]);
            plain[..32].copy_from_slice(b.value.as_bytes());
            plain[32..].copy_from_slice(m.value.as_bytes());
            let key = outbound_keys
                .get(v)
                .ok_or(ClientError::Crypto("missing envelope key"))?;
            let ciphertext = envelope::seal(key, &s.id, me, *v, &plain).map_err(crypto)?;
            envelopes.push(OutboundEnvelope { to: *v, ciphertext });
        }
        let self_mask_commitment = kdf::commit_self_mask(&s.id, me, self_seed.as_bytes());
        Ok((
            Shared {
                session: Arc::clone(s),
                self_seed,
                peers,
            },
            ClientMessage::ShareKeys(ShareKeys {
                session: s.id,
                envelopes,
                self_mask_commitment,
            }),
        ))
    }

    /// ShareRelay → R2 (§6.3). The input is masked in place and never copied;
    /// after this stage only its masked form exists.
    fn on_relay(
        &mut self,
        st: &Shared,
        session: SessionId,
        envelopes: &[InboundEnvelope],
    ) -> Result<(Masked, ClientMessage), ClientError> {
        const STAGE: Stage = Stage::MaskedInput;
        let s = &st.session;
        s.check(session)?;
        let me = self.id;
        let mut senders = BTreeSet::new();
        let mut held = BTreeMap::new();
        let mut bad_envelopes = Vec::new();
        for e in envelopes {
            let v = e.from;
            let Some(peer) = st.peers.get(&v) else {
                return Err(s.stranger(STAGE, v));
            };
            if !senders.insert(v) {
                return Err(ClientError::RepeatedId {
                    stage: STAGE,
                    client: v,
                });
            }
            let shares =
                envelope::open(&peer.envelope_in, &s.id, v, me, &e.ciphertext).and_then(|pt| {
                    let mut b = Zeroizing::new([0u8; 32]);
                    let mut m = Zeroizing::new([0u8; 32]);
                    b.copy_from_slice(&pt[..32]);
                    m.copy_from_slice(&pt[32..]);
                    let b = Option::<Scalar>::from(Scalar::from_canonical_bytes(*b))?;
                    let m = Option::<Scalar>::from(Scalar::from_canonical_bytes(*m))?;
                    Some(Held {
                        self_mask: Zeroizing::new(b),
                        mask_key: Zeroizing::new(m),
                    })
                });
            match shares {
                Some(h) => {
                    held.insert(v, h);
                }
                // The neighbour (or the server) sent garbage: keep masking with
                // the neighbour, hold no share for it, and report it (§6.3).
                None => bad_envelopes.push(v),
            }
        }
        let masked_with: Vec<ClientId> = senders.into_iter().collect();
        if masked_with.len() < s.threshold {
            return Err(ClientError::TooFewNeighbours {
                stage: STAGE,
                have: masked_with.len(),
                need: s.threshold,
            });
        }
        let mut streams = Vec::with_capacity(masked_with.len() + 1);
        let self_key = keys::self_mask_key(&st.self_seed, &s.id, me).map_err(crypto)?;
        streams.push(MaskStream::new(&self_key, Sign::Add).map_err(crypto)?);
        for v in &masked_with {
            let peer = st
                .peers
                .get(v)
                .ok_or(ClientError::Crypto("missing pair key"))?;
            streams
                .push(MaskStream::new(&peer.pair_mask, keys::pair_sign(me, *v)).map_err(crypto)?);
        }
        let mut y = self.input.take().ok_or(ClientError::UnexpectedMessage {
            state: "input already consumed",
            message: "ShareRelay",
        })?;
        // Everything a message can get wrong was checked above. What remains
        // are internal AES or packing failures, which consume the input.
        prg::apply_parallel(&mut y, &streams).map_err(crypto)?;
        ring::reduce(&mut y, s.params.bits);
        let masked = PackedVec::pack(&y, s.params.bits)
            .map_err(|_| ClientError::Crypto("packing failed"))?;
        Ok((
            Masked {
                session: Arc::clone(s),
                masked_with,
                held,
            },
            ClientMessage::MaskedInput(MaskedInput {
                session: s.id,
                masked,
                bad_envelopes,
            }),
        ))
    }

    /// ConsistencyRequest → R3 (§6.4).
    fn on_consistency(
        &self,
        st: &Masked,
        session: SessionId,
        survivors: &[ClientId],
    ) -> Result<([u8; 32], ClientMessage), ClientError> {
        const STAGE: Stage = Stage::ConsistencyCheck;
        let s = &st.session;
        s.check(session)?;
        check_sorted(STAGE, survivors)?;
        if let Some(&c) = survivors.iter().find(|c| s.params.index_of(**c).is_none()) {
            return Err(ClientError::UnknownClient {
                stage: STAGE,
                client: c,
            });
        }
        if survivors.binary_search(&self.id).is_err() {
            return Err(ClientError::NotASurvivor { client: self.id });
        }
        if survivors.len() < s.params.min_survivors as usize {
            return Err(ClientError::BelowMinimumSurvivors {
                have: survivors.len(),
                need: s.params.min_survivors,
            });
        }
        let have = intersection_len(survivors, &st.masked_with);
        if have < s.threshold {
            return Err(ClientError::TooFewSurvivors {
                stage: STAGE,
                have,
                need: s.threshold,
            });
        }
        let digest = survivors_digest(survivors);
        let signature = self
            .identity
            .sign(&consistency_signed_bytes(&s.id, &digest));
        Ok((
            digest,
            ClientMessage::Consistency(ConsistencySignature {
                session: s.id,
                signature,
            }),
        ))
    }

    /// UnmaskRequest → R4 (§6.5). Every check runs before anything is revealed.
    fn on_unmask(
        &self,
        st: &mut Signed,
        session: SessionId,
        signatures: &[SurvivorSignature],
        alive: &[ClientId],
        dropped: &[ClientId],
    ) -> Result<ClientMessage, ClientError> {
        const STAGE: Stage = Stage::Unmasking;
        let m = &st.masked;
        let s = &m.session;
        s.check(session)?;
        let is_masked_with = |c: &ClientId| m.masked_with.binary_search(c).is_ok();
        let survived = |c: &ClientId| st.survivors.binary_search(c).is_ok();

        // 1. No id twice in a list.
        let mut alive_set = BTreeSet::new();
        for &a in alive {
            if !alive_set.insert(a) {
                return Err(ClientError::RepeatedId {
                    stage: STAGE,
                    client: a,
                });
            }
        }
        let mut dropped_set = BTreeSet::new();
        for &d in dropped {
            if !dropped_set.insert(d) {
                return Err(ClientError::RepeatedId {
                    stage: STAGE,
                    client: d,
                });
            }
        }
        // 2. No id both alive and dropped (the Flower overlap attack).
        if let Some(&c) = dropped_set.intersection(&alive_set).next() {
            return Err(ClientError::BothAliveAndDropped { client: c });
        }
        // 3. Only neighbours this client masked with (and so holds shares of).
        if let Some(&c) = alive.iter().chain(dropped).find(|c| !is_masked_with(c)) {
            return Err(s.stranger(STAGE, c));
        }
        // 4. Never the other kind of share of a neighbour, across requests.
        for (list, requested) in [(alive, ShareKind::SelfMask), (dropped, ShareKind::MaskKey)] {
            for c in list {
                if let Some(&revealed) = st.revealed.get(c)
                    && revealed != requested
                {
                    return Err(ClientError::AlreadyRevealed {
                        client: *c,
                        revealed,
                        requested,
                    });
                }
            }
        }
        // 5. Agree with the signed survivor set.
        if let Some(&c) = alive.iter().find(|c| !survived(c)) {
            return Err(ClientError::ContradictsConsistencySet {
                client: c,
                requested: "alive",
            });
        }
        if let Some(&c) = dropped.iter().find(|c| survived(c)) {
            return Err(ClientError::ContradictsConsistencySet {
                client: c,
                requested: "dropped",
            });
        }
        // 6. At least t of this client's neighbours survive.
        let have = intersection_len(&st.survivors, &m.masked_with);
        if have < s.threshold {
            return Err(ClientError::TooFewSurvivors {
                stage: STAGE,
                have,
                need: s.threshold,
            });
        }
        // 7. At least t neighbours signed this very survivor set.
        let signed = consistency_signed_bytes(&s.id, &st.digest);
        let mut signers = BTreeSet::new();
        let mut items = Vec::with_capacity(signatures.len());
        for sig in signatures {
            let c = sig.client;
            if !signers.insert(c) {
                return Err(ClientError::RepeatedId {
                    stage: STAGE,
                    client: c,
                });
            }
            if !is_masked_with(&c) {
                return Err(s.stranger(STAGE, c));
            }
            if !survived(&c) {
                return Err(ClientError::ContradictsConsistencySet {
                    client: c,
                    requested: "a signer",
                });
            }
            let identity = s.params.identity_of(c).ok_or(ClientError::UnknownClient {
                stage: STAGE,
                client: c,
            })?;
            items.push((identity, signed.as_slice(), &sig.signature));
        }
        if let Err(i) = identity::verify_all(&items) {
            let client = signatures.get(i).map_or(self.id, |s| s.client);
            return Err(ClientError::BadSignature {
                stage: Stage::ConsistencyCheck,
                client,
            });
        }
        if signers.len() < s.threshold {
            return Err(ClientError::TooFewSignatures {
                have: signers.len(),
                need: s.threshold,
            });
        }

        // All checks passed: fix the kind per neighbour, then reveal.
        let mut self_mask = Vec::with_capacity(alive.len());
        for &a in alive {
            st.revealed.insert(a, ShareKind::SelfMask);
            if let Some(h) = m.held.get(&a) {
                self_mask.push(RevealedShare {
                    owner: a,
                    share: h.self_mask.to_bytes(),
                });
            }
        }
        let mut mask_key = Vec::with_capacity(dropped.len());
        for &d in dropped {
            st.revealed.insert(d, ShareKind::MaskKey);
            if let Some(h) = m.held.get(&d) {
                mask_key.push(RevealedShare {
                    owner: d,
                    share: h.mask_key.to_bytes(),
                });
            }
        }
        Ok(ClientMessage::UnmaskShares(UnmaskShares {
            session: s.id,
            self_mask,
            mask_key,
        }))
    }
}

/// Checks that a client list is strictly ascending.
fn check_sorted(stage: Stage, list: &[ClientId]) -> Result<(), ClientError> {
    for w in list.windows(2) {
        if w[0] == w[1] {
            return Err(ClientError::RepeatedId {
                stage,
                client: w[1],
            });
        }
        if w[0] > w[1] {
            return Err(ClientError::NotSorted {
                stage,
                client: w[1],
            });
        }
    }
    Ok(())
}
