//! A server killed mid-round and restarted from its checkpoint
//! (protocols/federation.md §5.2, §5.3), over real QUIC on loopback.

mod common;

use std::path::Path;

use common::*;
use fedveil_fed::checkpoint::Checkpoint;
use fedveil_fed::client::Fault;
use fedveil_fed::config::Plan;
use fedveil_fed::metrics::{ClientEvent, Event};
use fedveil_fed::net::NetClient;
use fedveil_fed::secagg::Stage;

const CLIENTS: usize = 6;
const ROUNDS: u64 = 6;
const KILL_ROUND: u64 = 3;

fn plan_in(dir: &Path) -> Plan {
    plan(&format!(
        r#"
[federation]
rounds = {ROUNDS}
checkpoint_dir = "{}"
[training]
local_steps = 3
learning_rate = 0.1
[optimizer]
kind = "fedadam"
server_lr = 0.05
[dp]
placement = "distributed"
clip = 1.0
noise_multiplier = 0.7
min_survivors = 5
[task]
kind = "synthetic"
dim = 24
seed = 9
"#,
        dir.display()
    ))
}

/// Runs a federation, kills the server when round 3's `stage` starts,
/// restarts it on the same port and lets it finish. Returns the final
/// parameters, ε, and a copy of the checkpoint directory taken at the kill.
async fn killed_at(stage: Stage, tag: &str) -> (Vec<f32>, f64, std::path::PathBuf, Vec<u64>) {
    let dir = scratch(&format!("restart-{tag}"));
    let copy = scratch(&format!("restart-{tag}-copy"));
    let plan = plan_in(&dir);
    let cast = Cast::new(CLIENTS, 4);
    let randomness = seeded(11);
    let first = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let addr = first.addr;
    // Client 0 stalls at the kill point, so the server cannot get past it
    // before the kill lands (the stage waits for its deadline). The fault
    // fires once: the repeated session runs as in the uninterrupted run.
    let endpoint = NetClient::new(addr, cast.server.fingerprint(), limits()).unwrap();
    let (stalled_tx, mut stalled) = tokio::sync::mpsc::unbounded_channel();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (faults, events) = if i == 0 {
                let f = Fault::Stall {
                    round: KILL_ROUND,
                    stage,
                };
                (vec![f], Some(stalled_tx.clone()))
            } else {
                (Vec::new(), None)
            };
            start_client(
                &cast,
                i,
                addr,
                &plan,
                randomness.clone(),
                Some(endpoint.clone()),
                events,
                ClientOptions {
                    faults,
                    ..ClientOptions::default()
                },
            )
        })
        .collect();
    // Kill once client 0 has stalled in this session (the server's own
    // "stage started" event comes before its requests reach the clients).
    loop {
        let e = tokio::time::timeout(std::time::Duration::from_secs(60), stalled.recv())
            .await
            .expect("client 0 stalls within 60 s")
            .expect("client 0's events");
        if matches!(e, ClientEvent::Fault { round, stage: s } if round == KILL_ROUND && s == stage)
        {
            break;
        }
    }
    // The crash: no shutdown, no goodbye.
    first.task.abort();
    assert!(first.task.await.unwrap_err().is_cancelled());
    std::fs::create_dir_all(&copy).unwrap();
    let ck = Checkpoint::load(&dir)
        .unwrap()
        .expect("a checkpoint exists");
    assert_eq!(
        ck.header.completed_rounds, KILL_ROUND,
        "the last completed round is in the checkpoint"
    );
    ck.save(&copy).unwrap();

    let mut second = start_server(&cast, plan.clone(), addr, randomness.clone(), None).await;
    assert_eq!(second.addr, addr);
    second
        .wait_for(
            10,
            |e| matches!(e, Event::Resumed { round } if *round == KILL_ROUND),
        )
        .await;
    let (summary, _) = second.finish().await;
    for c in join_clients(clients).await {
        c.expect("clients reconnect and finish");
    }
    assert_eq!(summary.rounds, ROUNDS);
    let ledger = Checkpoint::load(&dir).unwrap().unwrap().header.ledger;
    let charged: Vec<u64> = ledger.entries.iter().map(|e| e.round).collect();
    let _ = std::fs::remove_dir_all(&dir);
    (summary.params, summary.epsilon.unwrap(), copy, charged)
}

/// The uninterrupted run from a checkpoint directory.
async fn uninterrupted_from(dir: &Path) -> (Vec<f32>, f64) {
    let plan = plan_in(dir);
    let cast = Cast::new(CLIENTS, 4);
    let randomness = seeded(11);
    let server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let clients = start_clients(&cast, server.addr, &plan, &randomness, None);
    let (summary, _) = server.finish().await;
    join_clients(clients).await;
    assert_eq!(summary.rounds, ROUNDS);
    let _ = std::fs::remove_dir_all(dir);
    (summary.params, summary.epsilon.unwrap())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

// §5.2: killed before the sum could be unmasked, the restarted server
// repeats round 3 and ends bit for bit where an uninterrupted run from the
// same checkpoint ends, with the same privacy spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_round_resumes_and_matches_an_uninterrupted_run() {
    let (params, eps, copy, charged) = killed_at(Stage::MaskedInput, "masked").await;
    assert_eq!(charged, (0..ROUNDS).collect::<Vec<_>>());
    let (want, want_eps) = uninterrupted_from(&copy).await;
    assert_eq!(bits(&params), bits(&want), "the resumed run diverged");
    assert_eq!(eps, want_eps);
}

// §5.3: killed after round 3 was charged (the unmasking requests were about
// to go out), the restarted server charges the repeated round again: the
// server may have learned the first session's sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_interrupted_after_its_charge_is_charged_again() {
    let (params, eps, copy, charged) = killed_at(Stage::Unmasking, "unmask").await;
    let mut want_charged: Vec<u64> = (0..ROUNDS).collect();
    want_charged.insert(KILL_ROUND as usize, KILL_ROUND);
    assert_eq!(charged, want_charged);
    // The copy taken at the kill already holds the first charge, so the run
    // from it spends the same; a never-interrupted run would spend less.
    let (want, want_eps) = uninterrupted_from(&copy).await;
    assert_eq!(bits(&params), bits(&want));
    assert_eq!(eps, want_eps);
    let noise = plan_in(Path::new("x"))
        .resolve(CLIENTS as u32, 24)
        .unwrap()
        .dp
        .unwrap()
        .noise;
    let rho = fedveil_fed::dp::zcdp::round_rho(&noise, CLIENTS as u32).unwrap();
    let eps_of = |rounds: u64| fedveil_fed::dp::zcdp::epsilon(rounds as f64 * rho, 1e-5).unwrap();
    assert!(
        (eps - eps_of(ROUNDS + 1)).abs() < 1e-9 * eps,
        "{eps} vs {}",
        eps_of(ROUNDS + 1)
    );
    assert!(eps > eps_of(ROUNDS));
}
