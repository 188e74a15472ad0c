//! Running the `trustql` binary from tests.

#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `trustql` with `args` and waits for it.
pub fn trustql(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trustql"))
        .args(args)
        .output()
        .expect("run trustql")
}

/// Its stdout and stderr together, for messages and assertions.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
