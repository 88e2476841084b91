#!/usr/bin/env bash
# RL execution modes, time per step: datasets/rl-sums/job.toml with steps = 8, no eval, run once
# per execution mode (sync, one_step_off_async with bound 1, fully_async with bound 2), back to
# back, in a fresh home. Prints one JSON line per mode: mean time per step, sampling and
# training time, staleness per step, train reward. Needs the release binary and the model:
#   ./tools/get-smollm2.sh && cargo build --release -p whet && benches/rl_modes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for mode in sync one_step_off_async fully_async; do
  bound=""
  [ "$mode" = one_step_off_async ] && bound="max_steps_off_policy = 1"
  [ "$mode" = fully_async ] && bound="max_steps_off_policy = 2"
  sed -e "s/^eval_dataset.*//" -e "s/^steps = 12/steps = 8/" -e "s/^eval_interval = 4/eval_interval = 0/" \
      -e "s/^temperature = 1.0/temperature = 1.0\nexecution_mode = \"$mode\"\n$bound/" \
      -e "s#\.\./\.\./models#$root/models#" -e "s#\"train.jsonl\"#\"$root/datasets/rl-sums/train.jsonl\"#" \
      datasets/rl-sums/job.toml > "$work/$mode.toml"
  id=$(./target/release/whet train "$work/$mode.toml" --home "$work/home" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  ./target/release/whet jobs metrics "$id" --home "$work/home" --json | MODE=$mode python3 -c '
import json, os, sys
rows = [json.loads(l) for l in sys.stdin]
mean = lambda k: sum(r[k] for r in rows) / len(rows)
print(json.dumps({"mode": os.environ["MODE"], "time_per_step": round(mean("time/step"), 2),
                  "sample": round(mean("time/sample"), 2), "train": round(mean("time/train"), 2),
                  "staleness": [int(r["async/staleness"]) for r in rows],
                  "reward": [round(r["train/reward_mean"], 3) for r in rows]}))'
done
