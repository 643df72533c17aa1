//! Task metrics beyond the loss: GSM8K exact match (the number a solution
//! ends with), and pass@k for code (HumanEval, MBPP) with generated
//! programs run against their tests in a sandboxed `python3`.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ModelError, Result};

// ------------------------------------------------------------ GSM8K

/// The final answer of a GSM8K solution, as a canonical decimal string:
/// the number after the last `####` (the dataset's own format), else the
/// first number after `The answer is` (the few-shot format FS-LLM prompts
/// for, any case), else the last number in the text. Commas, dollar signs
/// and a trailing period are ignored; `18.00` becomes `18`.
pub fn gsm8k_answer(text: &str) -> Option<String> {
    if let Some(at) = text.rfind("####") {
        return first_number(&text[at + 4..]);
    }
    let lower = text.to_lowercase();
    if let Some(at) = lower.find("the answer is") {
        // Lowercasing keeps ASCII offsets; the trigger is ASCII.
        return first_number(&lower[at + "the answer is".len()..]);
    }
    numbers(text).last().and_then(|n| canonical(n))
}

/// Whether a generated solution's answer equals the reference's.
pub fn gsm8k_exact_match(generated: &str, reference: &str) -> bool {
    match (gsm8k_answer(generated), gsm8k_answer(reference)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn first_number(text: &str) -> Option<String> {
    numbers(text).first().and_then(|n| canonical(n))
}

/// The numbers in `text` (`-?\d[\d,]*(\.\d+)?`), commas removed.
fn numbers(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            || (chars[i] == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        if !starts {
            i += 1;
            continue;
        }
        let mut n = String::new();
        if chars[i] == '-' {
            n.push('-');
            i += 1;
        }
        while i < chars.len() {
            let c = chars[i];
            if c.is_ascii_digit() {
                n.push(c);
            } else if c == ',' && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
                // A thousands separator.
            } else if c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
                n.push('.');
            } else {
                break;
            }
            i += 1;
        }
        out.push(n);
    }
    out
}

/// `n` without superfluous zeros: `018.50` → `18.5`, `-0.0` → `0`.
fn canonical(n: &str) -> Option<String> {
    let (neg, digits) = match n.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, n),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let body = if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    };
    Some(if neg && body != "0" {
        format!("-{body}")
    } else {
        body
    })
}

// ------------------------------------------------------------ pass@k

/// The unbiased pass@k estimator (Chen et al. 2021): the probability that
/// at least one of `k` samples drawn without replacement from `n`
/// generations, `c` of them correct, passes; `1 − C(n−c, k)/C(n, k)`,
/// computed as a product so that it neither overflows nor cancels.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Result<f64> {
    if k == 0 || k > n || c > n {
        return Err(ModelError::Input(format!(
            "pass@k needs 1 ≤ k ≤ n and c ≤ n, got n = {n}, c = {c}, k = {k}"
        )));
    }
    if n - c < k {
        return Ok(1.0);
    }
    let fail: f64 = ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product();
    Ok(1.0 - fail)
}

/// The code in a model's answer: the first fenced block (```` ```python ````
/// or a bare fence); the text before the fence when the answer has a lone
/// closing fence (a completion that ends its code with one); else the
/// whole answer.
pub fn extract_code(answer: &str) -> String {
    let Some(open) = answer.find("```") else {
        return answer.to_string();
    };
    if answer.matches("```").count() == 1 && !answer[..open].trim().is_empty() {
        return answer[..open].to_string();
    }
    // The rest of the opening line names the language.
    let body = answer[open + 3..].split_once('\n').map_or("", |(_, b)| b);
    body[..body.find("```").unwrap_or(body.len())].to_string()
}

/// Whether a prompt is itself the start of the program (HumanEval's
/// signature and docstring) rather than prose (MBPP's task): its first
/// line that is not blank is Python that begins a module.
pub fn is_code_prompt(instruction: &str) -> bool {
    instruction
        .lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| {
            ["def ", "from ", "import ", "class ", "@", "#", "async def "]
                .iter()
                .any(|p| l.starts_with(p))
        })
}

