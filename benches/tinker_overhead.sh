#!/usr/bin/env bash
# The Tinker protocol's overhead: the same LoRA SFT steps (SmolLM2, benches/data datums, batch 8,
# rank 16, lr 1e-4) in process (`whet-bench sft`) and through the official SDK against
# `whet serve` (benches/tinker_sdk_sft.py), one after the other on this machine. Prints both JSON
# lines and the ratio; writes benches/results/tinker_overhead.json.
# Knobs: STEPS (timed steps, default 5), WARMUP (default 1).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
steps=${STEPS:-5}
warmup=${WARMUP:-1}
model=$(./tools/get-smollm2.sh)
python=$(./tools/get-tinker-sdk.sh | head -1)
cargo build --release -q -p whet -p whet-benches
data=benches/data/sft_datums.jsonl
mkdir -p benches/results
tmp=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$tmp"' EXIT

inproc=$(target/release/whet-bench sft --model "$model" --data "$data" --batch 8 --steps "$steps" \
  --warmup "$warmup" --rank 16 --alpha 32 --lr 1e-4 --json)
echo "$inproc"

target/release/whet serve --listen 127.0.0.1:0 --json --home "$tmp/home" \
  --model "HuggingFaceTB/SmolLM2-135M-Instruct=$model" > "$tmp/serve.out" 2> "$tmp/serve.err" &
server=$!
for _ in $(seq 100); do [[ -s "$tmp/serve.out" ]] && break; sleep 0.2; done
url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$tmp/serve.out")
sdk=$(TINKER_API_KEY=tml-bench TINKER_TELEMETRY=0 "$python" benches/tinker_sdk_sft.py \
  --base-url "$url" --model HuggingFaceTB/SmolLM2-135M-Instruct --data "$data" --batch 8 \
  --steps "$steps" --warmup "$warmup" --rank 16 --lr 1e-4)
echo "$sdk"

python3 - "$inproc" "$sdk" "$(git rev-parse --short HEAD)" <<'PY'
import json, sys
inproc, sdk, commit = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
ratio = sdk["tokens_per_s"] / inproc["trained_tokens_per_s"]
out = {"in_process": inproc, "through_sdk": sdk, "sdk_over_in_process": ratio, "commit": commit}
json.dump(out, open("benches/results/tinker_overhead.json", "w"), indent=1)
print(f"through the SDK / in process, trained tokens/s: {ratio:.3f}")
PY
