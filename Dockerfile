# GPU-node image for the Kubeflow components and the CLI.
#
# torch/torchvision wheels from PyPI are CUDA 13 builds that carry their own CUDA runtime libraries; the
# onnxruntime-gpu wheel is also built for CUDA 13 and its [cuda,cudnn] extras bring the libraries it needs
# beyond torch's (libcurand). So the base image needs no CUDA toolkit: the node's NVIDIA driver (via the
# NVIDIA container toolkit / GPU operator) is all a GPU node must provide.
#
# Install steps are the ones `make install` runs for the tests: the exact versions in constraints.txt, then
# the project itself.
#
#   docker build -t REGISTRY/nft-harden:0.1.0 .
#   docker push REGISTRY/nft-harden:0.1.0
#   nft-harden pipeline compile --image REGISTRY/nft-harden:0.1.0 --out pipeline.yaml
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin harden
WORKDIR /opt/nft-harden

# Dependencies first (cached layer): every pinned package CI tested.
COPY constraints.txt ./
RUN python -m pip install -r constraints.txt

COPY pyproject.toml README.md ./
COPY nft_core ./nft_core
COPY harden ./harden
COPY components ./components
COPY pipeline ./pipeline
RUN python -m pip install --no-deps . && nft-harden --help > /dev/null

# numeric, so that pods with runAsNonRoot can verify it (hadolint DL3066)
USER 1000:1000
WORKDIR /home/harden
ENTRYPOINT ["nft-harden"]
CMD ["--help"]