/// The program that tests a generated answer: the code in it
/// ([`extract_code`]), after the prompt when the prompt is code
/// ([`is_code_prompt`]; a completion that repeats the whole function just
/// redefines it), then the tests.
pub fn test_program(instruction: &str, answer: &str, test: &str) -> String {
    let code = extract_code(answer);
    let mut program = String::new();
    if is_code_prompt(instruction) {
        program.push_str(instruction);
        if !program.ends_with('\n') {
            program.push('\n');
        }
    }
    program.push_str(&code);
    program.push_str("\n\n");
    program.push_str(test);
    program.push('\n');
    program
}

/// How a program ran against its tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every test passed (the program exited with status 0).
    Passed,
    /// It raised, failed an assertion, or ran out of memory; the tail of
    /// its error output.
    Failed(String),
    /// It ran past its time limit and was killed.
    TimedOut,
}

/// What a sandboxed program may use.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Wall-clock time; the process group is killed after it.
    pub timeout: Duration,
    /// Address space (`RLIMIT_AS`).
    pub memory_bytes: u64,
    /// CPU seconds (`RLIMIT_CPU`).
    pub cpu_seconds: u64,
    /// The largest file it may write (`RLIMIT_FSIZE`).
    pub file_bytes: u64,
    /// The Python interpreter.
    pub python: PathBuf,
    /// Processes the program may have at once (`RLIMIT_NPROC`, counted
    /// inside the sandbox's own user namespace).
    pub processes: u64,
    /// Run generated code even where the system cannot isolate it
    /// ([`sandbox_status`]). Off by default: without isolation, generated
    /// code can read what the process can read and start processes.
    pub allow_unsandboxed: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(10),
            memory_bytes: 1 << 30,
            cpu_seconds: 10,
            file_bytes: 1 << 20,
            python: PathBuf::from("python3"),
            processes: 32,
            allow_unsandboxed: false,
        }
    }
}

/// The output kept from a program.
const MAX_OUTPUT: usize = 64 << 10;

/// Set up by trusted code before the candidate runs: resource limits,
/// no sockets, no subprocesses, the working directory a fresh temporary
/// one. The candidate then runs with `exec` in a fresh namespace; its
/// exit status is the verdict.
const GUARD: &str = r#"
import os, resource, sys
mem, cpu, fsize, nproc = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if nproc > 0:
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
import socket
def _no_network(*a, **k):
    raise OSError("network access is disabled in the sandbox")
socket.socket = _no_network
socket.create_connection = _no_network
socket.socketpair = _no_network
socket.getaddrinfo = _no_network
def _no_processes(*a, **k):
    raise OSError("starting processes is disabled in the sandbox")
for name in ("system", "fork", "forkpty", "execv", "execve", "execvp", "execvpe",
             "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp",
             "spawnvpe", "posix_spawn", "posix_spawnp", "popen", "kill", "killpg"):
    if hasattr(os, name):
        setattr(os, name, _no_processes)
import subprocess
subprocess.Popen = _no_processes
source = sys.stdin.read()
sys.stdin = open(os.devnull)
exec(compile(source, "<candidate>", "exec"), {"__name__": "__main__"})
"#;

/// Builds the sandbox inside fresh user, PID, mount, network, IPC and UTS
/// namespaces (run by `/bin/sh` as the namespace's root, before the
/// candidate exists): a new root on a size-limited tmpfs holding `/usr` and
/// the interpreter's installation read-only, `/dev/{null,zero,urandom}`,
/// its own `/proc` and a writable `/tmp`; the old root is detached, so
/// nothing of the host's files is reachable; then every capability is
/// dropped and `no_new_privs` set before the interpreter starts.
/// Arguments: the mount point, the user to run as (`-`: stay the user
/// namespace's root, without capabilities), the directories to expose
/// read-only, `--`, then the command.
const SANDBOX: &str = r#"
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
trap 'echo "fedveil-sandbox: setup failed" >&2; exit 125' EXIT
root="$1"; shift
uid="$1"; shift
mount --make-rprivate /
mount -t tmpfs -o size=64m,mode=755,nosuid,nodev tmpfs "$root"
mkdir -p "$root/tmp" "$root/proc" "$root/dev" "$root/.old"
chmod 1777 "$root/tmp"
for l in bin lib lib32 lib64 sbin; do
    if [ -L "/$l" ]; then
        ln -s "$(readlink "/$l")" "$root/$l"
    elif [ -d "/$l" ]; then
        mkdir "$root/$l"
        mount --rbind "/$l" "$root/$l"
        mount -o remount,bind,ro,nosuid,nodev "$root/$l"
    fi
