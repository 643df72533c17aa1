//! Clients that vanish at every stage, over real QUIC on loopback
//! (protocols/federation.md §4.2, secagg-plus.md §6): the server still
//! unmasks exactly the sum of the survivors' inputs.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use fedveil_fed::client::Fault;
use fedveil_fed::metrics::{ClientEvent, Event, stage_key};
use fedveil_fed::secagg::{ClientId, Stage};
use tokio::sync::mpsc::unbounded_channel;

// Round r loses one client that disconnects and one that stalls (stays
// connected, never answers: the stage deadline drops it) at stage r.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_lost_at_each_stage_leave_the_survivors_exact_sum() {
    let plan = plan(
        r#"
[federation]
rounds = 5
[deadlines]
train = 2.0
share = 1.0
masked = 1.0
consistency = 1.0
unmask = 1.0
[task]
kind = "synthetic"
dim = 40
"#,
    );
    let n = 8;
    let cast = Cast::new(n, 2);
    let randomness = seeded(5);
    let mut server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let (tx, mut client_events) = unbounded_channel();
    // Round r: client 2r+1 disconnects and client 2r+2 stalls (ids are
    // 1-based, indices 0-based), at stage r.
    let victims: Vec<(ClientId, ClientId, Stage)> = Stage::ALL
        .iter()
        .enumerate()
        .map(|(r, s)| {
            (
                ClientId((2 * r % n) as u32 + 1),
                ClientId(((2 * r + 1) % n) as u32 + 1),
                *s,
            )
        })
        .collect();
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let id = ClientId(i as u32 + 1);
            let faults = victims
                .iter()
                .enumerate()
                .filter_map(|(r, (d, s, stage))| {
                    let (round, stage) = (r as u64, *stage);
                    if *d == id {
                        Some(Fault::Disconnect { round, stage })
                    } else if *s == id {
                        Some(Fault::Stall { round, stage })
                    } else {
                        None
                    }
                })
                .collect();
            start_client(
                &cast,
                i,
                server.addr,
                &plan,
                randomness.clone(),
                None,
                Some(tx.clone()),
                ClientOptions {
                    faults,
                    record_inputs: true,
                    ..ClientOptions::default()
                },
            )
        })
        .collect();
    let mut sums = BTreeMap::new();
    let mut completed = BTreeMap::new();
    while completed.len() < 5 {
        match server.wait_for(60, |_| true).await {
            Event::Aggregated {
                round,
                survivors,
                sum,
                ..
            } => {
                sums.insert(round, (survivors, sum));
            }
            Event::RoundCompleted(m) => {
                completed.insert(m.round, m);
            }
            Event::RoundAborted { round, reason, .. } => panic!("round {round} aborted: {reason}"),
            _ => {}
        }
    }
    let (summary, _) = server.finish().await;
    assert_eq!(summary.rounds, 5);
    join_clients(clients).await;
    let mut inputs: BTreeMap<(u64, ClientId), Arc<Vec<u32>>> = BTreeMap::new();
    let mut faults = 0;
    while let Ok(e) = client_events.try_recv() {
        match e {
            ClientEvent::Input {
                client,
                round,
                ring,
            } => {
                inputs.insert((round, client), ring);
            }
            ClientEvent::Fault { .. } => faults += 1,
            _ => {}
        }
    }
    assert_eq!(faults, 10, "every injected fault fired once");

    for (r, (gone, stalled, stage)) in victims.iter().enumerate() {
        let r = r as u64;
        let (survivors, sum) = &sums[&r];
        // Clients lost before their masked input was accepted are not in
        // the sum; those lost later are.
        let expect_in = *stage > Stage::MaskedInput;
        for v in [gone, stalled] {
            assert_eq!(
                survivors.contains(v),
                expect_in,
                "round {r}: {v} lost at {stage}"
            );
        }
        assert_eq!(survivors.len(), if expect_in { n } else { n - 2 });
        let mut want = vec![0u32; sum.len()];
        for s in survivors {
            let x = &inputs[&(r, *s)];
            for (w, v) in want.iter_mut().zip(x.iter()) {
                *w = w.wrapping_add(*v);
            }
        }
        assert!(
            **sum == want,
            "round {r}: the sum is not the survivors' exact sum"
        );
        let m = &completed[&r];
        for v in [gone, stalled] {
            assert!(
                m.dropouts
                    .iter()
                    .any(|d| d.client == v.0 && d.stage == stage_key(*stage)),
                "round {r}: {v} not reported dropped at {stage}: {:?}",
                m.dropouts
            );
        }
    }
}
