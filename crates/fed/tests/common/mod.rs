//! A federation over real QUIC on loopback for tests: a server task and
//! client tasks that can be started, stopped and restarted independently,
//! with their events collected.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use fedveil_fed::FedError;
use fedveil_fed::adversary::{Adversary, ClientAdversary, ClientHooks, ServerHooks};
use fedveil_fed::client::{self, ClientSetup, ClientSummary, Fault};
use fedveil_fed::config::{Plan, Policy, RunFile};
use fedveil_fed::metrics::{ClientEvent, Event};
use fedveil_fed::net::frame::{read_blob, read_frame, write_frame};
use fedveil_fed::net::quinn;
use fedveil_fed::net::{ClientIdentity, Limits, NetClient, ServerIdentity};
use fedveil_fed::randomness::Randomness;
use fedveil_fed::server::{Server, ServerSetup, Summary};
use fedveil_fed::wire::{Down, MAX_UP_FRAME, RoundSpec, Up, VERSION};
use fedveil_task::synthetic::{SyntheticConfig, SyntheticEvaluator, SyntheticTrainer};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;

pub const NAME: &str = "localhost";

/// Logs to the test's output when `FEDVEIL_TEST_LOG` holds a tracing
/// filter (e.g. `FEDVEIL_TEST_LOG=debug cargo test -- --nocapture`).
pub fn logs() {
    if let Ok(filter) = std::env::var("FEDVEIL_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A plan from the federation tables of a run file (`[run]` is added).
pub fn plan(tables: &str) -> Plan {
    let text = format!("[run]\nclients = 1\n{tables}");
    RunFile::parse(Path::new("test.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"))
        .plan()
}

pub fn limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(3),
        ..Limits::default()
    }
}

pub fn task(plan: &Plan) -> SyntheticConfig {
    SyntheticConfig::from_table(&plan.task).unwrap()
}

/// The parties of a test federation.
pub struct Cast {
    pub server: ServerIdentity,
    pub clients: Vec<ClientIdentity>,
}

impl Cast {
    pub fn new(n: usize, seed: u64) -> Cast {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        Cast {
            server: ServerIdentity::generate(&[NAME.to_string()]).unwrap(),
            clients: (0..n).map(|_| ClientIdentity::generate(&mut rng)).collect(),
        }
    }

    pub fn identity(&self, i: usize) -> ClientIdentity {
        ClientIdentity::from_seed(&self.clients[i].seed())
    }
}

pub struct RunningServer {
    pub addr: SocketAddr,
    pub task: JoinHandle<Result<Summary, FedError>>,
    pub events: UnboundedReceiver<Event>,
}

impl RunningServer {
    /// The next event matching `pred`, within `secs` seconds.
    pub async fn wait_for(&mut self, secs: u64, mut pred: impl FnMut(&Event) -> bool) -> Event {
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            match tokio::time::timeout_at(until, self.events.recv()).await {
                Ok(Some(e)) if pred(&e) => return e,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the server's events ended"),
                Err(_) => panic!("no such server event within {secs} s"),
            }
        }
    }

    pub async fn finish(self) -> (Summary, Vec<Event>) {
        let RunningServer {
            task, mut events, ..
        } = self;
        let summary = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("the federation finishes within 120 s")
            .expect("the server task")
            .unwrap_or_else(|e| panic!("the server failed: {e}"));
        let mut rest = Vec::new();
        while let Ok(e) = events.try_recv() {
            rest.push(e);
        }
        (summary, rest)
    }
}

/// Starts a server on `listen` (retrying while a previous server's socket
/// is being released).
pub async fn start_server(
    cast: &Cast,
    plan: Plan,
    listen: SocketAddr,
    randomness: Randomness,
    adversary: Option<Box<dyn Adversary>>,
) -> RunningServer {
    start_server_with(cast, plan, listen, randomness, adversary, limits()).await
}

/// [`start_server`] with the server's transport limits.
pub async fn start_server_with(
    cast: &Cast,
    plan: Plan,
    listen: SocketAddr,
    randomness: Randomness,
    adversary: Option<Box<dyn Adversary>>,
    limits: Limits,
) -> RunningServer {
    logs();
    let (tx, events) = unbounded_channel();
    let population = cast.clients.len() as u32;
    let cfg = task(&plan);
    let mut adversary = adversary;
    let mut tries = 0;
    let server = loop {
        let setup = ServerSetup {
            plan: plan.clone(),
            identity: cast.server.clone(),
            allow: cast.clients.iter().map(ClientIdentity::public).collect(),
            listen,
            limits: limits.clone(),
            evaluator: Box::new(SyntheticEvaluator::new(&cfg, population).unwrap()),
            randomness: randomness.clone(),
            events: Some(tx.clone()),
            hooks: ServerHooks {
                adversary: adversary.take(),
            },
        };
        match Server::bind(setup) {
            Ok(s) => break s,
            Err(FedError::Net(e)) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the server did not start: {e}"),
        }
    };
    let addr = server.local_addr();
    RunningServer {
        addr,
        task: tokio::spawn(server.run()),
        events,
    }
}

pub fn loopback() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

