# syntax=docker/dockerfile:1
# The train step on CUDA. The base image brings the CUDA build of the torch version
# imgpipe was tested with (docker/constraints.txt: torch==2.15.0; the tested wheel is
# +cu132), so pip keeps it and installs only what is missing.
# Build from the repository root: docker build -f docker/gpu.Dockerfile -t imgpipe-gpu .
ARG TORCH_IMAGE=pytorch/pytorch:2.15.0-cuda13.2-cudnn9-runtime
FROM ${TORCH_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/imgpipe

# KFP's launcher writes artifacts under /gcs, /minio and /s3 (kubeflow/pipelines#5673).
RUN useradd --uid 10001 --gid 0 --create-home --shell /usr/sbin/nologin imgpipe \
    && mkdir -p /gcs /minio /s3 /oci /opt/imgpipe \
    && chmod 1777 /gcs /minio /s3 /oci

WORKDIR /opt/imgpipe
COPY docker/constraints.txt ./docker/constraints.txt
COPY pyproject.toml README.md ./
COPY src ./src
# torchvision from the index of the base image's CUDA, should the base lack it.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cu132 \
        --constraint docker/constraints.txt ./ \
    && python -c "import imgpipe, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
COPY components ./components
COPY pipelines ./pipelines

USER 10001
WORKDIR /home/imgpipe
