//! Server and client endpoints (protocols/federation.md §2).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::identity::{ClientIdentity, ClientKey, Fingerprint, ServerIdentity};
use crate::{NetError, auth, tls};

/// Size and time limits of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest frame (a control message).
    pub max_frame: usize,
    /// The largest blob (a vector).
    pub max_blob: usize,
    /// How long the TLS handshake plus client authentication may take.
    pub handshake_timeout: Duration,
    /// A connection silent for this long is closed.
    pub idle_timeout: Duration,
    /// Connection attempts a server authenticates at once; further ones are
    /// refused until one of them ends (protocols/federation.md §2.2).
    pub max_handshakes: usize,
    /// Rejected messages an authenticated connection may send before the
    /// server closes it (protocols/federation.md §3.1).
    pub max_violations: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 16 << 20,
            max_blob: 1 << 30,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_handshakes: 64,
            max_violations: 64,
        }
    }
}

/// An authenticated connection: the client's key and the QUIC connection.
#[derive(Debug)]
pub struct Authenticated {
    /// The client's identity key (on both sides).
    pub key: ClientKey,
    pub connection: quinn::Connection,
}

/// Application error code sent when closing a connection for a failed
/// authentication.
pub const CLOSE_UNAUTHENTICATED: u32 = 1;

/// The server's listening endpoint.
#[derive(Debug)]
pub struct NetServer {
    endpoint: quinn::Endpoint,
    allow: Arc<RwLock<BTreeSet<ClientKey>>>,
    limits: Limits,
    /// One permit per handshake in progress.
    handshakes: Arc<tokio::sync::Semaphore>,
    /// Attempts refused because `max_handshakes` were in progress.
    refused: std::sync::atomic::AtomicU64,
}

impl NetServer {
    /// Listens on `addr` (within a tokio runtime).
    pub fn bind(
        addr: SocketAddr,
        identity: &ServerIdentity,
        allow: impl IntoIterator<Item = ClientKey>,
        limits: Limits,
    ) -> Result<Self, NetError> {
        let config = tls::server_config(identity, limits.idle_timeout)?;
        let io = |e: std::io::Error| NetError::Io(format!("{addr}: {e}"));
        let socket = std::net::UdpSocket::bind(addr).map_err(io)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| NetError::Io("no async runtime is running".into()))?;
        let (reset_key, cid_key) = identity.restart_stable_keys();
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config.reset_key(Arc::new(reset_key));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let endpoint =
            quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime).map_err(io)?;
        Ok(NetServer {
            endpoint,
            allow: Arc::new(RwLock::new(allow.into_iter().collect())),
            handshakes: Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes.max(1))),
            refused: std::sync::atomic::AtomicU64::new(0),
            limits,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.endpoint
            .local_addr()
            .map_err(|e| NetError::Io(e.to_string()))
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Adds a key to the allow-list.
    pub fn allow(&self, key: ClientKey) {
        if let Ok(mut a) = self.allow.write() {
            a.insert(key);
        }
    }

    /// Removes a key from the allow-list (existing connections stay).
    pub fn revoke(&self, key: &ClientKey) {
        if let Ok(mut a) = self.allow.write() {
            a.remove(key);
        }
    }

    /// The next connection attempt, not yet authenticated. Run
    /// [`Pending::authenticate`] in its own task so that a slow or hostile
    /// client cannot hold up the others. While `max_handshakes` attempts
    /// are being authenticated, new ones are refused at once (the QUIC
    /// handshake is not even started), so unauthenticated peers hold a
    /// bounded amount of the server's memory.
    pub async fn accept(&self) -> Option<Pending> {
        loop {
            let incoming = self.endpoint.accept().await?;
            match Arc::clone(&self.handshakes).try_acquire_owned() {
                Ok(permit) => {
                    return Some(Pending {
                        incoming,
                        allow: Arc::clone(&self.allow),
                        limits: self.limits.clone(),
                        _permit: permit,
                    });
                }
                Err(_) => {
                    self.refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    incoming.refuse();
                }
            }
        }
    }

    /// Connection attempts refused so far because `max_handshakes` were
    /// already in progress.
    pub fn refused_handshakes(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"server shutting down");
    }
}

