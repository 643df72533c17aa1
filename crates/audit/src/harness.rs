//! A federation over real QUIC on loopback, for the attacks: the
//! federation's own server and clients (the synthetic task), started and
//! awaited with deadlines, and an authenticated client that speaks the
//! protocol by hand.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedveil_fed::FedError;
use fedveil_fed::adversary::{ClientAdversary, ClientHooks, ServerHooks};
use fedveil_fed::client::{self, ClientSetup, ClientSummary, Fault};
use fedveil_fed::config::{Plan, Policy, RunFile};
use fedveil_fed::metrics::{ClientEvent, Event};
use fedveil_fed::net::frame::{read_frame, write_frame};
use fedveil_fed::net::quinn;
use fedveil_fed::net::{ClientIdentity, Limits, NetClient, ServerIdentity};
use fedveil_fed::randomness::Randomness;
use fedveil_fed::server::{Server, ServerSetup, Summary};
use fedveil_fed::wire::{Down, Up, VERSION};
use fedveil_task::synthetic::{SyntheticConfig, SyntheticEvaluator, SyntheticTrainer};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;

use crate::{AuditError, Result};

const NAME: &str = "localhost";
/// How long any one federation of the audit may take.
const FEDERATION_DEADLINE: Duration = Duration::from_secs(120);

fn harness(what: impl std::fmt::Display) -> AuditError {
    AuditError::Harness(what.to_string())
}

/// A plan from a run file's federation tables, with short deadlines and
/// the synthetic task (`[run]` is added).
pub fn plan(rounds: u64, extra: &str) -> Result<Plan> {
    let text = format!(
        r#"[run]
clients = 1
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
    );
    Ok(RunFile::parse(Path::new("audit.toml"), &text)?.plan())
}

/// The transport limits of the audit's parties.
pub fn limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(3),
        ..Limits::default()
    }
}

fn task(plan: &Plan) -> Result<SyntheticConfig> {
    Ok(SyntheticConfig::from_table(&plan.task)?)
}

/// The parties of a federation: fresh identities.
pub struct Cast {
    pub server: ServerIdentity,
    pub clients: Vec<ClientIdentity>,
}

impl Cast {
    pub fn new(n: usize) -> Result<Cast> {
        let mut rng = ChaCha20Rng::from_rng(rand_core::OsRng)
            .map_err(|e| harness(format!("the OS random generator: {e}")))?;
        Ok(Cast {
            server: ServerIdentity::generate(&[NAME.to_string()])?,
            clients: (0..n).map(|_| ClientIdentity::generate(&mut rng)).collect(),
        })
    }

    fn identity(&self, i: usize) -> ClientIdentity {
        ClientIdentity::from_seed(&self.clients[i].seed())
    }
}

pub struct RunningServer {
    pub addr: SocketAddr,
    pub task: JoinHandle<std::result::Result<Summary, FedError>>,
    pub events: UnboundedReceiver<Event>,
}

impl RunningServer {
    /// The next event matching `pred`, within `secs` seconds.
    pub async fn wait_for(
        &mut self,
        secs: u64,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            match tokio::time::timeout_at(until, self.events.recv()).await {
                Ok(Some(e)) if pred(&e) => return Ok(e),
                Ok(Some(_)) => {}
                Ok(None) => return Err(harness("the server's events ended")),
                Err(_) => return Err(harness(format!("no such server event within {secs} s"))),
            }
        }
    }

    /// The server's result and every event it emitted that was not
    /// consumed yet.
    pub async fn end(self) -> Result<(std::result::Result<Summary, FedError>, Vec<Event>)> {
        let RunningServer {
            task, mut events, ..
        } = self;
        let result = tokio::time::timeout(FEDERATION_DEADLINE, task)
            .await
            .map_err(|_| harness("the federation did not end within 120 s"))?
            .map_err(|e| harness(format!("the server task: {e}")))?;
        let mut rest = Vec::new();
        while let Ok(e) = events.try_recv() {
            rest.push(e);
        }
        Ok((result, rest))
    }
}

/// Starts the federation's server on loopback.
pub async fn start_server(
    cast: &Cast,
    plan: &Plan,
    randomness: Randomness,
    limits: Limits,
) -> Result<RunningServer> {
    let (tx, events) = unbounded_channel();
    let population = cast.clients.len() as u32;
    let cfg = task(plan)?;
    let setup = ServerSetup {
        plan: plan.clone(),
        identity: cast.server.clone(),
        allow: cast.clients.iter().map(ClientIdentity::public).collect(),
        listen: (Ipv4Addr::LOCALHOST, 0).into(),
        limits,
        evaluator: Box::new(SyntheticEvaluator::new(&cfg, population)?),
        randomness,
        events: Some(tx),
        hooks: ServerHooks::default(),
    };
    let server = Server::bind(setup)?;
    Ok(RunningServer {
        addr: server.local_addr(),
        task: tokio::spawn(server.run()),
        events,
    })
}

