#!/usr/bin/env bash
# whet vs PyTorch + PEFT on one NVIDIA GPU, side by side in one run: LoRA SFT (rank 16 on all
# seven projections, sequence length 2048, bf16 base weights) on a Llama-3.2-1B-shaped and a
# Qwen3-1.7B-shaped model with random weights — trained tokens/s, MFU, peak GPU memory — and
# sampling new tokens/s. Writes benches/gpu/results.json and prints a table.
#
# NOT RUN YET: written on a machine without a GPU; nothing here has been measured. On the GPU
# machine (driver ≥ 580, CUDA 13 runtime libraries, Python with torch + transformers + peft):
#
#   ./tools/get-cuda.sh && . .cuda/env.sh            # the build (see the README's CUDA section)
#   cargo build --release -p whet-benches --features cuda
#   pip install -r benches/gpu/requirements.txt
#   benches/gpu/run.sh [--peak-tflops 989] [--batch 4] [--steps 10]
#
# MFU = trained tokens/s × model FLOPs per token / the GPU's peak dense bf16 FLOP/s (989 TFLOP/s
# for an H100 or H200 SXM; --peak-tflops for others). FLOPs per token are whet-bench's
# count (forward and input gradient of every frozen matrix, the adapters, causal attention),
# the same figure for both sides.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${WHET_GPU_BENCH_DIR:-/tmp/whet-gpu-bench}
peak_tflops=989
batch=4
steps=10
while [[ $# -gt 0 ]]; do
  case "$1" in
    --peak-tflops) peak_tflops=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    *) echo "usage: $0 [--peak-tflops T] [--batch B] [--steps S]" >&2; exit 2 ;;
  esac
done
bin="${CARGO_TARGET_DIR:-$root/target}/release/whet-bench"
[[ -x "$bin" ]] || { echo "$bin missing: cargo build --release -p whet-benches --features cuda" >&2; exit 1; }
# whet-bench's flags for this run (its defaults are the CPU benchmark's).
gpu=(--device cuda --precision bf16 --json)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

python3 "$here/make_models.py" --out "$work"
results="$here/results.json"
: > "$work/lines.jsonl"
run() { # tag, command...: one JSON object (the command's JSON lines + its peak) per run; a
  # command that fails is recorded as failed and the others still run.
  local tag=$1; shift
  echo "== $tag" >&2
  { python3 "$here/gpu_peak.py" -- "$@" || echo '{"failed": true}'; } | python3 -c '
import json, sys
lines = [json.loads(l) for l in sys.stdin if l.startswith("{")]
out = {"run": sys.argv[1]}
for l in lines: out.update(l)
print(json.dumps(out))' "$tag" | tee -a "$work/lines.jsonl"
}
for model in llama-3.2-1b qwen3-1.7b; do
  m="$work/$model"
  run "$model sft whet" "$bin" sft "${gpu[@]}" --model "$m" --data "$work/datums.jsonl" \
    --batch "$batch" --steps "$steps" --warmup 2
  run "$model sft torch" python3 "$here/torch_gpu.py" sft --model "$m" --data "$work/datums.jsonl" --batch "$batch" --steps "$steps"
  run "$model sample whet" "$bin" sample "${gpu[@]}" --model "$m" --prompts "$work/prompts.jsonl" \
    --max-tokens 128
  run "$model sample torch" python3 "$here/torch_gpu.py" sample --model "$m" --prompts "$work/prompts.jsonl"
done
python3 - "$work/lines.jsonl" "$results" "$peak_tflops" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
peak = float(sys.argv[3]) * 1e12
by = {r["run"]: r for r in rows}
table = []
def num(r, key, fmt, scale=1.0):
    return fmt.format(r[key] * scale) if key in r and not r.get("failed") else "failed"

for model in ["llama-3.2-1b", "qwen3-1.7b"]:
    w, t = by[f"{model} sft whet"], by[f"{model} sft torch"]
    flops = w.get("flops_per_token")
    for r in (w, t):
        if flops and "trained_tokens_per_s" in r:
            r["mfu"] = r["trained_tokens_per_s"] * flops / peak
    sw, st = by[f"{model} sample whet"], by[f"{model} sample torch"]
    ratio = (f" ({w['trained_tokens_per_s'] / t['trained_tokens_per_s']:.2f}x)"
             if "trained_tokens_per_s" in w and "trained_tokens_per_s" in t else "")
    table.append(f"| {model} | {num(w, 'trained_tokens_per_s', '{:.0f}')} / "
                 f"{num(t, 'trained_tokens_per_s', '{:.0f}')}{ratio} | "
                 f"{num(w, 'mfu', '{:.1f}%', 100)} / {num(t, 'mfu', '{:.1f}%', 100)} | "
                 f"{num(w, 'peak_gpu_bytes', '{:.1f}', 2**-30)} / "
                 f"{num(t, 'peak_gpu_bytes', '{:.1f}', 2**-30)} GiB | "
                 f"{num(sw, 'new_tokens_per_s', '{:.0f}')} / {num(st, 'new_tokens_per_s', '{:.0f}')} |")
json.dump(rows, open(sys.argv[2], "w"), indent=1)
print("| model | SFT tokens/s whet / torch | MFU whet / torch | peak GPU memory whet / torch | sampling tokens/s whet / torch |")
print("|---|---|---|---|---|")
print("\n".join(table))
PY
