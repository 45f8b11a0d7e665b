# syntax=docker/dockerfile:1.7
# The text-to-image gRPC service (`t2i serve`) on NVIDIA GPUs.
#
#   docker build -f docker/service.Dockerfile -t REGISTRY/t2i-service:TAG .
#
# Build context: the repository root (docker/service.Dockerfile.dockerignore keeps it small).
# Models are NOT in the image: mount them (Kubernetes: the models volume at /models) and point
# T2I_MODELS at a models file. Without T2I_MODELS it serves the tiny random-weight demo model,
# built into T2I_DATA_DIR on first start.
#
# Python 3.11 comes from python-build-standalone (installed by uv; relocatable, no compiler),
# torch is the CUDA 13.0 build from the PyTorch index (it brings its own CUDA libraries as
# wheels; the driver must support CUDA 13.0), every other dependency is pinned by
# constraints.txt. The final stage has no compiler, no uv, no pip.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION=3.11
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# xformers 0.0.35 requires torch>=2.10 (stable ABI); the service falls back to SDPA without it.
ARG XFORMERS_VERSION=0.0.35
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
# 1. torch (CUDA build; 2.13.0+cu130 satisfies constraints.txt's torch==2.13.0) and xformers.
RUN /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
      torch==2.13.0 "xformers==${XFORMERS_VERSION}"
# 2. The service and its dependencies, pinned by constraints.txt (torch is already satisfied).
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
# open-clip-torch only for the demo model's CLIP vocabulary file; --no-deps because its declared
# dependencies would pull torchvision and another torch.
RUN /opt/venv/bin/pip install -c constraints.txt . \
    && /opt/venv/bin/pip install -c constraints.txt --no-deps open-clip-torch \
    && /opt/venv/bin/python -c "import torch, xformers, t2i.cli; assert torch.version.cuda, torch.__version__" \
    && /opt/venv/bin/pip uninstall -y pip

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="illustrious-t2i" \
      org.opencontainers.image.description="Text-to-image gRPC service (SDXL / Illustrious-XL)"
# Fixed numeric ids: Kubernetes runAsNonRoot checks need a numeric user.
RUN groupadd --system --gid 10001 t2i \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/t2i --no-create-home \
       --shell /usr/sbin/nologin t2i \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/t2i /models
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    T2I_DATA_DIR=/var/lib/t2i \
    T2I_LOG_FORMAT=json
USER 10001:10001
WORKDIR /var/lib/t2i
VOLUME ["/var/lib/t2i"]
EXPOSE 50051 9464 8090
ENTRYPOINT ["t2i"]
CMD ["serve"]
