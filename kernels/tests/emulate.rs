//! The CUDA kernels' logic on the CPU: each `tests/emulate/*.cpp` compiles the kernel sources
//! as C++ with g++ against a small emulation of the CUDA subset they use (`cuda_emu.h`:
//! threads of a block as threads, barriers for `__syncthreads` and the warp shuffles), runs
//! them and holds every output to a double-precision reference. Needs no GPU and no CUDA, so
//! it runs in the default build.
//!
//! What it checks: indexing and layouts, masks (causal, window, padding, packed sequences),
//! tiling and tile edges, GQA head mapping, the reductions and the online softmax, that every
//! output element is written. What it cannot: timing, coalescing, bank conflicts, register
//! pressure (ptxas.rs looks at spills), behaviour that only the GPU's memory model shows.
//!
//! The small kernels take seconds; attention takes a few minutes on 2 cores (every shuffle is
//! two barriers of 32 threads), so it is `#[ignore]`d: `cargo test -p whet-kernels --test
//! emulate -- --ignored`. Both skip, saying why, without a g++ that has C++20's `<barrier>`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulate")
}

/// A C++20 compiler, or `None` with the reason.
fn cxx() -> Result<PathBuf, String> {
    let cxx = PathBuf::from(std::env::var_os("CXX").unwrap_or_else(|| "g++".into()));
    let probe = std::env::temp_dir().join(format!("whet-emu-probe-{}.cpp", std::process::id()));
    std::fs::write(
        &probe,
        "#include <barrier>\nint main() { std::barrier<> b(1); }\n",
    )
    .unwrap();
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-fsyntax-only"])
        .arg(&probe)
        .output();
    std::fs::remove_file(&probe).ok();
    match out {
        Ok(o) if o.status.success() => Ok(cxx),
        Ok(_) => Err(format!("{} lacks C++20 <barrier>", cxx.display())),
        Err(e) => Err(format!("no {} ({e})", cxx.display())),
    }
}

/// Builds and runs `tests/emulate/{name}.cpp`; panics with its output on a failure.
fn emulate(name: &str) {
    let cxx = match cxx() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let work = std::env::temp_dir().join(format!("whet-emu-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(
        work.join("whet_tiles.h"),
        whet_kernels::tiles::tiles_header(),
    )
    .unwrap();
    let exe = work.join(name);
    let cuda = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let build = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-w", "-pthread"])
        .arg(format!("-I{}", dir().display()))
        .arg(format!("-I{}", work.display()))
        .arg(format!("-I{}", cuda.display()))
        .arg(dir().join(format!("{name}.cpp")))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{name}: g++ failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let log = String::from_utf8_lossy(&run.stdout);
    eprintln!("{log}");
    std::fs::remove_dir_all(&work).ok();
    assert!(run.status.success(), "{name}: failures:\n{log}");
}

#[test]
fn rmsnorm_rope_swiglu_logprobs_and_linear_helpers_match_their_references() {
    emulate("small_kernels");
}

#[test]
#[ignore = "minutes on 2 cores: cargo test -p whet-kernels --test emulate -- --ignored"]
fn flash_attention_forward_and_backward_match_the_reference() {
    emulate("attention");
}
