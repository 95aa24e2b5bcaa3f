//! What several integration tests share: running the `autopar` binary.

use std::process::Command;

/// Runs the `autopar` binary with `args`: (success, stdout, stderr).
pub fn autopar(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_autopar"))
        .args(args)
        .output()
        .expect("run autopar");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
