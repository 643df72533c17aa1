//! A server and its clients in one process, over real QUIC sockets on
//! loopback (`fedveil run`). Identities and the server certificate are made
//! fresh for the run; every client pins the certificate and proves its key
//! exactly as across machines.

use std::net::SocketAddr;
use std::time::Duration;

use fedveil_net::{ClientIdentity, Limits, NetClient, ServerIdentity};
use rand_core::OsRng;
use tokio::sync::mpsc::UnboundedSender;

use crate::FedError;
use crate::client::{self, ClientSetup, ClientSummary};
use crate::config::{Plan, Policy};
use crate::metrics::{ClientEvent, Event};
use crate::randomness::Randomness;
use crate::server::{Server, ServerSetup, Summary};
use crate::trainer::{Evaluator, Trainer};

/// Makes client `i`'s trainer (`i` counts from 0).
pub type TrainerFactory = Box<dyn Fn(u32) -> Result<Box<dyn Trainer>, FedError> + Send + Sync>;

/// A local federation.
pub struct LocalRun {
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

impl std::fmt::Debug for LocalRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRun")
            .field("clients", &self.clients)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// What a local federation produced.
#[derive(Debug)]
pub struct LocalOutcome {
    pub server: Summary,
    pub clients: Vec<Result<ClientSummary, FedError>>,
}

/// Runs the federation to its end.
pub async fn run(local: LocalRun) -> Result<LocalOutcome, FedError> {
    let LocalRun {
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
        adversary: None,
    })?;
    let addr = server.local_addr();
    // One UDP socket for all the clients.
    let endpoint = NetClient::new(addr, pin, limits.clone())?;
    let mut tasks = Vec::with_capacity(ids.len());
    for (i, id) in ids.into_iter().enumerate() {
        let setup = ClientSetup {
            server: addr,
            server_name: name.into(),
            pin,
            identity: id,
            limits: limits.clone(),
            trainer: trainers(i as u32)?,
            policy: Policy::default(),
            randomness: randomness.clone(),
            reconnect: Duration::from_millis(200),
            max_reconnect: Duration::from_secs(2),
            give_up_after: Some(Duration::from_secs(30)),
            events: client_events.clone(),
            record_inputs: false,
            endpoint: Some(endpoint.clone()),
            faults: Vec::new(),
        };
        tasks.push(tokio::spawn(client::run(setup)));
    }
    let summary = server.run().await;
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(
            t.await
                .unwrap_or_else(|e| Err(FedError::Internal(format!("client task: {e}")))),
        );
    }
    Ok(LocalOutcome {
        server: summary?,
        clients: outcomes,
    })
}
