//! What an unauthenticated or hostile peer can make the server hold
//! (protocols/federation.md §2.2, §2.3; issue 17, finding 10): a declared
//! frame length costs nothing until its bytes arrive, and handshakes in
//! progress are bounded in number.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fedveil_net::frame::read_frame;
use fedveil_net::{ClientIdentity, Limits, NetClient, NetError, NetServer, ServerIdentity};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// The system allocator, recording the largest single allocation.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

const NAME: &str = "localhost";

fn limits(max_handshakes: usize) -> Limits {
    Limits {
        max_frame: 16 << 20,
        max_blob: 32 << 20,
        handshake_timeout: Duration::from_millis(1500),
        idle_timeout: Duration::from_secs(10),
        max_handshakes,
        max_violations: 64,
    }
}

// §2.3: a peer declares a 15 MiB frame and sends 100 bytes of it. The
// reader has allocated a few KiB, not 15 MiB; when the stream ends the read
// fails cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_frame_length_costs_nothing_until_its_bytes_arrive() {
    let server = ServerIdentity::generate(&[NAME.to_string()]).unwrap();
    let client = ClientIdentity::generate(&mut ChaCha20Rng::seed_from_u64(1));
    let lim = limits(64);
    let net = NetServer::bind(
        (Ipv4Addr::LOCALHOST, 0).into(),
        &server,
        [client.public()],
        lim.clone(),
    )
    .unwrap();
    let addr = net.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (read_tx, read_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let pending = net.accept().await.unwrap();
        let auth = pending.authenticate().await.unwrap();
        let (_send, mut recv) = auth.connection.accept_bi().await.unwrap();
        // The first byte of the header is in: the server is reading.
        let _ = tx.send(());
        let r = read_frame::<Vec<u8>>(&mut recv, 16 << 20).await;
        let _ = read_tx.send(r);
        drop(net);
    });
    let endpoint = NetClient::new(addr, server.fingerprint(), lim).unwrap();
    let conn = endpoint
        .connect(addr, NAME, &client)
        .await
        .unwrap()
        .connection;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    LARGEST.store(0, Ordering::Relaxed);
    send.write_all(&(15u32 << 20).to_be_bytes()).await.unwrap();
    send.write_all(&[0u8; 100]).await.unwrap();
    rx.recv().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < 4 << 20,
        "the reader allocated {largest} bytes for a frame whose 100 bytes arrived"
    );
    send.finish().unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), read_rx)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(NetError::Closed)), "{r:?}");
}

// §2.2: with two handshakes already in progress (peers that completed TLS
// and never prove a key), a third attempt is refused at once, even from an
// allowed client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_bounded() {
    let server = ServerIdentity::generate(&[NAME.to_string()]).unwrap();
    let client = ClientIdentity::generate(&mut ChaCha20Rng::seed_from_u64(2));
    let lim = limits(2);
    let net = std::sync::Arc::new(
        NetServer::bind(
            (Ipv4Addr::LOCALHOST, 0).into(),
            &server,
            [client.public()],
            lim.clone(),
        )
        .unwrap(),
    );
    let addr = net.local_addr().unwrap();
    let serving = std::sync::Arc::clone(&net);
    tokio::spawn(async move {
        while let Some(pending) = serving.accept().await {
            tokio::spawn(async move {
                let _ = pending.authenticate().await;
            });
        }
    });
    let endpoint = NetClient::new(addr, server.fingerprint(), lim).unwrap();
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(endpoint.connect_tls_only(addr, NAME).await.unwrap());
    }
    // Refused by the server: the attempt fails (as a refused connect or a
    // connection lost during it, depending on timing) and is counted.
    let err = endpoint.connect(addr, NAME, &client).await.unwrap_err();
    assert!(
        matches!(err, NetError::Connect(_) | NetError::Connection(_)),
        "{err}"
    );
    assert!(net.refused_handshakes() >= 1);
    // That the place is freed again once the silent peers time out is
    // checked apart, in the test below.
    drop(silent);
}

// §2.2: once the silent handshakes time out, an allowed client gets in
// again. The server keeps what it authenticated (dropping a connection
// closes it, and the client would see "connection lost" right after its
// proof was accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_gets_in_once_the_silent_handshakes_time_out() {
    let server = ServerIdentity::generate(&[NAME.to_string()]).unwrap();
    let client = ClientIdentity::generate(&mut ChaCha20Rng::seed_from_u64(3));
    let lim = limits(2);
    let net = std::sync::Arc::new(
        NetServer::bind(
            (Ipv4Addr::LOCALHOST, 0).into(),
            &server,
            [client.public()],
            lim.clone(),
        )
        .unwrap(),
    );
    let addr = net.local_addr().unwrap();
    let serving = std::sync::Arc::clone(&net);
    let (tx, mut results) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(pending) = serving.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(pending.authenticate().await);
            });
        }
    });
    let endpoint = NetClient::new(addr, server.fingerprint(), lim).unwrap();
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(endpoint.connect_tls_only(addr, NAME).await.unwrap());
    }
    assert!(endpoint.connect(addr, NAME, &client).await.is_err());
    assert_eq!(net.refused_handshakes(), 1);
    // Both silent peers time out on the server (1.5 s), freeing their places.
    let mut kept = Vec::new();
    for _ in 0..2 {
        let r = tokio::time::timeout(Duration::from_secs(5), results.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(r, Err(NetError::Timeout { .. })),
            "{:?}",
            r.map(|a| a.key)
        );
    }
    let ok = endpoint.connect(addr, NAME, &client).await;
    assert!(ok.is_ok(), "{:?}", ok.err());
    let served = results.recv().await.unwrap();
    assert_eq!(served.unwrap().key, client.public());
    kept.push(ok);
    assert_eq!(net.refused_handshakes(), 1);
    drop(silent);
}
