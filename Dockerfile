# syntax=docker/dockerfile:1
#
# TorchServe image of the bundle, built from the environment the tests run in: Python 3.11, the pinned
# requirements.txt (torch 2.14.1 from PyPI is a CUDA build; TorchServe 0.12.0; captum, snownlp, ...), a Java 17
# runtime for TorchServe's frontend, and the archives built with each model's GPU profile. The image holds no
# config.properties: Kubernetes mounts it (k8s/10-config.yaml); each Deployment names its A/B variant, and
# registry.py (the entrypoint) turns that into the archives it serves.
#
#   ./archive.sh --profile gpu         # model_store_gpu/*.mar: handlers/<m>.gpu.yaml inside (registry.py configs)
#   docker build -t registry.example.com/torchserve-bundle:0.1.0 .
#   ./archive.sh && docker build --build-arg ARCHIVES=model_store \
#       -t registry.example.com/torchserve-bundle-cpu:0.1.0 .      # CPU profile, for k8s/overlays/cpu
#
# Tags: one immutable tag per release of the archives; never push other archives under a tag
# that a Deployment uses. Variants A and B each name the tag they run (k8s/20-torchserve-*.yaml).
# tests/k8s/test_k8s.py checks this file against the repo: the Python of the venv, requirements.txt, the
# archive folder of the GPU profile, the paths and user of the manifests.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}
# model_store_gpu (GPU profile) or model_store (CPU profile).
ARG ARCHIVES=model_store_gpu

# Java 17, the major version the test suite runs TorchServe with.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

# Exactly the pins the tests run with (requirements.txt also holds the test tools: one environment, not two).
COPY --chown=root:root --chmod=0444 requirements.txt /opt/torchserve/requirements.txt
RUN python -m pip install --no-cache-dir --disable-pip-version-check -r /opt/torchserve/requirements.txt

# A fixed, numeric, non-root user: the pods run as 10001:10001 (runAsUser/runAsGroup), and the
# kubelet can only verify runAsNonRoot for numeric users.
RUN groupadd --system --gid 10001 torchserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin torchserve

# The archives, the bundle's metric declarations (config.properties: metrics_config), the readiness probe
# (k8s/20-torchserve-*.yaml) and the registry that names each variant's archives, root-owned and read-only.
COPY --chown=root:root --chmod=0444 ${ARCHIVES}/*.mar /opt/torchserve/model-store/
COPY --chown=root:root --chmod=0444 metrics.yaml /opt/torchserve/metrics.yaml
COPY --chown=root:root --chmod=0444 scripts/readiness.py /opt/torchserve/readiness.py
COPY --chown=root:root --chmod=0444 registry.py /opt/torchserve/registry.py

# Kubernetes mounts emptyDirs on /tmp and /opt/torchserve/logs (read-only root filesystem) and the
# ConfigMap on /opt/torchserve/config; the directories exist here too so that `docker run` works.
RUN mkdir -p /opt/torchserve/config /opt/torchserve/logs \
 && chown 10001:10001 /opt/torchserve/logs

ENV TEMP=/tmp \
    HOME=/tmp \
    LOG_LOCATION=/opt/torchserve/logs \
    METRICS_LOCATION=/opt/torchserve/logs \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /opt/torchserve
# Inference and metrics; the management API (8081) listens on loopback only.
EXPOSE 8080 8082

# TorchServe in the foreground, as the container's process (registry.py execs it with the --models of the
# variant); --ncs: no config snapshots (an immutable pod has nothing to resume). Kubernetes replaces CMD with
# its own --variant and --ts-config.
ENTRYPOINT ["python", "/opt/torchserve/registry.py", "serve"]
CMD ["--variant", "a", "--ts-config", "/opt/torchserve/config/config.properties"]
