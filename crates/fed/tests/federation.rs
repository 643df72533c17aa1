//! Whole federations over real QUIC on loopback (protocols/federation.md §4,
//! §5): convergence with SecAgg+ and distributed DP, the metrics, the
//! privacy ledger and budget, and client policies.

mod common;

use common::*;
use fedveil_fed::metrics::{Event, RoundMetrics};
use fedveil_fed::randomness::Randomness;

const TASK: &str = r#"
[task]
kind = "synthetic"
dim = 16
samples_per_client = 64
noise = 0.1
heterogeneity = 0.5
seed = 3
"#;

// §4, §5: twenty clients, SecAgg+ with 6 neighbours, distributed discrete
// Gaussian noise; the global model reaches the task's exact optimum, up to
// the noise. (At z = 0.5 the final distance is 0.04-0.07 over repeated
// runs; without noise it is below 0.01. The tolerance is twice the worst.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secagg_and_distributed_dp_reach_the_synthetic_optimum() {
    let dir = scratch("converge");
    let metrics = dir.join("metrics.jsonl");
    let plan = plan(&format!(
        r#"
[federation]
rounds = 40
metrics = "{}"
[training]
local_steps = 5
batch_size = 32
learning_rate = 0.1
[optimizer]
kind = "fedavg"
server_lr = 0.5
[secagg]
degree = 6
threshold = 4
[dp]
placement = "distributed"
clip = 0.5
noise_multiplier = 0.5
delta = 1e-5
min_survivors = 16
{TASK}"#,
        metrics.display()
    ));
    let cast = Cast::new(20, 1);
    let randomness = Randomness::os();
    let mut server = start_server(&cast, plan.clone(), loopback(), randomness.clone(), None).await;
    let clients = start_clients(&cast, server.addr, &plan, &randomness, None);
    let first = server
        .wait_for(30, |e| matches!(e, Event::RoundCompleted(_)))
        .await;
    let Event::RoundCompleted(first) = first else {
        unreachable!()
    };
    let (summary, _) = server.finish().await;
    for c in join_clients(clients).await {
        let c = c.expect("every client finishes cleanly");
        assert_eq!((c.rounds, c.rounds_served), (40, 40));
    }
    assert_eq!(summary.rounds, 40);
    let eval = summary.evaluation.expect("evaluated");
    let distance = eval.metrics["distance_to_optimum"];
    assert_eq!(eval.metrics["optimum_is_exact"], 1.0);
    eprintln!(
        "distance to the optimum {distance:.4}, loss {:.4}",
        eval.loss
    );
    assert!(distance < 0.15, "distance to the optimum {distance}");
    assert!(
        eval.loss < 0.2 * first.loss.unwrap(),
        "loss {} after {}",
        eval.loss,
        first.loss.unwrap()
    );

    // The ledger: 40 rounds of 20 survivors, through the crate's own zCDP.
    let resolved = plan.resolve(20, 16).unwrap();
    let noise = resolved.dp.unwrap().noise;
    let rho = fedveil_fed::dp::zcdp::round_rho(&noise, 20).unwrap();
    let want = fedveil_fed::dp::zcdp::epsilon(40.0 * rho, 1e-5).unwrap();
    let eps = summary.epsilon.unwrap();
    eprintln!("epsilon {eps:.3} at delta 1e-5 over 40 rounds");
    assert!((eps - want).abs() < 1e-9 * want, "{eps} vs {want}");

    // One JSON line per round, with the keys scripts rely on.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 40);
    for (r, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in [
            "round",
            "loss",
            "epsilon",
            "bytes_sent",
            "bytes_received",
            "stage_seconds",
            "dropouts",
            "survivors",
        ] {
            assert!(v.get(key).is_some(), "line {r} lacks {key}: {line}");
        }
        let m: RoundMetrics = serde_json::from_str(line).unwrap();
        assert_eq!(
            (m.round, m.status.as_str(), m.survivors),
            (r as u64, "completed", 20)
        );
        assert!(m.bytes_sent > 20 * 16 * 4 && m.bytes_received > 0);
        for stage in ["train", "share", "masked", "consistency", "unmask", "total"] {
            assert!(
                m.stage_seconds.contains_key(stage),
                "{stage} missing: {line}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// §4.6: the unprotected baseline. Clients whose policy allows it send raw
// updates and the server applies their sample-weighted mean, exactly the
// same update as secure aggregation without noise would (up to the float
// codec's rounding); clients with the default policy refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprotected_rounds_average_raw_updates_and_default_clients_refuse_them() {
    let tables = |aggregation: &str| {
        plan(&format!(
            r#"
[federation]
rounds = 3
aggregation = "{aggregation}"
attempts = 1
[training]
local_steps = 2
learning_rate = 0.1
[optimizer]
kind = "fedavg"
server_lr = 1.0
{TASK}"#
        ))
    };
    let cast = Cast::new(5, 21);
    let randomness = fedveil_fed::randomness::Randomness::seeded([5; 32]);
    let run = |aggregation: &'static str, allow: bool| {
        let plan = tables(aggregation);
        let cast = &cast;
        let randomness = randomness.clone();
        async move {
            let server =
                start_server(cast, plan.clone(), loopback(), randomness.clone(), None).await;
            let endpoint =
                fedveil_fed::net::NetClient::new(server.addr, cast.server.fingerprint(), limits())
                    .unwrap();
            let clients: Vec<_> = (0..5)
                .map(|i| {
                    let mut options = ClientOptions::default();
                    options.policy.allow_unprotected = allow;
                    start_client(
                        cast,
                        i,
                        server.addr,
                        &plan,
                        randomness.clone(),
                        Some(endpoint.clone()),
                        None,
                        options,
                    )
                })
                .collect();
            let task = server.task;
            let result = tokio::time::timeout(std::time::Duration::from_secs(60), task)
                .await
                .expect("the federation ends")
                .unwrap();
            for c in clients {
                c.abort();
            }
            result
        }
    };
    let raw = run("unprotected", true).await.expect("unprotected rounds");
    let secure = run("secagg", true).await.expect("secure rounds");
    assert_eq!(raw.rounds, 3);
    // The same trajectory: only the codec's rounding differs.
    let worst = raw
        .params
        .iter()
        .zip(&secure.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-3,
        "unprotected and secure FedAvg differ by {worst}"
    );
    assert!(
        raw.params != secure.params,
        "no rounding at all is implausible"
    );

    let refused = run("unprotected", false).await;
    let err = refused.expect_err("no client takes part").to_string();
    assert!(err.contains("round 0 failed"), "{err}");
}
