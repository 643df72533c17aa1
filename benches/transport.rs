//! Loopback throughput of one 16 MiB update: fedveil's QUIC transport
//! (authenticated connection, one stream, `write_blob`/`read_blob`) against
//! raw TCP (length prefix and bytes over a `tokio` socket), side by side in
//! one run.
//!
//!     cargo bench --bench transport
//!
//! Each iteration sends the update and waits for the receiver's one-byte
//! acknowledgement after it holds the whole vector, like a client sending its
//! masked input to the server.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fedveil_net::frame::{read_blob, write_blob};
use fedveil_net::{ClientIdentity, Limits, NetClient, NetServer, ServerIdentity};
use rand_core::OsRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BYTES: usize = 16 << 20;

fn update() -> Vec<u8> {
    (0..BYTES as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

/// An authenticated QUIC connection to a server that reads a blob per
/// stream and answers one byte.
fn quic(rt: &Runtime) -> fedveil_net::quinn::Connection {
    rt.block_on(async {
        let server = ServerIdentity::generate(&["localhost".to_string()]).unwrap();
        let client = ClientIdentity::generate(&mut OsRng);
        let limits = Limits::default();
        let net = NetServer::bind(
            (Ipv4Addr::LOCALHOST, 0).into(),
            &server,
            [client.public()],
            limits.clone(),
        )
        .unwrap();
        let addr = net.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(p) = net.accept().await {
                let a = p.authenticate().await.unwrap();
                while let Ok((mut send, mut recv)) = a.connection.accept_bi().await {
                    let got = read_blob(&mut recv, BYTES).await.unwrap();
                    assert_eq!(got.len(), BYTES);
                    send.write_all(&[1]).await.unwrap();
                    send.finish().unwrap();
                }
            }
        });
        let c = NetClient::new(addr, server.fingerprint(), limits).unwrap();
        c.connect(addr, "localhost", &client)
            .await
            .unwrap()
            .connection
    })
}

async fn quic_send(conn: &fedveil_net::quinn::Connection, data: &[u8]) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_blob(&mut send, data, BYTES).await.unwrap();
    send.finish().unwrap();
    let mut ack = [0u8; 1];
    recv.read_exact(&mut ack).await.unwrap();
}

/// A TCP connection to a server that reads a length-prefixed vector and
/// answers one byte.
fn tcp(rt: &Runtime) -> tokio::net::TcpStream {
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            loop {
                let mut len = [0u8; 8];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let n = u64::from_be_bytes(len) as usize;
                assert!(n <= BYTES);
                let mut buf = vec![0u8; n];
                s.read_exact(&mut buf).await.unwrap();
                s.write_all(&[1]).await.unwrap();
            }
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    })
}

async fn tcp_send(s: &mut tokio::net::TcpStream, data: &[u8]) {
    s.write_all(&(data.len() as u64).to_be_bytes())
        .await
        .unwrap();
    s.write_all(data).await.unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.unwrap();
}

fn loopback(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let data = update();
    let conn = quic(&rt);
    let mut stream = tcp(&rt);
    let mut g = c.benchmark_group("loopback_16MiB");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(10));
    // Interleaved in one run: QUIC, then TCP, each over its warm connection.
    g.bench_function("quic", |b| b.iter(|| rt.block_on(quic_send(&conn, &data))));
    g.bench_function("tcp", |b| {
        b.iter(|| rt.block_on(tcp_send(&mut stream, &data)))
    });
    g.finish();
}

criterion_group!(benches, loopback);
criterion_main!(benches);
