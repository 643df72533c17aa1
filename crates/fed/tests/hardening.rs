//! Attacks one party could mount against a running federation that once
//! got through (issue 17), each over real QUIC on loopback: a client that
//! keeps sending refused messages, a retried round that would overspend the
//! privacy budget, a client that forges its weight slot, and a Poisson
//! cohort too small for the configured threshold. Each test fails on the
//! code before the fix.

mod common;

use common::*;
use fedveil_audit::hardening::ForgedWeight;
use fedveil_fed::client::Fault;
use fedveil_fed::config::{PlacementName, Policy};
use fedveil_fed::metrics::{ClientEvent, Event};
use fedveil_fed::randomness::Randomness;
use fedveil_fed::secagg::Stage;
use fedveil_fed::wire::{Up, VERSION};

fn short_rounds(rounds: u64, extra: &str) -> fedveil_fed::config::Plan {
    plan(&format!(
        r#"
[federation]
rounds = {rounds}
[deadlines]
train = 1.5
share = 1.5
masked = 1.5
consistency = 1.5
unmask = 1.5
{extra}
[task]
kind = "synthetic"
dim = 12
"#
    ))
}

// federation.md §3.1: a client whose messages keep being refused is
// disconnected after `max_violations` of them; the others finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_breaking_the_rules_is_disconnected() {
    let mut plan = short_rounds(2, "");
    // The rogue is gone for good: the rounds go on with the other four.
    plan.federation.cohort_size = Some(4);
    plan.federation.min_clients = Some(4);
    let n = 5;
    let cast = Cast::new(n, 61);
    let randomness = Randomness::os();
    let mut lim = limits();
    lim.max_violations = 16;
    let mut server = start_server_with(
        &cast,
        plan.clone(),
        loopback(),
        randomness.clone(),
        None,
        lim,
    )
    .await;
    let addr = server.addr;
    let honest: Vec<_> = (0..n - 1)
        .map(|i| {
            start_client(
                &cast,
                i,
                addr,
                &plan,
                randomness.clone(),
                None,
                None,
                ClientOptions::default(),
            )
        })
        .collect();
    let mut rogue = Rogue::connect(addr, &cast, n - 1).await;
    for _ in 0..40 {
        rogue.up(&Up::Hello { version: VERSION }).await;
    }
    let reason = rogue.closed().await;
    assert!(reason.contains("16 rejected messages"), "{reason}");
    let seen = server
        .wait_for(
            10,
            |e| matches!(e, Event::Rejected { reason, .. } if reason.contains("16 rejected")),
        )
        .await;
    assert!(matches!(seen, Event::Rejected { client, .. } if client.0 == n as u32));
    let (summary, _) = server.finish().await;
    assert_eq!(summary.rounds, 2);
    for c in join_clients(honest).await {
        assert_eq!(c.unwrap().rounds, 2);
    }
}

// federation.md §5.3: a session that was charged and then aborted (two
// members vanish while unmasking, below the threshold) is retried only if
// the retry fits the budget too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_session_cannot_take_the_ledger_past_the_budget() {
    let dp = "[dp]\nplacement = \"distributed\"\nclip = 1.0\nnoise_multiplier = 2.0\nmin_survivors = 3\n";
    let probe = short_rounds(3, dp);
    let noise = probe.resolve(5, 12).unwrap().dp.unwrap().noise;
    let rho = fedveil_fed::dp::zcdp::round_rho(&noise, 3).unwrap();
    let one = fedveil_fed::dp::zcdp::epsilon(rho, 1e-5).unwrap();
    let two = fedveil_fed::dp::zcdp::epsilon(2.0 * rho, 1e-5).unwrap();
    // One session at the survivor floor fits; two do not.
    let budget = 0.5 * (one + two);
    let plan = short_rounds(
        3,
        &format!("{dp}epsilon_budget = {budget}\n[secagg]\nthreshold = 4\n"),
    );
    let cast = Cast::new(5, 62);
    let randomness = Randomness::os();
    let server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let addr = server.addr;
    let clients: Vec<_> = (0..5)
        .map(|i| {
            let faults = if i >= 3 {
                vec![Fault::Disconnect {
                    round: 0,
                    stage: Stage::Unmasking,
                }]
            } else {
                Vec::new()
            };
            start_client(
                &cast,
                i,
                addr,
                &plan,
                randomness.clone(),
                None,
                None,
                ClientOptions {
                    faults,
                    ..ClientOptions::default()
                },
            )
        })
        .collect();
    let (summary, events) = server.finish().await;
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::RoundAborted {
                round: 0,
                attempt: 0,
                ..
            }
        )),
        "the first session was to abort while unmasking"
    );
    assert_eq!(summary.rounds, 0, "{}", summary.reason);
    assert!(
        summary.reason.contains("privacy budget")
            && summary.reason.contains("session 2 of round 0"),
        "{}",
        summary.reason
    );
    let spent = summary.epsilon.unwrap();
    assert!(
        spent > 0.0 && spent <= budget,
        "ε = {spent}, budget {budget}"
    );
    let _ = join_clients(clients).await;
}

