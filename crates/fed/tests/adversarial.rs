//! Hostile peers against a running federation, over real QUIC on loopback
//! (protocols/federation.md §2, §3, §4.4; SECURITY.md): strangers, wrong
//! pins, malformed, oversized, replayed and wrong-round frames, a server
//! that sends one client a different model, client policies and the
//! privacy budget. Every time, the honest clients finish.

mod common;

use common::*;
use fedveil_fed::adversary::Adversary;
use fedveil_fed::client::ClientSummary;
use fedveil_fed::config::{PlacementName, Policy};
use fedveil_fed::metrics::{ClientEvent, Event};
use fedveil_fed::net::{ClientIdentity, NetClient, NetError, ServerIdentity};
use fedveil_fed::secagg::crypto::identity::IdentityKeypair;
use fedveil_fed::secagg::messages::{ClientMessage, ServerMessage};
use fedveil_fed::secagg::{ClientId, SessionId};
use fedveil_fed::wire::{self, MAX_UP_FRAME, RoundSpec, Up};
use fedveil_fed::{FedError, randomness::Randomness};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tokio::sync::mpsc::unbounded_channel;

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

fn all_finished(results: &[Result<ClientSummary, FedError>], rounds: u64) {
    for r in results {
        let s = r
            .as_ref()
            .unwrap_or_else(|e| panic!("an honest client failed: {e}"));
        assert_eq!(s.rounds, rounds);
    }
}

// §2.1, §2.2: a stranger and a client pinning another certificate are
// refused while a federation runs; it finishes regardless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_wrong_pins_are_refused_while_the_federation_runs() {
    let plan = short_rounds(3, "");
    let cast = Cast::new(4, 21);
    let randomness = Randomness::os();
    let mut server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let addr = server.addr;
    let clients = start_clients(&cast, addr, &plan, &randomness, None);
    server
        .wait_for(30, |e| matches!(e, Event::RoundStarted { .. }))
        .await;

    let stranger = ClientIdentity::generate(&mut ChaCha20Rng::seed_from_u64(999));
    let endpoint = NetClient::new(addr, cast.server.fingerprint(), limits()).unwrap();
    let err = endpoint.connect(addr, NAME, &stranger).await.unwrap_err();
    assert!(
        matches!(&err, NetError::Refused(r) if r.contains("not allowed")),
        "{err}"
    );
    let seen = server
        .wait_for(10, |e| matches!(e, Event::Unauthenticated { .. }))
        .await;
    assert!(matches!(seen, Event::Unauthenticated { reason, .. } if reason.contains("allow-list")));

    let other = ServerIdentity::generate(&[NAME.to_string()]).unwrap();
    let endpoint = NetClient::new(addr, other.fingerprint(), limits()).unwrap();
    let err = endpoint
        .connect(addr, NAME, &cast.identity(0))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NetError::Connect(m) if m.contains("certificate")),
        "{err}"
    );

    let (summary, _) = server.finish().await;
    assert_eq!(summary.rounds, 3);
    all_finished(&join_clients(clients).await, 3);
}

