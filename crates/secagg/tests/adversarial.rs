//! A malicious server, malicious clients and a hostile network against the
//! real client and server code (protocols/secagg-plus.md §6.7, §6.8, §8).
//!
//! The test plays the server: it runs the honest protocol up to a stage, then
//! edits, replaces or replays the server's messages, and uses the crate's own
//! primitives to reconstruct whatever the clients gave away.

mod common;

use std::collections::BTreeMap;

use common::Fed;
use curve25519_dalek::scalar::Scalar;
use fedveil_secagg::crypto::identity::SignatureBytes;
use fedveil_secagg::crypto::kdf;
use fedveil_secagg::crypto::keys;
use fedveil_secagg::crypto::prg::{self, MaskStream};
use fedveil_secagg::crypto::shamir::{self, Share};
use fedveil_secagg::messages::{
    AdvertisedKeys, ClientMessage, RevealedShare, ServerMessage, SurvivorSignature,
};
use fedveil_secagg::ring::PackedVec;
use fedveil_secagg::{AbortReason, ClientError, ClientId, Rejected, SessionId, ShareKind, Stage};

const N: u32 = 10;
const K: u32 = 6;
const T: u32 = 4;
const DIM: u32 = 64;

fn target() -> ClientId {
    ClientId(3)
}

/// What the clients sent, as logged by the harness.
fn advertised(fed: &Fed, c: ClientId) -> AdvertisedKeys {
    fed.sent()
        .iter()
        .find_map(|(from, m)| match m {
            ClientMessage::AdvertiseKeys(k) if *from == c => Some(k.clone()),
            _ => None,
        })
        .expect("advertised")
}

fn commitment(fed: &Fed, c: ClientId) -> [u8; 32] {
    fed.sent()
        .iter()
        .find_map(|(from, m)| match m {
            ClientMessage::ShareKeys(s) if *from == c => Some(s.self_mask_commitment),
            _ => None,
        })
        .expect("shared")
}

fn masked_input(fed: &Fed, c: ClientId) -> PackedVec {
    fed.sent()
        .iter()
        .find_map(|(from, m)| match m {
            ClientMessage::MaskedInput(x) if *from == c => Some(x.masked.clone()),
            _ => None,
        })
        .expect("masked")
}

/// Shares of `owner` of the given kind in the clients' answers.
fn loot(answers: &[(ClientId, ClientMessage)], owner: ClientId, kind: ShareKind) -> Vec<Share> {
    answers
        .iter()
        .filter_map(|(holder, m)| {
            let ClientMessage::UnmaskShares(u) = m else {
                return None;
            };
            let list = match kind {
                ShareKind::SelfMask => &u.self_mask,
                ShareKind::MaskKey => &u.mask_key,
            };
            list.iter().find(|s| s.owner == owner).map(|s| Share {
                holder: *holder,
                value: Option::from(Scalar::from_canonical_bytes(s.share)).expect("canonical"),
            })
        })
        .collect()
}

/// Reconstructs the self-mask seed of `owner` and checks its commitment.
fn recover_self_seed(fed: &Fed, owner: ClientId, shares: &[Share]) -> Option<Scalar> {
    if shares.len() < T as usize {
        return None;
    }
    let seed = *shamir::reconstruct(&shares[..T as usize]).ok()?;
    let ok = kdf::commit_self_mask(&fed.server.session_id(), owner, seed.as_bytes())
        == commitment(fed, owner);
    ok.then_some(seed)
}

/// Reconstructs the mask seed of `owner` and checks it against its advertised key.
fn recover_mask_seed(fed: &Fed, owner: ClientId, shares: &[Share]) -> Option<Scalar> {
    if shares.len() < T as usize {
        return None;
    }
    let seed = *shamir::reconstruct(&shares[..T as usize]).ok()?;
    let sk = keys::mask_secret(&seed, &fed.server.session_id(), owner).ok()?;
    (sk.public().ok()? == advertised(fed, owner).mask_pk).then_some(seed)
}

/// The server's best estimate of `owner`'s input: its masked input minus
/// every mask the recovered seeds let it compute.
fn strip_masks(
    fed: &Fed,
    owner: ClientId,
    self_seed: Option<Scalar>,
    mask_seed: Option<Scalar>,
) -> Vec<u32> {
    let session: SessionId = fed.server.session_id();
    let mut y = masked_input(fed, owner).unpack().expect("well formed");
    let mut streams = Vec::new();
    if let Some(b) = self_seed {
        let key = keys::self_mask_key(&b, &session, owner).unwrap();
        streams.push(MaskStream::new(&key, prg::Sign::Sub).unwrap());
    }
    if let Some(s) = mask_seed {
        let sk = keys::mask_secret(&s, &session, owner).unwrap();
        let mine = advertised(fed, owner).mask_pk;
        for v in fed.neighbours(owner) {
            let theirs = advertised(fed, v).mask_pk;
            let shared = sk.agree(&theirs).unwrap();
            let key = keys::pair_mask_key(&shared, &session, owner, &mine, v, &theirs).unwrap();
            streams.push(MaskStream::new(&key, keys::pair_sign(owner, v).negate()).unwrap());
        }
    }
    prg::apply(&mut y, 0, &streams).unwrap();
    y
}

