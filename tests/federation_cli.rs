//! `fedveil run`, `fedveil server` and `fedveil client` as separate
//! processes over loopback QUIC, with the shipped configs
//! (protocols/federation.md §4-§6).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Killed, fedveil, free_udp_port, keygen, spawn};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-fedcli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
        .display()
        .to_string()
}

fn metrics_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each metrics line is JSON"))
        .collect()
}

// §6: the shipped in-process config runs as it is (here shortened), prints
// a JSON summary with the documented keys, and writes one metrics line per
// round with loss, ε, bytes, stage times and dropouts.
#[test]
fn run_with_the_shipped_synthetic_config_writes_metrics_and_a_summary() {
    let dir = scratch("run");
    let metrics = dir.join("metrics.jsonl");
    let (code, out, err) = fedveil(&[
        "run",
        &config("synthetic.toml"),
        "--json",
        "--quiet",
        "--set",
        "federation.rounds=6",
        "--set",
        &format!("federation.checkpoint_dir={}", dir.join("ck").display()),
        "--metrics",
        metrics.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON summary");
    assert_eq!(summary["rounds"], 6);
    assert_eq!(summary["clients"], 50);
    assert_eq!(summary["clients_failed"], 0);
    let eps = summary["epsilon"].as_f64().unwrap();
    assert!(eps > 0.0 && eps < 8.0, "{summary}");
    assert!(summary["loss"].as_f64().unwrap() > 0.0);
    assert!(summary["eval"]["distance_to_optimum"].as_f64().is_some());
    assert!(summary["server_peak_rss_bytes"].as_u64().unwrap() > 0);

    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 6);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["round"], i as u64);
        assert_eq!(l["status"], "completed");
        assert!(l["loss"].as_f64().is_some());
        assert!(l["epsilon"].as_f64().unwrap() <= eps + 1e-12);
        assert!(l["bytes_sent"].as_u64().unwrap() > 0);
        assert!(l["bytes_received"].as_u64().unwrap() > 0);
        assert!(l["dropouts"].as_array().unwrap().is_empty());
        for stage in ["train", "share", "masked", "consistency", "unmask", "total"] {
            assert!(l["stage_seconds"][stage].as_f64().is_some(), "{stage}: {l}");
        }
    }

    // A second run resumes from the checkpoint: nothing left to train.
    let (code, out, err) = fedveil(&[
        "run",
        &config("synthetic.toml"),
        "--quiet",
        "--set",
        "federation.rounds=6",
        "--set",
        &format!("federation.checkpoint_dir={}", dir.join("ck").display()),
        "--metrics",
        metrics.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already holds all 6 rounds"), "{err}");
    assert!(out.contains("no round ran in this invocation"), "{out}");
    assert_eq!(metrics_lines(&metrics).len(), 6);
}

// §6: configs are checked before anything starts; the error names the key
// and the exit status is 2.
#[test]
fn bad_configs_are_refused_with_the_key_that_is_wrong() {
    let dir = scratch("bad");
    let cases: &[(&[&str], &str)] = &[
        (&["--set", "federation.rondus=3"], "rondus"),
        (
            &["--set", "secagg.degree=4", "--set", "secagg.threshold=5"],
            "threshold",
        ),
        (&["--set", "dp.clip=-1"], "dp.clip"),
        (&["--set", "task.kind=\"llama\""], "task.kind"),
        (&["--set", "task.shard=0"], "task.shard"),
        (&["--set", "run.clients=0"], "run.clients"),
        (&["--set", "federation.rounds"], "section.key=VALUE"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["run", "--quiet"];
        let cfg = config("synthetic.toml");
        args.push(&cfg);
        args.extend_from_slice(extra);
        let (code, _, err) = fedveil(&args);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(
            err.contains(needle),
            "{extra:?}: expected '{needle}' in: {err}"
        );
    }
    let missing = dir.join("nope.toml");
    let (code, _, err) = fedveil(&["run", missing.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("nope.toml"), "{err}");
    // A client config without a fingerprint, and a server without keys.
    let (code, _, err) = fedveil(&[
        "client",
        "--config",
        &config("client.toml"),
        "--set",
        "client.fingerprint=\"sha256:00\"",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("not both"), "{err}");
    let (code, _, err) = fedveil(&[
        "server",
        "--config",
        &config("server.toml"),
        "--set",
        &format!("server.certificate={}", dir.join("none.pem").display()),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("none.pem"), "{err}");
}

// §5.3, §5.4: a server process killed with SIGKILL mid-run restarts from
// its checkpoint, its client processes reconnect, and the federation
// completes every round with none lost (the bit-exact comparison with an
// uninterrupted run is crates/fed/tests/restart.rs).
#[test]
fn a_killed_server_process_restarts_from_its_checkpoint_and_its_clients_reconnect() {
    let dir = scratch("restart");
    let keys = dir.join("keys");
    keygen(&keys, 3);
    let allow = keys.join("allow.txt");
    let rounds = 300;
    let port = free_udp_port();
    let metrics = dir.join("metrics.jsonl");
    let server_args: Vec<String> = [
        "server".to_string(),
        "--quiet".into(),
        "--json".into(),
        "--config".into(),
        config("server.toml"),
        "--set".into(),
        format!("server.listen=127.0.0.1:{port}"),
        "--set".into(),
        format!(
            "server.certificate={}",
            keys.join("server/cert.pem").display()
        ),
        "--set".into(),
        format!("server.key={}", keys.join("server/key.pem").display()),
        "--set".into(),
        format!("server.allow_list={}", allow.display()),
        "--set".into(),
        format!("federation.rounds={rounds}"),
        "--set".into(),
        format!("federation.checkpoint_dir={}", dir.join("ck").display()),
        "--set".into(),
        format!("federation.metrics={}", metrics.display()),
        // Little privacy spent per round, so that the budget allows them all.
        "--set".into(),
        "dp.noise_multiplier=40".into(),
    ]
    .into();
    let mut server = spawn(&server_args, &dir.join("server-1.log"), &[]);
    let clients: Vec<Killed> = (0..3)
        .map(|i| {
            let args: Vec<String> = [
                "client".to_string(),
                "--config".into(),
                config("client.toml"),
                "--identity".into(),
                keys.join(format!("client-{i}.key")).display().to_string(),
                "--set".into(),
                format!("task.shard={i}"),
                "--set".into(),
                format!("client.server=127.0.0.1:{port}"),
                "--set".into(),
                "client.server_name=localhost".into(),
                "--set".into(),
                format!(
                    "client.fingerprint_file={}",
                    keys.join("server/fingerprint.txt").display()
                ),
                "--set".into(),
                "client.max_reconnect=0.5".into(),
                "--set".into(),
                "client.give_up_after=60".into(),
            ]
            .into();
            spawn(&args, &dir.join(format!("client-{i}.log")), &[])
        })
        .collect();

    // Kill the server once a few rounds are done.
    let start = Instant::now();
    while metrics_lines(&metrics).len() < 10 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no progress: {}",
            std::fs::read_to_string(dir.join("server-1.log")).unwrap_or_default()
        );
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("the server ended early ({status}) before it was killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    let before = metrics_lines(&metrics).len();
    assert!(before < rounds, "the run finished before the kill");

    let server = spawn(&server_args, &dir.join("server-2.log"), &[]);
    let out = server.wait_with_output_or_timeout(Duration::from_secs(120));
    let log = std::fs::read_to_string(dir.join("server-2.log")).unwrap_or_default();
    assert!(out.status.success(), "the restarted server failed: {log}");
    assert!(log.contains("resumed"), "{log}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(summary["rounds"], rounds as u64, "{summary}");

    // Every round completed exactly once or, if the kill fell between its
    // metrics line and its checkpoint, once more after the restart.
    let lines = metrics_lines(&metrics);
    let mut seen = vec![0u32; rounds];
    for l in &lines {
        seen[l["round"].as_u64().unwrap() as usize] += 1;
    }
    assert!(seen.iter().all(|&c| c >= 1), "a round is missing");
    assert!(
        seen.iter().filter(|&&c| c > 1).count() <= 1,
        "more than the one in-flight round was repeated"
    );

    for (i, mut c) in clients.into_iter().enumerate() {
        let status = c.wait_timeout(Duration::from_secs(30));
        let log = std::fs::read_to_string(dir.join(format!("client-{i}.log"))).unwrap();
        assert!(status.success(), "client {i}: {log}");
        // The restarted server keeps its predecessor's stateless-reset and
        // connection-id keys (§2.4), so the clients learn of the crash from
        // its first reply instead of waiting out the idle timeout.
        assert!(
            log.contains("connection lost: reset by peer"),
            "client {i} was not reset by the restarted server: {log}"
        );
    }
}
