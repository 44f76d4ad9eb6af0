#!/usr/bin/env bash
# The GPU check of docs/performance.md, sized for one short borrowed-GPU session (about 6 minutes on an H200):
# the CIFAR-10 config's training step in bf16 against diffusers' UNet2DModel (images/s, TFLOP/s, MFU, memory),
# then torch.compile and channels_last on it. The GPU image has torch, accelerate and tensorboard but not diffusers,
# datasets, einops or denoising-diffusion-pytorch, so carry their wheels (downloaded here, where pip works).
# Prepared, not yet run: no GPU was lent to the task that wrote it.
#
#   pip download --no-deps -d .gpu-wheels diffusers einops denoising-diffusion-pytorch ema-pytorch datasets dill multiprocess importlib_metadata pytorch-fid
#   device tool: run(command="bash bench/gpu.sh", carry=[".gpu-wheels"], timeout_s=540)
#
# PEAK_TFLOPS is the dense bf16 peak the MFU column divides by (H100/H200 datasheet: about 990).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
out="${OUT:-.}"
python3 bench/train_throughput.py --shapes cifar10 --precisions bf16 --batch 128 --seconds 20 --repeats 1 \
  --peak-tflops "${PEAK_TFLOPS:-990}" | tee "$out/gpu-throughput.md"
python3 bench/levers.py --shape cifar10 --batch 128 --seconds 20 --repeats 1 \
  --levers default,compile,channels-last,fp32 | tee "$out/gpu-levers.md"
