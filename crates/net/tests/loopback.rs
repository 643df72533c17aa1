//! The transport over real QUIC on loopback (protocols/federation.md §2):
//! pinned certificates, client authentication and its refusals, bounded
//! frames and blobs, and a server that keeps serving after each bad peer.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fedveil_net::auth::{AuthMessage, MAX_AUTH_FRAME, channel_binding};
use fedveil_net::frame::{read_blob, read_frame, write_blob, write_frame};
use fedveil_net::identity::transcript;
use fedveil_net::{
    ClientIdentity, ClientKey, Limits, NetClient, NetError, NetServer, ServerIdentity,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const NAME: &str = "localhost";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Request {
    Text(String),
    Blob,
}

/// What the server task saw, in order.
#[derive(Debug)]
enum Seen {
    Authenticated(ClientKey),
    Refused(NetError),
    StreamError(NetError),
}

struct Harness {
    addr: SocketAddr,
    server: ServerIdentity,
    allowed: Vec<ClientIdentity>,
    seen: mpsc::UnboundedReceiver<Seen>,
    limits: Limits,
}

fn limits() -> Limits {
    Limits {
        max_frame: 1 << 20,
        max_blob: 32 << 20,
        handshake_timeout: Duration::from_millis(1500),
        idle_timeout: Duration::from_secs(10),
        max_handshakes: 64,
        max_violations: 64,
    }
}

/// Echoes requests on every stream the client opens.
async fn echo(conn: quinn::Connection, limits: Limits, seen: mpsc::UnboundedSender<Seen>) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let limits = limits.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let result = async {
                match read_frame::<Request>(&mut recv, limits.max_frame).await? {
                    Request::Text(t) => {
                        write_frame(&mut send, &Request::Text(t), limits.max_frame).await?;
                    }
                    Request::Blob => {
                        let b = read_blob(&mut recv, limits.max_blob).await?;
                        write_blob(&mut send, &b, limits.max_blob).await?;
                    }
                }
                send.finish()
                    .map_err(|e| NetError::Connection(e.to_string()))
            }
            .await;
            if let Err(e) = result {
                let _ = seen.send(Seen::StreamError(e));
            }
        });
    }
}

async fn start(allowed: usize) -> Harness {
    let server = ServerIdentity::generate(&[NAME.to_string()]).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let allowed: Vec<ClientIdentity> = (0..allowed)
        .map(|_| ClientIdentity::generate(&mut rng))
        .collect();
    let limits = limits();
    let net = NetServer::bind(
        (Ipv4Addr::LOCALHOST, 0).into(),
        &server,
        allowed.iter().map(|c| c.public()),
        limits.clone(),
    )
    .unwrap();
    let addr = net.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    let serve_limits = limits.clone();
    tokio::spawn(async move {
        while let Some(pending) = net.accept().await {
            let tx = tx.clone();
            let limits = serve_limits.clone();
            tokio::spawn(async move {
                match pending.authenticate().await {
                    Ok(a) => {
                        let _ = tx.send(Seen::Authenticated(a.key));
                        echo(a.connection, limits, tx).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Seen::Refused(e));
                    }
                }
            });
        }
    });
    Harness {
        addr,
        server,
        allowed,
        seen,
        limits,
    }
}

impl Harness {
    /// A copy of allowed identity `i`.
    fn identity(&self, i: usize) -> ClientIdentity {
        ClientIdentity::from_seed(&self.allowed[i].seed())
    }

    fn client(&self) -> NetClient {
        NetClient::new(self.addr, self.server.fingerprint(), self.limits.clone()).unwrap()
    }

    async fn next(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), self.seen.recv())
            .await
            .expect("the server reported nothing within 10 s")
            .expect("server task ended")
    }

    /// An honest client authenticates and gets an echo: the server is still
    /// serving.
    async fn still_serving(&mut self, which: usize) {
        let conn = self
            .client()
            .connect(self.addr, NAME, &self.allowed[which])
            .await
            .unwrap();
        assert!(
            matches!(self.next().await, Seen::Authenticated(k) if k == self.allowed[which].public())
        );
        let (mut send, mut recv) = conn.connection.open_bi().await.unwrap();
        let msg = Request::Text(format!("hello from {which}"));
        write_frame(&mut send, &msg, 1024).await.unwrap();
        send.finish().unwrap();
        assert_eq!(read_frame::<Request>(&mut recv, 1024).await.unwrap(), msg);
    }
}

/// Opens the authentication stream by hand and returns it with the nonce.
async fn begin(
    conn: &quinn::Connection,
    key: ClientKey,
) -> (quinn::SendStream, quinn::RecvStream, [u8; 32]) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &AuthMessage::Begin { key }, MAX_AUTH_FRAME)
        .await
        .unwrap();
    match read_frame::<AuthMessage>(&mut recv, MAX_AUTH_FRAME)
        .await
        .unwrap()
    {
        AuthMessage::Challenge { nonce } => (send, recv, nonce),
        other => panic!("expected a challenge, got {other:?}"),
    }
}