fn matching(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x == y).count()
}

fn unmask_request(
    msg: &ServerMessage,
) -> (
    SessionId,
    Vec<SurvivorSignature>,
    Vec<ClientId>,
    Vec<ClientId>,
) {
    match msg {
        ServerMessage::UnmaskRequest {
            session,
            signatures,
            alive,
            dropped,
        } => (*session, signatures.clone(), alive.clone(), dropped.clone()),
        other => panic!("expected an unmask request, got {}", other.name()),
    }
}

/// The unmask request `msg` with its lists edited by `f(signatures, alive, dropped)`.
fn edited(
    msg: &ServerMessage,
    f: impl FnOnce(&mut Vec<SurvivorSignature>, &mut Vec<ClientId>, &mut Vec<ClientId>),
) -> ServerMessage {
    let (session, mut signatures, mut alive, mut dropped) = unmask_request(msg);
    f(&mut signatures, &mut alive, &mut dropped);
    ServerMessage::UnmaskRequest {
        session,
        signatures,
        alive,
        dropped,
    }
}

/// Runs the honest session to the unmask requests and returns them.
fn honest_until_unmask(seed: u64) -> (Fed, Vec<(ClientId, ServerMessage)>) {
    let mut fed = Fed::new(N, K, T, DIM, 32, seed);
    let requests = fed.run_until(Stage::Unmasking);
    assert_eq!(requests.len(), N as usize);
    (fed, requests)
}

/// §8.2, design pitfall 1: Flower's server can list a live client as both
/// alive and dropped, and its clients then reveal both shares. Ours refuse,
/// and the target's input stays hidden.
#[test]
fn flower_overlap_attack_is_refused_and_the_target_stays_hidden() {
    let (mut fed, requests) = honest_until_unmask(1);
    let tgt = target();
    let neighbours = fed.neighbours(tgt);

    // The attack: every neighbour of the target is asked for both shares.
    for (to, msg) in requests.iter().filter(|(to, _)| neighbours.contains(to)) {
        let request = edited(msg, |_, _, dropped| {
            dropped.push(tgt);
            dropped.sort();
        });
        let got = fed.deliver(*to, request);
        assert_eq!(
            got,
            Err(ClientError::BothAliveAndDropped { client: tgt }),
            "neighbour {to}"
        );
    }
    // Splitting it up does not help: asking some neighbours for the
    // mask-key share contradicts the survivor set they signed.
    for (to, msg) in requests.iter().filter(|(to, _)| neighbours.contains(to)) {
        let request = edited(msg, |_, alive, dropped| {
            alive.retain(|c| *c != tgt);
            dropped.push(tgt);
            dropped.sort();
        });
        let got = fed.deliver(*to, request);
        assert_eq!(
            got,
            Err(ClientError::ContradictsConsistencySet {
                client: tgt,
                requested: "dropped"
            })
        );
    }
    // Refusals change nothing, so the server can still ask honestly.
    let mut answers = Vec::new();
    for (to, msg) in &requests {
        let a = fed
            .deliver(*to, msg.clone())
            .expect("honest request")
            .expect("answer");
        answers.push((*to, a));
    }
    // What the server holds: self-mask shares of the target, no mask-key shares.
    let b_shares = loot(&answers, tgt, ShareKind::SelfMask);
    let s_shares = loot(&answers, tgt, ShareKind::MaskKey);
    assert!(s_shares.is_empty());
    let b = recover_self_seed(&fed, tgt, &b_shares)
        .expect("a survivor's self mask is meant to be removable");
    assert!(recover_mask_seed(&fed, tgt, &s_shares).is_none());
    // Its best reconstruction is still masked: no better than chance (a
    // coordinate matches with probability 2^-32).
    let estimate = strip_masks(&fed, tgt, Some(b), None);
    assert_eq!(matching(&estimate, &fed.inputs[tgt.0 as usize]), 0);

    // Control: the same deterministic session replayed with the target
    // declared dropped yields the other secret, and the two together reveal
    // the input exactly. The protection is precisely that one session never
    // yields both.
    let (replay, s) = replay_with_target_dropped(1, tgt);
    assert_eq!(masked_input(&replay, tgt), masked_input(&fed, tgt));
    let both = strip_masks(&replay, tgt, Some(b), Some(s));
    assert_eq!(both, fed.inputs[tgt.0 as usize]);
}

