#!/usr/bin/env bash
# GPU check of the engine benchmark: SmolLM2 on CUDA in bfloat16 at C = 1, 32 and 128, with all
# four systems, inside five minutes. Writes bench/results/gpu/engine.{json,md,png}.
#
# Usage, from anywhere in the repository: bash bench/gpu_check.sh [extra bench.engine flags]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUDGET_S=300             # the whole benchmark, hard limit
INNER_BUDGET_S=270       # the harness stops starting workers past this, so results get written
OUT_DIR=bench/results/gpu
PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: this machine has no NVIDIA driver" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [[ ! -x "$PY" ]]; then
    echo "gpu_check: no $PY yet: running make setup"
    make setup
    # Fall back to the install stamp itself should the setup alias be missing.
    [[ -x "$PY" ]] || make .venv/.sluice-installed
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch $("$PY" -c 'import torch; print(torch.__version__)') in .venv" \
        "cannot use CUDA (a CPU-only build?): install a CUDA build of torch into .venv" >&2
    exit 1
fi

# Untimed: convert SmolLM2's GGUF into the safetensors cache once, so no worker pays for it.
"$PY" - <<'EOF'
from pathlib import Path

from inference_node.models import load_language_model

load_language_model(
    "smollm2-135m-instruct",
    device="cuda",
    dtype="bfloat16",
    cache_dir=Path.home() / ".cache" / "sluice" / "models",
)
EOF

status=0
timeout "$BUDGET_S" "$PY" -m bench.engine \
    --device cuda \
    --dtype bfloat16 \
    --concurrency 1,32,128 \
    --requests 128 \
    --midbatch-background-tokens 1000 \
    --matmul-seconds 1 \
    --time-budget-s "$INNER_BUDGET_S" \
    --out-dir "$OUT_DIR" \
    "$@" || status=$?

if [[ $status -eq 124 ]]; then
    echo "gpu_check: the benchmark did not finish within ${BUDGET_S} s" >&2
    exit "$status"
fi
if [[ -f "$OUT_DIR/engine.md" ]]; then
    echo
    cat "$OUT_DIR/engine.md"
fi
exit "$status"
