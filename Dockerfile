# syntax=docker/dockerfile:1
#
# TorchServe image of the bundle: the official TorchServe image plus the model archives that
# ./archive.sh builds into model_store/ and the repo's metrics.yaml. The image holds no
# config.properties: Kubernetes mounts it (k8s/10-config.yaml) and each Deployment names the
# archives it serves.
#
#   ./archive.sh                       # builds model_store/*.mar (see ./archive.sh --list)
#   docker build -t registry.example.com/torchserve-bundle:0.1.0 .
#   docker build --build-arg TORCHSERVE_IMAGE=pytorch/torchserve:0.12.0-cpu \
#       -t registry.example.com/torchserve-bundle-cpu:0.1.0 .      # for k8s/overlays/cpu
#
# Tags: one immutable tag per release of the archives; never push other archives under a tag
# that a Deployment uses. Variants A and B each name the tag they run (k8s/20-torchserve-*.yaml).
#
# The base image runs Python 3.9 with its own torch: the handlers must stay importable there
# (tests/test_k8s.py parses them as Python 3.9).
ARG TORCHSERVE_IMAGE=pytorch/torchserve:0.12.0-gpu
FROM ${TORCHSERVE_IMAGE}

USER root

# A fixed, numeric, non-root user: the pods run as 10001:10001 (runAsUser/runAsGroup), and the
# kubelet can only verify runAsNonRoot for numeric users. The base image's model-server user has
# no guaranteed UID. Nothing in the image is writable by this user except the logs directory.
RUN groupadd --system --gid 10001 torchserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin torchserve

# Python packages the handlers import beyond what the base image ships (torch, torchvision, numpy,
# pillow, captum, PyYAML, requests, psutil): none today. Add them here pinned as in requirements.txt,
# e.g. `RUN python -m pip install --no-cache-dir snownlp==0.12.3`; tests/test_k8s.py checks that
# every third-party import of handlers/ is covered and the pins agree.

# The archives and the bundle's metric declarations (config.properties: metrics_config), root-owned
# and read-only.
COPY --chown=root:root --chmod=0444 model_store/*.mar /opt/torchserve/model-store/
COPY --chown=root:root --chmod=0444 metrics.yaml /opt/torchserve/metrics.yaml

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

# TorchServe in the foreground, as the container's process; --ncs: no config snapshots (an
# immutable pod has nothing to resume). Kubernetes replaces CMD with its own --ts-config/--models.
ENTRYPOINT ["torchserve", "--foreground", "--ncs"]
CMD ["--ts-config", "/opt/torchserve/config/config.properties", "--models", "all"]