/// What sets one client apart from an honest one that trusts the server.
pub struct ClientOptions {
    pub faults: Vec<Fault>,
    pub policy: Policy,
    pub adversary: Option<Box<dyn ClientAdversary>>,
    pub ledger_dir: Option<PathBuf>,
    pub events: Option<UnboundedSender<ClientEvent>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            faults: Vec::new(),
            policy: Policy::trusting(),
            adversary: None,
            ledger_dir: None,
            events: None,
        }
    }
}

pub type ClientTask = JoinHandle<std::result::Result<ClientSummary, FedError>>;

/// Starts client `i` (shard `i` of the synthetic task).
pub fn start_client(
    cast: &Cast,
    i: usize,
    addr: SocketAddr,
    plan: &Plan,
    randomness: Randomness,
    options: ClientOptions,
) -> Result<ClientTask> {
    let cfg = task(plan)?;
    let setup = ClientSetup {
        server: addr,
        server_name: NAME.into(),
        pin: cast.server.fingerprint(),
        identity: cast.identity(i),
        limits: limits(),
        trainer: Box::new(SyntheticTrainer::new(&cfg, i as u32)?),
        policy: options.policy,
        randomness,
        reconnect: Duration::from_millis(100),
        max_reconnect: Duration::from_millis(500),
        give_up_after: Some(Duration::from_secs(30)),
        events: options.events,
        endpoint: None,
        faults: options.faults,
        bundle_cache: None,
        max_bundle_bytes: client::MAX_BUNDLE_BYTES,
        hooks: ClientHooks {
            adversary: options.adversary,
            record_inputs: false,
        },
        ledger_dir: options.ledger_dir,
    };
    Ok(tokio::spawn(client::run(setup)))
}

/// Waits for every client; a client that does not end in time is stopped.
pub async fn join_clients(
    clients: Vec<ClientTask>,
) -> Vec<std::result::Result<ClientSummary, String>> {
    let mut out = Vec::new();
    for c in clients {
        let abort = c.abort_handle();
        out.push(
            match tokio::time::timeout(Duration::from_secs(60), c).await {
                Ok(Ok(Ok(s))) => Ok(s),
                Ok(Ok(Err(e))) => Err(e.to_string()),
                Ok(Err(e)) => Err(format!("the client task: {e}")),
                Err(_) => {
                    abort.abort();
                    Err("did not end within 60 s".into())
                }
            },
        );
    }
    out
}

/// Everything queued on a client event channel.
pub fn drain(events: &mut UnboundedReceiver<ClientEvent>) -> Vec<ClientEvent> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        out.push(e);
    }
    out
}

/// The result of [`federate`].
pub struct Finished {
    pub server: std::result::Result<Summary, FedError>,
    pub server_events: Vec<Event>,
    pub client_events: Vec<ClientEvent>,
    pub clients: Vec<std::result::Result<ClientSummary, String>>,
}

/// Runs `plan` with one client per identity of `cast`, client `i` set up
/// by `options(i)`, until the server ends.
pub async fn federate(
    cast: &Cast,
    plan: &Plan,
    randomness: Randomness,
    mut options: impl FnMut(usize) -> ClientOptions,
) -> Result<Finished> {
    let server = start_server(cast, plan, randomness.clone(), limits()).await?;
    let (tx, mut events) = unbounded_channel();
    let mut clients = Vec::new();
    for i in 0..cast.clients.len() {
        let mut o = options(i);
        o.events = Some(tx.clone());
        clients.push(start_client(
            cast,
            i,
            server.addr,
            plan,
            randomness.clone(),
            o,
        )?);
    }
    let (result, server_events) = server.end().await?;
    let clients = join_clients(clients).await;
    Ok(Finished {
        server: result,
        server_events,
        client_events: drain(&mut events),
        clients,
    })
}

/// An authenticated client that speaks the protocol by hand.
pub struct Rogue {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl Rogue {
    pub async fn connect(addr: SocketAddr, cast: &Cast, i: usize) -> Result<Rogue> {
        let endpoint = NetClient::new(addr, cast.server.fingerprint(), limits())?;
        let conn = endpoint
            .connect(addr, NAME, &cast.identity(i))
            .await?
            .connection;
        let (mut send, mut recv) = conn.open_bi().await.map_err(harness)?;
        write_frame(&mut send, &Up::Hello { version: VERSION }, 1024).await?;
        let welcome: Down = read_frame(&mut recv, 1 << 20).await?;
        if !matches!(welcome, Down::Welcome { .. }) {
            return Err(harness(format!(
                "the server did not welcome the client: {welcome:?}"
            )));
        }
        Ok(Rogue { conn, send, recv })
    }
}

/// A fresh private directory under the system's temporary directory.
pub fn scratch(name: &str) -> Result<PathBuf> {
    let mut nonce = [0u8; 8];
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut nonce)
        .map_err(|e| harness(format!("the OS random generator: {e}")))?;
    let dir = std::env::temp_dir().join(format!(
        "fedveil-audit-{name}-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(nonce)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| harness(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}
