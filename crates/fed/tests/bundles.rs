//! Task bundles over real QUIC on loopback (protocols/federation.md §3.4):
//! every client fetches the server's bundle once, checks it against its
//! hash and trains on it; a reconnecting client does not fetch it again; a
//! restarted client finds it in its cache; a peer that answers the offer
//! wrongly is cut off while the others are served.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use fedveil_fed::client::{self, ClientSetup, Fault, MAX_BUNDLE_BYTES};
use fedveil_fed::metrics::{ClientEvent, Event};
use fedveil_fed::net::frame::{read_frame, write_frame};
use fedveil_fed::net::{ClientIdentity, NetClient};
use fedveil_fed::secagg::Stage;
use fedveil_fed::server::{Server, ServerSetup};
use fedveil_fed::trainer::{
    Evaluation, Evaluator, LocalUpdate, TrainError, Trainer, TrainingConfig,
};
use fedveil_fed::wire::{self, Down, Up, VERSION};
use fedveil_task::synthetic::{SyntheticConfig, SyntheticEvaluator, SyntheticTrainer};
use tokio::sync::mpsc::unbounded_channel;

/// Three chunks and a bit: more than one 64 KiB blob read.
fn bundle_bytes() -> Vec<u8> {
    (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

struct BundledEvaluator(SyntheticEvaluator);

impl Evaluator for BundledEvaluator {
    fn dim(&self) -> usize {
        self.0.dim()
    }
    fn initial_params(&mut self) -> Result<Vec<f32>, TrainError> {
        self.0.initial_params()
    }
    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, TrainError> {
        self.0.evaluate(params)
    }
    fn client_bundle(&mut self) -> Result<Option<Vec<u8>>, TrainError> {
        Ok(Some(bundle_bytes()))
    }
}

/// A synthetic trainer that can train only once it holds the bundle.
struct BundledTrainer {
    inner: SyntheticTrainer,
    installed: Arc<Mutex<Vec<usize>>>,
    ready: bool,
}

impl Trainer for BundledTrainer {
    fn dim(&self) -> usize {
        if self.ready { self.inner.dim() } else { 0 }
    }
    fn train(
        &mut self,
        global: &[f32],
        config: &TrainingConfig,
        rng: &mut dyn rand_core::RngCore,
    ) -> Result<LocalUpdate, TrainError> {
        if !self.ready {
            return Err(TrainError("no bundle".into()));
        }
        self.inner.train(global, config, rng)
    }
    fn wants_bundle(&self) -> bool {
        true
    }
    fn install_bundle(&mut self, bundle: &[u8]) -> Result<(), TrainError> {
        if bundle != bundle_bytes().as_slice() {
            return Err(TrainError("not the bundle".into()));
        }
        self.installed.lock().unwrap().push(bundle.len());
        self.ready = true;
        Ok(())
    }
}

fn the_plan(rounds: u64) -> fedveil_fed::config::Plan {
    plan(&format!(
        "[federation]\nrounds = {rounds}\ncohort_size = 3\n[secagg]\nthreshold = 2\n\
         [task]\nkind = \"synthetic\"\ndim = 8\n"
    ))
}

async fn server(
    cast: &Cast,
    rounds: u64,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<fedveil_fed::server::Summary, fedveil_fed::FedError>>,
    tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    logs();
    let plan = the_plan(rounds);
    let cfg = SyntheticConfig::from_table(&plan.task).unwrap();
    let (tx, rx) = unbounded_channel();
    let s = Server::bind(ServerSetup {
        plan,
        identity: cast.server.clone(),
        allow: cast.clients.iter().map(ClientIdentity::public).collect(),
        listen: loopback(),
        limits: limits(),
        evaluator: Box::new(BundledEvaluator(
            SyntheticEvaluator::new(&cfg, cast.clients.len() as u32).unwrap(),
        )),
        randomness: seeded(1),
        events: Some(tx),
        hooks: Default::default(),
    })
    .unwrap();
    let addr = s.local_addr();
    (addr, tokio::spawn(s.run()), rx)
}

#[allow(clippy::type_complexity)]
fn client(
    cast: &Cast,
    i: usize,
    addr: std::net::SocketAddr,
    cache: Option<std::path::PathBuf>,
    faults: Vec<Fault>,
    events: tokio::sync::mpsc::UnboundedSender<ClientEvent>,
    installed: Arc<Mutex<Vec<usize>>>,
) -> tokio::task::JoinHandle<Result<client::ClientSummary, fedveil_fed::FedError>> {
    let plan = the_plan(1);
    let cfg = SyntheticConfig::from_table(&plan.task).unwrap();
    tokio::spawn(client::run(ClientSetup {
        server: addr,
        server_name: NAME.into(),
        pin: cast.server.fingerprint(),
        identity: cast.identity(i),
        limits: limits(),
        trainer: Box::new(BundledTrainer {
            inner: SyntheticTrainer::new(&cfg, i as u32).unwrap(),
            installed,
            ready: false,
        }),
        policy: fedveil_fed::config::Policy::trusting(),
        randomness: seeded(10 + i as u8),
        reconnect: Duration::from_millis(100),
        max_reconnect: Duration::from_millis(500),
        give_up_after: Some(Duration::from_secs(30)),
        events: Some(events),
        endpoint: None,
        faults,
        bundle_cache: cache,
        max_bundle_bytes: MAX_BUNDLE_BYTES,
        hooks: Default::default(),
        ledger_dir: None,
    }))
}

// §3.4: one transfer per client, checked and installed before its first
// round; a client that reconnects mid-federation keeps the bundle it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_fetches_the_bundle_once_and_trains_on_it() {
    let cast = Cast::new(3, 1);
    let (addr, task, mut events) = server(&cast, 3).await;
    let (ctx, mut crx) = unbounded_channel();
    let installed = Arc::new(Mutex::new(Vec::new()));
    let dir = scratch("bundles-once");
    let clients: Vec<_> = (0..3)
        .map(|i| {
            // Client 0 drops its connection in round 1 and reconnects.
            let faults = if i == 0 {
                vec![Fault::Disconnect {
                    round: 1,
                    stage: Stage::ShareKeys,
                }]
            } else {
                Vec::new()
            };
            let cache = Some(dir.join(format!("client-{i}")));
            client(
                &cast,
                i,
                addr,
                cache,
                faults,
                ctx.clone(),
                Arc::clone(&installed),
            )
        })
        .collect();
    let summary = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(summary.rounds, 3);
    for c in clients {
        let s = c.await.unwrap().unwrap();
        assert_eq!(s.rounds, 3);
    }
    let len = bundle_bytes().len();
    assert_eq!(*installed.lock().unwrap(), vec![len; 3]);
    let mut sent = 0;
    while let Ok(e) = events.try_recv() {
        if let Event::BundleSent { bytes, .. } = e {
            assert_eq!(bytes, len as u64 + 8);
            sent += 1;
        }
    }
    assert_eq!(sent, 3, "one transfer per client, none on reconnect");
    let mut fetched = Vec::new();
    let mut reconnected = false;
    while let Ok(e) = crx.try_recv() {
        match e {
            ClientEvent::Bundle {
                hash,
                bytes,
                fetched: f,
            } => {
                assert_eq!(hash, wire::bundle_hash(&bundle_bytes()));
                assert_eq!(bytes, len as u64);
                fetched.push(f);
            }
            ClientEvent::Disconnected { .. } => reconnected = true,
            _ => {}
        }
    }
    assert!(reconnected);
    assert_eq!(fetched, vec![len as u64; 3]);
    // Each client cached exactly the verified bytes under their hash.
    for i in 0..3 {
        let files: Vec<_> = std::fs::read_dir(dir.join(format!("client-{i}")))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        assert_eq!(std::fs::read(&files[0]).unwrap(), bundle_bytes());
    }

    // A restarted client (a new process: nothing in memory) reads its
    // cache and fetches nothing; a cached file that was tampered with is
    // not used.
    let cast2 = Cast {
        server: cast.server.clone(),
        clients: cast
            .clients
            .iter()
            .map(|c| ClientIdentity::from_seed(&c.seed()))
            .collect(),
    };
    let tampered = std::fs::read_dir(dir.join("client-2"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&tampered, b"not the bundle").unwrap();
    let (addr, task, mut events) = server(&cast2, 1).await;
    let (ctx, mut crx) = unbounded_channel();
    let installed = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let cache = Some(dir.join(format!("client-{i}")));
            client(
                &cast2,
                i,
                addr,
                cache,
                Vec::new(),
                ctx.clone(),
                Arc::clone(&installed),
            )
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    for c in clients {
        c.await.unwrap().unwrap();
    }
    let mut fetched = Vec::new();
    while let Ok(e) = crx.try_recv() {
        if let ClientEvent::Bundle { fetched: f, .. } = e {
            fetched.push(f);
        }
    }
    fetched.sort();
    assert_eq!(
        fetched,
        vec![0, 0, len as u64],
        "only the tampered cache is refetched"
    );
    let mut sent = 0;
    while let Ok(e) = events.try_recv() {
        sent += usize::from(matches!(e, Event::BundleSent { .. }));
    }
    assert_eq!(sent, 1);
    assert_eq!(std::fs::read(&tampered).unwrap(), bundle_bytes());
}

// §3.4: a peer that answers the offer with anything but a reply for this
// bundle is cut off with the reason; the honest clients finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_answer_to_the_offer_closes_that_connection_only() {
    let cast = Cast::new(4, 2);
    let (addr, task, _events) = server(&cast, 2).await;
    let endpoint = NetClient::new(addr, cast.server.fingerprint(), limits()).unwrap();
    let answers = [
        Up::BundleReply {
            hash: [7; 32],
            fetch: true,
        },
        Up::Decline {
            round: 0,
            reason: "no".into(),
        },
    ];
    for answer in answers {
        let conn = endpoint
            .connect(addr, NAME, &cast.identity(3))
            .await
            .unwrap()
            .connection;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        write_frame(&mut send, &Up::Hello { version: VERSION }, 1024)
            .await
            .unwrap();
        let offer: Down = read_frame(&mut recv, 1 << 20).await.unwrap();
        assert!(
            matches!(offer, Down::Bundle { bytes: 200_000, .. }),
            "{offer:?}"
        );
        write_frame(&mut send, &answer, 1024).await.unwrap();
        let why = match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
            Ok(fedveil_fed::net::quinn::ConnectionError::ApplicationClosed(c)) => {
                String::from_utf8_lossy(&c.reason).into_owned()
            }
            other => panic!("not closed with a reason: {other:?}"),
        };
        assert!(
            why.contains("another bundle") || why.contains("expected BundleReply"),
            "{why}"
        );
    }
    // The honest clients start only once both wrong answers are handled:
    // started earlier, they could finish both rounds (and the server shut
    // its endpoint) before the second wrong answer's handshake.
    let (ctx, _crx) = unbounded_channel();
    let installed = Arc::new(Mutex::new(Vec::new()));
    let honest: Vec<_> = (0..3)
        .map(|i| {
            client(
                &cast,
                i,
                addr,
                None,
                Vec::new(),
                ctx.clone(),
                Arc::clone(&installed),
            )
        })
        .collect();
    let summary = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(summary.rounds, 2);
    for c in honest {
        assert_eq!(c.await.unwrap().unwrap().rounds, 2);
    }
}
