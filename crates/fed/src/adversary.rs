//! The hooks through which `fedveil audit` (crates/audit) and the tests
//! play a malicious server or a malicious client inside the real
//! federation runtimes. No attack lives here: the attacks are in the audit
//! crate, and reach the runtimes only through these hooks.
//!
//! Everything that can change what a runtime does is compiled only with
//! fed's `adversary` feature. In a default build [`ServerHooks`] and
//! [`ClientHooks`] are empty and their methods do nothing, so a library
//! user of fed compiles no hook at all. The `fedveil` binary enables the
//! feature for `fedveil audit`; `fedveil server`, `fedveil client` and
//! `fedveil run` install no hook.

#[cfg(feature = "adversary")]
use std::collections::BTreeMap;
use std::sync::Arc;

#[cfg(feature = "adversary")]
use fedveil_secagg::SessionId;
use fedveil_secagg::messages::ClientMessage;
#[cfg(feature = "adversary")]
use fedveil_secagg::messages::ServerMessage;
use fedveil_secagg::{ClientId, Stage};

use crate::wire::RoundSpec;

/// The server's hooks (`ServerHooks::default()`: none, as in operation).
#[derive(Default)]
pub struct ServerHooks {
    /// A malicious server's behaviour.
    #[cfg(feature = "adversary")]
    pub adversary: Option<Box<dyn Adversary>>,
}

impl std::fmt::Debug for ServerHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ServerHooks");
        #[cfg(feature = "adversary")]
        d.field("adversary", &self.adversary.is_some());
        d.finish()
    }
}

impl ServerHooks {
    /// What `client` is sent as the round starts instead of `spec` and
    /// `params` (none: what the others get).
    #[cfg_attr(not(feature = "adversary"), allow(unused_variables))]
    pub(crate) fn tampered(
        &mut self,
        client: ClientId,
        spec: &RoundSpec,
        params: &Arc<Vec<u8>>,
    ) -> Option<(RoundSpec, Vec<u8>)> {
        #[cfg(feature = "adversary")]
        if let Some(a) = self.adversary.as_mut() {
            let mut s = spec.clone();
            let mut p = params.as_ref().clone();
            a.tamper(client, &mut s, &mut p);
            return Some((s, p));
        }
        None
    }

    /// Shows the adversary a SecAgg+ message a cohort member sent.
    #[cfg_attr(not(feature = "adversary"), allow(unused_variables))]
    pub(crate) fn observe(&mut self, from: ClientId, msg: &ClientMessage) {
        #[cfg(feature = "adversary")]
        if let Some(a) = self.adversary.as_mut() {
            a.observe(from, msg);
        }
    }

    /// The stage at which the adversary takes the session of `round`,
    /// `attempt` over (none: the session runs honestly).
    #[cfg_attr(not(feature = "adversary"), allow(unused_variables))]
    pub(crate) fn takeover(&mut self, round: u64, attempt: u32) -> Option<Stage> {
        #[cfg(feature = "adversary")]
        if let Some(a) = self.adversary.as_mut() {
            return a.takeover(round, attempt);
        }
        None
    }
}

/// The client's hooks (`ClientHooks::default()`: none, as in operation).
#[derive(Default)]
pub struct ClientHooks {
    /// A malicious client's behaviour.
    #[cfg(feature = "adversary")]
    pub adversary: Option<Box<dyn ClientAdversary>>,
    /// Report the encoded input in [`crate::metrics::ClientEvent::Input`]
    /// (it is the client's secret: tests and the audit only).
    #[cfg(feature = "adversary")]
    pub record_inputs: bool,
}

impl std::fmt::Debug for ClientHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ClientHooks");
        #[cfg(feature = "adversary")]
        d.field("adversary", &self.adversary.is_some())
            .field("record_inputs", &self.record_inputs);
        d.finish()
    }
}

impl ClientHooks {
    /// What the client sends in place of `msg` of `round`.
    #[cfg_attr(not(feature = "adversary"), allow(unused_variables))]
    pub(crate) fn outgoing(&mut self, round: u64, msg: ClientMessage) -> Vec<ClientMessage> {
        #[cfg(feature = "adversary")]
        if let Some(a) = self.adversary.as_mut() {
            return a.outgoing(round, msg);
        }
        vec![msg]
    }

