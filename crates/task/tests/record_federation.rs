//! Record-level DP in a whole federation over loopback QUIC with SecAgg+
//! (protocols/dp.md §8): each client trains with DP-SGD, is its own
//! accountant and reports its ε; the server stops before the budget would
//! be passed, and a client before its own budget would; the model still
//! learns.

use std::path::{Path, PathBuf};

use fedveil_fed::FedError;
use fedveil_fed::config::RunFile;
use fedveil_fed::dp::{Accountant, SubsampledGaussian};
use fedveil_fed::in_process::{self, InProcessRun};
use fedveil_fed::metrics::ClientEvent;
use fedveil_fed::net::Limits;
use fedveil_fed::randomness::Randomness;
use fedveil_fed::trainer::{LocalUpdate, TrainError, Trainer, TrainingConfig};
use fedveil_task::TaskConfig;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fedveil-record-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Four clients, three rounds of five DP-SGD steps each, at noise
/// multiplier 1 and sampling rate 1/4, with `extra` appended to `[dp]`.
fn run_file(dir: &Path, extra: &str) -> RunFile {
    let text = format!(
        r#"
[run]
clients = 4

[federation]
rounds = 3
cohort_size = 4

[training]
local_steps = 5
batch_size = 64
learning_rate = 0.2

[optimizer]
kind = "fedavg"
server_lr = 1.0

[dp]
unit = "record"
clip = 1.0
noise_multiplier = 1.0
sampling_rate = 0.25
delta = 1e-5
{extra}

[deadlines]
train = 60
share = 20
masked = 20
consistency = 20
unmask = 20

[task]
kind = "synthetic"
dim = 8
samples_per_client = 256
noise = 0.1
heterogeneity = 0.2
seed = 5
"#
    );
    RunFile::parse(&dir.join("run.toml"), &text).unwrap()
}

fn run(file: RunFile, dir: &Path) -> in_process::InProcessResult {
    run_with(file, dir, |t| t, None).unwrap()
}

/// The federation of `file`, each client's trainer passed through `wrap`.
fn run_with(
    file: RunFile,
    dir: &Path,
    wrap: fn(Box<dyn Trainer>) -> Box<dyn Trainer>,
    client_events: Option<UnboundedSender<ClientEvent>>,
) -> Result<in_process::InProcessResult, FedError> {
    let task = TaskConfig::parse(&file.task, file.offsite.as_ref(), &dir.join("run.toml")).unwrap();
    let (evaluator, trainers) = task.in_process(file.run.clients, &mut |_| {}).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(in_process::run(InProcessRun {
        plan: file.plan(),
        clients: file.run.clients,
        listen: "127.0.0.1:0".parse().unwrap(),
        limits: Limits::default(),
        randomness: Randomness::os(),
        trainers: Box::new(move |i| trainers(i).map(wrap)),
        evaluator,
        events: None,
        client_events,
    }))
}

/// A task that trains without the round's record-level DP: what a buggy or
/// outdated task would do.
struct IgnoresRecordDp(Box<dyn Trainer>);

impl Trainer for IgnoresRecordDp {
    fn dim(&self) -> usize {
        self.0.dim()
    }

    fn train(
        &mut self,
        global: &[f32],
        config: &TrainingConfig,
        rng: &mut dyn rand_core::RngCore,
    ) -> Result<LocalUpdate, TrainError> {
        let plain = TrainingConfig {
            record_dp: None,
            ..config.clone()
        };
        self.0.train(global, &plain, rng)
    }
}

fn epsilon(steps: u64) -> f64 {
    SubsampledGaussian {
        noise_multiplier: 1.0,
        sampling_rate: 0.25,
        steps,
    }
    .epsilon(1e-5, Accountant::Pld)
    .unwrap()
}

#[test]
fn every_client_accounts_its_own_records_and_the_model_learns() {
    let dir = scratch("learns");
    let out = run(run_file(&dir, ""), &dir);
    let s = &out.server;
    assert_eq!(s.rounds, 3, "{}", s.reason);
    // Every client trained in every round: 15 steps each.
    let want = epsilon(15);
    assert_eq!(s.client_epsilon.len(), 4, "{:?}", s.client_epsilon);
    for (client, e) in &s.client_epsilon {
        assert!(
            (e - want).abs() <= 1e-9 * want,
            "client {client}: ε {e}, want {want}"
        );
    }
    assert_eq!(s.epsilon, Some(want));
    assert_eq!(s.delta, Some(1e-5));
    let before = s.initial_evaluation.as_ref().unwrap().loss;
    let after = s.evaluation.as_ref().unwrap().loss;
    assert!(after < 0.5 * before, "loss {before} -> {after}");
    for c in &out.clients {
        assert!(c.is_ok(), "{c:?}");
    }
}

#[test]
fn the_budget_stops_the_federation_before_any_client_would_pass_it() {
    let dir = scratch("budget");
    // Two rounds fit, the third would not.
    let budget = 0.5 * (epsilon(10) + epsilon(15));
    let out = run(run_file(&dir, &format!("epsilon_budget = {budget}")), &dir);
    let s = &out.server;
    assert_eq!(s.rounds, 2, "{}", s.reason);
    assert!(s.reason.contains("privacy budget"), "{}", s.reason);
    let spent = epsilon(10);
    for (client, e) in &s.client_epsilon {
        assert!((e - spent).abs() <= 1e-9 * spent, "client {client}: ε {e}");
        assert!(*e <= budget);
    }
}

