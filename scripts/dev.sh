#!/usr/bin/env bash
# One-stop set-up for a fresh Debian machine with Python 3.11, then the demo or the tests.
#   bash scripts/dev.sh demo   # pretrain the demo GPT on this machine's CPU
#   bash scripts/dev.sh test   # the whole test suite (starts the local Slurm cluster when root)
# Set-up is idempotent: the virtualenv is made once and reinstalled only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ORCH_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV" || { echo "error: '$PY -m venv' failed; on Debian: apt-get install python3-venv" >&2; exit 1; }
  fi
  local stamp="$VENV/.orch-installed" want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing torch and orch into $VENV (a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # mosaicml-streaming imports torchvision: install the matching pair first.
    "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    echo "$want" > "$stamp"
  fi
}

case "${1:-}" in
  demo)
    setup
    shift
    exec "$VENV/bin/orch" submit jobs/pretrain.yaml --follow "$@"
    ;;
  test)
    setup
    shift
    if [ -x slurm/cluster.sh ] && [ "$(id -u)" = 0 ]; then
      bash slurm/cluster.sh up
    fi
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh demo|test [args]" >&2
    exit 2
    ;;
esac
