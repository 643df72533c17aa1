//! The server's connections (protocols/federation.md §3.1): accepting and
//! authenticating clients, and one task per client that reads its control
//! stream into the server's hub and writes the hub's messages back.
//!
//! A connection task never trusts a length: frames are read against
//! [`MAX_UP_FRAME`](crate::wire::MAX_UP_FRAME) and a masked vector against
//! the exact size of the current session's vectors. A frame that breaks the
//! rules closes that client's connection with the reason; nothing else is
//! affected.
//!
//! Nothing one client sends makes the server queue without bound: the hub
//! takes messages through a bounded channel, and each client's writer
//! through a bounded queue of [`OUTBOUND_QUEUE`] messages. A rejection that
//! finds the queue full is dropped (the client is not reading, so it would
//! never see it), and a connection that commits `max_violations` rejected
//! messages in one session window is closed (§3.1).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fedveil_net::frame::{read_blob, read_frame_counted, write_blob, write_frame};
use fedveil_net::quinn;
use fedveil_net::{ClientKey, Limits, NetError, NetServer, Pending};
use fedveil_secagg::messages::MaskedInput;
use fedveil_secagg::ring::PackedVec;
use fedveil_secagg::{ClientId, SessionId};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::metrics::{Emitter, Event};
use crate::wire::{Down, MAX_UP_FRAME, Up, VERSION};

/// QUIC application close code for a protocol violation.
pub(crate) const CLOSE_PROTOCOL: u32 = 2;
/// QUIC application close code at the end of the federation.
pub(crate) const CLOSE_FINISHED: u32 = 0;
/// The largest frame the server writes.
const MAX_DOWN_FRAME: usize = 64 << 20;
/// Messages waiting for one client's writer. A session sends a member a
/// handful; a queue that fills belongs to a client that does not read.
pub(crate) const OUTBOUND_QUEUE: usize = 64;

/// A message for one client's writer.
#[derive(Debug)]
pub(crate) enum Outbound {
    Frame(Down),
    WithBlob(Down, Arc<Vec<u8>>),
    /// Write the frame, then close the connection with `reason`.
    Last(Down, u32, String),
}

/// What the connection tasks report to the server's hub.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A client authenticated and said hello; `tx` reaches its writer,
    /// `conn` closes its connection.
    Hello {
        id: ClientId,
        generation: u64,
        tx: mpsc::Sender<Outbound>,
        conn: quinn::Connection,
    },
    Up {
        id: ClientId,
        generation: u64,
        up: Up,
    },
    /// A masked input, whole: the header frame and its vector, in the
    /// form the SecAgg+ session takes.
    Masked {
        id: ClientId,
        generation: u64,
        input: MaskedInput,
    },
    /// An unprotected round's raw update.
    Update {
        id: ClientId,
        generation: u64,
        round: u64,
        attempt: u32,
        samples: u64,
        data: Vec<u8>,
    },
    Gone {
        id: ClientId,
        generation: u64,
        reason: String,
    },
}

/// The masked vectors the server currently accepts.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Expect {
    pub session: SessionId,
    pub bytes: usize,
}

