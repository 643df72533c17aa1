//! pass@k's sandbox against the escapes that got past the old
//! interpreter-level guard (issue 17, finding 1): `posix.system`,
//! `posix.fork`, `_socket`, `_posixsubprocess` (through a reloaded
//! `subprocess`), a `setsid` child that outlives its parent, writing outside
//! its directory, reading the repository, and a fork bomb. Each must fail,
//! and each failure is checked from outside the sandbox where it can be: the
//! files do not exist, the host's listener got no connection, no process of
//! the program is left. This machine (and CI) must provide the sandbox.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedveil_model::eval::{Limits, Verdict, run_python, sandbox_status};

/// Limits whose memory figure is unique to this test, so that the
/// program's processes can be found on the host by their command line.
fn limits(tag: u64) -> Limits {
    Limits {
        timeout: Duration::from_secs(4),
        memory_bytes: (256 << 20) + tag,
        cpu_seconds: 4,
        ..Limits::default()
    }
}

/// Host processes whose command line carries `tag`'s memory figure.
fn survivors(l: &Limits) -> Vec<String> {
    let needle = l.memory_bytes.to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("-I -S -B -c") && cmd.split(' ').any(|w| w == needle) {
            out.push(format!(
                "{}: {}",
                e.file_name().to_string_lossy(),
                &cmd[..cmd.len().min(60)]
            ));
        }
    }
    out
}

fn require_sandbox() {
    if let Err(why) = sandbox_status(Path::new("python3")) {
        panic!("this machine must provide pass@k's sandbox: {why}");
    }
}

fn outside(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fedveil-escape-{}-{name}", std::process::id()))
}

#[test]
fn every_escape_past_the_old_guard_fails_in_the_sandbox() {
    require_sandbox();
    let out = outside("escape");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    assert!(repo.exists());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let program = format!(
        r#"
import posix, sys, time
OUT = {out:?}
esc = []
# Lands in the sandbox's own /tmp, if anywhere: checked from outside.
try:
    open(OUT, "w").write("x")
except OSError:
    pass
try:
    posix.system("echo x > " + OUT + ".system; id > " + OUT + ".id")
except Exception:
    pass
try:
    open({repo:?}).read()
    esc.append("read the repository")
except OSError:
    pass
import _socket
try:
    _socket.socket(_socket.AF_INET, _socket.SOCK_RAW, 1)
    esc.append("opened a raw socket")
except OSError:
    pass
try:
    s = _socket.socket()
    s.settimeout(1)
    s.connect(("127.0.0.1", {port}))
    esc.append("connected to the host")
except OSError:
    pass
try:
    import importlib, subprocess
    importlib.reload(subprocess)
    subprocess.run(["/bin/sh", "-c", "echo x > " + OUT + ".spawn"])
except Exception:
    pass
pid = posix.fork()
if pid == 0:
    posix.setsid()
    while True:
        try:
            open(OUT + ".late", "w").write("x")
        except OSError:
            pass
        time.sleep(0.05)
time.sleep(0.3)
if esc:
    raise SystemExit("escaped: " + ", ".join(esc))
"#
    );
    let l = limits(101);
    let outcome = run_python(&program, &l).unwrap();
    assert_eq!(outcome, Verdict::Passed, "{outcome:?}");
    std::thread::sleep(Duration::from_millis(300));
    for suffix in ["", ".system", ".id", ".spawn", ".late"] {
        let p = PathBuf::from(format!("{}{suffix}", out.display()));
        assert!(!p.exists(), "{} was written", p.display());
    }
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the host's listener got a connection: {other:?}"),
    }
    let left = survivors(&l);
    assert!(left.is_empty(), "processes outlived the program: {left:?}");
}

#[test]
fn a_fork_bomb_is_stopped_and_nothing_outlives_it() {
    require_sandbox();
    let program = r#"
import posix, time
n = 0
try:
    for _ in range(100000):
        if posix.fork() == 0:
            time.sleep(60)
            posix._exit(0)
        n += 1
except OSError:
    pass
raise SystemExit("forked %d" % n)
"#;
    let l = limits(202);
    let outcome = run_python(program, &l).unwrap();
    let Verdict::Failed(why) = &outcome else {
        panic!("{outcome:?}")
    };
    let n: u64 = why
        .rsplit("forked ")
        .next()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("{why}"));
    assert!(n < l.processes, "{n} processes were started");
    std::thread::sleep(Duration::from_millis(300));
    let left = survivors(&l);
    assert!(left.is_empty(), "processes outlived the program: {left:?}");
}

#[test]
fn a_program_sees_only_usr_the_interpreter_and_its_own_tmp() {
    require_sandbox();
    let program = r#"
import os
top = os.listdir("/")
for d in ("etc", "home", "var", "work", "opt", "srv", "mnt", "run"):
    assert d not in top, top
for d in ("usr", "tmp", "proc", "dev"):
    assert d in top, top
assert os.listdir("/tmp") == [], os.listdir("/tmp")
assert sorted(os.listdir("/dev")) == ["null", "urandom", "zero"], os.listdir("/dev")
assert len([p for p in os.listdir("/proc") if p.isdigit()]) == 1
open("/tmp/x", "w").write("ok")
try:
    open("/usr/fedveil-x", "w")
    raise SystemExit("/usr is writable")
except OSError:
    pass
"#;
    assert_eq!(run_python(program, &limits(303)).unwrap(), Verdict::Passed);
}