/// Options for one client (by default: no faults, a policy that trusts
/// the test's own server, nothing recorded).
pub struct ClientOptions {
    pub faults: Vec<Fault>,
    pub policy: Policy,
    pub record_inputs: bool,
    pub adversary: Option<Box<dyn ClientAdversary>>,
    pub ledger_dir: Option<std::path::PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            faults: Vec::new(),
            policy: Policy::trusting(),
            record_inputs: false,
            adversary: None,
            ledger_dir: None,
        }
    }
}

/// Starts client `i` (shard `i` of the synthetic task).
#[allow(clippy::too_many_arguments)]
pub fn start_client(
    cast: &Cast,
    i: usize,
    addr: SocketAddr,
    plan: &Plan,
    randomness: Randomness,
    endpoint: Option<NetClient>,
    events: Option<UnboundedSender<ClientEvent>>,
    options: ClientOptions,
) -> JoinHandle<Result<ClientSummary, FedError>> {
    let cfg = task(plan);
    let setup = ClientSetup {
        server: addr,
        server_name: NAME.into(),
        pin: cast.server.fingerprint(),
        identity: cast.identity(i),
        limits: limits(),
        trainer: Box::new(SyntheticTrainer::new(&cfg, i as u32).unwrap()),
        policy: options.policy,
        randomness,
        reconnect: Duration::from_millis(100),
        max_reconnect: Duration::from_millis(500),
        give_up_after: Some(Duration::from_secs(30)),
        events,
        endpoint,
        faults: options.faults,
        bundle_cache: None,
        max_bundle_bytes: fedveil_fed::client::MAX_BUNDLE_BYTES,
        hooks: ClientHooks {
            adversary: options.adversary,
            record_inputs: options.record_inputs,
        },
        ledger_dir: options.ledger_dir,
    };
    tokio::spawn(client::run(setup))
}

/// Starts every client with default options on one shared endpoint.
pub fn start_clients(
    cast: &Cast,
    addr: SocketAddr,
    plan: &Plan,
    randomness: &Randomness,
    events: Option<UnboundedSender<ClientEvent>>,
) -> Vec<JoinHandle<Result<ClientSummary, FedError>>> {
    let endpoint = NetClient::new(addr, cast.server.fingerprint(), limits()).unwrap();
    (0..cast.clients.len())
        .map(|i| {
            start_client(
                cast,
                i,
                addr,
                plan,
                randomness.clone(),
                Some(endpoint.clone()),
                events.clone(),
                ClientOptions::default(),
            )
        })
        .collect()
}

/// Waits for every client to finish and returns their summaries.
pub async fn join_clients(
    clients: Vec<JoinHandle<Result<ClientSummary, FedError>>>,
) -> Vec<Result<ClientSummary, FedError>> {
    let mut out = Vec::new();
    for c in clients {
        out.push(
            tokio::time::timeout(Duration::from_secs(60), c)
                .await
                .expect("the client finishes")
                .expect("the client task"),
        );
    }
    out
}

pub fn seeded(byte: u8) -> Randomness {
    Randomness::seeded([byte; 32])
}

pub fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-fed-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// An authenticated client that speaks the protocol by hand.
pub struct Rogue {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl Rogue {
    pub async fn connect(addr: std::net::SocketAddr, cast: &Cast, i: usize) -> Rogue {
        let endpoint = NetClient::new(addr, cast.server.fingerprint(), limits()).unwrap();
        let conn = endpoint
            .connect(addr, NAME, &cast.identity(i))
            .await
            .unwrap()
            .connection;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        write_frame(&mut send, &Up::Hello { version: VERSION }, 1024)
            .await
            .unwrap();
        let welcome: Down = read_frame(&mut recv, 1 << 20).await.unwrap();
        assert!(matches!(welcome, Down::Welcome { .. }), "{welcome:?}");
        Rogue { conn, send, recv }
    }

    /// The next message, with a round's parameters.
    pub async fn next(&mut self) -> (Down, Vec<u8>) {
        let d: Down = tokio::time::timeout(
            Duration::from_secs(30),
            read_frame(&mut self.recv, 16 << 20),
        )
        .await
        .expect("a message within 30 s")
        .expect("a message");
        let blob = match &d {
            Down::Round(spec) => read_blob(&mut self.recv, spec.dim as usize * 4)
                .await
                .unwrap(),
            _ => Vec::new(),
        };
        (d, blob)
    }

    pub async fn next_round(&mut self) -> (RoundSpec, Vec<u8>) {
        loop {
            if let (Down::Round(spec), blob) = self.next().await {
                return (*spec, blob);
            }
        }
    }

    pub async fn next_rejection(&mut self) -> String {
        loop {
            if let (Down::Rejected { reason }, _) = self.next().await {
                return reason;
            }
        }
    }

    pub async fn up(&mut self, up: &Up) {
        write_frame(&mut self.send, up, MAX_UP_FRAME).await.unwrap();
    }

    /// Waits for the server to close the connection; returns its reason.
    pub async fn closed(&self) -> String {
        match tokio::time::timeout(Duration::from_secs(10), self.conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
                String::from_utf8_lossy(&c.reason).into_owned()
            }
            Ok(other) => panic!("closed otherwise: {other}"),
            Err(_) => panic!("the server did not close the connection"),
        }
    }
}