/// Sends `signature` as the proof and returns the server's verdict.
async fn prove(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    signature: [u8; 64],
) -> AuthMessage {
    write_frame(send, &AuthMessage::Proof { signature }, MAX_AUTH_FRAME)
        .await
        .unwrap();
    read_frame::<AuthMessage>(recv, MAX_AUTH_FRAME)
        .await
        .unwrap()
}

// §2.2: an allowed client proves its key; frames and a 16 MiB blob echo back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_client_exchanges_frames_and_a_16_mib_blob() {
    let mut h = start(2).await;
    h.still_serving(0).await;
    let conn = h
        .client()
        .connect(h.addr, NAME, &h.allowed[1])
        .await
        .unwrap();
    assert_eq!(conn.key, h.allowed[1].public());
    assert!(matches!(h.next().await, Seen::Authenticated(k) if k == h.allowed[1].public()));
    let blob: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (mut send, mut recv) = conn.connection.open_bi().await.unwrap();
    write_frame(&mut send, &Request::Blob, 1024).await.unwrap();
    write_blob(&mut send, &blob, h.limits.max_blob)
        .await
        .unwrap();
    send.finish().unwrap();
    let back = read_blob(&mut recv, h.limits.max_blob).await.unwrap();
    assert!(back == blob, "the blob came back altered");
}

// §2.2: a key not on the allow-list is refused before any protocol state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_client_is_refused_and_the_server_keeps_serving() {
    let mut h = start(1).await;
    let stranger = ClientIdentity::generate(&mut ChaCha20Rng::seed_from_u64(99));
    let err = h
        .client()
        .connect(h.addr, NAME, &stranger)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NetError::Refused(r) if r.contains("not allowed")),
        "{err}"
    );
    match h.next().await {
        Seen::Refused(NetError::NotAllowed { key }) => assert_eq!(key, stranger.public()),
        other => panic!("expected NotAllowed, got {other:?}"),
    }
    h.still_serving(0).await;
}

// §2.1: a client that pins another certificate does not complete the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificate_fingerprint_is_refused() {
    let mut h = start(1).await;
    let impostor = ServerIdentity::generate(&[NAME.to_string()]).unwrap();
    let client = NetClient::new(h.addr, impostor.fingerprint(), h.limits.clone()).unwrap();
    let err = client
        .connect(h.addr, NAME, &h.allowed[0])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NetError::Connect(m) if m.to_lowercase().contains("certificate")),
        "{err}"
    );
    assert!(matches!(
        h.next().await,
        Seen::Refused(NetError::Connect(_))
    ));
    h.still_serving(0).await;
}

// §2.2: a proof recorded on one connection is worthless on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_proof_is_refused() {
    let mut h = start(1).await;
    let me = h.identity(0);
    let first = h.client().connect_tls_only(h.addr, NAME).await.unwrap();
    let (mut send, mut recv, nonce) = begin(&first, me.public()).await;
    let proof = me.sign(&transcript(
        &nonce,
        &channel_binding(&first, &nonce).unwrap(),
        &me.public(),
    ));
    assert_eq!(
        prove(&mut send, &mut recv, proof).await,
        AuthMessage::Accepted
    );
    assert!(matches!(h.next().await, Seen::Authenticated(_)));

    let second = h.client().connect_tls_only(h.addr, NAME).await.unwrap();
    let (mut send, mut recv, nonce2) = begin(&second, me.public()).await;
    assert_ne!(nonce, nonce2, "the server reused a challenge");
    let verdict = prove(&mut send, &mut recv, proof).await;
    assert!(
        matches!(&verdict, AuthMessage::Refused { reason } if reason.contains("bad proof")),
        "{verdict:?}"
    );
    assert!(matches!(
        h.next().await,
        Seen::Refused(NetError::Unauthenticated(_))
    ));
    h.still_serving(0).await;
}

// §2.2: a relay that has the victim sign the server's nonce over the relay's
// own connection gets a signature bound to the wrong TLS session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_proof_is_refused() {
    let mut h = start(1).await;
    let victim = h.identity(0);
    let relay = h.client().connect_tls_only(h.addr, NAME).await.unwrap();
    let (mut send, mut recv, nonce) = begin(&relay, victim.public()).await;
    // The victim's own connection (to the relay, in a real attack): a
    // different TLS session, so a different channel binding.
    let victims_connection = h.client().connect_tls_only(h.addr, NAME).await.unwrap();
    let binding = channel_binding(&victims_connection, &nonce).unwrap();
    assert_ne!(binding, channel_binding(&relay, &nonce).unwrap());
    let signature = victim.sign(&transcript(&nonce, &binding, &victim.public()));
    let verdict = prove(&mut send, &mut recv, signature).await;
    assert!(
        matches!(verdict, AuthMessage::Refused { .. }),
        "{verdict:?}"
    );
    assert!(matches!(
        h.next().await,
        Seen::Refused(NetError::Unauthenticated(_))
    ));
    h.still_serving(0).await;
}

