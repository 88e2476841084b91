#!/usr/bin/env bash
# Installs the Tinker cookbook (`tinker-cookbook` 0.6.1 with the `tinker` 0.38.0 SDK) into
# .venv/cookbook (git-ignored), for running its recipes against `whet serve` with
# tools/cookbook.py. Python >= 3.11 is needed ($PYTHON, else python3).
#
# tinker-cookbook 0.6.1 declares `tml-renderers>=0.4.1`, which PyPI does not have (its newest is
# 0.2.1), so `pip install tinker-cookbook==0.6.1` does not resolve. The cookbook imports
# tml_renderers lazily, only for Inkling and Kimi K3.1 models, so this installs the cookbook's
# other dependencies (as its metadata states them, plus the `math-rl` extra that rl_loop
# imports) and then the cookbook itself with --no-deps.
#
# torch comes from PyPI: the Linux wheel is the CUDA build and pulls ~3 GB of nvidia-* wheels
# (about 6 GB installed). Where download.pytorch.org is reachable, TORCH_INDEX_URL=
# https://download.pytorch.org/whl/cpu installs the CPU-only build (~1 GB) first instead.
#
# Idempotent: a venv whose marker file `.complete` exists and whose python imports tinker 0.38.0
# and tinker_cookbook 0.6.1 is kept as it is. The venv is built in place (venvs are not
# relocatable) and the marker is written last, so a half-built one is deleted and rebuilt.
# Prints the venv's python at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
venv="$root/.venv/cookbook"

"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"tinker-cookbook needs Python >= 3.11; {sys.executable} is {sys.version.split()[0]} (set PYTHON=...)")
PY

ready() {
  [[ -f "$venv/.complete" && -x "$venv/bin/python" ]] &&
    [[ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("tinker"), m.version("tinker-cookbook"))' 2>/dev/null)" == "0.38.0 0.6.1" ]]
}

if ! ready; then
  echo "installing tinker==0.38.0 and tinker-cookbook==0.6.1 into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$root/.venv"
  "$python" -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  "${pip[@]}" install --quiet --upgrade pip
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "${pip[@]}" install --quiet "torch>=2.10" --index-url "$TORCH_INDEX_URL"
  fi
  # tinker-cookbook 0.6.1's Requires-Dist without tml-renderers, plus its `math-rl` extra.
  "${pip[@]}" install --quiet \
    "tinker==0.38.0" \
    "aiohttp>=3.9.0" "anyio>=4.0.0" "blobfile>=3.0.0" "chz>=0.4.0" "cloudpickle>=3.0.0" \
    "datasets>=2.14.0" "huggingface-hub>=0.20.0" "numpy>=1.24.0" "pillow>=10.0.0" \
    "pydantic>=2.0.0" "pyrage>=1.4.0" "rich>=13.0.0" "safetensors>=0.4.0" "termcolor>=2.0.0" \
    "tiktoken>=0.12.0" "torch>=2.10" "tqdm>=4.60.0" \
    "transformers!=5.3.0,!=5.4.*,!=5.5.0,!=5.5.1,!=5.5.2,!=5.5.3,!=5.6.*,>=4.57.6" \
    "math-verify>=0.5.0" "pylatexenc>=2.0" "sympy>=1.12.0"
  "${pip[@]}" install --quiet --no-deps "tinker-cookbook==0.6.1"
  # Both recipes import (rl_loop also pulls torch and the math grader).
  "$venv/bin/python" -c 'import tinker_cookbook.recipes.sl_loop, tinker_cookbook.recipes.rl_loop'
  if ! ready_check=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("tinker"), m.version("tinker-cookbook"))') ||
    [[ "$ready_check" != "0.38.0 0.6.1" ]]; then
    echo "tinker / tinker-cookbook did not install correctly in $venv (${ready_check:-nothing})" >&2
    exit 1
  fi
  touch "$venv/.complete" # last: only now does the venv count as installed
fi

echo "$venv/bin/python"
