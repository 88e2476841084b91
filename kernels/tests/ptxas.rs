//! Every embedded PTX module assembles for sm_90 (H100/H200) with ptxas — the step the driver's
//! JIT takes when a module loads — so a kernel that would fail to load on the GPU fails here,
//! on a machine without one. ptxas also refuses static shared memory over 48 KiB, and this test
//! refuses register spills (a silent slowdown). Skips, saying why, when ptxas is absent (CI has
//! none; `tools/get-cuda.sh` installs one).
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::process::Command;

fn ptxas() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = vec![];
    if let Some(p) = std::env::var_os("PTXAS") {
        candidates.push(p.into());
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            candidates.push(Path::new(&root).join("bin/ptxas"));
        }
    }
    candidates.push("ptxas".into());
    candidates.into_iter().find(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn every_module_assembles_for_sm_90_without_spills() {
    let Some(ptxas) = ptxas() else {
        eprintln!("skipped: no ptxas (set PTXAS or CUDA_ROOT, or run tools/get-cuda.sh)");
        return;
    };
    let dir = tempfile_dir();
    for m in whet_kernels::MODULES {
        let ptx = m.ptx();
        assert!(!ptx.is_empty(), "{}: no PTX embedded", m.name);
        for f in m.functions {
            assert!(
                ptx.contains(&format!(".entry {f}(")),
                "{}: no kernel {f}",
                m.name
            );
        }
        let src = dir.join(format!("{}.ptx", m.name));
        std::fs::write(&src, ptx).unwrap();
        let out = Command::new(&ptxas)
            .args(["-arch=sm_90", "-v"])
            .arg(&src)
            .arg("-o")
            .arg(dir.join(format!("{}.cubin", m.name)))
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: ptxas failed:\n{log}", m.name);
        for line in log.lines().filter(|l| l.contains("spill")) {
            assert!(
                line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
                "{}: {line}",
                m.name
            );
        }
        eprintln!(
            "{}: {} kernels assemble for sm_90",
            m.name,
            m.functions.len()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A fresh directory under the system's temp dir (no dependency for one directory).
fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("whet-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