// federation.md §4.5: a sum that cannot be decoded (one member forged its
// weight) aborts that session; the round is tried again and the
// federation goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_weight_aborts_the_session_not_the_federation() {
    let plan = short_rounds(2, "");
    let cast = Cast::new(4, 63);
    let randomness = Randomness::os();
    let server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let addr = server.addr;
    let mut clients: Vec<_> = (1..4)
        .map(|i| {
            start_client(
                &cast,
                i,
                addr,
                &plan,
                randomness.clone(),
                None,
                None,
                ClientOptions::default(),
            )
        })
        .collect();
    clients.push(start_client(
        &cast,
        0,
        addr,
        &plan,
        randomness.clone(),
        None,
        None,
        ClientOptions {
            adversary: Some(Box::new(ForgedWeight::default())),
            ..ClientOptions::default()
        },
    ));
    let (summary, events) = server.finish().await;
    let aborted: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::RoundAborted { round, reason, .. } => Some((*round, reason.clone())),
            _ => None,
        })
        .collect();
    assert!(
        aborted
            .iter()
            .any(|(r, why)| *r == 0 && why.contains("cannot be decoded")),
        "{aborted:?}"
    );
    assert_eq!(summary.rounds, 2, "{}", summary.reason);
    for c in join_clients(clients).await {
        assert_eq!(c.unwrap().rounds, 2);
    }
}

// federation.md §4.1: Poisson samples too small for an explicit threshold
// abort their session and the round is drawn again; the run never fails
// for it. (10 clients at rate 0.4 with threshold 5: most samples are too
// small.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_poisson_samples_never_end_a_run_with_an_explicit_threshold() {
    let plan = short_rounds(2, "[secagg]\nthreshold = 5\n");
    let mut plan = plan;
    plan.federation.cohort_size = None;
    plan.federation.sampling_rate = Some(0.4);
    plan.federation.attempts = 100;
    plan.federation.min_clients = Some(10);
    let cast = Cast::new(10, 64);
    let randomness = seeded(64);
    let server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let clients = start_clients(&cast, server.addr, &plan, &randomness, None);
    let (summary, events) = server.finish().await;
    assert_eq!(summary.rounds, 2, "{}", summary.reason);
    let small = events
        .iter()
        .filter(|e| matches!(e, Event::RoundAborted { reason, .. } if reason.contains("needs at least 6")))
        .count();
    assert!(small > 0, "no sample was too small: the test shows nothing");
    let _ = join_clients(clients).await;
}

/// Client events with their reasons: the refusals and the charges.
fn refusals(events: &mut tokio::sync::mpsc::UnboundedReceiver<ClientEvent>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let ClientEvent::Refused { reason, .. } = e {
            out.push(reason);
        }
    }
    out
}

/// Runs `plan` with every client under `policy` until the server ends;
/// returns the server's result and the clients' refusals.
async fn run_with_policy(
    cast: &Cast,
    plan: &fedveil_fed::config::Plan,
    policy: &Policy,
    randomness: Randomness,
    ledgers: Option<&std::path::Path>,
) -> (
    Result<fedveil_fed::server::Summary, fedveil_fed::FedError>,
    Vec<String>,
) {
    let server = start_server(cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let clients: Vec<_> = (0..cast.clients.len())
        .map(|i| {
            start_client(
                cast,
                i,
                server.addr,
                plan,
                randomness.clone(),
                None,
                Some(tx.clone()),
                ClientOptions {
                    policy: policy.clone(),
                    ledger_dir: ledgers.map(|d| d.join(format!("client-{i}"))),
                    ..ClientOptions::default()
                },
            )
        })
        .collect();
    let result = tokio::time::timeout(std::time::Duration::from_secs(120), server.task)
        .await
        .expect("the server ends within 120 s")
        .expect("the server task");
    let _ = join_clients(clients).await;
    (result, refusals(&mut events))
}

/// A strict client's policy: distributed noise only, z ≥ 1, clip ≤ 1, and
/// at most ε = 10 per round at δ = 1e-5.
fn strict() -> Policy {
    Policy {
        min_noise_multiplier: 1.0,
        max_clip: Some(1.0),
        refuse_placements: vec![PlacementName::Central, PlacementName::Local],
        max_round_epsilon: Some(10.0),
        ..Policy::default()
    }
}

// federation.md §4.4: a server that keeps the noise multiplier and the clip
// within the clients' policy but coarsens the grid (γ = 10) would make a
// round cost thousands in ε; the clients compute the round's ε themselves
// and decline it. Control: the same clients take part in the honest round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_refuse_a_round_whose_privacy_loss_their_policy_does_not_allow() {
    let dp = "[dp]\nplacement = \"distributed\"\nclip = 1.0\nnoise_multiplier = 1.0\nmin_survivors = 3\n";
    let cast = Cast::new(3, 65);
    let honest = short_rounds(1, dp);
    let coarse = short_rounds(1, &format!("{dp}granularity = 10.0\n"));
    let eps = |plan: &fedveil_fed::config::Plan| {
        let noise = plan.resolve(3, 12).unwrap().dp.unwrap().noise;
        let rho = fedveil_fed::dp::zcdp::round_rho(&noise, 3).unwrap();
        fedveil_fed::dp::zcdp::epsilon(rho, 1e-5).unwrap()
    };
    let (e_honest, e_coarse) = (eps(&honest), eps(&coarse));
    assert!(e_honest < 10.0 && e_coarse > 100.0, "{e_honest} {e_coarse}");

    let (result, refused) =
        run_with_policy(&cast, &honest, &strict(), Randomness::os(), None).await;
    assert_eq!(result.unwrap().rounds, 1, "the control round: {refused:?}");
    assert!(refused.is_empty(), "{refused:?}");

    let (result, refused) =
        run_with_policy(&cast, &coarse, &strict(), Randomness::os(), None).await;
    assert!(result.is_err(), "the coarse round completed");
    assert!(
        refused.len() >= 3 && refused.iter().all(|r| r.contains("per-round limit of 10")),
        "{refused:?}"
    );
}

