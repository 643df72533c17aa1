//! Load: one `fedveil server` process against a swarm of clients in this
//! process, all over loopback QUIC, with SecAgg+ and distributed DP.
//!
//!     cargo bench --bench load                      # 1,000 clients, d = 10,000, 2 rounds
//!     cargo bench --bench load -- --clients 200 --dim 50000 --rounds 3
//!
//! The server runs as its own process so that its peak resident memory
//! (VmHWM, which it writes into every metrics line) is its own; the clients
//! share one UDP socket here. Prints per-round stage times and the server's
//! peak memory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedveil_fed::in_process::{Swarm, spawn_swarm};
use fedveil_fed::net::{ClientIdentity, Limits, ServerIdentity};
use fedveil_fed::randomness::Randomness;
use fedveil_fed::trainer::Trainer;
use fedveil_task::synthetic::{SyntheticConfig, SyntheticTrainer};
use rand_core::OsRng;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    clients: u32,
    dim: usize,
    rounds: u32,
    degree: u32,
    threshold: u32,
}

fn args() -> Args {
    let mut a = Args {
        clients: 1000,
        dim: 10_000,
        rounds: 2,
        // The parameter finder's choice for n = 1,000 (secagg-plus.md §4).
        degree: 30,
        threshold: 17,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = || {
            argv.get(i + 1)
                .unwrap_or_else(|| panic!("{} needs a value", argv[i]))
                .clone()
        };
        match argv[i].as_str() {
            "--clients" => a.clients = value().parse().expect("--clients N"),
            "--dim" => a.dim = value().parse().expect("--dim D"),
            "--rounds" => a.rounds = value().parse().expect("--rounds R"),
            "--degree" => a.degree = value().parse().expect("--degree K"),
            "--threshold" => a.threshold = value().parse().expect("--threshold T"),
            // cargo bench passes --bench; criterion-style filters are ignored.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a.degree = a.degree.min(a.clients - 1);
    a.threshold = a.threshold.min(a.degree);
    a
}

fn vm_hwm() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn task(a: &Args) -> String {
    format!(
        "[task]\nkind = \"synthetic\"\ndim = {}\nsamples_per_client = 16\nnoise = 0.1\n\
         heterogeneity = 0.5\nseed = 1\n",
        a.dim
    )
}

fn server_config(a: &Args, dir: &Path, port: u16) -> PathBuf {
    let min = a.clients - a.clients / 10;
    let text = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
certificate = "server/cert.pem"
key = "server/key.pem"
allow_list = "allow.txt"
handshake_timeout = 60
idle_timeout = 120

[federation]
rounds = {rounds}
cohort_size = {n}
wait_s = 600
metrics = "metrics.jsonl"
checkpoint_dir = "checkpoint"

[training]
local_steps = 2
batch_size = 16
learning_rate = 0.05

[secagg]
degree = {k}
threshold = {t}

[dp]
placement = "distributed"
clip = 1.0
noise_multiplier = 1.0
min_survivors = {min}

[deadlines]
train = 600
share = 600
masked = 600
consistency = 600
unmask = 600

{task}"#,
        rounds = a.rounds,
        n = a.clients,
        k = a.degree,
        t = a.threshold,
        task = task(a),
    );
    let path = dir.join("server.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn main() {
    let a = args();
    let dir = std::env::temp_dir().join(format!("fedveil-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = ServerIdentity::generate(&["localhost".to_string()]).unwrap();
    std::fs::create_dir_all(dir.join("server")).unwrap();
    server.save(&dir.join("server")).unwrap();
    let ids: Vec<ClientIdentity> = (0..a.clients)
        .map(|_| ClientIdentity::generate(&mut OsRng))
        .collect();
    let mut allow = std::fs::File::create(dir.join("allow.txt")).unwrap();
    for id in &ids {
        writeln!(allow, "{}", id.public()).unwrap();
    }
    drop(allow);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = server_config(&a, &dir, port);
    eprintln!(
        "load: {} clients, d = {}, k = {}, t = {}, {} rounds, distributed DP; scratch {}",
        a.clients,
        a.dim,
        a.degree,
        a.threshold,
        a.rounds,
        dir.display()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedveil"))
        .args(["server", "--quiet", "--json", "--config"])
        .arg(&config)
        .env("FEDVEIL_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fedveil server");

    let cfg: SyntheticConfig = SyntheticConfig::from_table(&toml_table(&task(&a))).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let outcomes = rt.block_on(async {
        let tasks = spawn_swarm(Swarm {
            server: ([127, 0, 0, 1], port).into(),
            server_name: "localhost".into(),
            pin: server.fingerprint(),
            limits: Limits {
                handshake_timeout: Duration::from_secs(60),
                idle_timeout: Duration::from_secs(120),
                ..Limits::default()
            },
            identities: ids,
            trainers: Box::new(move |i| {
                Ok(Box::new(SyntheticTrainer::new(&cfg, i)?) as Box<dyn Trainer>)
            }),
            randomness: Randomness::os(),
            events: None,
            give_up_after: Duration::from_secs(120),
            policy: fedveil_fed::config::Policy::trusting(),
            bundle_cache: None,
        })
        .unwrap();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let wall = started.elapsed();
    let status = child.wait().unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(status.success(), "the server failed ({status})");
    let failed = outcomes.iter().filter(|o| o.is_err()).count();
    if let Some(Err(e)) = outcomes.iter().find(|o| o.is_err()) {
        eprintln!("a client failed: {e}");
    }

    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    println!(
        "{:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10}",
        "round",
        "survived",
        "train s",
        "share s",
        "masked s",
        "consist",
        "unmask s",
        "aggr s",
        "total s",
        "srv MiB"
    );
    let mut peak = 0u64;
    for line in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let s = |k: &str| m["stage_seconds"][k].as_f64().unwrap_or(f64::NAN);
        let rss = m["server_peak_rss_bytes"].as_u64().unwrap_or(0);
        peak = peak.max(rss);
        println!(
            "{:>6} {:>9} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>10.1}",
            m["round"].as_u64().unwrap_or(0),
            format!("{}/{}", m["survivors"], m["cohort"]),
            s("train"),
            s("share"),
            s("masked"),
            s("consistency"),
            s("unmask"),
            s("aggregate"),
            s("total"),
            rss as f64 / (1 << 20) as f64
        );
    }
    println!(
        "server peak RSS {:.1} MiB; clients' process peak RSS {:.1} MiB; {} of {} clients \
         finished cleanly; wall {:.1} s (connections included)",
        peak as f64 / (1 << 20) as f64,
        vm_hwm().unwrap_or(0) as f64 / (1 << 20) as f64,
        outcomes.len() - failed,
        outcomes.len(),
        wall.as_secs_f64()
    );
    println!("server summary: {}", stdout.trim());
    let _ = std::fs::remove_dir_all(&dir);
}

fn toml_table(text: &str) -> toml::Table {
    let t: toml::Table = text.parse().unwrap();
    t["task"].as_table().unwrap().clone()
}
