#!/usr/bin/env bash
# Live RL in the vault world (datasets/worlds/vault) on SmolLM2-135M-Instruct, CPU, the whole
# chain as a user would run it:
#   1. demonstrations: tools/make_vault_demos.py plays seeds 1000-1199 with a scripted agent
#      (160 for training, 40 for eval) — the model has never called a tool before;
#   2. SFT on them (1 epoch, batch 8, LoRA rank 16, lr 1e-3);
#   3. publish the SFT adapter as vault-sft@1.0.0, alias champion;
#   4. RL: datasets/worlds/vault/rl.toml (model = vault-sft@champion; 12 steps of 4 groups x 4
#      episodes) against the live world,
#      evaluated on world.yaml's 32 held-out eval_seeds before, midway and after.
# Prints the job ids and one JSON line per RL step. The home is $WHET_HOME if set, else a new
# temporary directory (kept, so `whet jobs …` can inspect it afterwards).
#   ./tools/get-smollm2.sh && benches/rl_world.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p whet -p whet-world-vault
export WHET_HOME=${WHET_HOME:-$(mktemp -d)}
echo "home: $WHET_HOME"
whet=./target/release/whet
demos=$WHET_HOME/demos
mkdir -p "$demos"
python3 tools/make_vault_demos.py --seeds 1000-1159 --out "$demos/train.jsonl"
python3 tools/make_vault_demos.py --seeds 1160-1199 --out "$demos/eval.jsonl"
id_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
sft=$($whet train sft --model models/SmolLM2-135M-Instruct.Q4_1.gguf --name vault-sft \
  --dataset "$demos/train.jsonl" --eval-dataset "$demos/eval.jsonl" --lora-rank 16 \
  --lora-alpha 32 --learning-rate 1e-3 --epochs 1 --batch-size 8 --warmup-steps 2 \
  --eval-interval 10 --json | id_of)
echo "sft job: $sft"
$whet models publish "$sft" --name vault-sft --version 1.0.0
$whet models alias set vault-sft@1.0.0 champion
rl=$($whet train datasets/worlds/vault/rl.toml --json | id_of)
echo "rl job: $rl"
$whet jobs metrics "$rl" --json | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    keep = ["step", "train/reward_mean", "worlds/success_rate", "worlds/turns_mean",
            "worlds/tokens_per_turn", "by_group/frac_mixed", "rollouts/trained",
            "eval/success_rate", "eval/reward_mean", "eval/turns_mean",
            "time/sample", "time/train", "time/step"]
    print(json.dumps({k: round(r[k], 3) for k in keep if k in r}))'
