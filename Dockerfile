# Training image: CUDA PyTorch plus this package. From the repository root:
#   docker build -t ddpm-train .
#   docker run --rm --init --gpus all --shm-size=8g -v "$PWD/runs:/workspace/runs" ddpm-train
# The base image holds the torch that setup.py pins (torch==2.14.1; CUDA 12.6 runs on NVIDIA drivers >= 525
# through CUDA's minor-version compatibility), so `pip install .` adds only the rest.
FROM pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/app/.cache/huggingface

# A fixed uid (1000, the usual first user on a host) so mounted run folders stay writable; Ubuntu 24.04
# bases already give it to a user named ubuntu.
RUN if id -un 1000 >/dev/null 2>&1; then userdel --remove "$(id -un 1000)"; fi \
    && useradd --create-home --uid 1000 app

WORKDIR /workspace
COPY . .
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info \
    && mkdir -p runs "$HF_HOME" \
    && chown -R app:app runs /home/app

USER 1000:1000
# Checkpoints, TensorBoard and exports (train.output_dir is runs/<name>); downloaded hub data sets.
VOLUME ["/workspace/runs", "/home/app/.cache/huggingface"]
# launch/node.sh starts one process per GPU (torchrun passes `docker stop`'s SIGTERM on to the trainer, which
# checkpoints; run with --init), and plain python for one. --resume latest: a restarted container continues
# its run instead of being refused (a fresh start never mixes into a used runs/ folder).
CMD ["launch/node.sh", "--config", "configs/cifar10.yaml", "--resume", "latest"]
