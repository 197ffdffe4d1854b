# syntax=docker/dockerfile:1
# The resize step (Ray Data), and the head/worker image of the KubeRay clusters it
# starts (k8s/ray/). The Ray version must be the one imgpipe was tested with
# (docker/constraints.txt pins ray==2.60.0): Ray refuses a cluster of mixed versions.
# Build from the repository root: docker build -f docker/ray.Dockerfile -t imgpipe-ray .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/imgpipe \
    IMGPIPE_RAYJOB_TEMPLATE=/opt/imgpipe/k8s/ray/rayjob-resize.yaml

# The base image runs as the non-root user "ray" (uid 1000, gid 100). KFP's launcher
# writes artifacts under /gcs, /minio and /s3 (kubeflow/pipelines#5673).
USER 0
RUN mkdir -p /gcs /minio /s3 /oci /opt/imgpipe \
    && chmod 1777 /gcs /minio /s3 /oci \
    && chown 1000:100 /opt/imgpipe
USER 1000

WORKDIR /opt/imgpipe
COPY --chown=1000:100 docker/constraints.txt ./docker/constraints.txt
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 src ./src
RUN pip install --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple \
        --constraint docker/constraints.txt ./ \
    && python -c "import imgpipe, ray; assert ray.__version__ == '2.60.0', ray.__version__"
# The RayJob template imgpipe.kuberay copies per run ($IMGPIPE_RAYJOB_TEMPLATE).
COPY --chown=1000:100 k8s/ray/rayjob-resize.yaml ./k8s/ray/rayjob-resize.yaml
COPY --chown=1000:100 components ./components
COPY --chown=1000:100 pipelines ./pipelines

WORKDIR /home/ray
