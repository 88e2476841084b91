//! With the `cuda` feature: compiles every `cuda/*.cu` to PTX with nvcc (`NVCC`, else
//! `$CUDA_ROOT/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`;
//! `tools/get-cuda.sh` installs one) into `OUT_DIR`. Without it: nothing, and no nvcc needed.
//!
//! PTX, not SASS: the driver compiles PTX for whichever GPU loads it, so one build serves
//! every GPU from the PTX target up. The target is `compute_80` (Ampere: the first with bf16
//! arithmetic) unless `WHET_CUDA_ARCH` says otherwise (e.g. `90`). The PTX ISA version is the
//! nvcc's: it must not be newer than the driver's (nvcc 13.0 → ISA 9.0 → driver 580 or later).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The attention tile table, shared with the crate; `tiles_header` writes it for nvcc.
#[path = "src/tiles.rs"]
#[allow(dead_code)]
mod tiles;

/// The nvcc to run: `NVCC`, else the one under a CUDA root variable, else `nvcc` on `PATH`.
fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=src/tiles.rs");
    for var in [
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "WHET_CUDA_ARCH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = std::env::var("WHET_CUDA_ARCH").unwrap_or_else(|_| "80".into());
    let arch: String = arch.chars().filter(|c| c.is_ascii_digit()).collect();
    std::fs::write(out.join("whet_tiles.h"), tiles::tiles_header()).expect("OUT_DIR is writable");
    let nvcc = nvcc();
    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
        .expect("kernels/cuda is part of the crate")
        .map(|e| e.expect("readable kernels/cuda").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        let stem = src.file_stem().expect("a .cu file has a name");
        let ptx = out.join(stem).with_extension("ptx");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{arch}"))
            .arg("-Icuda")
            .arg(format!("-I{}", out.display()))
            .arg(src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "could not run {} ({e}): the `cuda` feature needs nvcc; \
                     run tools/get-cuda.sh and source .cuda/env.sh",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
