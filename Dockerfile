# pedconv training image: the NGC PyTorch container plus this project.
# nvcr.io/nvidia/pytorch:26.08-py3 ships Ubuntu 24.04, Python 3.12, CUDA 13.4.1, cuDNN 9.25, NCCL, PyTorch 2.14.0a0
# (NVIDIA build), torchvision and NVIDIA DALI 2.2; host driver requirements: see docs/multi_gpu_and_docker.md.
# Pinned on purpose: change the tag only together with docs/multi_gpu_and_docker.md and a run of `python docker/check_image.py`.
FROM nvcr.io/nvidia/pytorch:26.08-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/pedconv

# Only what the container lacks (torch, torchvision, DALI, numpy and Pillow are the container's own).
COPY docker/requirements-ngc.txt /tmp/requirements-ngc.txt
RUN pip install --no-cache-dir -r /tmp/requirements-ngc.txt && rm /tmp/requirements-ngc.txt

COPY . .

# Fail the build, not the first training run, if the base image lacks a feature the code uses.
RUN python docker/check_image.py
