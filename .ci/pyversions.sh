#!/usr/bin/env bash
# The Pythons prefpipe supports besides the one .ci/run tests in full (3.11): for each, a venv made by ./dev, then
# `prefpipe --help`, the fast tests below and one short pipeline on a tiny model. Usage:
#   bash .ci/pyversions.sh [VERSION...]     (default: 3.10 3.13; VENV .venv-pyVERSION, as ./dev names it)
# Torch: this machine's disk holds a CPU wheel for Python 3.11 only and PyTorch's CPU index is out of reach, so these
# venvs get PyPI's torch wheel, a CUDA build (about 3 GB with its nvidia-* packages; it runs on CPU as well).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0} TORCH_INDEX=${TORCH_INDEX:-pypi}

# Torch-free and tiny-model tests, about a minute on 2 cores: the TOML reader (tomllib/tomli), the options and CLI,
# the data readers and checks, hashing, the losses. The full suite runs on 3.11.
FAST_TESTS=(
  tests/test_options.py tests/test_foundation.py tests/test_setup_commands.py tests/pipeline/test_pipeline_config.py
  tests/data/test_identity.py tests/data/test_formats.py tests/data/test_data_check.py tests/data/test_tokenize.py
  tests/data/test_input_robustness.py tests/data/test_data_mapped.py tests/train/test_losses.py
  tests/generation/test_generation_pairs.py tests/generation/test_generation_judges.py
)

pipeline_smoke() {  # $1: the venv; the real CLI, defaults (progress bars on), three training steps
  local prefpipe work
  prefpipe=$(cd "$1" && pwd)/bin/prefpipe
  work=$(mktemp -d)
  "$1/bin/python" - "$work" <<'EOF'
import json, random, sys
from pathlib import Path
from prefpipe.tiny import build_tiny
work = Path(sys.argv[1])
build_tiny(work / "tiny")
rng = random.Random(0)
words = "the a quick brown fox dog jumps over lazy cat sat on mat".split()
text = lambda n: " ".join(rng.choice(words) for _ in range(n))
with open(work / "pairs.jsonl", "w") as f:
    for i in range(12):
        f.write(json.dumps({"prompt": f"Q{i}: {text(4)}", "chosen": text(6), "rejected": text(5) + " no"}) + "\n")
(work / "run.toml").write_text(
    'model = "tiny"\ndata = "pairs.jsonl"\nruns_dir = "runs"\nloss_type = ["dpo"]\nbeta = [0.1]\ndevice = "cpu"\n'
    '[precompute]\nmax_length = 64\nmax_prompt_length = 32\n[train]\nmax_steps = 3\nbatch_size = 4\n')
EOF
  (cd "$work" && "$prefpipe" pipeline --config run.toml && test -d runs/dpo-beta0.1/final && test -s runs/summary.md)
  rm -rf "$work"
}

versions=("$@")
[ $# -gt 0 ] || versions=(3.10 3.13)
for version in "${versions[@]}"; do
  venv=.venv-py$version
  start=$SECONDS
  PYTHON=$version VENV=$venv ./dev setup
  echo "pyversions: $venv ($("$venv/bin/python" --version)) ready in $((SECONDS - start)) s" >&2
  start=$SECONDS
  "$venv/bin/prefpipe" --help >/dev/null
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} VENV=$venv ./dev test -p no:cacheprovider "${FAST_TESTS[@]}"
  pipeline_smoke "$venv"
  echo "pyversions: Python $version passed in $((SECONDS - start)) s" >&2
done
