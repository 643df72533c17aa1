//! Hostile peers against the real transport over loopback QUIC, for
//! `fedveil audit` (protocols/federation.md §2): a client that is not on
//! the allow-list, and an authenticated client that sends a frame header
//! announcing 4 GiB. Each must be refused with a clear error before any
//! protocol state or large buffer exists, and an honest client connecting
//! afterwards must still be served.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand_core::OsRng;
use serde::Serialize;
use tokio::sync::mpsc;

use fedveil_fed::net::frame::{read_frame, write_frame};
use fedveil_fed::net::{ClientIdentity, Limits, NetClient, NetError, NetServer, ServerIdentity};

const NAME: &str = "localhost";

/// What a hostile peer achieved against the server.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetFinding {
    /// The server's errors about the hostile peer, in order.
    pub refused: Vec<String>,
    /// Whether the hostile peer got anything served.
    pub attacker_served: bool,
    /// Whether an honest client connecting afterwards was authenticated
    /// and had a frame echoed.
    pub honest_served: bool,
}

impl NetFinding {
    pub fn held(&self) -> bool {
        !self.refused.is_empty() && !self.attacker_served && self.honest_served
    }

    pub fn evidence(&self) -> String {
        format!(
            "server: {}; the attacker was served: {}; an honest client afterwards was served: {}",
            if self.refused.is_empty() {
                "no error".to_string()
            } else {
                self.refused.join("; ")
            },
            self.attacker_served,
            self.honest_served
        )
    }
}

/// A server that echoes one frame per stream for authenticated clients
/// and reports every refusal and stream error.
struct EchoServer {
    addr: SocketAddr,
    server: ServerIdentity,
    honest: ClientIdentity,
    /// An allowed client that turns hostile.
    insider: ClientIdentity,
    limits: Limits,
    errors: mpsc::UnboundedReceiver<String>,
    net: std::sync::Arc<NetServer>,
}

impl EchoServer {
    fn start() -> Result<EchoServer, NetError> {
        let server = ServerIdentity::generate(&[NAME.to_string()])?;
        let honest = ClientIdentity::generate(&mut OsRng);
        let insider = ClientIdentity::generate(&mut OsRng);
        let limits = Limits {
            max_frame: 1 << 16,
            max_blob: 1 << 20,
            handshake_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(10),
            max_handshakes: 64,
            max_violations: 64,
        };
        let net = std::sync::Arc::new(NetServer::bind(
            (Ipv4Addr::LOCALHOST, 0).into(),
            &server,
            [honest.public(), insider.public()],
            limits.clone(),
        )?);
        let addr = net.local_addr()?;
        let (tx, errors) = mpsc::unbounded_channel();
        let serving = std::sync::Arc::clone(&net);
        let max = limits.max_frame;
        tokio::spawn(async move {
            while let Some(pending) = serving.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let conn = match pending.authenticate().await {
                        Ok(a) => a.connection,
                        Err(e) => {
                            let _ = tx.send(format!("refused: {e}"));
                            return;
                        }
                    };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let echoed = async {
                                let text: String = read_frame(&mut recv, max).await?;
                                write_frame(&mut send, &text, max).await?;
                                send.finish()
                                    .map_err(|e| NetError::Connection(e.to_string()))
                            };
                            if let Err(e) = echoed.await {
                                let _ = tx.send(format!("stream: {e}"));
                            }
                        });
                    }
                });
            }
        });
        Ok(EchoServer {
            addr,
            server,
            honest,
            insider,
            limits,
            errors,
            net,
        })
    }

    fn client(&self) -> Result<NetClient, NetError> {
        NetClient::new(self.addr, self.server.fingerprint(), self.limits.clone())
    }

    /// Sends a frame as `identity` and returns whether it came back.
    async fn echo(&self, identity: &ClientIdentity) -> bool {
        let Ok(client) = self.client() else {
            return false;
        };
        let Ok(conn) = client.connect(self.addr, NAME, identity).await else {
            return false;
        };
        let run = async {
            let (mut send, mut recv) = conn.connection.open_bi().await.ok()?;
            write_frame(&mut send, &"ping".to_string(), 1024)
                .await
                .ok()?;
            send.finish().ok()?;
            read_frame::<String>(&mut recv, 1024).await.ok()
        };
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s == "ping")
    }

    /// What the attack achieved: the server's errors within `wait`, and
    /// whether an honest client connecting afterwards is still served.
    async fn finding(&mut self, attacker_served: bool, wait: Duration) -> NetFinding {
        let refused = self.drain(wait).await;
        let honest = ClientIdentity::from_seed(&self.honest.seed());
        let honest_served = self.echo(&honest).await;
        NetFinding {
            refused,
            attacker_served,
            honest_served,
        }
    }

    /// The errors the server reported within `wait`.
    async fn drain(&mut self, wait: Duration) -> Vec<String> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, self.errors.recv()).await {
            out.push(e);
        }
        out
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.net.close();
    }
}