/// A connection attempt. It holds one of the server's handshake permits
/// until it is authenticated, refused or dropped.
#[derive(Debug)]
pub struct Pending {
    incoming: quinn::Incoming,
    allow: Arc<RwLock<BTreeSet<ClientKey>>>,
    limits: Limits,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Pending {
    /// Where the attempt comes from.
    pub fn remote_address(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Completes the TLS handshake and the client's proof of key, within
    /// the handshake timeout. A refused connection is closed with code
    /// [`CLOSE_UNAUTHENTICATED`] and the reason.
    pub async fn authenticate(self) -> Result<Authenticated, NetError> {
        let allow = Arc::clone(&self.allow);
        let limit = self.limits.handshake_timeout;
        let run = async move {
            let conn = self
                .incoming
                .await
                .map_err(|e| NetError::Connect(e.to_string()))?;
            let allowed = |k: &ClientKey| allow.read().map(|a| a.contains(k)).unwrap_or(false);
            match auth::server_side(&conn, allowed).await {
                Ok(key) => Ok(Authenticated {
                    key,
                    connection: conn,
                }),
                Err(e) => {
                    // Give the refusal a moment to reach the client, then close.
                    let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
                    conn.close(CLOSE_UNAUTHENTICATED.into(), e.to_string().as_bytes());
                    Err(e)
                }
            }
        };
        tokio::time::timeout(limit, run)
            .await
            .unwrap_or(Err(NetError::Timeout {
                what: "the client's handshake and proof of key",
            }))
    }
}

/// A client endpoint: one UDP socket that trusts exactly one pinned server
/// certificate. Many connections (many client identities, in a simulation)
/// can share it.
#[derive(Debug, Clone)]
pub struct NetClient {
    endpoint: quinn::Endpoint,
    limits: Limits,
}

impl NetClient {
    /// A client endpoint on an ephemeral port, for servers of `family`'s
    /// address family, that accepts only the certificate `pin`.
    pub fn new(family: SocketAddr, pin: Fingerprint, limits: Limits) -> Result<Self, NetError> {
        let bind: SocketAddr = if family.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| NetError::Io(e.to_string()))?;
        endpoint.set_default_client_config(tls::client_config(pin, limits.idle_timeout)?);
        Ok(NetClient { endpoint, limits })
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Opens a QUIC connection to `server` without proving any key. The
    /// server accepts nothing on such a connection but the authentication
    /// exchange of [`crate::auth`]; this is for tools that speak that
    /// exchange themselves (and for tests of the server's refusals).
    pub async fn connect_tls_only(
        &self,
        server: SocketAddr,
        server_name: &str,
    ) -> Result<quinn::Connection, NetError> {
        let run = async {
            self.endpoint
                .connect(server, server_name)
                .map_err(|e| NetError::Connect(e.to_string()))?
                .await
                .map_err(|e| NetError::Connect(e.to_string()))
        };
        tokio::time::timeout(self.limits.handshake_timeout, run)
            .await
            .unwrap_or(Err(NetError::Timeout {
                what: "the server's handshake",
            }))
    }

    /// Connects to `server` and proves `identity`.
    pub async fn connect(
        &self,
        server: SocketAddr,
        server_name: &str,
        identity: &ClientIdentity,
    ) -> Result<Authenticated, NetError> {
        let run = async {
            let conn = self
                .endpoint
                .connect(server, server_name)
                .map_err(|e| NetError::Connect(e.to_string()))?
                .await
                .map_err(|e| NetError::Connect(e.to_string()))?;
            match auth::client_side(&conn, identity).await {
                Ok(()) => Ok(Authenticated {
                    key: identity.public(),
                    connection: conn,
                }),
                Err(e) => {
                    conn.close(CLOSE_UNAUTHENTICATED.into(), b"authentication failed");
                    Err(e)
                }
            }
        };
        tokio::time::timeout(self.limits.handshake_timeout, run)
            .await
            .unwrap_or(Err(NetError::Timeout {
                what: "the server's handshake and the proof of key",
            }))
    }
}
