//! Dropouts at every stage (protocols/secagg-plus.md §6.3–§6.6, §6.9).
//!
//! Hundreds of random sessions, each with random clients vanishing at random
//! stages. An oracle, written from the set rules of the spec and not from the
//! server's code, predicts every survivor set; the session must then either
//! produce exactly the ring sum of the predicted survivors' inputs, or abort
//! with an error whose rule the oracle confirms.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::Fed;
use fedveil_secagg::{AbortReason, ClientId, ShareKind, Stage};
use proptest::prelude::*;

type Set = BTreeSet<ClientId>;

#[derive(Debug, PartialEq)]
enum Expected {
    Sum {
        survivors: Set,
    },
    /// The session cannot finish; the listed (client, kind) pairs break the
    /// rule checked at the stage.
    Abort {
        stage: Stage,
        violators: BTreeSet<(ClientId, ShareKind)>,
        missing_shares: bool,
    },
    NoClientsLeft(Stage),
}

fn inter(a: &Set, b: &Set) -> usize {
    a.intersection(b).count()
}

/// The oracle: which clients end up where, from the spec's rules (§6).
fn predict(fed: &Fed, plan: &BTreeMap<Stage, Set>) -> Expected {
    let t = fed.params.threshold as usize;
    let all: Set = (0..fed.params.clients() as u32).map(ClientId).collect();
    let nb: BTreeMap<ClientId, Set> = all
        .iter()
        .map(|&c| (c, fed.neighbours(c).into_iter().collect()))
        .collect();
    let silenced = |s: Stage, c: &ClientId| plan.get(&s).is_some_and(|d| d.contains(c));
    let keep = |from: &Set, s: Stage| -> Set {
        from.iter().copied().filter(|c| !silenced(s, c)).collect()
    };

    // §6.1–6.2: advertise; clients with fewer than t advertised neighbours are excluded.
    let u1 = keep(&all, Stage::AdvertiseKeys);
    let s1: Set = u1
        .iter()
        .copied()
        .filter(|v| inter(&nb[v], &u1) >= t)
        .collect();
    if s1.is_empty() {
        return Expected::NoClientsLeft(Stage::AdvertiseKeys);
    }
    // §6.3: share; u and v mask with each other iff both shared (and are neighbours).
    let u2 = keep(&s1, Stage::ShareKeys);
    let m: BTreeMap<ClientId, Set> = u2
        .iter()
        .map(|&v| (v, nb[&v].intersection(&u2).copied().collect()))
        .collect();
    let s2: Set = u2.iter().copied().filter(|v| m[v].len() >= t).collect();
    if s2.is_empty() {
        return Expected::NoClientsLeft(Stage::ShareKeys);
    }
    // §6.4: masked input; every survivor and every dropped client it masked
    // with needs t surviving holders.
    let u3 = keep(&s2, Stage::MaskedInput);
    if u3.is_empty() {
        return Expected::NoClientsLeft(Stage::MaskedInput);
    }
    let needed: Set = u3
        .iter()
        .flat_map(|u| m[u].iter().copied())
        .filter(|d| !u3.contains(d))
        .collect();
    let check = |holders: &Set| -> BTreeSet<(ClientId, ShareKind)> {
        let mut bad = BTreeSet::new();
        for u in &u3 {
            if inter(&m[u], holders) < t {
                bad.insert((*u, ShareKind::SelfMask));
            }
        }
        for d in &needed {
            if inter(&m[d], holders) < t {
                bad.insert((*d, ShareKind::MaskKey));
            }
        }
        bad
    };
    let bad = check(&u3);
    if !bad.is_empty() {
        return Expected::Abort {
            stage: Stage::MaskedInput,
            violators: bad,
            missing_shares: false,
        };
    }
    // §6.5: consistency; a signer answers unmask requests only if t of its
    // neighbours signed too.
    let u4 = keep(&u3, Stage::ConsistencyCheck);
    let responders: Set = u4
        .iter()
        .copied()
        .filter(|v| inter(&m[v], &u4) >= t)
        .collect();
    let bad = check(&responders);
    if !bad.is_empty() {
        return Expected::Abort {
            stage: Stage::ConsistencyCheck,
            violators: bad,
            missing_shares: false,
        };
    }
    // §6.6: unmask; shares come only from those who answer.
    let u5 = keep(&responders, Stage::Unmasking);
    let bad = check(&u5);
    if !bad.is_empty() {
        return Expected::Abort {
            stage: Stage::Unmasking,
            violators: bad,
            missing_shares: true,
        };
    }
    Expected::Sum { survivors: u3 }
}