// §2.3, §3.2, secagg-plus.md §6.8: an authenticated member replays its own
// messages, sends them into the wrong round, then sends a malformed frame,
// an oversized frame and an oversized masked vector. Each gets a clear
// error (a rejection, or a closed connection with the reason); the server
// keeps serving the honest clients, which finish every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_replayed_and_wrong_round_frames_get_clear_errors() {
    let plan = short_rounds(8, "");
    let n = 5;
    let cast = Cast::new(n, 22);
    let randomness = Randomness::os();
    let server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let addr = server.addr;
    // Clients 0..n-1 are honest; client n-1 is the rogue.
    let endpoint = NetClient::new(addr, cast.server.fingerprint(), limits()).unwrap();
    let honest: Vec<_> = (0..n - 1)
        .map(|i| {
            start_client(
                &cast,
                i,
                addr,
                &plan,
                randomness.clone(),
                Some(endpoint.clone()),
                None,
                ClientOptions::default(),
            )
        })
        .collect();
    let mut rogue = Rogue::connect(addr, &cast, n - 1).await;

    // Round 0: advertise keys honestly, then replay them.
    let (spec, blob) = rogue.next_round().await;
    let context = spec.context(&wire::params_hash(&blob)).unwrap();
    let me = ClientId(n as u32);
    let identity = IdentityKeypair::from_secret_bytes(&cast.identity(n - 1).seed());
    let mut sa =
        fedveil_fed::secagg::Client::new(me, identity, context, vec![0; spec.session.dim as usize]);
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let keys = sa
        .handle(ServerMessage::Setup(spec.session.clone()), &mut rng)
        .unwrap()
        .unwrap();
    rogue.up(&Up::Secagg(keys.clone())).await;
    rogue.up(&Up::Secagg(keys.clone())).await;
    let reason = rogue.next_rejection().await;
    assert!(
        reason.contains("already sent") || reason.contains("out of round"),
        "replay: {reason}"
    );
    // A message for a session that does not exist.
    let ClientMessage::AdvertiseKeys(mut forged) = keys.clone() else {
        panic!()
    };
    forged.session = SessionId([7; 32]);
    rogue
        .up(&Up::Secagg(ClientMessage::AdvertiseKeys(forged)))
        .await;
    let reason = rogue.next_rejection().await;
    assert!(
        reason.contains("belongs to session"),
        "wrong session: {reason}"
    );

    // Round 1: round 0's keys again.
    let (spec1, _) = rogue.next_round().await;
    assert_eq!(spec1.round, 1);
    rogue.up(&Up::Secagg(keys)).await;
    let reason = rogue.next_rejection().await;
    assert!(reason.contains("replayed"), "old round: {reason}");

    // A frame that is not a message.
    rogue.send.write_all(&3u32.to_be_bytes()).await.unwrap();
    rogue.send.write_all(&[0xff, 0xff, 0xff]).await.unwrap();
    let reason = rogue.closed().await;
    assert!(reason.contains("malformed"), "malformed: {reason}");

    // A frame over the limit: refused before it is read.
    let mut rogue = Rogue::connect(addr, &cast, n - 1).await;
    rogue
        .send
        .write_all(&(MAX_UP_FRAME as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    let reason = rogue.closed().await;
    assert!(reason.contains("exceeds the limit"), "oversized: {reason}");

    // A masked vector far larger than the session's.
    let mut rogue = Rogue::connect(addr, &cast, n - 1).await;
    let (spec, _) = rogue.next_round().await;
    let masked = Up::Masked {
        session: spec.session.session_id(),
        bits: 32,
        len: 1 << 30,
        bad_envelopes: vec![],
    };
    rogue.up(&masked).await;
    rogue
        .send
        .write_all(&(1u64 << 32).to_be_bytes())
        .await
        .unwrap();
    let reason = rogue.closed().await;
    assert!(
        reason.contains("masked vector of 4294967296 bytes"),
        "oversized blob: {reason}"
    );
    drop(rogue);

    // The same identity, now honest, takes part again.
    let reformed = start_client(
        &cast,
        n - 1,
        addr,
        &plan,
        randomness.clone(),
        None,
        None,
        ClientOptions::default(),
    );
    let (summary, _) = server.finish().await;
    assert_eq!(summary.rounds, 8);
    all_finished(&join_clients(honest).await, 8);
    all_finished(&join_clients(vec![reformed]).await, 8);
    for r in &summary.history {
        assert!(r.survivors >= 4, "round {} lost honest clients", r.round);
    }
}

/// The malicious server of §3.3: in round `r` it sends client `r + 1` a
/// different model, hiding it more carefully each round.
struct DifferentModel;

impl Adversary for DifferentModel {
    fn tamper(&mut self, client: ClientId, spec: &mut RoundSpec, params: &mut Vec<u8>) {
        if client.0 as u64 != spec.round + 1 {
            return;
        }
        params[0] ^= 0x40;
        match spec.round {
            // Round 0: only the parameters change.
            0 => {}
            // Round 1: their announced hash changes too.
            1 => spec.params_hash = wire::params_hash(params),
            // Round 2: and the session's context, so that the client accepts
            // the session (whose id then differs from everybody else's).
            _ => {
                spec.params_hash = wire::params_hash(params);
                spec.session.context = spec.context(&spec.params_hash).unwrap();
            }
        }
    }
}

// §3.3: a client sent a different model than its peers cannot join their
// session, however the server dresses it up; the others complete the round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sent_a_different_model_cannot_join_the_session() {
    let plan = short_rounds(3, "");
    let cast = Cast::new(6, 23);
    let randomness = Randomness::os();
    let mut server = start_server(
        &cast,
        plan.clone(),
        loopback(),
        randomness.clone(),
        Some(Box::new(DifferentModel)),
    )
    .await;
    let (tx, mut events) = unbounded_channel();
    let clients = start_clients(&cast, server.addr, &plan, &randomness, Some(tx));
    let mut completed = Vec::new();
    while completed.len() < 3 {
        if let Event::RoundCompleted(m) = server
            .wait_for(30, |e| matches!(e, Event::RoundCompleted(_)))
            .await
        {
            completed.push(m);
        }
    }
    let (summary, _) = server.finish().await;
    assert_eq!(summary.rounds, 3);
    join_clients(clients).await;
    for m in &completed {
        let victim = m.round as u32 + 1;
        assert_eq!(m.survivors, 5, "round {}", m.round);
        assert!(
            m.dropouts
                .iter()
                .any(|d| d.client == victim && d.stage == "train"),
            "round {}: {:?}",
            m.round,
            m.dropouts
        );
    }
    let mut refusals = vec![Vec::new(); 3];
    while let Ok(e) = events.try_recv() {
        if let ClientEvent::Refused { round, reason } = e {
            refusals[round as usize].push(reason);
        }
    }
    let said = |r: usize, what: &str| refusals[r].iter().any(|s| s.contains(what));
    assert!(
        said(0, "do not match their announced hash"),
        "{:?}",
        refusals[0]
    );
    assert!(
        said(1, "different models to different clients"),
        "{:?}",
        refusals[1]
    );
    // Its session id differs from everybody's: the server refuses its keys.
    assert!(said(2, "belongs to session"), "{:?}", refusals[2]);
}

