#!/usr/bin/env bash
# Issue 6's GPU checks as one short run, for a GPU machine that has the driver and the CUDA 13
# runtime libraries but no network and no toolchain: the CUDA test binary is built and packed
# here, carried there, and run against the repository's fixtures.
#
#   here:   ./tools/get-cuda.sh && . .cuda/env.sh && benches/gpu/device-check.sh pack
#           → .cuda/device/cuda-tests.gz (stripped, ~14 MB: fits a 64 MiB carry)
#   there:  benches/gpu/device-check.sh run        (from the repository root, .cuda/device carried)
#
# `run` says which of the shared libraries the binary needs are missing (libcuda.so.1 from the
# driver; libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libcudart.so.13 from CUDA 13),
# prints the GPU, then runs every test of crates/engine/tests/cuda.rs one at a time: each kernel
# against its CPU op (values and gradients), decoding over a cache in place, and the parity
# fixtures on the GPU in f32 and bf16. Exit status: the tests'.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
packed="$root/.cuda/device/cuda-tests.gz"

case "${1:-}" in
  pack)
    cd "$root"
    bin=$(nice -n 15 cargo test --release -p whet-engine --features cuda --test cuda --no-run \
      --message-format json 2> /dev/null |
      python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
    [[ -n "$bin" ]] || { echo "no test binary: is .cuda/env.sh sourced?" >&2; exit 1; }
    mkdir -p "$(dirname "$packed")"
    strip -o "${packed%.gz}" "$bin"
    gzip -9 -f "${packed%.gz}"
    ls -la "$packed"
    ;;
  run)
    [[ -s "$packed" ]] || { echo "$packed missing: run '$0 pack' where CUDA is installed" >&2; exit 1; }
    missing=0
    for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
      found=""
      for d in ${LD_LIBRARY_PATH//:/ } /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [[ -e "$d/$lib" ]] && found="$d/$lib" && break
      done
      [[ -z "$found" ]] && /sbin/ldconfig -p 2> /dev/null | grep -q " $lib " && found="(ld.so cache)"
      echo "$lib: ${found:-MISSING}"
      [[ -n "$found" ]] || missing=1
    done
    if [[ -d /usr/local/cuda/lib64 ]]; then
      export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    [[ $missing == 0 ]] || { echo "put the missing libraries on LD_LIBRARY_PATH first" >&2; exit 1; }
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    gunzip -c "$packed" > "$work/cuda-tests"
    chmod +x "$work/cuda-tests"
    WHET_FIXTURES="$root/tests/fixtures" "$work/cuda-tests" --test-threads=1 --nocapture
    ;;
  *)
    echo "usage: $0 pack|run" >&2
    exit 2
    ;;
esac