/// Replays the deterministic session `seed`, this time telling every client
/// that `tgt` dropped, and recovers `tgt`'s mask seed from their answers.
fn replay_with_target_dropped(seed: u64, tgt: ClientId) -> (Fed, Scalar) {
    let mut replay = Fed::new(N, K, T, DIM, 32, seed);
    let consistency = replay.run_until(Stage::ConsistencyCheck);
    let survivors: Vec<ClientId> = (0..N).map(ClientId).filter(|c| *c != tgt).collect();
    let mut sigs: BTreeMap<ClientId, SignatureBytes> = BTreeMap::new();
    let session = replay.server.session_id();
    for (to, _) in consistency {
        if to == tgt {
            continue;
        }
        let msg = ServerMessage::ConsistencyRequest {
            session,
            survivors: survivors.clone(),
        };
        if let Ok(Some(ClientMessage::Consistency(c))) = replay.deliver(to, msg) {
            sigs.insert(to, c.signature);
        }
    }
    let mut answers = Vec::new();
    for v in replay.neighbours(tgt) {
        let nb = replay.neighbours(v);
        let signatures = nb
            .iter()
            .filter_map(|c| {
                sigs.get(c).map(|s| SurvivorSignature {
                    client: *c,
                    signature: *s,
                })
            })
            .collect();
        let alive = nb.iter().copied().filter(|c| *c != tgt).collect();
        let msg = ServerMessage::UnmaskRequest {
            session,
            signatures,
            alive,
            dropped: vec![tgt],
        };
        let a = replay
            .deliver(v, msg)
            .expect("a legitimate request for a dropped client")
            .expect("answer");
        answers.push((v, a));
    }
    let s_shares = loot(&answers, tgt, ShareKind::MaskKey);
    assert!(loot(&answers, tgt, ShareKind::SelfMask).is_empty());
    let seed =
        recover_mask_seed(&replay, tgt, &s_shares).expect("t mask-key shares of a dropped client");
    (replay, seed)
}

/// §6.7 rule 3: a request may only name neighbours the client masked with.
#[test]
fn unmask_request_naming_a_non_neighbour_is_refused() {
    let (mut fed, requests) = honest_until_unmask(2);
    let (to, msg) = requests[0].clone();
    let stranger = (0..N)
        .map(ClientId)
        .find(|c| *c != to && !fed.neighbours(to).contains(c))
        .expect("a non-neighbour");
    let request = edited(&msg, |_, alive, _| {
        alive.push(stranger);
        alive.sort();
    });
    let got = fed.deliver(to, request);
    assert_eq!(
        got,
        Err(ClientError::NonNeighbour {
            stage: Stage::Unmasking,
            client: stranger
        })
    );
    // Asking a client for its own shares is the same rule.
    let request = edited(&msg, |_, alive, _| {
        alive.push(to);
        alive.sort();
    });
    let got = fed.deliver(to, request);
    assert_eq!(
        got,
        Err(ClientError::NonNeighbour {
            stage: Stage::Unmasking,
            client: to
        })
    );
}

/// §6.7 rule 1: no id twice in a list.
#[test]
fn unmask_request_repeating_an_id_is_refused() {
    let (mut fed, requests) = honest_until_unmask(3);
    let (to, msg) = requests[1].clone();
    let (_, _, alive, _) = unmask_request(&msg);
    let again = alive[0];
    let got = fed.deliver(to, edited(&msg, |_, alive, _| alive.push(again)));
    assert_eq!(
        got,
        Err(ClientError::RepeatedId {
            stage: Stage::Unmasking,
            client: again
        })
    );
    // A repeated signer is refused too.
    let request = edited(&msg, |signatures, _, _| {
        signatures.push(signatures[0].clone())
    });
    let got = fed.deliver(to, request);
    assert!(
        matches!(got, Err(ClientError::RepeatedId { .. })),
        "{got:?}"
    );
}

/// §6.7 rule 6: fewer than t surviving neighbours. The survivor set is fixed
/// and signed in R3, so that is where a too-small set is refused; R4 checks
/// the signed set again.
#[test]
fn survivor_set_with_fewer_than_t_neighbours_is_refused() {
    let mut fed = Fed::new(N, K, T, DIM, 32, 4);
    let requests = fed.run_until(Stage::ConsistencyCheck);
    let (to, msg) = requests[0].clone();
    let ServerMessage::ConsistencyRequest { session, .. } = msg else {
        panic!()
    };
    let nb = fed.neighbours(to);
    // The client itself plus t-1 of its neighbours.
    let mut survivors: Vec<ClientId> = nb[..T as usize - 1].to_vec();
    survivors.push(to);
    survivors.sort();
    let got = fed.deliver(to, ServerMessage::ConsistencyRequest { session, survivors });
    assert_eq!(
        got,
        Err(ClientError::TooFewSurvivors {
            stage: Stage::ConsistencyCheck,
            have: T as usize - 1,
            need: T as usize
        })
    );
    // And a set without the client is not one it can sign.
    let survivors: Vec<ClientId> = (0..N).map(ClientId).filter(|c| *c != to).collect();
    let got = fed.deliver(to, ServerMessage::ConsistencyRequest { session, survivors });
    assert_eq!(got, Err(ClientError::NotASurvivor { client: to }));
}

