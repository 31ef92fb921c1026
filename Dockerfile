# lxm on a CUDA runtime image: Python venv, torch/torchvision wheels from PyPI (built for CUDA 12), lxm installed
# from pyproject.toml (its only dependency list). Default command: `lxm --help`.
#
#   docker build -t lxm .
#   docker run --gpus all -v $PWD/data:/work lxm lxm pretrain --config base --corpus corpus/ ...
#
# The detectron2 extraction engine is optional and not built here: lxm's default engine is plain torch/torchvision
# and gives the same boxes. Users who want detectron2 add it in an image derived from this one.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python and the shared libraries OpenCV's headless wheel needs; versions follow the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first, pinned (pyproject.toml admits these versions), so the lxm install below keeps them.
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/lxm
COPY pyproject.toml README.md ./
COPY lxm ./lxm
# hadolint ignore=DL3013
RUN pip install . && lxm --help > /dev/null

WORKDIR /work
CMD ["lxm", "--help"]
