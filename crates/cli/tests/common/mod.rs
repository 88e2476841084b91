//! Helpers of the end-to-end tests: run the `whet` binary, find fixtures.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

pub fn whet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whet"))
        .args(args)
        .output()
        .expect("whet runs")
}

pub fn ok(args: &[&str]) -> String {
    let out = whet(args);
    assert!(
        out.status.success(),
        "whet {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail, returns its stderr.
pub fn fails(args: &[&str]) -> String {
    let out = whet(args);
    assert!(!out.status.success(), "whet {args:?} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "whet {args:?} panicked: {err}");
    err
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub mod server;

pub fn smollm2() -> Option<PathBuf> {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{} is missing: run tools/get-smollm2.sh", p.display());
    }
    eprintln!(
        "skipping: {} is missing (run tools/get-smollm2.sh)",
        p.display()
    );
    None
}
