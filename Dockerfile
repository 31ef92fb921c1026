# lxm with detectron2 on a CUDA runtime image. Default command: `lxm --help`.
#
# Two stages on one CUDA release. `detectron2` (the -devel image: nvcc and the CUDA headers) makes a venv with
# torch/torchvision (wheels for that CUDA release), lxm from pyproject.toml (its only dependency list, with the
# `detectron2` extra) and detectron2 from its official repository at a pinned commit, compiled with its CUDA
# extension. The runtime image takes that venv and nothing else; there `lxm extract --engine auto` (the default)
# runs the detectron2 engine.
#
#   docker build -t lxm .      # long: compiles detectron2's CUDA kernels for six GPU generations
#   docker run --gpus all -v $PWD/data:/work lxm lxm extract --images coco/val2014 --out features/val2014 ...
#
# DETECTRON2_COMMIT is the commit of the source snapshot the tests run the engine on (../shared/vendor/detectron2,
# checked by tests/test_docker.py). TORCH_CUDA names the PyTorch wheel index for CUDA_VERSION: detectron2's
# extension must be compiled by the CUDA release torch was built with.
ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-${UBUNTU} AS detectron2

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_CUDA=cu130
ARG DETECTRON2_COMMIT=02b5c4e295e990042a714712c21dc79b731e8833
# No GPU is visible during `docker build`: FORCE_CUDA compiles the kernels anyway, for the GPU generations torch's
# cu130 wheels support (Turing to Blackwell; PTX for later ones).
ARG TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;9.0;10.0;12.0+PTX"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FORCE_CUDA=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}

# Python with headers, git for pip's checkout, a C++ compiler and ninja for the extension.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git g++ ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first, pinned (pyproject.toml admits these versions), so the installs below keep it.
RUN pip install --index-url=https://download.pytorch.org/whl/${TORCH_CUDA} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/lxm
COPY pyproject.toml README.md ./
COPY lxm ./lxm
# hadolint ignore=DL3013
RUN pip install ".[detectron2]" && lxm --help > /dev/null

# --no-build-isolation: compiled against the torch above (whose dependencies include setuptools). pip records the
# commit in detectron2's direct_url.json, and `lxm extract` copies it into each store's manifest.
RUN pip install --no-build-isolation "git+https://github.com/facebookresearch/detectron2.git@${DETECTRON2_COMMIT}" \
    && python -c "import torch, detectron2._C"

FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-${UBUNTU}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The Python the venv was made with (same Ubuntu release) and the shared libraries OpenCV's headless wheel needs;
# versions follow the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=detectron2 /opt/venv /opt/venv
RUN lxm --help > /dev/null \
    && python -c "from lxm.extract.pipeline import choose_engine; e = choose_engine('auto'); print(e.summary()); \
assert e.name == 'detectron2'"

WORKDIR /work
CMD ["lxm", "--help"]
