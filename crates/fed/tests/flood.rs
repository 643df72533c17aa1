//! One authenticated client floods the server with a million small frames
//! that it refuses, and never reads a byte of what the server sends back
//! (issue 17, finding 3). The server's resident memory stays within 64 MiB
//! of where it was and the honest clients finish their rounds. Alone in its
//! test binary, so that the process's peak memory is this test's.

mod common;

use common::*;
use fedveil_fed::metrics::Event;
use fedveil_fed::randomness::Randomness;
use fedveil_fed::wire::{Up, VERSION};

/// The process's peak resident memory so far (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

const FRAMES: usize = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_refused_frames_from_a_client_that_never_reads_stay_bounded() {
    let plan = plan(
        r#"
[federation]
rounds = 3
cohort_size = 4
min_clients = 4
[deadlines]
train = 3
share = 3
masked = 3
consistency = 3
unmask = 3
[task]
kind = "synthetic"
dim = 12
"#,
    );
    let n = 5;
    let cast = Cast::new(n, 71);
    let randomness = Randomness::os();
    // No disconnection for violations: the bound must come from the queues.
    let mut lim = limits();
    lim.max_violations = u32::MAX;
    lim.idle_timeout = std::time::Duration::from_secs(60);
    let mut server = start_server_with(
        &cast,
        plan.clone(),
        loopback(),
        randomness.clone(),
        None,
        lim,
    )
    .await;
    let addr = server.addr;
    let honest: Vec<_> = (0..n - 1)
        .map(|i| {
            start_client(
                &cast,
                i,
                addr,
                &plan,
                randomness.clone(),
                None,
                None,
                ClientOptions::default(),
            )
        })
        .collect();
    let rogue = Rogue::connect(addr, &cast, n - 1).await;
    server
        .wait_for(30, |e| matches!(e, Event::RoundStarted { .. }))
        .await;
    let before = peak_rss();

    // A refused Hello, a million times, written in batches.
    let mut frame = Vec::new();
    let body = postcard_hello();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let batch: Vec<u8> = frame.repeat(10_000);
    let Rogue { conn, mut send, .. } = rogue;
    let flood_started = std::time::Instant::now();
    for _ in 0..FRAMES / 10_000 {
        send.write_all(&batch).await.unwrap();
    }
    send.finish().unwrap();
    // The server has read everything once it sees the stream end.
    let seen = server
        .wait_for(
            120,
            |e| matches!(e, Event::Disconnected { client, .. } if client.0 == n as u32),
        )
        .await;
    let after = peak_rss();
    eprintln!(
        "flood: {FRAMES} frames in {:.1} s; peak RSS {} -> {} MiB",
        flood_started.elapsed().as_secs_f64(),
        before >> 20,
        after >> 20
    );
    drop(conn);
    // It ended its stream: the server read every frame (the hub handles a
    // connection's messages in order, so all of them were refused first).
    assert!(
        matches!(&seen, Event::Disconnected { reason, .. } if reason.contains("closed its stream")),
        "{seen:?}"
    );
    let grew = after.saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "peak resident memory grew by {} MiB over the flood",
        grew >> 20
    );
    let (summary, _) = server.finish().await;
    assert_eq!(summary.rounds, 3);
    for c in join_clients(honest).await {
        assert_eq!(c.unwrap().rounds, 3);
    }
}

/// `Up::Hello` as the wire carries it.
fn postcard_hello() -> Vec<u8> {
    postcard::to_stdvec(&Up::Hello { version: VERSION }).unwrap()
}