/// §2.1, §6.4: a server that lets the survivor set fall below the session's
/// floor aborts before unmasking, and a server that asks anyway is refused
/// by every client: a sum of too few (noised) inputs is never revealed.
#[test]
fn survivor_set_below_the_floor_is_neither_unmasked_nor_signed() {
    let floor = N - 2;
    // Honest server: three clients vanish before sending their masked input.
    let mut fed = Fed::with_floor(N, K, T, DIM, 11, floor);
    fed.drop_plan.insert(
        Stage::MaskedInput,
        [ClientId(1), ClientId(4), ClientId(8)].into(),
    );
    assert_eq!(
        fed.run(),
        Err(AbortReason::BelowMinimumSurvivors {
            stage: Stage::MaskedInput,
            have: N as usize - 3,
            need: floor
        })
    );

    // Malicious server: everyone sent a masked input, but the server names
    // a survivor set below the floor that still gives each client t
    // surviving neighbours.
    let mut fed = Fed::with_floor(N, K, T, DIM, 12, floor);
    let requests = fed.run_until(Stage::ConsistencyCheck);
    let (to, msg) = requests[0].clone();
    let ServerMessage::ConsistencyRequest { session, survivors } = msg else {
        panic!()
    };
    assert_eq!(survivors.len(), N as usize);
    let nb = fed.neighbours(to);
    let mut small: Vec<ClientId> = nb.clone();
    small.push(to);
    small.sort();
    assert!(small.len() < floor as usize);
    let got = fed.deliver(
        to,
        ServerMessage::ConsistencyRequest {
            session,
            survivors: small.clone(),
        },
    );
    assert_eq!(
        got,
        Err(ClientError::BelowMinimumSurvivors {
            have: small.len(),
            need: floor
        })
    );
    // The refusal changed nothing: the honest request is still signed.
    let got = fed.deliver(to, ServerMessage::ConsistencyRequest { session, survivors });
    assert!(
        matches!(got, Ok(Some(ClientMessage::Consistency(_)))),
        "{got:?}"
    );
}

/// §6.7 rule 5: the request must agree with the survivor set the client signed.
#[test]
fn unmask_request_contradicting_the_signed_set_is_refused() {
    // n = 10, so survivors drop out at masked input and the set has holes.
    let mut fed = Fed::new(N, K, T, DIM, 32, 5);
    fed.drop_plan
        .insert(Stage::MaskedInput, [ClientId(7)].into());
    let requests = fed.run_until(Stage::Unmasking);
    let (to, msg) = requests
        .iter()
        .find(|(to, _)| fed.neighbours(*to).contains(&ClientId(7)))
        .cloned()
        .expect("a neighbour of the dropped client");
    let (_, _, alive, dropped) = unmask_request(&msg);
    assert!(dropped.contains(&ClientId(7)));
    // A signed survivor asked for as dropped.
    let victim = alive[0];
    let request = edited(&msg, |_, alive, dropped| {
        alive.retain(|c| *c != victim);
        dropped.push(victim);
        dropped.sort();
    });
    assert_eq!(
        fed.deliver(to, request),
        Err(ClientError::ContradictsConsistencySet {
            client: victim,
            requested: "dropped"
        })
    );
    // A dropped client asked for as alive.
    let request = edited(&msg, |_, alive, dropped| {
        dropped.retain(|c| *c != ClientId(7));
        alive.push(ClientId(7));
        alive.sort();
    });
    assert_eq!(
        fed.deliver(to, request),
        Err(ClientError::ContradictsConsistencySet {
            client: ClientId(7),
            requested: "alive"
        })
    );
}

/// §6.7 rule 4: once a client revealed one kind of share of a neighbour, no
/// later request gets the other kind, whatever else it says.
#[test]
fn a_revealed_share_kind_is_never_switched() {
    let (mut fed, requests) = honest_until_unmask(6);
    let (to, msg) = requests[2].clone();
    let first = fed
        .deliver(to, msg.clone())
        .expect("honest request")
        .expect("answer");
    let ClientMessage::UnmaskShares(first) = first else {
        panic!()
    };
    assert!(first.mask_key.is_empty());
    // Asking again is fine (a server that lost the answer retries).
    let again = fed
        .deliver(to, msg.clone())
        .expect("retry")
        .expect("answer");
    let ClientMessage::UnmaskShares(again) = again else {
        panic!()
    };
    assert_eq!(again.self_mask, first.self_mask);
    // Asking for the other kind is not.
    let (_, _, alive, _) = unmask_request(&msg);
    let neighbour = alive[0];
    let request = edited(&msg, |_, alive, dropped| {
        alive.retain(|c| *c != neighbour);
        dropped.push(neighbour);
        dropped.sort();
    });
    let got = fed.deliver(to, request);
    assert_eq!(
        got,
        Err(ClientError::AlreadyRevealed {
            client: neighbour,
            revealed: ShareKind::SelfMask,
            requested: ShareKind::MaskKey
        })
    );
}

