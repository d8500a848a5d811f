# GPU-node image for the Kubeflow components and the CLI.
#
# torch/torchvision wheels from PyPI are CUDA 13 builds that carry their own CUDA runtime libraries; the
# onnxruntime-gpu wheel is also built for CUDA 13 and its [cuda,cudnn] extras bring the libraries it needs
# beyond torch's (libcurand). So the base image needs no CUDA toolkit: the node's NVIDIA driver (via the
# NVIDIA container toolkit / GPU operator) is all a GPU node must provide.
#
# What it installs is requirements/runtime.txt (`make lock-runtime`): pyproject.toml's dependencies without the
# [local] and [dev] extras (so no dvc, no MLflow server stack, no test tools; MLflow's client is mlflow-skinny,
# and the image talks to an MLflow server over HTTP, an sqlite registry being refused here), at the versions CI
# tested (constraints.txt), each file checked against its sha256 (pip --require-hashes). Then the project
# itself, without dependencies, and `pip check`. Two packages come as source (kfp-server-api, nft-harden):
# they are built with the hashed setuptools of requirements/build.txt, without build isolation (which would
# fetch an unpinned, unhashed setuptools).
#
#   docker build -t REGISTRY/nft-harden:0.1.0 \
#       --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#       --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" --build-arg SOURCE="$(git remote get-url origin)" .
#   docker push REGISTRY/nft-harden:0.1.0
#   nft-harden pipeline compile --image REGISTRY/nft-harden:0.1.0 --out pipeline.yaml
#
# The base image is pinned by digest (the tag is then only a label for readers): a python:3.11-slim-bookworm
# image published on Docker Hub. The digest was not pulled or inspected on the machine this was written on (no
# registry access there); it is the one pinned for that tag in public repositories' Dockerfiles, e.g.
# peiyang-z6/BandStructure_AI_Project, file Dockerfile (commit 031f26d8efa99aa7b48789a61e4834bcc313d355),
# and several others. Docker checks what it pulls against the digest: a wrong or withdrawn digest fails the
# build, it never pulls something else. To move to the tag's current image, replace it with the digest that
#   docker buildx imagetools inspect python:3.11-slim-bookworm
# prints (the "Digest:" line, the multi-platform index), then rebuild.
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

# OCI annotations (https://github.com/opencontainers/image-spec/blob/main/annotations.md). The repository URL
# (SOURCE), the commit (REVISION) and the build time (CREATED) come from the build (see above) and stay empty
# when not given.
ARG VERSION=0.1.0
ARG SOURCE=""
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="nft-harden" \
      org.opencontainers.image.description="Backdoor purification (Neural mask Fine-Tuning) as an auditable MLOps hardening stage: the nft-harden CLI and its Kubeflow components" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin harden
WORKDIR /opt/nft-harden

# Dependencies first (cached layer): the build backend, then the runtime lock, every file checked by its hash.
COPY requirements/build.txt requirements/runtime.txt ./requirements/
RUN python -m pip install --require-hashes --no-deps -r requirements/build.txt \
    && python -m pip install --require-hashes --no-deps --no-build-isolation -r requirements/runtime.txt

COPY pyproject.toml README.md ./
COPY nft_core ./nft_core
COPY harden ./harden
COPY components ./components
COPY pipeline ./pipeline
RUN python -m pip install --no-deps --no-build-isolation . \
    && python -m pip check \
    && nft-harden --help > /dev/null

# numeric, so that pods with runAsNonRoot can verify it (hadolint DL3066)
USER 1000:1000
WORKDIR /home/harden
ENTRYPOINT ["nft-harden"]
CMD ["--help"]