done
while [ "$1" != "--" ]; do
    mkdir -p "$root$1"
    mount --rbind "$1" "$root$1"
    mount -o remount,bind,ro,nosuid,nodev "$root$1"
    shift
done
shift
for d in null zero urandom; do
    touch "$root/dev/$d"
    mount --bind "/dev/$d" "$root/dev/$d"
done
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
cd "$root"
pivot_root . .old
umount -l /.old
rmdir /.old
cd /tmp
trap - EXIT
if [ "$uid" = "-" ]; then
    exec setpriv --no-new-privs --inh-caps=-all --ambient-caps=-all --bounding-set=-all -- "$@"
fi
exec setpriv --reuid="$uid" --regid="$uid" --clear-groups --no-new-privs \
    --inh-caps=-all --ambient-caps=-all --bounding-set=-all -- "$@"
"#;

/// The exit status and the message of a sandbox that could not be set up.
const SETUP_FAILED: (i32, &str) = (125, "fedveil-sandbox: setup failed");

/// The namespaces the sandbox runs in. As root: PID, mount, network, IPC
/// and UTS namespaces, and the program runs as [`SANDBOX_UID`] (the limit
/// on processes does not bind root, whose user a mapped namespace root
/// would still be). Otherwise a user namespace too, whose root (the caller,
/// outside) sets everything up and then drops every capability.
const NAMESPACES: &[&str] = &[
    "--pid",
    "--fork",
    "--kill-child",
    "--mount",
    "--net",
    "--ipc",
    "--uts",
];

/// The user a program runs as when fedveil runs as root: one no account
/// uses, so that `RLIMIT_NPROC` counts the sandbox's processes only.
pub const SANDBOX_UID: u32 = 1_734_000_000;

/// Whether this process runs as root.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// An interpreter as the sandbox runs it: its real executable and the
/// directories it needs, read-only.
#[derive(Clone, Debug, PartialEq)]
struct Interpreter {
    exe: PathBuf,
    dirs: Vec<PathBuf>,
}

/// Finds `python`'s real executable and installation (a pyenv shim or a
/// virtual environment resolves to the interpreter behind it).
fn interpreter(python: &std::path::Path) -> std::result::Result<Interpreter, String> {
    static FOUND: std::sync::Mutex<Vec<(PathBuf, Interpreter)>> = std::sync::Mutex::new(Vec::new());
    if let Ok(found) = FOUND.lock()
        && let Some((_, i)) = found.iter().find(|(p, _)| p == python)
    {
        return Ok(i.clone());
    }
    let out = Command::new(python)
        .args([
            "-I",
            "-S",
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable)); print(os.path.realpath(sys.base_prefix))",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", python.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let (Some(exe), Some(prefix)) = (lines.next(), lines.next()) else {
        return Err(format!(
            "{} did not say where it is installed",
            python.display()
        ));
    };
    let exe = PathBuf::from(exe);
    let mut dirs = vec![PathBuf::from("/usr")];
    for d in [
        PathBuf::from(prefix),
        exe.parent().map(PathBuf::from).unwrap_or_default(),
    ] {
        if !d.is_absolute() || d == std::path::Path::new("/") {
            return Err(format!(
                "{}: an installation at '{}'",
                python.display(),
                d.display()
            ));
        }
        if !dirs.iter().any(|k| d.starts_with(k)) {
            dirs.push(d);
        }
    }
    let i = Interpreter { exe, dirs };
    if let Ok(mut found) = FOUND.lock() {
        found.push((python.to_path_buf(), i.clone()));
    }
    Ok(i)
}