/// Application bytes in and out, over all connections.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// The task's bundle, offered to every client before it joins (§3.4).
pub(crate) struct Bundle {
    pub hash: [u8; 32],
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("bytes", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// Everything the accept loop shares with its connection tasks.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionContext {
    pub ids: Arc<HashMap<ClientKey, ClientId>>,
    pub bundle: Option<Arc<Bundle>>,
    pub hub: mpsc::Sender<Inbound>,
    pub expect: watch::Receiver<Option<Expect>>,
    pub counters: Arc<Counters>,
    pub limits: Limits,
    pub events: Emitter<Event>,
}

/// Accepts connections until the endpoint closes. Dropping the future (or
/// aborting its task) drops every connection task with it.
pub(crate) async fn accept_loop(net: Arc<NetServer>, shared: ConnectionContext) {
    let mut tasks = JoinSet::new();
    let mut generation = 0u64;
    loop {
        tokio::select! {
            pending = net.accept() => {
                let Some(pending) = pending else { break };
                generation += 1;
                tasks.spawn(connection(pending, generation, shared.clone()));
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

async fn connection(pending: Pending, generation: u64, shared: ConnectionContext) {
    let remote = pending.remote_address();
    let auth = match pending.authenticate().await {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(%remote, "refused a connection: {e}");
            shared.events.emit(Event::Unauthenticated {
                remote,
                reason: e.to_string(),
            });
            return;
        }
    };
    let Some(&id) = shared.ids.get(&auth.key) else {
        // The allow-list and the id map are built from the same list.
        auth.connection
            .close(CLOSE_PROTOCOL.into(), b"no client id for this key");
        return;
    };
    let conn = auth.connection;
    let limits = &shared.limits;
    let opened = tokio::time::timeout(limits.handshake_timeout, async {
        let (send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| NetError::Connection(e.to_string()))?;
        let (hello, n) = read_frame_counted::<Up>(&mut recv, MAX_UP_FRAME).await?;
        Ok::<_, NetError>((send, recv, hello, n))
    })
    .await;
    let (mut send, mut recv, hello, n) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::info!(%id, "no control stream: {e}");
            conn.close(CLOSE_PROTOCOL.into(), e.to_string().as_bytes());
            return;
        }
        Err(_) => {
            conn.close(
                CLOSE_PROTOCOL.into(),
                b"no Hello within the handshake timeout",
            );
            return;
        }
    };
    shared
        .counters
        .received
        .fetch_add(n as u64, Ordering::Relaxed);
    match hello {
        Up::Hello { version } if version == VERSION => {}
        Up::Hello { version } => {
            let reason =
                format!("this server speaks federation protocol {VERSION}, the client {version}");
            refuse(&conn, send, reason).await;
            return;
        }
        other => {
            refuse(
                &conn,
                send,
                format!("expected Hello, got {}", up_name(&other)),
            )
            .await;
            return;
        }
    }
    if let Some(bundle) = &shared.bundle
        && let Err(reason) = offer_bundle(id, &mut send, &mut recv, bundle, &shared).await
    {
        tracing::info!(%id, "bundle: {reason}");
        conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
        return;
    }
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let hello = Inbound::Hello {
        id,
        generation,
        tx: tx.clone(),
        conn: conn.clone(),
    };
    if shared.hub.send(hello).await.is_err() {
        return;
    }
    // The reader reports the end; the hub then drops its sender, which ends
    // the writer.
    let reader = async {
        let reason = read_loop(id, generation, recv, tx, &conn, &shared).await;
        let _ = shared
            .hub
            .send(Inbound::Gone {
                id,
                generation,
                reason,
            })
            .await;
    };
    let writer = write_loop(conn.clone(), send, rx, &shared.counters);
    tokio::join!(reader, writer);
}

/// Offers the task's bundle and sends it if the client asks (§3.4),
/// before the client joins the federation: a client never receives a round
/// it could not train.
async fn offer_bundle(
    id: ClientId,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    bundle: &Bundle,
    shared: &ConnectionContext,
) -> Result<(), String> {
    let offer = Down::Bundle {
        hash: bundle.hash,
        bytes: bundle.data.len() as u64,
    };
    let n = write_frame(send, &offer, MAX_DOWN_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    shared.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
    let reply = tokio::time::timeout(
        shared.limits.handshake_timeout,
        read_frame_counted::<Up>(recv, MAX_UP_FRAME),
    )
    .await;
    let fetch = match reply {
        Ok(Ok((Up::BundleReply { hash, fetch }, n))) if hash == bundle.hash => {
            shared
                .counters
                .received
                .fetch_add(n as u64, Ordering::Relaxed);
            fetch
        }
        Ok(Ok((Up::BundleReply { .. }, _))) => {
            return Err("the client answered for another bundle".into());
        }
        Ok(Ok((other, _))) => {
            return Err(format!("expected BundleReply, got {}", up_name(&other)));
        }
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no BundleReply within the handshake timeout".into()),
    };
    if fetch {
        write_blob(send, &bundle.data, bundle.data.len())
            .await
            .map_err(|e| e.to_string())?;
        let bytes = bundle.data.len() as u64 + 8;
        shared.counters.sent.fetch_add(bytes, Ordering::Relaxed);
        shared.events.emit(Event::BundleSent { client: id, bytes });
        tracing::info!(%id, bytes, "sent the bundle");
    }
    Ok(())
}

/// Writes a refusal and closes.
async fn refuse(conn: &quinn::Connection, mut send: quinn::SendStream, reason: String) {
    let _ = write_frame(
        &mut send,
        &Down::Rejected {
            reason: reason.clone(),
        },
        MAX_DOWN_FRAME,
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
    conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
}

fn up_name(up: &Up) -> &'static str {
    match up {
        Up::Hello { .. } => "Hello",
        Up::Secagg(_) => "a secure-aggregation message",
        Up::Masked { .. } => "Masked",
        Up::Decline { .. } => "Decline",
        Up::Update { .. } => "Update",
        Up::BundleReply { .. } => "BundleReply",
        Up::Spent { .. } => "Spent",
    }
}

/// Why reading from a client stopped.
enum Stopped {
    /// It broke a rule; it is told why.
    Violation(String),
    /// The stream failed.
    Stream(String),
}

/// Reads the vector that follows a `Masked` or `Update` frame: exactly the
/// size the running session or round expects (nothing when none runs).
async fn read_expected(
    recv: &mut quinn::RecvStream,
    shared: &ConnectionContext,
    what: &str,
) -> Result<Vec<u8>, Stopped> {
    let max = shared.expect.borrow().map_or(0, |e| e.bytes);
    let data = match read_blob(recv, max).await {
        Ok(d) => d,
        Err(NetError::FrameTooLarge { len, max }) => {
            return Err(Stopped::Violation(format!(
                "{what} of {len} bytes; the running round's have {max}"
            )));
        }
        Err(e @ NetError::Malformed(_)) => return Err(Stopped::Violation(e.to_string())),
        Err(e) => return Err(Stopped::Stream(e.to_string())),
    };
    shared
        .counters
        .received
        .fetch_add(data.len() as u64 + 8, Ordering::Relaxed);
    Ok(data)
}

/// Reads the client's frames until the stream ends or breaks a rule;
/// returns why it stopped.
async fn read_loop(
    id: ClientId,
    generation: u64,
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<Outbound>,
    conn: &quinn::Connection,
    shared: &ConnectionContext,
) -> String {
    let violation = |reason: String| {
        let last = Outbound::Last(
            Down::Rejected {
                reason: reason.clone(),
            },
            CLOSE_PROTOCOL,
            reason.clone(),
        );
        if tx.try_send(last).is_err() {
            // Its queue is full: it is not reading; close without a word.
            conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
        }
        format!("protocol violation: {reason}")
    };
    loop {
        let (up, n) = match read_frame_counted::<Up>(&mut recv, MAX_UP_FRAME).await {
            Ok(x) => x,
            Err(e @ (NetError::FrameTooLarge { .. } | NetError::Malformed(_))) => {
                return violation(e.to_string());
            }
            Err(NetError::Closed) => return "the client closed its stream".into(),
            Err(e) => return e.to_string(),
        };
        shared
            .counters
            .received
            .fetch_add(n as u64, Ordering::Relaxed);
        let msg = match up {
            Up::Masked {
                session,
                bits,
                len,
                bad_envelopes,
            } => {
                let data = match read_expected(&mut recv, shared, "a masked vector").await {
                    Ok(d) => d,
                    Err(Stopped::Violation(why)) => return violation(why),
                    Err(Stopped::Stream(why)) => return why,
                };
                Inbound::Masked {
                    id,
                    generation,
                    input: MaskedInput {
                        session,
                        masked: PackedVec { bits, len, data },
                        bad_envelopes,
                    },
                }
            }
            Up::Update {
                round,
                attempt,
                samples,
            } => {
                let data = match read_expected(&mut recv, shared, "an update").await {
                    Ok(d) => d,
                    Err(Stopped::Violation(why)) => return violation(why),
                    Err(Stopped::Stream(why)) => return why,
                };
                Inbound::Update {
                    id,
                    generation,
                    round,
                    attempt,
                    samples,
                    data,
                }
            }
            up => Inbound::Up { id, generation, up },
        };
        if shared.hub.send(msg).await.is_err() {
            return "the server is shutting down".into();
        }
    }
}

/// Writes the hub's messages until the hub lets go or the stream breaks.
async fn write_loop(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Outbound>,
    counters: &Counters,
) {
    while let Some(out) = rx.recv().await {
        let result = match out {
            Outbound::Frame(d) => write_frame(&mut send, &d, MAX_DOWN_FRAME)
                .await
                .map(|n| n as u64),
            Outbound::WithBlob(d, blob) => match write_frame(&mut send, &d, MAX_DOWN_FRAME).await {
                Ok(n) => write_blob(&mut send, &blob, blob.len())
                    .await
                    .map(|()| (n + 8 + blob.len()) as u64),
                Err(e) => Err(e),
            },
            Outbound::Last(d, code, reason) => {
                if let Ok(n) = write_frame(&mut send, &d, MAX_DOWN_FRAME).await {
                    counters.sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                let _ = send.finish();
                // Let the client read it and close first; then close anyway.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                conn.close(code.into(), reason.as_bytes());
                return;
            }
        };
        match result {
            Ok(n) => {
                counters.sent.fetch_add(n, Ordering::Relaxed);
            }
            Err(_) => {
                conn.close(CLOSE_PROTOCOL.into(), b"write failed");
                return;
            }
        }
    }
    // The hub let go of this connection (a newer one replaced it, or the
    // server is shutting down).
    conn.close(CLOSE_FINISHED.into(), b"closed by the server");
}
