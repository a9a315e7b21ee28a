# syntax=docker/dockerfile:1
#
# One image for the three kube-nbd components: `nbdserver` (the NBD server the operator runs per
# export), `nbd-operator` (the kopf operator) and `nbd-agent` (the node agent and CSI node
# plugin). One image keeps versions in lock-step: an agent never speaks to a server from another
# release, and a cluster pulls one layer set per node.
#
# Build:   docker build -t ghcr.io/kube-nbd/kube-nbd:0.1.0 .
# Lint:    .venv/bin/hadolint Dockerfile   (tests/controlplane/test_dockerfile_lint.py does this)

# The base is pinned to a patch release and a Debian release; the node tools below are pinned to
# that Debian release's versions, so both move together. Override for a mirror or a digest pin:
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:... .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
# Stage 1: build a self-contained virtualenv. Nothing from this stage but /opt/kube-nbd reaches
# the final image (no pip cache, no build front-end, no source tree).
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# The same interpreter path exists in the runtime stage (same base image), so the venv can be
# copied across stages as is. pip is pinned; setuptools comes from the build-system table in
# pyproject.toml (pip builds in an isolated environment).
RUN python -m venv /opt/kube-nbd \
    && /opt/kube-nbd/bin/pip install --no-cache-dir pip==25.3

# Only what the wheel needs: tests, docs, bench and charts stay out (see .dockerignore too).
COPY pyproject.toml README.md ./
COPY nbdserver/ nbdserver/
COPY api/ api/
COPY agent/ agent/
COPY operator/ operator/

# Not editable: the runtime stage has no /src. The agent and operator extras pull grpcio,
# pyroute2, kopf and the Kubernetes client; "fast" adds uvloop for the server's event loop.
RUN /opt/kube-nbd/bin/pip install --no-cache-dir ".[agent,operator,fast]"

# ---------------------------------------------------------------------------------------------
# Stage 2: the runtime image.
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown

LABEL org.opencontainers.image.title="kube-nbd" \
      org.opencontainers.image.description="Network block devices on Kubernetes: nbdserver, nbd-agent (CSI node plugin) and nbd-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/kube-nbd/kube-nbd" \
      org.opencontainers.image.documentation="https://github.com/kube-nbd/kube-nbd/blob/main/docs/quickstart.md"

# Node tools the agent runs on the host's block devices: mkfs.ext4 and resize2fs (e2fsprogs),
# mkfs.xfs and xfs_growfs (xfsprogs), modprobe for the nbd module (kmod). blkid, blockdev, mount and umount come from
# util-linux and mount, which are Essential/required in every Debian image and are deliberately
# not pinned here: pinning an Essential package breaks the build as soon as a point release
# updates it in the base image. The smoke test at the end proves every tool is present.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        e2fsprogs=1.47.0-2+b2 \
        xfsprogs=6.1.0-1 \
        kmod=30+20221128-1 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/kube-nbd /opt/kube-nbd

ENV PATH=/opt/kube-nbd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed, numeric, non-root identity so Kubernetes' runAsNonRoot can verify it without a
# passwd lookup. The agent is the one component that must run as root; its DaemonSet says so
# explicitly (runAsUser: 0) instead of the image defaulting to root for everyone.
RUN groupadd --system --gid 65532 kube-nbd \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kube-nbd

# Fail the build, not the first mount on a node, when a console script or a node tool is missing.
RUN nbdserver --help >/dev/null \
    && nbd-agent --help >/dev/null \
    && nbd-operator --help >/dev/null \
    && command -v mkfs.ext4 mkfs.xfs resize2fs xfs_growfs blkid blockdev mount umount modprobe \
        >/dev/null

USER 65532:65532
WORKDIR /

# The registered NBD port (IANA 10809); the operator's Services point at it.
EXPOSE 10809

# Kubernetes ignores HEALTHCHECK (the chart and the operator set probes); this one serves plain
# `docker run ... nbdserver serve` users: a healthy NBD server greets every new connection with
# the 8-byte NBDMAGIC before any option, TLS or not. Override the port with KUBE_NBD_HEALTH_PORT,
# or disable it with `--no-healthcheck` when running the agent or the operator outside Kubernetes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, socket; s = socket.create_connection(('127.0.0.1', int(os.environ.get('KUBE_NBD_HEALTH_PORT', '10809'))), timeout=3); raise SystemExit(0 if s.recv(8) == b'NBDMAGIC' else 1)"]

# No ENTRYPOINT: each workload names its console script (nbdserver, nbd-agent, nbd-operator).
CMD ["nbdserver", "--help"]