#[test]
fn an_update_trained_without_the_rounds_record_level_dp_never_leaves_the_client() {
    let dir = scratch("ignored");
    let mut file = run_file(&dir, "");
    file.federation.rounds = 1;
    let (tx, mut rx) = unbounded_channel();
    let out = run_with(file, &dir, |t| Box::new(IgnoresRecordDp(t)), Some(tx));
    // Every client declines every session: the round fails.
    let err = out.unwrap_err().to_string();
    assert!(err.contains("round 0 failed"), "{err}");
    let mut refusals = 0;
    while let Ok(e) = rx.try_recv() {
        match e {
            ClientEvent::Refused { reason, .. } => {
                assert!(reason.contains("nothing is sent"), "{reason}");
                refusals += 1;
            }
            ClientEvent::Charged { .. } => panic!("a client charged a session it refused"),
            _ => {}
        }
    }
    assert!(refusals >= 4, "{refusals} refusals");
}

// dp.md §8, federation.md §4.7: each client is its own accountant. One
// client's own policy allows two rounds of the run's steps; the federation
// has no budget of its own. That client refuses the third round, naming its
// budget, and is charged nothing more; the others finish it.
#[test]
fn a_client_with_a_smaller_budget_of_its_own_refuses_the_round_that_would_pass_it() {
    use std::sync::Arc;
    use std::time::Duration;

    use fedveil_fed::config::Policy;
    use fedveil_fed::in_process::Swarm;
    use fedveil_fed::net::{ClientIdentity, ServerIdentity};
    use fedveil_fed::server::{Server, ServerSetup};

    let dir = scratch("own-budget");
    let file = run_file(&dir, "");
    let task = TaskConfig::parse(&file.task, file.offsite.as_ref(), &dir.join("run.toml")).unwrap();
    let (evaluator, trainers) = task.in_process(4, &mut |_| {}).unwrap();
    let trainers = Arc::new(trainers);
    let budget = 0.5 * (epsilon(10) + epsilon(15));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, mut rx) = unbounded_channel();
    let (summary, strict) = rt.block_on(async {
        let identity = ServerIdentity::generate(&["localhost".to_string()]).unwrap();
        let pin = identity.fingerprint();
        let ids: Vec<ClientIdentity> = (0..4)
            .map(|_| ClientIdentity::generate(&mut rand_core::OsRng))
            .collect();
        let server = Server::bind(ServerSetup {
            plan: file.plan(),
            identity,
            allow: ids.iter().map(ClientIdentity::public).collect(),
            listen: "127.0.0.1:0".parse().unwrap(),
            limits: Limits::default(),
            evaluator,
            randomness: Randomness::os(),
            events: None,
            hooks: Default::default(),
        })
        .unwrap();
        let policy = Policy::for_run(server.resolved());
        assert_eq!(policy.epsilon_budget, None);
        let mut ids = ids;
        let last = ids.split_off(3);
        let swarm = |identities, policy, first: u32, events| {
            let trainers = trainers.clone();
            in_process::spawn_swarm(Swarm {
                server: server.local_addr(),
                server_name: "localhost".into(),
                pin,
                limits: Limits::default(),
                identities,
                trainers: Box::new(move |i| trainers(first + i)),
                randomness: Randomness::os(),
                events,
                give_up_after: Duration::from_secs(30),
                policy,
                bundle_cache: None,
            })
            .unwrap()
        };
        let others = swarm(ids, policy.clone(), 0, None);
        let strict_policy = Policy {
            epsilon_budget: Some(budget),
            ..policy
        };
        let strict = swarm(last, strict_policy, 3, Some(tx));
        let summary = server.run().await.unwrap();
        for c in others {
            assert_eq!(c.await.unwrap().unwrap().rounds_served, 3);
        }
        let mut strict = strict;
        (summary, strict.pop().unwrap().await.unwrap().unwrap())
    });
    assert_eq!(summary.rounds, 3, "{}", summary.reason);
    assert_eq!(strict.rounds_served, 2, "{strict:?}");
    assert_eq!(
        summary.client_epsilon.len(),
        4,
        "{:?}",
        summary.client_epsilon
    );
    let strict_id = strict.client.unwrap().0;
    for (client, e) in &summary.client_epsilon {
        let want = if *client == strict_id {
            epsilon(10)
        } else {
            epsilon(15)
        };
        assert!(
            (e - want).abs() <= 1e-9 * want,
            "client {client}: ε {e}, want {want}"
        );
    }
    let mut refused = Vec::new();
    while let Ok(e) = rx.try_recv() {
        match e {
            ClientEvent::Refused { round, reason } => refused.push((round, reason)),
            ClientEvent::Charged { round, .. } => assert!(round < 2, "charged round {round}"),
            _ => {}
        }
    }
    assert!(!refused.is_empty(), "the strict client never refused");
    for (round, reason) in &refused {
        assert_eq!(*round, 2, "{reason}");
        assert!(
            reason.contains(&format!("past its budget of {budget}")),
            "{reason}"
        );
    }
}