// §4.4: clients hold the server to their own policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_decline_rounds_that_break_their_policy() {
    let plan = short_rounds(
        2,
        "[dp]\nplacement = \"central\"\nclip = 1.0\nnoise_multiplier = 0.8\n",
    );
    // Seven clients (six neighbours each, threshold 4): five remain when
    // two decline, each with four answering neighbours.
    let cast = Cast::new(7, 24);
    let randomness = Randomness::os();
    let server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let (tx, mut events) = unbounded_channel();
    let policies = [
        Policy {
            refuse_placements: vec![PlacementName::Central],
            ..Policy::trusting()
        },
        Policy {
            min_noise_multiplier: 1.0,
            ..Policy::trusting()
        },
    ];
    let mut clients = Vec::new();
    for i in 0..7 {
        let policy = policies.get(i).cloned().unwrap_or_else(Policy::trusting);
        clients.push(start_client(
            &cast,
            i,
            server.addr,
            &plan,
            randomness.clone(),
            None,
            Some(tx.clone()),
            ClientOptions {
                policy,
                ..ClientOptions::default()
            },
        ));
    }
    let (summary, _) = server.finish().await;
    join_clients(clients).await;
    let mut reasons = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let ClientEvent::Refused { reason, .. } = e {
            reasons.push(reason);
        }
    }
    assert_eq!(summary.rounds, 2);
    for r in &summary.history {
        assert_eq!(r.survivors, 5);
    }
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("central noise"))
            .count(),
        2
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("below this client's minimum"))
            .count(),
        2
    );
}

// §5.3: the server stops before a round that could pass the budget, and a
// restarted server remembers what was spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_privacy_budget_stops_the_federation_across_restarts() {
    let dir = scratch("budget");
    let dp = "[dp]\nplacement = \"distributed\"\nclip = 1.0\nnoise_multiplier = 2.0\nmin_survivors = 4\n";
    // The budget fits two rounds at the survivor floor, not three.
    let probe = short_rounds(10, dp);
    let noise = probe.resolve(5, 12).unwrap().dp.unwrap().noise;
    let rho = fedveil_fed::dp::zcdp::round_rho(&noise, 4).unwrap();
    let two = fedveil_fed::dp::zcdp::epsilon(2.0 * rho, 1e-5).unwrap();
    let three = fedveil_fed::dp::zcdp::epsilon(3.0 * rho, 1e-5).unwrap();
    let budget = 0.5 * (two + three);
    let mut plan = short_rounds(10, &format!("{dp}epsilon_budget = {budget}\n"));
    plan.federation.checkpoint_dir = Some(dir.clone());
    let cast = Cast::new(5, 25);
    let randomness = Randomness::os();
    let server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let clients = start_clients(&cast, server.addr, &plan, &randomness, None);
    let (summary, _) = server.finish().await;
    assert_eq!(summary.rounds, 2);
    assert!(
        summary.reason.contains("privacy budget"),
        "{}",
        summary.reason
    );
    // Charged with the actual survivors (5, above the floor of 4).
    let spent = summary.epsilon.unwrap();
    let rho5 = fedveil_fed::dp::zcdp::round_rho(&noise, 5).unwrap();
    let want = fedveil_fed::dp::zcdp::epsilon(2.0 * rho5, 1e-5).unwrap();
    assert!(
        spent <= budget && (spent - want).abs() < 1e-9 * want,
        "{spent} {want} {budget}"
    );
    for c in join_clients(clients).await {
        assert_eq!(c.unwrap().rounds, 2);
    }
    // Restarted, it stops at once: the ledger came back with the model.
    let server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let (summary, _) = server.finish().await;
    assert_eq!(summary.rounds, 2);
    assert!(
        summary.reason.contains("privacy budget"),
        "{}",
        summary.reason
    );
    assert_eq!(summary.epsilon.unwrap(), spent);
    let _ = std::fs::remove_dir_all(&dir);
}