// §2.2: naming an allowed key but signing with another is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_by_another_key_is_refused() {
    let mut h = start(2).await;
    let (claimed, signer) = (h.identity(0), h.identity(1));
    let conn = h.client().connect_tls_only(h.addr, NAME).await.unwrap();
    let (mut send, mut recv, nonce) = begin(&conn, claimed.public()).await;
    let binding = channel_binding(&conn, &nonce).unwrap();
    let signature = signer.sign(&transcript(&nonce, &binding, &claimed.public()));
    assert!(matches!(
        prove(&mut send, &mut recv, signature).await,
        AuthMessage::Refused { .. }
    ));
    assert!(matches!(
        h.next().await,
        Seen::Refused(NetError::Unauthenticated(_))
    ));
    h.still_serving(1).await;
}

// §2.2: a client that completes TLS and then says nothing is cut off at the
// handshake deadline, and holds nothing up meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_times_out_without_holding_up_others() {
    let mut h = start(1).await;
    let t = Instant::now();
    let _silent = h.client().connect_tls_only(h.addr, NAME).await.unwrap();
    h.still_serving(0).await;
    match h.next().await {
        Seen::Refused(NetError::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    let waited = t.elapsed();
    assert!(
        waited >= h.limits.handshake_timeout,
        "cut off after {waited:?}"
    );
}

// §2.3: a frame header over the limit is refused before anything is read
// or allocated, a malformed frame is refused, and either way the server
// goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_frames_get_clear_errors() {
    let mut h = start(1).await;
    let conn = h
        .client()
        .connect(h.addr, NAME, &h.allowed[0])
        .await
        .unwrap();
    assert!(matches!(h.next().await, Seen::Authenticated(_)));

    // A 4 GiB frame header.
    let (mut send, _recv) = conn.connection.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    match h.next().await {
        Seen::StreamError(NetError::FrameTooLarge { len, max }) => {
            assert_eq!((len, max), (u64::from(u32::MAX), h.limits.max_frame as u64));
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }

    // A frame that is not a Request.
    let (mut send, _recv) = conn.connection.open_bi().await.unwrap();
    send.write_all(&3u32.to_be_bytes()).await.unwrap();
    send.write_all(&[0x7f, 0xff, 0xff]).await.unwrap();
    send.finish().unwrap();
    assert!(matches!(
        h.next().await,
        Seen::StreamError(NetError::Malformed(_))
    ));

    // A valid Request with trailing bytes.
    let mut bytes = postcard::to_stdvec(&Request::Text("x".into())).unwrap();
    bytes.extend_from_slice(&[1, 2, 3]);
    let (mut send, _recv) = conn.connection.open_bi().await.unwrap();
    send.write_all(&(bytes.len() as u32).to_be_bytes())
        .await
        .unwrap();
    send.write_all(&bytes).await.unwrap();
    send.finish().unwrap();
    assert!(
        matches!(h.next().await, Seen::StreamError(NetError::Malformed(m)) if m.contains("trailing"))
    );

    // A blob header of 1 TiB.
    let (mut send, _recv) = conn.connection.open_bi().await.unwrap();
    write_frame(&mut send, &Request::Blob, 1024).await.unwrap();
    send.write_all(&(1u64 << 40).to_be_bytes()).await.unwrap();
    match h.next().await {
        Seen::StreamError(NetError::FrameTooLarge { len, .. }) => assert_eq!(len, 1 << 40),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }

    // A frame that ends early.
    let (mut send, _recv) = conn.connection.open_bi().await.unwrap();
    send.write_all(&100u32.to_be_bytes()).await.unwrap();
    send.write_all(&[0; 10]).await.unwrap();
    send.finish().unwrap();
    assert!(matches!(
        h.next().await,
        Seen::StreamError(NetError::Closed)
    ));

    // The same connection, and others, still work.
    let (mut send, mut recv) = conn.connection.open_bi().await.unwrap();
    write_frame(&mut send, &Request::Text("still here".into()), 1024)
        .await
        .unwrap();
    send.finish().unwrap();
    assert_eq!(
        read_frame::<Request>(&mut recv, 1024).await.unwrap(),
        Request::Text("still here".into())
    );
    h.still_serving(0).await;
}

// §2.3: the writer refuses to send what the reader would refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_refuses_frames_over_its_limit() {
    let mut h = start(1).await;
    let conn = h
        .client()
        .connect(h.addr, NAME, &h.allowed[0])
        .await
        .unwrap();
    assert!(matches!(h.next().await, Seen::Authenticated(_)));
    let (mut send, _recv) = conn.connection.open_bi().await.unwrap();
    let big = Request::Text("x".repeat(2000));
    assert!(matches!(
        write_frame(&mut send, &big, 1024).await,
        Err(NetError::FrameTooLarge { max: 1024, .. })
    ));
    assert!(matches!(
        write_blob(&mut send, &[0u8; 2048], 1024).await,
        Err(NetError::FrameTooLarge {
            len: 2048,
            max: 1024
        })
    ));
}
