#!/usr/bin/env bash
# Make .venv/bin/python the project's Python 3.12 environment, creating it when missing.
#
# The environment is about 11 GB, so it lives in a cache keyed by a hash of
# requirements.txt and .venv is a link to it: a fresh clone on the same machine
# reuses it, and a change of pins builds a new one. The project itself is installed
# editable (no deps, seconds), re-pointed at this checkout whenever it is elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

find_python312() {
  local candidate
  for candidate in "${PYTHON312:-}" python3.12; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for candidate in "$(pyenv root)"/versions/3.12*/bin/python3.12; do
      if [ -x "$candidate" ] && "$candidate" -c 'import sys' 2>/dev/null; then
        echo "$candidate"; return 0
      fi
    done
  fi
  return 1
}

key=$(sha256sum requirements.txt | cut -c1-12)
cache_dir=${JAXLLM_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jaxllm}
venv="$cache_dir/venv-$key"

if [ ! -f "$venv/.complete" ]; then
  if ! python=$(find_python312); then
    cat >&2 <<'MSG'
error: jaxllm needs Python 3.12 (vllm-tpu 0.32.0 ships cp312 wheels only; jax 0.11.2 needs >= 3.12).
  None was found: no working `python3.12` on PATH and none under `pyenv root`/versions/3.12*.
  Install one, for example `pyenv install 3.12` or `apt-get install python3.12 python3.12-venv`,
  or point PYTHON312=/path/to/python3.12 at it, then run make again.
MSG
    exit 1
  fi
  echo ">> creating $venv with $python (vllm-tpu stack, about 8 minutes and 11 GB, once per pin set)"
  rm -rf "$venv"
  mkdir -p "$cache_dir"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --progress-bar off --upgrade pip
  "$venv/bin/python" -m pip install --progress-bar off -r requirements.txt
  touch "$venv/.complete"
fi

if [ "$(readlink .venv 2>/dev/null)" != "$venv" ]; then
  rm -rf .venv
  ln -s "$venv" .venv
fi

# The editable install records this checkout's path; re-point it when another clone used the cache last.
# Run the check from / so that this checkout's own jaxllm folder cannot shadow the installed one.
if ! (cd / && "$root/.venv/bin/python" - "$root" <<'PY' 2>/dev/null

import os, sys, jaxllm
sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(jaxllm.__file__))) != sys.argv[1])
PY
); then
  echo ">> installing jaxllm (editable) from $root into $venv"
  .venv/bin/python -m pip install --progress-bar off --quiet --no-deps --no-build-isolation -e "$root"
fi