/// §8.3: a server that shows different clients different survivor sets
/// (equivocation) cannot collect t shares of both kinds: signatures over the
/// other set do not verify, and 2t > k leaves no room for two quorums.
#[test]
fn equivocating_survivor_sets_cannot_unmask_the_target() {
    let mut fed = Fed::new(N, K, T, DIM, 32, 7);
    let consistency = fed.run_until(Stage::ConsistencyCheck);
    let tgt = target();
    let session = fed.server.session_id();
    let nb_t = fed.neighbours(tgt);
    let all: Vec<ClientId> = (0..N).map(ClientId).collect();
    let without: Vec<ClientId> = all.iter().copied().filter(|c| *c != tgt).collect();
    // The best split for the server: t of the target's neighbours see the
    // target alive (group A), the other k - t see it dropped (group B);
    // everybody else is put where their signatures help most: in both.
    let group_a: Vec<ClientId> = nb_t[..T as usize].to_vec();
    let mut sig_a = BTreeMap::new();
    let mut sig_b = BTreeMap::new();
    for (to, _) in &consistency {
        let in_b = nb_t[T as usize..].contains(to);
        let in_a = !in_b;
        if in_a {
            let m = ServerMessage::ConsistencyRequest {
                session,
                survivors: all.clone(),
            };
            if let Ok(Some(ClientMessage::Consistency(c))) = fed.deliver(*to, m) {
                sig_a.insert(*to, c.signature);
            }
        } else if *to != tgt {
            let m = ServerMessage::ConsistencyRequest {
                session,
                survivors: without.clone(),
            };
            if let Ok(Some(ClientMessage::Consistency(c))) = fed.deliver(*to, m) {
                sig_b.insert(*to, c.signature);
            }
        }
    }
    // A signature over the other set is refused outright.
    let v = group_a[0];
    let mixed: Vec<SurvivorSignature> = fed
        .neighbours(v)
        .iter()
        .filter_map(|c| {
            sig_a.get(c).or(sig_b.get(c)).map(|s| SurvivorSignature {
                client: *c,
                signature: *s,
            })
        })
        .collect();
    if mixed.iter().any(|s| sig_b.contains_key(&s.client)) {
        let alive = fed.neighbours(v);
        let got = fed.deliver(
            v,
            ServerMessage::UnmaskRequest {
                session,
                signatures: mixed,
                alive,
                dropped: vec![],
            },
        );
        assert!(
            matches!(
                got,
                Err(ClientError::BadSignature {
                    stage: Stage::ConsistencyCheck,
                    ..
                })
            ),
            "{got:?}"
        );
    }
    // Collect everything each group will give.
    let mut answers = Vec::new();
    for v in nb_t.clone() {
        let (sigs, alive, dropped): (
            &BTreeMap<ClientId, SignatureBytes>,
            Vec<ClientId>,
            Vec<ClientId>,
        ) = if group_a.contains(&v) {
            (&sig_a, fed.neighbours(v), vec![])
        } else {
            (
                &sig_b,
                fed.neighbours(v)
                    .into_iter()
                    .filter(|c| *c != tgt)
                    .collect(),
                vec![tgt],
            )
        };
        let signatures = fed
            .neighbours(v)
            .iter()
            .filter_map(|c| {
                sigs.get(c).map(|s| SurvivorSignature {
                    client: *c,
                    signature: *s,
                })
            })
            .collect();
        if let Ok(Some(a)) = fed.deliver(
            v,
            ServerMessage::UnmaskRequest {
                session,
                signatures,
                alive,
                dropped,
            },
        ) {
            answers.push((v, a));
        }
    }
    let b = loot(&answers, tgt, ShareKind::SelfMask);
    let s = loot(&answers, tgt, ShareKind::MaskKey);
    assert!(s.len() < T as usize, "got {} mask-key shares", s.len());
    assert!(b.len() + s.len() <= K as usize);
    assert!(recover_mask_seed(&fed, tgt, &s).is_none());
}

