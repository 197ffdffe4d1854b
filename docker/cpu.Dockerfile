# syntax=docker/dockerfile:1
# The download and clean steps, and `imgpipe submit` for scheduled retraining.
# Build from the repository root: docker build -f docker/cpu.Dockerfile -t imgpipe-cpu .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/imgpipe

# KFP's launcher writes artifacts under /gcs, /minio and /s3 at the filesystem root;
# a non-root user must be able to create them (kubeflow/pipelines#5673, #10397).
RUN useradd --uid 10001 --gid 0 --create-home --shell /usr/sbin/nologin imgpipe \
    && mkdir -p /gcs /minio /s3 /oci /opt/imgpipe \
    && chmod 1777 /gcs /minio /s3 /oci

WORKDIR /opt/imgpipe
COPY docker/constraints.txt ./docker/constraints.txt
COPY pyproject.toml README.md ./
COPY src ./src
# CPU wheels of torch/torchvision (the default index's carry CUDA libraries these steps never use).
RUN pip install --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple \
        --constraint docker/constraints.txt ./ \
    && python -c "import imgpipe, kfp, torch; print('imgpipe', imgpipe.__version__, 'kfp', kfp.__version__, 'torch', torch.__version__)"
# The pipeline definition, for `imgpipe compile/submit` (found on PYTHONPATH).
COPY components ./components
COPY pipelines ./pipelines

USER 10001
WORKDIR /home/imgpipe
CMD ["imgpipe", "--help"]
