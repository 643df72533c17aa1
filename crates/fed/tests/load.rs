//! Many clients at once over real QUIC on loopback (protocols/federation.md
//! §4): the CI-sized version of `cargo bench --bench load` (1,000 clients,
//! d = 10,000, BENCHMARKS.md).

mod common;

use common::*;
use fedveil_fed::in_process::{InProcessRun, run};
use fedveil_fed::metrics::Event;
use fedveil_fed::randomness::Randomness;
use fedveil_fed::trainer::Trainer;
use fedveil_task::synthetic::{SyntheticConfig, SyntheticEvaluator, SyntheticTrainer};

const CLIENTS: u32 = 200;

// Two hundred clients on one shared UDP socket, SecAgg+ with 20 neighbours
// and distributed DP: every client survives both rounds, and every metrics
// line reports the server's peak memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_finish_rounds_and_the_server_reports_its_peak_memory() {
    let dir = scratch("load");
    let metrics = dir.join("metrics.jsonl");
    let plan = plan(&format!(
        r#"
[federation]
rounds = 2
metrics = "{}"
[training]
local_steps = 1
batch_size = 8
[secagg]
degree = 20
threshold = 11
[dp]
placement = "distributed"
clip = 1.0
noise_multiplier = 1.0
min_survivors = 180
[deadlines]
train = 120
share = 120
masked = 120
consistency = 120
unmask = 120
[task]
kind = "synthetic"
dim = 2000
samples_per_client = 8
seed = 2
"#,
        metrics.display()
    ));
    let task = SyntheticConfig::from_table(&plan.task).unwrap();
    let evaluator = SyntheticEvaluator::new(&task, CLIENTS).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let outcome = run(InProcessRun {
        plan,
        clients: CLIENTS,
        listen: loopback(),
        limits: limits(),
        randomness: Randomness::os(),
        trainers: Box::new(move |i| {
            Ok(Box::new(SyntheticTrainer::new(&task, i)?) as Box<dyn Trainer>)
        }),
        evaluator: Box::new(evaluator),
        events: Some(tx),
        client_events: None,
    })
    .await
    .expect("the federation runs");
    assert_eq!(outcome.server.rounds, 2);
    for c in &outcome.clients {
        let c = c.as_ref().expect("every client finishes");
        assert_eq!(c.rounds_served, 2);
    }
    let mut completed = 0;
    while let Ok(e) = rx.try_recv() {
        if let Event::RoundCompleted(m) = e {
            assert_eq!((m.survivors, m.cohort), (CLIENTS, CLIENTS));
            assert!(m.dropouts.is_empty());
            let rss = m.server_peak_rss_bytes.expect("peak memory is reported");
            assert!(rss > 1 << 20, "{rss}");
            completed += 1;
        }
    }
    assert_eq!(completed, 2);
    let lines = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(lines.lines().count(), 2);
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["server_peak_rss_bytes"].as_u64().unwrap() > 0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
