//! What privacy costs: one federated round of 20 clients at d = 4·10^6 over
//! loopback QUIC, with SecAgg+ and distributed DP, with SecAgg+ alone, and
//! unprotected (raw updates averaged by the server: plain FedAvg over the
//! same transport), side by side in one run.
//!
//!     cargo bench --bench overhead
//!
//! Each sample is a fresh in-process federation (`fedveil run`'s code path)
//! of one round; the time measured is the server's round time (the metrics'
//! `stage_seconds.total`: broadcast, local training, encoding and noise,
//! every secure-aggregation stage, decoding, the optimiser, evaluation and
//! the checkpoint), not the set-up of the clients.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fedveil_fed::config::RunFile;
use fedveil_fed::in_process::{InProcessRun, run};
use fedveil_fed::metrics::Event;
use fedveil_fed::net::Limits;
use fedveil_fed::randomness::Randomness;
use fedveil_fed::trainer::Trainer;
use fedveil_task::synthetic::{SyntheticConfig, SyntheticEvaluator, SyntheticTrainer};

// As the fedveil binary does (src/tuning.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[path = "../src/tuning.rs"]
mod tuning;

const CLIENTS: u32 = 20;
const DIM: usize = 4_000_000;

fn config(tables: &str) -> RunFile {
    let text = format!(
        r#"[run]
clients = {CLIENTS}
[federation]
rounds = 1
[training]
local_steps = 1
batch_size = 1
learning_rate = 0.01
[deadlines]
train = 600
share = 600
masked = 600
consistency = 600
unmask = 600
[task]
kind = "synthetic"
dim = {DIM}
samples_per_client = 1
seed = 1
{tables}"#
    );
    RunFile::parse(Path::new("overhead.toml"), &text).unwrap()
}

/// One federation of one round; returns the round's time.
fn round(rt: &tokio::runtime::Runtime, file: &RunFile) -> Duration {
    let plan = file.plan();
    let task = SyntheticConfig::from_table(&plan.task).unwrap();
    let evaluator = SyntheticEvaluator::new(&task, CLIENTS).unwrap();
    rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let outcome = run(InProcessRun {
            plan,
            clients: CLIENTS,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            limits: Limits::default(),
            randomness: Randomness::os(),
            trainers: Box::new(move |i| {
                Ok(Box::new(SyntheticTrainer::new(&task, i)?) as Box<dyn Trainer>)
            }),
            evaluator: Box::new(evaluator),
            events: Some(tx),
            client_events: None,
        })
        .await
        .unwrap();
        assert_eq!(outcome.server.rounds, 1);
        while let Ok(e) = rx.try_recv() {
            if let Event::RoundCompleted(m) = e {
                assert_eq!(m.survivors, CLIENTS);
                return Duration::from_secs_f64(m.stage_seconds["total"]);
            }
        }
        panic!("no round completed");
    })
}

fn overhead(c: &mut Criterion) {
    tuning::tune();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cases = [
        (
            "secagg_dp",
            config(
                "[dp]\nplacement = \"distributed\"\nclip = 1.0\nnoise_multiplier = 1.0\n\
                 min_survivors = 18\n",
            ),
        ),
        ("secagg", config("")),
        (
            "unprotected",
            config("").tap(|f| {
                f.federation.aggregation = fedveil_fed::config::AggregationName::Unprotected
            }),
        ),
    ];
    let mut g = c.benchmark_group("round_n20_d4M");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(60));
    for (name, file) in &cases {
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| round(&rt, file)).sum())
        });
    }
    g.finish();
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl<T> Tap for T {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

criterion_group!(benches, overhead);
criterion_main!(benches);
