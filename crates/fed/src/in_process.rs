//! A server and its clients in one process, over real QUIC sockets on
//! loopback (`fedveil run`). Identities and the server certificate are made
//! fresh for the run; every client pins the certificate and proves its key
//! exactly as across machines.

use std::net::SocketAddr;
use std::time::Duration;

use fedveil_net::{ClientIdentity, Fingerprint, Limits, NetClient, ServerIdentity};
use rand_core::OsRng;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use crate::FedError;
use crate::client::{self, ClientSetup, ClientSummary};
use crate::config::{Plan, Policy};
use crate::metrics::{ClientEvent, Event};
use crate::randomness::Randomness;
use crate::server::{Server, ServerSetup, Summary};
use crate::trainer::{Evaluator, Trainer};

/// How long clients may take to finish after the server has ended.
const CLIENT_GRACE: Duration = Duration::from_secs(3);

/// Makes client `i`'s trainer (`i` counts from 0).
pub type TrainerFactory = Box<dyn Fn(u32) -> Result<Box<dyn Trainer>, FedError> + Send + Sync>;

/// A local federation.
pub struct InProcessRun {
    pub plan: Plan,
    pub clients: u32,
    pub listen: SocketAddr,
    pub limits: Limits,
    pub randomness: Randomness,
    pub trainers: TrainerFactory,
    pub evaluator: Box<dyn Evaluator>,
    pub events: Option<UnboundedSender<Event>>,
    pub client_events: Option<UnboundedSender<ClientEvent>>,
}

impl std::fmt::Debug for InProcessRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessRun")
            .field("clients", &self.clients)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// What a local federation produced.
#[derive(Debug)]
pub struct InProcessResult {
    pub server: Summary,
    pub clients: Vec<Result<ClientSummary, FedError>>,
}

/// Many clients in one process, sharing one UDP socket: the clients of
/// [`run`], and load generators against a server elsewhere.
pub struct Swarm {
    pub server: SocketAddr,
    pub server_name: String,
    pub pin: Fingerprint,
    pub limits: Limits,
    /// One client per identity; client `i` trains with `trainers(i)`.
    pub identities: Vec<ClientIdentity>,
    pub trainers: TrainerFactory,
    pub randomness: Randomness,
    pub events: Option<UnboundedSender<ClientEvent>>,
    /// Each client gives up after this long without a connection.
    pub give_up_after: Duration,
    /// Every client's policy.
    pub policy: Policy,
    /// Where the clients cache the server's bundle (none: in memory).
    pub bundle_cache: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Swarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("server", &self.server)
            .field("clients", &self.identities.len())
            .finish_non_exhaustive()
    }
}

/// Starts every client of `swarm` as a task.
pub fn spawn_swarm(swarm: Swarm) -> Result<Vec<JoinHandle<ClientOutcome>>, FedError> {
    let endpoint = NetClient::new(swarm.server, swarm.pin, swarm.limits.clone())?;
    let mut tasks = Vec::with_capacity(swarm.identities.len());
    for (i, id) in swarm.identities.into_iter().enumerate() {
        let setup = ClientSetup {
            server: swarm.server,
            server_name: swarm.server_name.clone(),
            pin: swarm.pin,
            identity: id,
            limits: swarm.limits.clone(),
            trainer: (swarm.trainers)(i as u32)?,
            policy: swarm.policy.clone(),
            randomness: swarm.randomness.clone(),
            reconnect: Duration::from_millis(200),
            max_reconnect: Duration::from_secs(2),
            give_up_after: Some(swarm.give_up_after),
            events: swarm.events.clone(),
            endpoint: Some(endpoint.clone()),
            faults: Vec::new(),
            bundle_cache: swarm.bundle_cache.clone(),
            max_bundle_bytes: client::MAX_BUNDLE_BYTES,
            hooks: Default::default(),
            ledger_dir: None,
        };
        tasks.push(tokio::spawn(client::run(setup)));
    }
    Ok(tasks)
}

/// A client's end.
pub type ClientOutcome = Result<ClientSummary, FedError>;

/// Runs the federation to its end.
pub async fn run(local: InProcessRun) -> Result<InProcessResult, FedError> {
    let InProcessRun {
        plan,
        clients,
        listen,
        limits,
        randomness,
        trainers,
        evaluator,
        events,
        client_events,
    } = local;
    let name = "localhost";
    let identity = ServerIdentity::generate(&[name.to_string()])?;
    let ids: Vec<ClientIdentity> = (0..clients)
        .map(|_| ClientIdentity::generate(&mut OsRng))
        .collect();
    let pin = identity.fingerprint();
    let server = Server::bind(ServerSetup {
        plan,
        identity,
        allow: ids.iter().map(ClientIdentity::public).collect(),
        listen,
        limits: limits.clone(),
        evaluator,
        randomness: randomness.clone(),
        events,
        hooks: Default::default(),
    })?;
    let addr = server.local_addr();
    // One process, one operator: the clients accept exactly what the run
    // file asks of the server (an unprotected run only because the same
    // file that asked for it starts them).
    let policy = Policy::for_run(server.resolved());
    let tasks = spawn_swarm(Swarm {
        server: addr,
        server_name: name.into(),
        pin,
        limits,
        identities: ids,
        trainers,
        randomness,
        events: client_events,
        give_up_after: Duration::from_secs(30),
        policy,
        bundle_cache: None,
    })?;
    let summary = server.run().await;
    // Clients the server told that the federation ended finish at once; a
    // client still trying to connect (the server ended before it got in,
    // say after resuming a finished checkpoint) is stopped after a grace
    // period rather than left to retry.
    let grace = tokio::time::Instant::now() + CLIENT_GRACE;
    let mut outcomes = Vec::with_capacity(tasks.len());
    for mut t in tasks {
        let outcome = match tokio::time::timeout_at(grace, &mut t).await {
            Ok(joined) => {
                joined.unwrap_or_else(|e| Err(FedError::Internal(format!("client task: {e}"))))
            }
            Err(_) => {
                t.abort();
                Err(FedError::Stopped(
                    "the server ended the federation before this client took part".into(),
                ))
            }
        };
        outcomes.push(outcome);
    }
    Ok(InProcessResult {
        server: summary?,
        clients: outcomes,
    })
}