/// Whether this system can build the sandbox for `python`: `Ok` with a
/// description of the isolation, or `Err` with why not (the namespaces
/// refused, `unshare` or `setpriv` missing, the interpreter not found).
/// Probed once per interpreter.
pub fn sandbox_status(python: &std::path::Path) -> std::result::Result<String, String> {
    static PROBED: std::sync::Mutex<Vec<(PathBuf, std::result::Result<String, String>)>> =
        std::sync::Mutex::new(Vec::new());
    if let Ok(p) = PROBED.lock()
        && let Some((_, r)) = p.iter().find(|(k, _)| k == python)
    {
        return r.clone();
    }
    let probe = || -> std::result::Result<String, String> {
        let i = interpreter(python)?;
        let dir = tempdir().map_err(|e| e.to_string())?;
        let out = sandboxed(&i, &dir)
            .args(["-I", "-S", "-c", "import os; print(len(os.listdir('/')))"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        let out = out.map_err(|e| format!("running unshare: {e}"))?;
        if out.status.success() {
            Ok(
                "user, PID, mount, network, IPC and UTS namespaces; a read-only root of /usr \
                and the interpreter; no capabilities"
                    .into(),
            )
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(format!(
                "the system refused the sandbox's namespaces: {}",
                err.lines().last().unwrap_or("no reason given")
            ))
        }
    };
    let r = probe();
    if let Ok(mut p) = PROBED.lock() {
        p.push((python.to_path_buf(), r.clone()));
    }
    r
}

/// The command that runs `i` in the sandbox, mounted on the empty
/// directory `root` (arguments follow).
fn sandboxed(i: &Interpreter, root: &std::path::Path) -> Command {
    let mut c = Command::new("unshare");
    let uid = if is_root() {
        SANDBOX_UID.to_string()
    } else {
        c.args(["--user", "--map-root-user"]);
        "-".to_string()
    };
    c.args(NAMESPACES)
        .args(["--", "/bin/sh", "-c", SANDBOX, "fedveil-sandbox"])
        .arg(root)
        .arg(uid);
    c.args(&i.dirs).arg("--").arg(&i.exe);
    c
}

/// Runs `program` (a candidate solution followed by its tests) in
/// `python3` under `limits`, isolated by the operating system
/// ([`sandbox_status`]): its own user, PID, mount, network, IPC and UTS
/// namespaces, a root that holds only `/usr` and the interpreter
/// (read-only) and a fresh `/tmp`, no capabilities, at most
/// `limits.processes` processes, and a wall clock that kills the whole
/// namespace. Where the system cannot isolate it, it refuses unless
/// `limits.allow_unsandboxed`; then the program runs in a fresh temporary
/// directory with a clean environment, its own process group and the
/// interpreter-level guard, which generated code can get past.
pub fn run_python(program: &str, limits: &Limits) -> Result<Verdict> {
    let isolated = match sandbox_status(&limits.python) {
        Ok(_) => true,
        Err(_) if limits.allow_unsandboxed => false,
        Err(why) => {
            return Err(ModelError::Config(format!(
                "pass@k runs generated code, and this system cannot isolate it ({why}); \
                 set allow_unsandboxed = true in [task.pass_at_k] to run it without isolation \
                 (it can then read what this process can read)"
            )));
        }
    };
    let dir = tempdir()?;
    let result = run_in(program, limits, &dir, isolated);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(
    program: &str,
    limits: &Limits,
    dir: &std::path::Path,
    isolated: bool,
) -> Result<Verdict> {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let io = |e: std::io::Error| ModelError::Config(format!("running python3: {e}"));
    let mut cmd = if isolated {
        let i = interpreter(&limits.python).map_err(ModelError::Config)?;
        sandboxed(&i, dir)
    } else {
        let mut c = match network_isolation() {
            Some(prefix) => {
                let mut c = Command::new(prefix[0]);
                c.args(&prefix[1..]).arg(&limits.python);
                c
            }
            None => Command::new(&limits.python),
        };
        c.current_dir(dir);
        c
    };
    let home = if isolated {
        std::path::Path::new("/tmp")
    } else {
        dir
    };
    let mut child = cmd
        .args(["-I", "-S", "-B", "-c", GUARD])
        .arg(limits.memory_bytes.to_string())
        .arg(limits.cpu_seconds.max(1).to_string())
        .arg(limits.file_bytes.to_string())
        .arg(if isolated { limits.processes.max(1) } else { 0 }.to_string())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("TMPDIR", home)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A program that exits before reading everything is its own verdict.
        let _ = stdin.write_all(program.as_bytes());
    }
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(MAX_OUTPUT as u64 * 4).read_to_end(&mut buf);
        }
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io)? {
            break Some(status);
        }
        if started.elapsed() >= limits.timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Whatever the candidate started goes with it: the whole group.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
    let err = reader.join().unwrap_or_default();
    let tail = String::from_utf8_lossy(&err[err.len().saturating_sub(MAX_OUTPUT)..]).into_owned();
    if isolated
        && status.is_some_and(|s| s.code() == Some(SETUP_FAILED.0))
        && tail.contains(SETUP_FAILED.1)
    {
        return Err(ModelError::Config(format!(
            "pass@k's sandbox could not be set up: {}",
            tail.lines().rev().take(4).collect::<Vec<_>>().join(" / ")
        )));
    }
    Ok(match status {
        None => Verdict::TimedOut,
        Some(s) if s.success() => Verdict::Passed,
        Some(s) => {
            use std::os::unix::process::ExitStatusExt;
            // SIGXCPU or SIGKILL from the CPU limit: it ran out of time.
            if matches!(s.signal(), Some(24) | Some(9)) {
                Verdict::TimedOut
            } else {
                Verdict::Failed(tail.lines().rev().take(8).collect::<Vec<_>>().join("\n"))
            }
        }
    })
}

