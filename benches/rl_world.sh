#!/usr/bin/env bash
# Live RL in the vault world (datasets/worlds/vault) on SmolLM2-135M-Instruct, CPU, the whole
# chain as a user would run it:
#   1. demonstrations: tools/make_vault_demos.py plays seeds 1000-1199 with a scripted agent
#      (160 for training, 40 for eval) — the model has never called a tool before;
#   2. SFT on them (1 epoch, batch 8, LoRA rank 16, lr 1e-3);
#   3. publish the SFT adapter as vault-sft@1.0.0, alias champion;
#   4. RL: datasets/worlds/vault/rl.toml (model = vault-sft@champion; 12 steps of 4 groups x 8
#      episodes, lr 5e-5) against the live world, published as vault-rl@0.1.0;
#   5. RL again: rl-continue.toml from vault-rl@0.1.0 (lr 1e-4), published as vault-rl@0.2.0;
#      both evaluated greedily on world.yaml's 32 held-out eval_seeds along the way;
#   6. the three policies (SFT, after 4, after 5) at temperature 1 on the training seeds (128
#      episodes each) and on the held-out eval seeds (128 each), kept in $WHET_HOME/rollouts/
#      and summarised by benches/rl_world_report.py.
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
metrics() {
  $whet jobs metrics "$1" --json | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    keep = ["step", "train/reward_mean", "worlds/success_rate", "worlds/turns_mean",
            "worlds/tokens_per_turn", "worlds/reward/tool_error", "by_group/frac_mixed",
            "rollouts/trained", "optim/entropy",
            "eval/success_rate", "eval/reward_mean", "eval/turns_mean",
            "time/sample", "time/train", "time/step"]
    print(json.dumps({k: round(r[k], 3) for k in keep if k in r}))'
}
rl=$($whet train datasets/worlds/vault/rl.toml --json | id_of)
echo "rl job: $rl"
metrics "$rl"
$whet models publish "$rl" --name vault-rl --version 0.1.0
rl2=$($whet train datasets/worlds/vault/rl-continue.toml --json | id_of)
echo "rl job (continued): $rl2"
metrics "$rl2"
$whet models publish "$rl2" --name vault-rl --version 0.2.0
# The held-out seeds as a manifest of their own (worlds rollout plays a manifest's `seeds`).
held_out=datasets/worlds/vault/held-out.yaml
trap 'rm -f "$held_out"' EXIT
python3 - "$held_out" <<'PY'
import re, sys
s = open("datasets/worlds/vault/world.yaml").read()
ev = re.search(r"eval_seeds: (\[.*\])", s).group(1)
open(sys.argv[1], "w").write(re.sub(r"\nseeds: \[.*\]", "\nseeds: " + ev, s))
PY
mkdir -p "$WHET_HOME/rollouts"
report=()
for m in vault-sft@1.0.0 vault-rl@0.1.0 vault-rl@0.2.0; do
  files=()
  for world in datasets/worlds/vault/world.yaml "$held_out"; do
    out="$WHET_HOME/rollouts/$m-$(basename "$world" .yaml).jsonl"
    echo "$m on $world (T=1, 128 episodes): $($whet worlds rollout "$world" --model "$m" \
      --count 128 --batch 32 --seed 7 --out "$out" --json)"
    files+=("$out")
  done
  report+=("$m=${files[0]},${files[1]}")
done
# Success per seed set, endings, tool errors, wrong answers; each RL policy against SFT.
python3 benches/rl_world_report.py "${report[@]}"
