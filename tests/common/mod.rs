//! Helpers shared by the command-line tests.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the `fedveil` binary; returns its exit status, stdout and stderr.
pub fn fedveil(args: &[&str]) -> (i32, String, String) {
    fedveil_env(args, &[])
}

/// [`fedveil`] with extra environment.
pub fn fedveil_env(args: &[&str], env: &[(&str, &Path)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedveil"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run fedveil");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `fedveil` process, killed if the test ends before it does.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Killed {
    /// Waits at most `limit` for the process to end.
    pub fn wait_timeout(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(start.elapsed() < limit, "the process did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits at most `limit`, then returns the status and stdout.
    pub fn wait_with_output_or_timeout(mut self, limit: Duration) -> std::process::Output {
        self.wait_timeout(limit);
        let mut stdout = Vec::new();
        if let Some(mut s) = self.0.stdout.take() {
            std::io::Read::read_to_end(&mut s, &mut stdout).unwrap();
        }
        let status = self.0.wait().unwrap();
        std::process::Output {
            status,
            stdout,
            stderr: Vec::new(),
        }
    }
}

/// Starts `fedveil` with logs at info level into `log`, stdout piped, and
/// extra environment.
pub fn spawn(args: &[String], log: &Path, env: &[(&str, &Path)]) -> Killed {
    let f = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedveil"));
    cmd.args(args)
        .env("FEDVEIL_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(f);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Killed(cmd.spawn().expect("spawn fedveil"))
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

/// `fedveil keygen` as an operator runs it: a server certificate in
/// `keys/server/` and `clients` identities `keys/client-<i>.key` listed in
/// `keys/allow.txt`.
pub fn keygen(keys: &Path, clients: usize) {
    let (code, _, err) = fedveil(&[
        "keygen",
        "server",
        "--dir",
        keys.join("server").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let allow = keys.join("allow.txt");
    for i in 0..clients {
        let out = keys.join(format!("client-{i}.key"));
        let (code, _, err) = fedveil(&[
            "keygen",
            "client",
            "--out",
            out.to_str().unwrap(),
            "--allow-list",
            allow.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
    }
}