#[derive(Debug, Clone)]
struct Case {
    n: u32,
    k: u32,
    t: u32,
    dim: u32,
    bits: u8,
    /// Per stage, per client: silence it when asked for that stage.
    drops: Vec<Vec<bool>>,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (5u32..=14)
        .prop_flat_map(|n| (Just(n), 2u32..n))
        .prop_filter("an odd degree needs an even number of clients", |(n, k)| {
            !(k % 2 == 1 && n % 2 == 1 && *k + 1 < *n)
        })
        .prop_flat_map(|(n, k)| {
            // Per stage: often nobody drops, otherwise up to a fifth of the clients.
            let rate = prop_oneof![2 => Just(0.0f64), 3 => 0.0f64..0.2];
            let stage_drops = rate
                .prop_flat_map(move |p| prop::collection::vec(prop::bool::weighted(p), n as usize));
            (
                Just(n),
                Just(k),
                (k / 2 + 1)..=k,
                1u32..12,
                prop::sample::select(vec![5u8, 8, 13, 16, 24, 32]),
                prop::collection::vec(stage_drops, 5),
                any::<u64>(),
            )
        })
        .prop_map(|(n, k, t, dim, bits, drops, seed)| Case {
            n,
            k,
            t,
            dim,
            bits,
            drops,
            seed,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// §6.9: exact sum over the survivors, or the abort whose rule is broken.
    #[test]
    fn random_dropout_schedules_give_the_exact_sum_or_the_right_abort(c in case()) {
        let mut fed = Fed::new(c.n, c.k, c.t, c.dim, c.bits, c.seed);
        let mut plan = BTreeMap::new();
        for (stage, mask) in Stage::ALL.iter().zip(&c.drops) {
            let set: Set = mask.iter().enumerate().filter(|(_, d)| **d).map(|(i, _)| ClientId(i as u32)).collect();
            plan.insert(*stage, set);
        }
        fed.drop_plan = plan.clone();
        let expected = predict(&fed, &plan);
        let outcome = fed.run();
        prop_assert!(fed.refusals.is_empty(), "honest clients refused: {:?}", fed.refusals);
        prop_assert!(fed.rejections.is_empty(), "server rejected: {:?}", fed.rejections);
        match (&expected, outcome) {
            (Expected::Sum { survivors }, Ok(agg)) => {
                let got: Set = agg.survivors.iter().copied().collect();
                prop_assert_eq!(&got, survivors);
                let want = fed.sum_of(&agg.survivors);
                prop_assert_eq!(agg.sum, want, "the sum is not exact");
            }
            (Expected::NoClientsLeft(s), Err(AbortReason::NoClientsLeft { stage, .. })) => {
                prop_assert_eq!(*s, stage);
            }
            (
                Expected::Abort { stage, violators, missing_shares: false },
                Err(AbortReason::TooFewSurvivingNeighbours { stage: got, client, kind, have, need }),
            ) => {
                prop_assert_eq!(*stage, got);
                prop_assert!(violators.contains(&(client, kind)), "{client} {kind} is not a violator: {violators:?}");
                prop_assert!(have < need);
            }
            (
                Expected::Abort { stage: Stage::Unmasking, violators, missing_shares: true },
                Err(AbortReason::MissingShares { client, kind, have, need, .. }),
            ) => {
                prop_assert!(violators.contains(&(client, kind)), "{client} {kind} is not a violator: {violators:?}");
                prop_assert!(have < need);
            }
            (e, o) => prop_assert!(false, "expected {e:?}, got {o:?}"),
        }
    }
}

/// A drop at each single stage, on the classic complete graph (Bonawitz et al.).
#[test]
fn complete_graph_survives_one_drop_at_every_stage() {
    for stage in Stage::ALL {
        let mut fed = Fed::new(7, 6, 4, 20, 32, 11);
        fed.drop_plan.insert(stage, [ClientId(3)].into());
        let agg = fed.run().unwrap_or_else(|e| panic!("drop at {stage}: {e}"));
        let survivors: Vec<ClientId> = if stage <= Stage::MaskedInput {
            (0..7).filter(|&i| i != 3).map(ClientId).collect()
        } else {
            (0..7).map(ClientId).collect()
        };
        assert_eq!(agg.survivors, survivors, "drop at {stage}");
        assert_eq!(agg.sum, fed.sum_of(&survivors), "drop at {stage}");
        assert!(fed.refusals.is_empty());
    }
}

/// Pitfall 4 of design §1 (Flower fails the round): a client that vanishes
/// during ShareKeys, after others received its keys, must not fail the round.
#[test]
fn a_drop_during_share_keys_still_sums_the_survivors() {
    let mut fed = Fed::new(12, 6, 4, 50, 20, 5);
    fed.drop_plan
        .insert(Stage::ShareKeys, [ClientId(0), ClientId(5)].into());
    let agg = fed.run().expect("the round completes");
    let survivors: Vec<ClientId> = (0..12)
        .filter(|i| ![0, 5].contains(i))
        .map(ClientId)
        .collect();
    assert_eq!(agg.survivors, survivors);
    assert_eq!(agg.sum, fed.sum_of(&survivors));
    assert!(agg.dropped.contains(&(ClientId(0), Stage::ShareKeys)));
}

/// §6.9: too many drops at unmasking name the client whose mask is stuck.
#[test]
fn too_few_unmask_responses_name_the_rule_and_the_clients() {
    let mut fed = Fed::new(8, 4, 3, 10, 32, 9);
    let victim = ClientId(2);
    let holders = fed.neighbours(victim);
    // Silence two of its four neighbours at unmasking: 2 < t = 3 shares left.
    fed.drop_plan
        .insert(Stage::Unmasking, holders[..2].iter().copied().collect());
    match fed.run() {
        Err(AbortReason::MissingShares {
            client,
            kind,
            have,
            need,
            holders: from,
        }) => {
            assert_eq!(need, 3);
            assert!(have < need);
            assert!(from.iter().all(|h| !holders[..2].contains(h)));
            assert!(
                fed.neighbours(client)
                    .iter()
                    .filter(|h| holders[..2].contains(h))
                    .count()
                    >= 1
            );
            assert_eq!(kind, ShareKind::SelfMask);
        }
        other => panic!("expected MissingShares, got {other:?}"),
    }
    // The server told every client still in the session that it is over.
    assert!(fed.clients().filter(|c| c.aborted().is_some()).count() >= 6);
}

/// A client reported gone drops out at once: the stage closes when the
/// others have answered, with no deadline passing, and the sum is that of
/// the survivors exactly as if the client had timed out.
#[test]
fn a_client_reported_gone_drops_without_waiting_for_the_deadline() {
    for stage in Stage::ALL {
        let mut fed = Fed::new(9, 6, 4, 30, 32, 21);
        let victim = ClientId(4);
        fed.drop_plan.insert(stage, [victim].into());
        let requests = fed.run_until(stage);
        // The layer above notices the closed connection.
        let now = fed.now;
        assert!(fed.server.drop_client(now, victim));
        assert!(!fed.server.drop_client(now, ClientId(99)));
        fed.exchange(requests);
        let agg = fed.run().unwrap_or_else(|e| panic!("gone at {stage}: {e}"));
        assert_eq!(
            fed.now,
            std::time::Duration::ZERO,
            "a deadline passed (gone at {stage})"
        );
        let survivors: Vec<ClientId> = if stage <= Stage::MaskedInput {
            (0..9).filter(|&i| i != 4).map(ClientId).collect()
        } else {
            (0..9).map(ClientId).collect()
        };
        assert_eq!(agg.survivors, survivors, "gone at {stage}");
        assert_eq!(agg.sum, fed.sum_of(&survivors), "gone at {stage}");
    }
    // Reported gone before the session starts: never waited for.
    let mut fed = Fed::new(9, 6, 4, 30, 32, 22);
    assert!(
        fed.server
            .drop_client(std::time::Duration::ZERO, ClientId(1))
    );
    fed.drop_plan
        .insert(Stage::AdvertiseKeys, [ClientId(1)].into());
    let agg = fed.run().expect("completes");
    assert_eq!(fed.now, std::time::Duration::ZERO);
    assert!(!agg.survivors.contains(&ClientId(1)));
}
