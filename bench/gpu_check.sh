#!/usr/bin/env bash
# The prepared GPU check of issue 16: reward model and PPO on SmolLM2-135M in bf16, with and
# without LoRA; tokens/s, peak GPU memory and loss of each (bench/gpu_check.py; < 8 minutes
# on one GPU is the goal, not yet measured). Where vllm is installed (pip install
# 'hhdata[vllm]'), PPO once more with --generator vllm, its tokens/s beside transformers
# generation's (--no-vllm skips it). From the repository root, on a GPU machine:
#
#   bash bench/gpu_check.sh /tmp/gpu-check            # then copy results.md into bench/gpu.md
#   bash bench/gpu_check.sh --dry-run /tmp/gpu-dry    # the plumbing on a CPU: tiny model, seconds
#   bash bench/gpu_check.sh /tmp/gpu-check --no-vllm  # flags after OUT_DIR go to gpu_check.py
#
# PYTHON picks the interpreter (default .venv/bin/python, as `make venv` builds it). Any failed
# step stops the script with its exit code.
set -euo pipefail

dry_run=()
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=(--dry-run)
    shift
fi
out="${1:?usage: bash bench/gpu_check.sh [--dry-run] OUT_DIR [--no-vllm]}"
python="${PYTHON:-.venv/bin/python}"

if [[ ${#dry_run[@]} -eq 0 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$python" -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"'
    "$python" -c 'import gguf, peft' # SmolLM2-135M is read from GGUF; LoRA is peft's
    "$python" -c 'import importlib.util as u; print("vllm:", "installed" if u.find_spec("vllm")
else "not installed: the PPO run with --generator vllm is skipped")'
fi
mkdir -p "$out"
# one thread per core is plenty for the data side; the GPU does the work
OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" timeout 1200 "$python" bench/gpu_check.py --out "$out" \
    "${dry_run[@]}" "${@:2}"
echo "results: $out/results.md"
