#!/usr/bin/env bash
# GPU check for phase one: precompute ~20k pairs with a random-init 0.5B Qwen2-shaped model (150k vocabulary, bf16)
# with the hf backend and, where `import vllm` works, the vllm backend; then one table with tokens/s, the --verify
# drift against a float32 transformers forward, and the peak GPU memory of each. About 8 minutes on one H100.
#
# Nothing is installed: the project runs from this checkout (PYTHONPATH=.). Full output goes under $OUT (the
# device tool's output folder; default .devout/). Sizes come from the environment, so it dry-runs on a CPU:
#   ROWS=200 HIDDEN=64 LAYERS=2 HEADS=2 KV_HEADS=1 INTER=128 VOCAB=1000 DTYPE=float32 bash bench/gpu_check.sh
# PYTHON picks the interpreter (python3); VLLM_PYTHON the one for the vllm half (default: the same).
set -uo pipefail  # not -e: a failed half still leaves its row in the table
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/.devout}"
PYTHON="${PYTHON:-python3}"
VLLM_PYTHON="${VLLM_PYTHON:-$PYTHON}"
DTYPE="${DTYPE:-bfloat16}"
VERIFY="${VERIFY:-64}"
ROWS="${ROWS:-20000}"
PART_ROWS="${PART_ROWS:-$(( ROWS / 10 > 0 ? ROWS / 10 : 1 ))}"
WORK="${WORK:-$(mktemp -d)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DTYPE VERIFY ROWS VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}" VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname); work dir $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" -c "import torch, transformers, pyarrow; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| pyarrow', pyarrow.__version__)"
"$PYTHON" -c "import prefpipe.cli" || { echo "prefpipe does not import with $PYTHON"; exit 1; }

t0=$(date +%s)
"$PYTHON" bench/gpu_check.py build "$WORK" || { echo "build failed"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"

common=(precompute --model "$WORK/model" --data "$WORK/pairs.jsonl" --dtype "$DTYPE" --max_length 1024
        --max_prompt_length 512 --part_rows "$PART_ROWS" --verify "$VERIFY" --no_progress)

"$PYTHON" bench/gpu_check.py run hf "$OUT" "$WORK" -- \
    "$PYTHON" -m prefpipe "${common[@]}" --backend hf --out "$WORK/cache-hf"

if "$VLLM_PYTHON" -c "import vllm" >/dev/null 2>&1; then
    "$PYTHON" bench/gpu_check.py run vllm "$OUT" "$WORK" -- \
        "$VLLM_PYTHON" -m prefpipe "${common[@]}" --backend vllm --out "$WORK/cache-vllm"
else
    echo '{"name": "vllm", "status": "vllm: not installed on this machine"}' > "$OUT/vllm.json"
fi

echo
echo "== summary ($(( $(date +%s) - t0 )) s in all)"
"$PYTHON" bench/gpu_check.py table "$OUT" "$WORK"