// federation.md §4.4: a server that runs a session of a round again (here:
// a server restarted from nothing, with the same federation id) cannot
// average several noisy versions of a client's input. The restarted
// clients read their ledgers and refuse the session they already revealed
// their input in, and every further session past their budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_refuse_a_replayed_session_and_remember_across_restarts() {
    let dir = scratch("client-ledgers");
    let dp = "[dp]\nplacement = \"distributed\"\nclip = 1.0\nnoise_multiplier = 2.0\nmin_survivors = 3\n";
    let plan = short_rounds(1, dp);
    let noise = plan.resolve(3, 12).unwrap().dp.unwrap().noise;
    let rho = fedveil_fed::dp::zcdp::round_rho(&noise, 3).unwrap();
    let one = fedveil_fed::dp::zcdp::epsilon(rho, 1e-5).unwrap();
    let two = fedveil_fed::dp::zcdp::epsilon(2.0 * rho, 1e-5).unwrap();
    let policy = Policy {
        epsilon_budget: Some(0.5 * (one + two)),
        ..strict()
    };
    let cast = Cast::new(3, 66);
    let (result, refused) = run_with_policy(&cast, &plan, &policy, seeded(66), Some(&dir)).await;
    assert_eq!(result.unwrap().rounds, 1, "{refused:?}");
    for i in 0..3 {
        let files: Vec<_> = std::fs::read_dir(dir.join(format!("client-{i}")))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 1, "client {i} keeps one ledger file");
    }

    // The same federation again from the start, the clients restarted.
    let (result, refused) = run_with_policy(&cast, &plan, &policy, seeded(66), Some(&dir)).await;
    assert!(result.is_err(), "a replayed round completed");
    assert!(
        refused
            .iter()
            .any(|r| r.contains("already revealed its input in session 1 of round 0")),
        "{refused:?}"
    );
    assert!(
        refused.iter().any(|r| r.contains("past its budget")),
        "{refused:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// federation.md §4.4: a client file without [policy] refuses rounds
// without differential privacy; a client's floors on the SecAgg+ degree
// and threshold are enforced. The clients that accept finish the round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_policy_requires_dp_and_secagg_floors_are_enforced() {
    let plan = short_rounds(1, "");
    let cast = Cast::new(5, 67);
    let randomness = Randomness::os();
    let server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let policies = [
        Policy::default(),
        Policy {
            min_degree: 5,
            ..Policy::trusting()
        },
        Policy {
            min_threshold: 4,
            ..Policy::trusting()
        },
    ];
    let clients: Vec<_> = (0..5)
        .map(|i| {
            start_client(
                &cast,
                i,
                server.addr,
                &plan,
                randomness.clone(),
                None,
                Some(tx.clone()),
                ClientOptions {
                    policy: policies.get(i).cloned().unwrap_or_else(Policy::trusting),
                    ..ClientOptions::default()
                },
            )
        })
        .collect();
    // Five clients, four neighbours each, threshold 3: three decline, and
    // the session cannot reach its threshold with two. Every session fails.
    let result = tokio::time::timeout(std::time::Duration::from_secs(120), server.task)
        .await
        .unwrap()
        .unwrap();
    let _ = join_clients(clients).await;
    let refused = refusals(&mut events);
    assert!(result.is_err());
    for want in [
        "has no differential privacy, and this client's policy requires it",
        "4 neighbours, below this client's minimum 5",
        "threshold 3 is below this client's minimum 4",
    ] {
        assert!(
            refused.iter().any(|r| r.contains(want)),
            "{want}: {refused:?}"
        );
    }
}
