#!/usr/bin/env bash
# One-stop set-up for a fresh Debian machine with Python 3.11, then the demo or the tests.
#   bash scripts/dev.sh demo       # the demo pipeline on this machine's CPU: pretrain, SFT, DPO, GRPO, eval
#   bash scripts/dev.sh pretrain   # the demo pretrain alone
#   bash scripts/dev.sh test   # the whole test suite (starts the local Slurm cluster when root)
#   bash scripts/dev.sh fast   # the unit tests alone: no end-to-end run, no Slurm (about a minute or two)
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

# lm-evaluation-harness, for the test that checks our eval job against it: an overlay environment that
# sees .venv's torch and transformers but keeps its own huggingface_hub (docs/eval.md says why).
setup_lm_eval() {
  local lm="$VENV/lmeval" base
  [ -x "$lm/bin/python" ] && "$lm/bin/python" -c "import lm_eval" 2>/dev/null && return 0
  echo "[setup] installing lm-evaluation-harness into $lm (about 2 minutes the first time)"
  "$PY" -m venv "$lm"
  base=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import site; site.addsitedir('$base')" > "$("$lm/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_orch_base.pth"
  "$lm/bin/python" -m pip install -q lm_eval accelerate "huggingface_hub==0.36.2" "transformers==4.57.6" "torch==2.14.1" \
    || { echo "warning: lm_eval could not be installed; its comparison test will be skipped" >&2; rm -rf "$lm"; }
}

case "${1:-}" in
  demo)  # the whole chain on this machine: pretrain -> SFT -> DPO -> GRPO -> eval (report.md)
    setup
    shift
    exec "$VENV/bin/orch" submit jobs/pipeline.yaml executor=local --follow "$@"
    ;;
  pretrain)  # the pretrain stage alone
    setup
    shift
    exec "$VENV/bin/orch" submit jobs/pretrain.yaml executor=local --follow "$@"
    ;;
  test)
    setup
    setup_lm_eval
    shift
    if [ -x slurm/cluster.sh ] && [ "$(id -u)" = 0 ]; then
      bash slurm/cluster.sh up
    fi
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  fast)  # what a change to one file usually needs first; `test` runs these too
    setup
    shift
    exec "$VENV/bin/python" -m pytest -m "not slow and not slurm" "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh demo|pretrain|test|fast [args]" >&2
    exit 2
    ;;
esac