/// §6.1, §8.4 (Pasquini et al. 2022): a client given a different model than
/// its peers ends up in a different session and cannot take part.
#[test]
fn a_client_sent_a_different_model_cannot_join() {
    let tgt = target();
    // The target holds another model; the server's parameters name the common one.
    let mut fed = Fed::with_context(N, K, T, DIM, 32, 8, |c| {
        if c == tgt { [9; 32] } else { [7; 32] }
    });
    let agg = fed.run().expect("the others finish");
    assert!(fed.refusals.contains(&(tgt, ClientError::ContextMismatch)));
    assert!(!agg.survivors.contains(&tgt));
    assert_eq!(agg.sum, fed.sum_of(&agg.survivors));

    // A server that tells the target the truth about its (different) model
    // puts it in another session: its keys and its peers' keys do not verify
    // across the two.
    let mut fed = Fed::with_context(N, K, T, DIM, 32, 8, |c| {
        if c == tgt { [9; 32] } else { [7; 32] }
    });
    fed.start();
    let setup = fed.take_outbox();
    let mut adverts = BTreeMap::new();
    for (to, msg) in setup {
        let ServerMessage::Setup(mut p) = msg else {
            panic!()
        };
        if to == tgt {
            p.context = [9; 32];
        }
        if let Ok(Some(ClientMessage::AdvertiseKeys(k))) = fed.deliver(to, ServerMessage::Setup(p))
        {
            adverts.insert(to, k);
        }
    }
    let common = fed.server.session_id();
    assert_ne!(adverts[&tgt].session, common);
    let v = fed.neighbours(tgt)[0];
    let mut keys: Vec<AdvertisedKeys> = fed
        .neighbours(v)
        .iter()
        .map(|c| adverts[c].clone())
        .collect();
    let got = fed.deliver(
        v,
        ServerMessage::KeyDirectory {
            session: common,
            keys: keys.clone(),
        },
    );
    assert!(
        matches!(got, Err(ClientError::WrongSession { .. })),
        "{got:?}"
    );
    // Relabelling the target's keys with the common session breaks its signature.
    for k in &mut keys {
        k.session = common;
    }
    let got = fed.deliver(
        v,
        ServerMessage::KeyDirectory {
            session: common,
            keys,
        },
    );
    assert_eq!(
        got,
        Err(ClientError::BadSignature {
            stage: Stage::ShareKeys,
            client: tgt
        })
    );
}

/// §6.2: keys the server substituted (a man in the middle) are refused.
#[test]
fn substituted_keys_in_the_directory_are_refused() {
    let mut fed = Fed::new(N, K, T, DIM, 32, 9);
    let dirs = fed.run_until(Stage::ShareKeys);
    let (to, msg) = dirs[0].clone();
    let ServerMessage::KeyDirectory { session, mut keys } = msg else {
        panic!()
    };
    let victim = keys[1].sender;
    keys[1].mask_pk = advertised(&fed, to).mask_pk;
    let got = fed.deliver(to, ServerMessage::KeyDirectory { session, keys });
    assert_eq!(
        got,
        Err(ClientError::BadSignature {
            stage: Stage::ShareKeys,
            client: victim
        })
    );
    // The unmodified directory is still accepted: a refusal changes nothing.
    assert!(
        fed.deliver(to, dirs[0].1.clone())
            .expect("honest directory")
            .is_some()
    );
}

/// §5.4, §6.3: a tampered share envelope does not open; the holder reports it
/// and keeps masking with the sender, and the round still completes exactly.
#[test]
fn a_tampered_envelope_is_reported_and_the_round_completes() {
    let mut fed = Fed::new(N, K, T, DIM, 20, 10);
    let mut relays = fed.run_until(Stage::MaskedInput);
    let (victim, msg) = &mut relays[4];
    let victim = *victim;
    let ServerMessage::ShareRelay { envelopes, .. } = msg else {
        panic!()
    };
    let accused = envelopes[0].from;
    envelopes[0].ciphertext[7] ^= 0x40;
    fed.exchange(relays);
    let agg = fed.run().expect("the round completes");
    let all: Vec<ClientId> = (0..N).map(ClientId).collect();
    assert_eq!(agg.survivors, all);
    assert_eq!(agg.sum, fed.sum_of(&all));
    assert_eq!(agg.complaints.len(), 1);
    assert_eq!(
        (agg.complaints[0].reporter, agg.complaints[0].accused),
        (victim, accused)
    );
    assert!(fed.refusals.is_empty());
}

/// §6.8: wrong-length and malformed vectors are rejected and the honest
/// message that follows is still accepted.
#[test]
fn wrong_length_vectors_are_rejected_without_losing_the_client() {
    let mut fed = Fed::new(N, K, T, DIM, 16, 11);
    let relays = fed.run_until(Stage::MaskedInput);
    let now = fed.now;
    for (to, msg) in relays {
        let Ok(Some(ClientMessage::MaskedInput(m))) = fed.deliver(to, msg) else {
            panic!()
        };
        if to == ClientId(2) {
            let mut short = m.clone();
            short.masked = PackedVec::pack(&[1, 2, 3], 16).unwrap();
            let got = fed
                .server
                .handle_message(now, to, ClientMessage::MaskedInput(short));
            assert_eq!(
                got,
                Err(Rejected::WrongLength {
                    client: to,
                    expected: DIM,
                    got: 3,
                    expected_bits: 16,
                    got_bits: 16
                })
            );
            let mut wide = m.clone();
            wide.masked = PackedVec::pack(&vec![0; DIM as usize], 32).unwrap();
            assert!(matches!(
                fed.server
                    .handle_message(now, to, ClientMessage::MaskedInput(wide)),
                Err(Rejected::WrongLength { got_bits: 32, .. })
            ));
            let mut truncated = m.clone();
            truncated.masked.data.pop();
            assert!(matches!(
                fed.server
                    .handle_message(now, to, ClientMessage::MaskedInput(truncated)),
                Err(Rejected::Malformed { .. })
            ));
            let mut stranger = m.clone();
            stranger.bad_envelopes = vec![ClientId(99)];
            assert!(matches!(
                fed.server
                    .handle_message(now, to, ClientMessage::MaskedInput(stranger)),
                Err(Rejected::Malformed { .. })
            ));
        }
        fed.server
            .handle_message(now, to, ClientMessage::MaskedInput(m))
            .expect("the honest vector is accepted");
    }
    let agg = fed.run().expect("completes");
    assert_eq!(agg.survivors.len(), N as usize);
    assert_eq!(agg.sum, fed.sum_of(&agg.survivors));
}

