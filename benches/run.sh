#!/usr/bin/env bash
# whet vs PyTorch on this CPU, side by side in ONE run: the machine's matmul peak, TRL's SFTTrainer
# (fp32 and its CPU default bf16 autocast), a padding-free PyTorch+PEFT loop (fp32 and bf16 autocast),
# whet's LoRA SFT (f32 and bf16), transformers' generate (fp32 and bf16), whet's sampler (f32 and bf16)
# -- one after the other, each in its own process. Writes
# benches/results/latest.json and benches/RESULTS.md (via benches/report.py).
#
# Needs python3 with torch, transformers, peft, trl, datasets (benches/requirements.txt) and cargo.
# A full run takes ~25 minutes on 2 cores (TRL fp32 alone ~8). Knobs (environment):
#   BENCH_STEPS=10 BENCH_WARMUP=1 BENCH_BATCH=8 BENCH_RANK=16 BENCH_ALPHA=32 BENCH_MAX_TOKENS=64
#   BENCH_SKIP="trl-bf16"   names to leave out (peak trl trl-bf16 loop loop-bf16 whet-sft whet-sft-bf16
#                           generate generate-bf16 whet-sample whet-sample-bf16); default: none
#   BENCH_ONLY="loop whet-sft"   run only these
#   BENCH_NO_BUILD=1        don't run cargo build (use whatever target/release/whet-bench is there)
#   WHET_BENCH=path         the whet-bench binary (default target/release/whet-bench)
#   BENCH_WAIT_QUIET=60     before each benchmark, wait up to this many seconds for the machine to be quiet
#                           (other processes < 10% of the CPU); every result records others' share anyway
# Quick smoke run (~5 min): BENCH_STEPS=1 BENCH_MAX_TOKENS=8 benches/run.sh
# The whet binary may be absent or fail: its rows then read "n/a".
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

STEPS=${BENCH_STEPS:-10}
WARMUP=${BENCH_WARMUP:-1}
BATCH=${BENCH_BATCH:-8}
RANK=${BENCH_RANK:-16}
ALPHA=${BENCH_ALPHA:-32}
MAX_TOKENS=${BENCH_MAX_TOKENS:-64}
SKIP=" ${BENCH_SKIP-} "
ONLY=" ${BENCH_ONLY:-} "
WHET=${WHET_BENCH:-target/release/whet-bench}
WAIT_QUIET=${BENCH_WAIT_QUIET:-60}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
PY=${PYTHON:-python3}
results=benches/results
lines=$results/run.jsonl

wanted() {
  [[ "$SKIP" != *" $1 "* ]] && { [[ "$ONLY" == "  " ]] || [[ "$ONLY" == *" $1 "* ]]; }
}
bench() {  # bench NAME CMD...
  local name=$1
  shift
  wanted "$name" || return 0
  "$PY" benches/measure.py --name "$name" --append "$lines" --wait-quiet "$WAIT_QUIET" -- "$@"
}

start=$(date +%s)
tools/get-smollm2.sh >/dev/null || { echo "could not fetch the model" >&2; exit 1; }
for f in sft_rows.jsonl sft_datums.jsonl sample_prompts.jsonl; do
  [[ -s benches/data/$f ]] || { "$PY" benches/data/make_data.py || exit 1; break; }
done
# Dequantize the GGUF into benches/.cache/smollm2-hf once, outside any timing.
"$PY" -c 'import sys; sys.path.insert(0, "benches"); import common; common.ensure_hf_cache()' || exit 1

if [[ -z "${BENCH_NO_BUILD:-}" ]] && { wanted whet-sft || wanted whet-sample || wanted whet-sft-bf16 || wanted whet-sample-bf16; }; then
  echo "[bench] cargo build --release -p whet-benches" >&2
  cargo build --release -p whet-benches >&2 || echo "[bench] whet-bench did not build: its rows will read n/a" >&2
fi

mkdir -p "$results"
: >"$lines"
"$PY" - "$results/meta.json" "$STEPS" "$WARMUP" "$BATCH" "$RANK" "$ALPHA" "$MAX_TOKENS" <<'PY'
import datetime, importlib.metadata as md, json, os, platform, subprocess, sys
out, steps, warmup, batch, rank, alpha, max_tokens = sys.argv[1:]
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return ""
cpu = next((l.split(":", 1)[1].strip() for l in sh("lscpu").splitlines() if l.startswith("Model name")), platform.processor())
vers = [f"python {platform.python_version()}"]
for p in ["torch", "transformers", "peft", "trl", "accelerate", "datasets"]:
    try:
        vers.append(f"{p} {md.version(p)}")
    except md.PackageNotFoundError:
        vers.append(f"{p} absent")
vers.append(sh("rustc --version") or "rustc absent")
rev = sh("git rev-parse --short HEAD")
dirty = " (with uncommitted changes)" if sh("git status --porcelain --untracked-files=no") else ""
mem = sh("free -h | awk '/^Mem:/ {print $2}'")
flags = next((l.split(":", 1)[1].split() for l in sh("lscpu").splitlines() if l.startswith("Flags")), [])
simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
json.dump({
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "cpu": cpu, "cpu_flags": " ".join(simd) or "no AVX2", "cores": os.cpu_count(), "mem": mem,
    "versions": ", ".join(vers), "whet_rev": rev + dirty,
    "settings": f"{steps} timed steps after {warmup} warm-up, batch {batch}, LoRA rank {rank} alpha {alpha}, "
                f"2 threads; sampling {max_tokens} new tokens",
}, open(out, "w"), indent=2)
PY

sft_args=(--steps "$STEPS" --warmup "$WARMUP" --batch "$BATCH" --rank "$RANK" --alpha "$ALPHA" --json)
bench peak "$PY" benches/peak.py --json
bench trl "$PY" benches/torch_sft.py --variant trl "${sft_args[@]}"
bench trl-bf16 "$PY" benches/torch_sft.py --variant trl-bf16 "${sft_args[@]}"
bench loop "$PY" benches/torch_sft.py --variant loop "${sft_args[@]}"
bench loop-bf16 "$PY" benches/torch_sft.py --variant loop-bf16 "${sft_args[@]}"
bench whet-sft "$WHET" sft --model "$MODEL" --data benches/data/sft_datums.jsonl "${sft_args[@]}"
bench whet-sft-bf16 "$WHET" sft --model "$MODEL" --data benches/data/sft_datums.jsonl --precision bf16 "${sft_args[@]}"
bench generate "$PY" benches/torch_sample.py --max-tokens "$MAX_TOKENS" --json
bench generate-bf16 "$PY" benches/torch_sample.py --max-tokens "$MAX_TOKENS" --bf16 --json
bench whet-sample "$WHET" sample --model "$MODEL" --prompts benches/data/sample_prompts.jsonl \
  --max-tokens "$MAX_TOKENS" --json
bench whet-sample-bf16 "$WHET" sample --model "$MODEL" --prompts benches/data/sample_prompts.jsonl \
  --max-tokens "$MAX_TOKENS" --precision bf16 --json

"$PY" benches/report.py --lines "$lines" --meta "$results/meta.json"
echo "[bench] done in $(($(date +%s) - start)) s: benches/RESULTS.md" >&2