/// A command prefix that gives the program a network namespace of its own
/// (no interfaces but loopback, so nothing outside is reachable), where
/// the system allows it: `unshare --net` as root, or inside a new user
/// namespace otherwise. `None`: only the Python-level guard applies.
pub fn network_isolation() -> Option<&'static [&'static str]> {
    static PREFIX: std::sync::OnceLock<Option<&'static [&'static str]>> =
        std::sync::OnceLock::new();
    *PREFIX.get_or_init(|| {
        const ROOT: &[&str] = &["unshare", "--net", "--"];
        const USER: &[&str] = &["unshare", "--map-root-user", "--net", "--"];
        [ROOT, USER].into_iter().find(|p| {
            Command::new(p[0])
                .args(&p[1..])
                .arg("true")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    })
}

fn tempdir() -> Result<PathBuf> {
    let mut bytes = [0u8; 12];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    let name = hex::encode(bytes);
    let dir = std::env::temp_dir().join(format!("fedveil-sandbox-{name}"));
    std::fs::create_dir(&dir).map_err(|e| ModelError::file(&dir, e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_canonical() {
        assert_eq!(canonical("018.50").as_deref(), Some("18.5"));
        assert_eq!(canonical("-0.0").as_deref(), Some("0"));
        assert_eq!(canonical("1000").as_deref(), Some("1000"));
        assert_eq!(numbers("a 1,234.5 b -7 c 3."), vec!["1234.5", "-7", "3"]);
    }

    #[test]
    fn pass_at_k_is_the_unbiased_estimator() {
        assert_eq!(pass_at_k(10, 0, 1).unwrap(), 0.0);
        assert_eq!(pass_at_k(10, 10, 5).unwrap(), 1.0);
        assert!((pass_at_k(10, 3, 1).unwrap() - 0.3).abs() < 1e-12);
        // 1 − C(7,2)/C(10,2) = 1 − 21/45.
        assert!((pass_at_k(10, 3, 2).unwrap() - (1.0 - 21.0 / 45.0)).abs() < 1e-12);
        assert_eq!(pass_at_k(5, 4, 2).unwrap(), 1.0);
        assert!(pass_at_k(5, 1, 6).is_err());
        assert!(pass_at_k(200, 1, 100).unwrap() > 0.49);
    }
}