/// §6.6: a client that reveals a wrong share is caught by the commitment;
/// the server reconstructs from the other shares and names the liar.
#[test]
fn a_lying_share_holder_is_identified_and_outvoted() {
    let (mut fed, requests) = honest_until_unmask(12);
    let liar = requests[0].0;
    let now = fed.now;
    for (to, msg) in requests {
        let Ok(Some(ClientMessage::UnmaskShares(mut u))) = fed.deliver(to, msg) else {
            panic!()
        };
        if to == liar {
            let s = &mut u.self_mask[0];
            let v = Option::<Scalar>::from(Scalar::from_canonical_bytes(s.share)).unwrap()
                + Scalar::ONE;
            s.share = v.to_bytes();
        }
        fed.server
            .handle_message(now, to, ClientMessage::UnmaskShares(u))
            .expect("well-formed");
    }
    let agg = fed
        .server
        .take_outcome()
        .expect("done")
        .expect("recovered from the other shares");
    assert_eq!(agg.sum, fed.sum_of(&agg.survivors));
    assert_eq!(agg.bad_shares.len(), 1);
    assert_eq!(agg.bad_shares[0].holder, liar);
}

/// §6.8: unrequested or malformed shares are rejected.
#[test]
fn unrequested_and_malformed_shares_are_rejected() {
    let (mut fed, requests) = honest_until_unmask(13);
    let now = fed.now;
    let (to, msg) = requests[0].clone();
    let Ok(Some(ClientMessage::UnmaskShares(u))) = fed.deliver(to, msg) else {
        panic!()
    };
    let session = u.session;
    let stranger = (0..N)
        .map(ClientId)
        .find(|c| !fed.neighbours(to).contains(c) && *c != to)
        .unwrap();
    let mut extra = u.clone();
    extra.self_mask.push(RevealedShare {
        owner: stranger,
        share: [1; 32],
    });
    assert!(matches!(
        fed.server
            .handle_message(now, to, ClientMessage::UnmaskShares(extra)),
        Err(Rejected::Malformed { .. })
    ));
    let mut noncanonical = u.clone();
    noncanonical.self_mask[0].share = [0xff; 32];
    assert!(matches!(
        fed.server
            .handle_message(now, to, ClientMessage::UnmaskShares(noncanonical)),
        Err(Rejected::Malformed { .. })
    ));
    let mut twice = u.clone();
    twice.self_mask.push(twice.self_mask[0].clone());
    assert!(matches!(
        fed.server
            .handle_message(now, to, ClientMessage::UnmaskShares(twice)),
        Err(Rejected::Malformed { .. })
    ));
    assert_eq!(session, fed.server.session_id());
    fed.server
        .handle_message(now, to, ClientMessage::UnmaskShares(u))
        .expect("honest shares");
}

/// §6.7, §6.8: replayed and out-of-round messages are refused on both sides.
#[test]
fn replayed_and_out_of_round_messages_are_refused() {
    // A request from another session (an earlier round) is refused.
    let (_old, old_requests) = honest_until_unmask(14);
    let (mut fed, _requests) = honest_until_unmask(15);
    let (to, old) = old_requests[0].clone();
    let got = fed.deliver(to, old);
    assert!(
        matches!(got, Err(ClientError::WrongSession { .. })),
        "{got:?}"
    );

    // Out of round, client side: a key directory when waiting for unmasking.
    let session = fed.server.session_id();
    let got = fed.deliver(
        to,
        ServerMessage::KeyDirectory {
            session,
            keys: vec![],
        },
    );
    assert!(
        matches!(
            got,
            Err(ClientError::UnexpectedMessage {
                message: "KeyDirectory",
                ..
            })
        ),
        "{got:?}"
    );
    // A second setup, a second consistency request.
    let params = fed.params.clone();
    let got = fed.deliver(to, ServerMessage::Setup(params));
    assert!(matches!(
        got,
        Err(ClientError::UnexpectedMessage {
            message: "Setup",
            ..
        })
    ));
    let got = fed.deliver(
        to,
        ServerMessage::ConsistencyRequest {
            session,
            survivors: vec![to],
        },
    );
    assert!(matches!(got, Err(ClientError::UnexpectedMessage { .. })));

    // Out of round, client side: an unmask request while sharing.
    let mut early = Fed::new(N, K, T, DIM, 32, 16);
    let relays = early.run_until(Stage::MaskedInput);
    let session = early.server.session_id();
    let (to, _) = relays[0].clone();
    let got = early.deliver(
        to,
        ServerMessage::UnmaskRequest {
            session,
            signatures: vec![],
            alive: vec![],
            dropped: vec![],
        },
    );
    assert!(matches!(
        got,
        Err(ClientError::UnexpectedMessage {
            message: "UnmaskRequest",
            ..
        })
    ));
}

