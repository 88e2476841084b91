#!/usr/bin/env bash
# Live RL in the vault world (datasets/worlds/vault) on SmolLM2-135M-Instruct, CPU, the whole
# chain as a user would run it:
#   1. demonstrations: tools/make_vault_demos.py plays seeds 1000-1199 with a scripted agent
#      (160 for training, 40 for eval) — the model has never called a tool before;
#   2. SFT on them (1 epoch, batch 8, LoRA rank 16, lr 1e-3);
#   3. publish the SFT adapter as vault-sft@1.0.0, alias champion;
#   4. RL: datasets/worlds/vault/rl.toml (model = vault-sft@champion; 16 steps of 8 (task, seed)
#      slots x 4 episodes over world.yaml's 64 training seeds, lr 1e-4 decaying to 0; its eval
#      plays 128 episodes at temperature 1 on the 32 held-out eval_seeds before training, after
#      step 8 and at the end), published as vault-rl@0.1.0;
#   5. both policies measured apart from the job, on other draws: at temperature 1, 256
#      episodes on the training seeds (4 per seed) and 256 on the held-out seeds (8 per seed);
#      greedy, one episode per seed of each set; kept in $WHET_HOME/rollouts/ and summarised by
#      benches/rl_world_report.py.
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
    keep = ["step", "learning_rate", "train/reward_mean", "worlds/success_rate", "worlds/turns_mean",
            "worlds/reward/tool_error", "rollouts/trained", "optim/entropy",
            "eval/success_rate", "eval/reward_mean", "eval/turns_mean",
            "time/sample", "time/train", "time/step"]
    print(json.dumps({k: round(r[k], 6 if k == "learning_rate" else 3) for k in keep if k in r}))'
$whet models publish "$rl" --name vault-rl --version 0.1.0
world=datasets/worlds/vault/world.yaml
out=$WHET_HOME/rollouts
mkdir -p "$out"
for m in vault-sft@1.0.0 vault-rl@0.1.0; do
  for set in train held-out; do
    flag=()
    [[ $set == held-out ]] && flag=(--eval-seeds)
    r=$($whet worlds rollout "$world" "${flag[@]}" --model "$m" --count 256 --batch 32 \
      --seed 7 --out "$out/$m-$set-t1.jsonl" --json)
    echo "$m, $set seeds, T=1: $r"
    # Greedy: one episode per seed (64 training, 32 held-out).
    n=64
    [[ $set == held-out ]] && n=32
    r=$($whet worlds rollout "$world" "${flag[@]}" --model "$m" --count $n --batch 32 \
      --temperature 0 --out "$out/$m-$set-greedy.jsonl" --json)
    echo "$m, $set seeds, greedy: $r"
  done
done
# Success per seed set, endings, tool errors, wrong answers; the RL policy against SFT.
for mode in t1 greedy; do
  echo "== $mode"
  python3 benches/rl_world_report.py \
    "sft=$out/vault-sft@1.0.0-train-$mode.jsonl,$out/vault-sft@1.0.0-held-out-$mode.jsonl" \
    "rl=$out/vault-rl@0.1.0-train-$mode.jsonl,$out/vault-rl@0.1.0-held-out-$mode.jsonl"
done
