#!/usr/bin/env bash
# The GPU path in one short call (issue #14): the CUDA tests, then the 0.5b recipes timed
# with --device cuda beside the CPU floor. Run it on a machine with a GPU:
#     bash benchmarks/gpu_check.sh [methods...]     (default: linear ties dare_ties slerp)
# Needs torch with CUDA and `pip install -e '.[test]'`; prints the test summary and one
# table row per recipe (wall seconds, ratio to the I/O floor, peak RSS).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q tests/engine/test_device.py
methods=("$@")
[ ${#methods[@]} -eq 0 ] && methods=(linear ties dare_ties slerp)
python benchmarks/run.py --size 0.5b --device cuda --methods "${methods[@]}"