/// §6.8: the server rejects what it must and keeps serving everybody else.
#[test]
fn the_server_rejects_bad_messages_and_keeps_serving() {
    let mut fed = Fed::new(N, K, T, DIM, 32, 17);
    fed.start();
    let setup = fed.take_outbox();
    let now = fed.now;
    let mut adverts = Vec::new();
    for (to, msg) in setup {
        if let Ok(Some(m)) = fed.deliver(to, msg) {
            adverts.push((to, m));
        }
    }
    let (a, msg_a) = adverts[0].clone();
    let (b, _) = adverts[1].clone();
    // Someone not in the roster.
    assert_eq!(
        fed.server.handle_message(now, ClientId(999), msg_a.clone()),
        Err(Rejected::UnknownClient {
            client: ClientId(999)
        })
    );
    // Another client's keys under one's own name.
    assert!(matches!(
        fed.server.handle_message(now, b, msg_a.clone()),
        Err(Rejected::Malformed { .. })
    ));
    // A message of a later stage.
    let session = fed.server.session_id();
    let early = ClientMessage::Consistency(fedveil_secagg::messages::ConsistencySignature {
        session,
        signature: SignatureBytes([0; 64]),
    });
    assert!(matches!(
        fed.server.handle_message(now, a, early),
        Err(Rejected::OutOfRound {
            current: Stage::AdvertiseKeys,
            got: Stage::ConsistencyCheck,
            ..
        })
    ));
    // Another session.
    let ClientMessage::AdvertiseKeys(mut k) = msg_a.clone() else {
        panic!()
    };
    k.session = SessionId([1; 32]);
    assert!(matches!(
        fed.server
            .handle_message(now, a, ClientMessage::AdvertiseKeys(k.clone())),
        Err(Rejected::WrongSession { .. })
    ));
    // A forged signature.
    let ClientMessage::AdvertiseKeys(mut forged) = msg_a.clone() else {
        panic!()
    };
    forged.cipher_pk[0] ^= 1;
    assert_eq!(
        fed.server
            .handle_message(now, a, ClientMessage::AdvertiseKeys(forged)),
        Err(Rejected::BadSignature {
            client: a,
            stage: Stage::AdvertiseKeys
        })
    );
    // Then the real one, once; a second copy is a duplicate.
    fed.server
        .handle_message(now, a, msg_a.clone())
        .expect("accepted");
    assert_eq!(
        fed.server.handle_message(now, a, msg_a.clone()),
        Err(Rejected::Duplicate {
            client: a,
            stage: Stage::AdvertiseKeys
        })
    );
    // Everybody else is served, and the round completes.
    for (from, m) in adverts.into_iter().skip(1) {
        fed.server.handle_message(now, from, m).expect("accepted");
    }
    let agg = fed.run().expect("completes");
    assert_eq!(agg.survivors.len(), N as usize);
    assert_eq!(agg.sum, fed.sum_of(&agg.survivors));
    assert_eq!(
        fed.server.handle_message(now, a, msg_a),
        Err(Rejected::SessionOver)
    );
}

/// §6.8: a client that dropped out cannot come back later in the session.
#[test]
fn a_client_that_missed_a_stage_is_not_eligible_later() {
    let mut fed = Fed::new(N, K, T, DIM, 32, 18);
    fed.drop_plan.insert(Stage::ShareKeys, [ClientId(5)].into());
    let relays = fed.run_until(Stage::MaskedInput);
    assert!(relays.iter().all(|(to, _)| *to != ClientId(5)));
    let session = fed.server.session_id();
    let late = ClientMessage::MaskedInput(fedveil_secagg::messages::MaskedInput {
        session,
        masked: PackedVec::pack(&vec![0; DIM as usize], 32).unwrap(),
        bad_envelopes: vec![],
    });
    let now = fed.now;
    assert_eq!(
        fed.server.handle_message(now, ClientId(5), late),
        Err(Rejected::NotEligible {
            client: ClientId(5),
            stage: Stage::MaskedInput
        })
    );
}
