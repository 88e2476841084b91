#!/usr/bin/env bash
# Installs the official Tinker Python SDK, in the two versions `whet serve`'s conformance test
# drives (crates/cli/tests/tinker_sdk/), into virtualenvs under .venv/ (git-ignored):
#   .venv/tinker-0.38.0   the current SDK (create_* return futures)
#   .venv/tinker-0.34.0   the older one (create_* return clients, downloads via `archive`)
# Each gets `pip install tinker==<version> numpy` from PyPI. Python >= 3.11 is needed
# ($PYTHON, else python3).
# Idempotent: a venv whose marker file `.complete` exists and whose python imports the right
# tinker version is kept as it is. A venv is built in place (venvs are not relocatable) and the
# marker is written last, so a half-built one (interrupted install) is deleted and rebuilt.
# Prints the two pythons at the end, 0.38.0 first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
versions=(0.38.0 0.34.0)

"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"tinker needs Python >= 3.11; {sys.executable} is {sys.version.split()[0]} (set PYTHON=...)")
PY

# True when the venv is complete and imports tinker at the wanted version.
ready() {
  local venv=$1 version=$2
  [[ -f "$venv/.complete" && -x "$venv/bin/python" ]] &&
    [[ "$("$venv/bin/python" -c 'import tinker; print(tinker.__version__)' 2>/dev/null)" == "$version" ]]
}

for version in "${versions[@]}"; do
  venv="$root/.venv/tinker-$version"
  if ready "$venv" "$version"; then
    continue
  fi
  echo "installing tinker==$version into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$root/.venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  # Both versions resolve with today's packages from their own pins (checked: tinker 0.34.0
  # needs nothing pinned beyond what its metadata says). Should a future release of a
  # dependency break 0.34.0, pin it here, e.g. `"pydantic<2.13"`, and say why.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "tinker==$version" numpy
  got=$("$venv/bin/python" -c 'import tinker; print(tinker.__version__)') || got=""
  if [[ "$got" != "$version" ]]; then
    echo "tinker $version did not install correctly in $venv (imports as '${got:-nothing}')" >&2
    exit 1
  fi
  touch "$venv/.complete" # last: only now does the venv count as installed
done

for version in "${versions[@]}"; do
  echo "$root/.venv/tinker-$version/bin/python"
done
