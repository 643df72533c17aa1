//! Helpers shared by the command-line tests.

use std::process::Command;

/// Runs the `fedveil` binary; returns its exit status, stdout and stderr.
pub fn fedveil(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedveil"))
        .args(args)
        .output()
        .expect("run fedveil");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