/// §2.2: a client whose key is not on the allow-list connects (the TLS
/// handshake succeeds, its certificate pin is right) and proves its own
/// key. It must be refused before any protocol state is created.
pub async fn unauthenticated_client() -> Result<NetFinding, NetError> {
    let mut h = EchoServer::start()?;
    let stranger = ClientIdentity::generate(&mut OsRng);
    let attacker_served = h.echo(&stranger).await;
    Ok(h.finding(attacker_served, Duration::from_secs(2)).await)
}

/// §2.3: an authenticated client announces a 4 GiB frame. The server must
/// refuse it from the header alone, without allocating, and keep serving.
pub async fn oversized_frame() -> Result<NetFinding, NetError> {
    let mut h = EchoServer::start()?;
    let insider = ClientIdentity::from_seed(&h.insider.seed());
    let conn = h.client()?.connect(h.addr, NAME, &insider).await?;
    let (mut send, mut recv) = conn
        .connection
        .open_bi()
        .await
        .map_err(|e| NetError::Connection(e.to_string()))?;
    send.write_all(&u32::MAX.to_be_bytes())
        .await
        .map_err(|e| NetError::Connection(e.to_string()))?;
    let _ = send.finish();
    let answer = tokio::time::timeout(Duration::from_secs(3), recv.read_to_end(1 << 20)).await;
    let attacker_served = matches!(answer, Ok(Ok(ref b)) if !b.is_empty());
    Ok(h.finding(attacker_served, Duration::from_secs(1)).await)
}

/// The transport's claims, each against its attack.
pub async fn claims() -> crate::Result<Vec<crate::Claim>> {
    let cases = [
        (
            "network.unauthenticated_client",
            "federation.md §2.2",
            "A client whose key is not on the server's allow-list is refused before any \
             protocol state exists, and the server keeps serving.",
            "A client with the right certificate pin but an unknown key connects over QUIC, \
             proves its own key and sends a frame; an allowed client connects afterwards.",
            unauthenticated_client().await,
        ),
        (
            "network.oversized_frame",
            "federation.md §2.3",
            "A frame over the size limit is refused from its header, before anything is \
             allocated, and the server keeps serving.",
            "An authenticated client opens a stream and announces a 4 GiB frame; another \
             client connects afterwards.",
            oversized_frame().await,
        ),
    ];
    let mut claims = Vec::new();
    for (id, section, claim, attack, finding) in cases {
        let finding =
            finding.map_err(|e| crate::AuditError::Harness(format!("the {id} case: {e}")))?;
        claims.push(crate::Claim::new(
            id,
            section,
            claim,
            attack,
            finding.held(),
            finding.evidence(),
            &finding,
        )?);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_peers_are_refused_and_honest_ones_served() {
        let f = unauthenticated_client().await.unwrap();
        assert!(f.held(), "{f:?}");
        assert!(f.refused[0].contains("refused"), "{f:?}");
        let f = oversized_frame().await.unwrap();
        assert!(f.held(), "{f:?}");
        assert!(f.refused.iter().any(|e| e.contains("4294967295")), "{f:?}");
    }
}