    /// Whether the client reports its encoded input.
    #[cfg(feature = "adversary")]
    pub(crate) fn record_inputs(&self) -> bool {
        self.record_inputs
    }

    /// Whether the client reports its encoded input: never without the
    /// hooks.
    #[cfg(not(feature = "adversary"))]
    pub(crate) fn record_inputs(&self) -> bool {
        false
    }
}

/// Lets a test or `fedveil audit --quic` play a malicious server: one that
/// sends some clients something other than what the others get, or that
/// takes a session over at some stage and speaks to the clients itself.
#[cfg(feature = "adversary")]
pub trait Adversary: Send + 'static {
    /// Called for every cohort member as a round starts, with what it is
    /// about to receive.
    fn tamper(&mut self, _client: ClientId, _spec: &mut RoundSpec, _params: &mut Vec<u8>) {}

    /// Sees every SecAgg+ message a cohort member sends, before the server
    /// handles it (also those it then refuses).
    fn observe(&mut self, _from: ClientId, _msg: &ClientMessage) {}

    /// The stage at which to take over the session of `round`, `attempt`
    /// (none: the session runs honestly).
    fn takeover(&mut self, _round: u64, _attempt: u32) -> Option<Stage> {
        None
    }

    /// Plays the server in a session taken over: `requests` are the
    /// messages the honest server was about to send at the takeover stage,
    /// unsent; `link` reaches the cohort over its connections. It runs on a
    /// blocking thread. Afterwards the session is aborted.
    fn play(
        &mut self,
        _view: View,
        _requests: Vec<(ClientId, ServerMessage)>,
        _link: &mut dyn Link,
    ) {
    }
}

/// Lets a test or `fedveil audit --quic` play a malicious client: it sees
/// every SecAgg+ message this client is about to send, and the client
/// sends what it returns instead, in order.
#[cfg(feature = "adversary")]
pub trait ClientAdversary: Send + 'static {
    fn outgoing(&mut self, round: u64, msg: ClientMessage) -> Vec<ClientMessage>;
}

/// How an attacking server reaches the clients of a session.
#[cfg(feature = "adversary")]
pub trait Link {
    /// Sends every message, in order, and returns the answers that came
    /// back (a client that refuses a message answers nothing; the link
    /// keeps the refusals where it can see them).
    fn ask_all(&mut self, msgs: Vec<(ClientId, ServerMessage)>) -> Vec<(ClientId, ClientMessage)>;
}

/// What the server knows of a session when an attack takes it over.
#[cfg(feature = "adversary")]
#[derive(Clone, Debug)]
pub struct View {
    pub session: SessionId,
    pub bits: u8,
    pub threshold: u32,
    /// The session's roster.
    pub members: Vec<ClientId>,
    /// Each member's neighbours.
    pub neighbours: BTreeMap<ClientId, Vec<ClientId>>,
    /// Every message a member sent so far, in order (also those the honest
    /// server refused).
    pub log: Vec<(ClientId, ClientMessage)>,
}

/// A request of an adversary's [`Link`] to the server task.
#[cfg(feature = "adversary")]
pub(crate) struct Ask {
    pub msgs: Vec<(ClientId, ServerMessage)>,
    pub reply: tokio::sync::oneshot::Sender<Vec<(ClientId, ClientMessage)>>,
}

/// The link of an adversary playing on a blocking thread: each batch goes
/// to the server task, which sends it over the clients' connections and
/// collects their answers.
#[cfg(feature = "adversary")]
pub(crate) struct RelayLink {
    pub tx: tokio::sync::mpsc::UnboundedSender<Ask>,
}

#[cfg(feature = "adversary")]
impl Link for RelayLink {
    fn ask_all(&mut self, msgs: Vec<(ClientId, ServerMessage)>) -> Vec<(ClientId, ClientMessage)> {
        let (reply, answers) = tokio::sync::oneshot::channel();
        if self.tx.send(Ask { msgs, reply }).is_err() {
            return Vec::new();
        }
        answers.blocking_recv().unwrap_or_default()
    }
}
