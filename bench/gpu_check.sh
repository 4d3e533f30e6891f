#!/usr/bin/env bash
# The trainer's GPU checks in one command on a lent H100/H200 (the `device` tool's machine), which
# has torch but not megatron-core. Prepare here, once per checkout (the wheel is git-ignored):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
#
# then run `bash bench/gpu_check.sh` there with carry=[".whl"] and timeout_s=570. It prints the
# GPU, then `python bench/train_step.py --gpu` (Llama-3.2-1B shape, seq 4096: bf16 tokens/s and
# MFU; FP8 against bf16 when Transformer Engine imports), and leaves the log in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu_check.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'mcore', m.__version__)" \
    | tee -a "$log"
timeout 480 python3 bench/train_step.py --gpu --steps "${STEPS:-40}" 2>&1 | tee -a "$log"
