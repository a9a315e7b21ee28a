# syntax=docker/dockerfile:1
#
# One image for the three kube-nbd components: `nbdserver` (the NBD server the operator runs per
# export), `nbd-operator` (the kopf operator) and `nbd-agent` (the node agent and CSI node
# plugin). One image keeps versions in lock-step: an agent never speaks to a server from another
# release, and a cluster pulls one layer set per node.
#
# Build:   docker build -t ghcr.io/kube-nbd/kube-nbd:0.1.0 .
#          podman/buildah: add --format docker, or the HEALTHCHECK is dropped (docs/image.md)
# Lint:    .venv/bin/hadolint Dockerfile   (tests/controlplane/test_dockerfile_lint.py does this)
# Test:    tests/image/ builds this file with buildah and runs the image with runc (as root)

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

# pip lives in its own venv (/opt/build-tools, pinned) and installs into /opt/kube-nbd from
# outside (`pip --python`), so the venv that ships never holds pip, setuptools or wheel:
# setuptools only exists in pip's isolated build environment. The same interpreter path exists
# in the runtime stage (same base image), so the venv is copied across stages as is.
RUN python -m venv /opt/build-tools \
    && /opt/build-tools/bin/pip install --no-cache-dir pip==25.3 \
    && python -m venv --without-pip /opt/kube-nbd

# Only what the wheel needs: tests, docs, bench and charts stay out (see .dockerignore too).
COPY pyproject.toml README.md ./
COPY nbdserver/ nbdserver/
COPY api/ api/
COPY agent/ agent/
COPY operator/ operator/

# Not editable: the runtime stage has no /src. The agent extra brings grpcio and protobuf, the
# operator extra kopf, aiohttp and kubernetes_asyncio (kopf's kubeconfig login imports it).
# Nothing else: uvloop and pyroute2, which earlier releases declared, are imported by none of
# the three programs; tests/image/ checks that neither reaches the image.
RUN /opt/build-tools/bin/pip --python /opt/kube-nbd/bin/python install --no-cache-dir \
        ".[agent,operator]"

# ---------------------------------------------------------------------------------------------
# Stage 2: the two xfsprogs programs the agent runs, mkfs.xfs and xfs_growfs, taken out of
# Debian's package instead of installing it. Installed, xfsprogs brings libicu72 (35 MB, for
# xfs_scrub alone) and Debian's own python3 (about 30 MB beside the base's Python, for
# xfs_scrub_all alone) into every node's image. The price: dpkg in the image does not list
# xfsprogs (its copyright file is copied; the version is the pin below). The runtime stage
# installs the two libraries the programs link against and runs both, so a missing library
# fails the build, not a mount.
FROM ${PYTHON_IMAGE} AS xfsprogs

WORKDIR /tmp/xfsprogs
RUN apt-get update \
    && apt-get download 'xfsprogs=6.1.0-*' \
    && dpkg-deb --extract xfsprogs_*.deb /xfsprogs \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
# Stage 3: the runtime image.
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

# Node tools the agent runs on the host's block devices. Already in every Debian image (Essential
# or Priority: required), so neither installed nor pinned: mkfs.ext4 and resize2fs (e2fsprogs),
# blkid and blockdev (util-linux), mount and umount. Installed, because the base lacks them:
# modprobe for the nbd module (kmod), and the libraries of mkfs.xfs and xfs_growfs (stage 2).
# A pin names the Debian release's upstream version and accepts any Debian revision (`55-*`):
# a stable or security update of the release still installs, another upstream version fails the
# build. An exact pin would break the day the archive replaces that revision (the archive keeps
# only the newest one of each release); tests/controlplane/test_dockerfile_lint.py checks each
# pin against the release's package index.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        'kmod=30+20221128-*' \
        'libinih1=55-*' \
        'liburcu8=0.13.2-*' \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

COPY --from=xfsprogs /xfsprogs/sbin/mkfs.xfs /xfsprogs/usr/sbin/xfs_growfs /usr/sbin/
COPY --from=xfsprogs /xfsprogs/usr/share/doc/xfsprogs/copyright /usr/share/doc/xfsprogs/

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
        >/dev/null \
    && mkfs.xfs -V >/dev/null \
    && xfs_growfs -V >/dev/null

USER 65532:65532
WORKDIR /

# The registered NBD port (IANA 10809); the operator's Services point at it.
EXPOSE 10809

# Kubernetes ignores HEALTHCHECK (the chart and the operator set probes); this one serves plain
# `docker run ... nbdserver serve` users: a healthy NBD server greets every new connection with
# the 8-byte NBDMAGIC before any option, TLS or not. Override the port with KUBE_NBD_HEALTH_PORT,
# or disable it with `--no-healthcheck` when running the agent or the operator outside Kubernetes.
# Only the docker image format has a place for it: podman and buildah, which default to OCI, keep
# it with `--format docker` (tests/image/ builds that way and runs this command).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, socket; s = socket.create_connection(('127.0.0.1', int(os.environ.get('KUBE_NBD_HEALTH_PORT', '10809'))), timeout=3); raise SystemExit(0 if s.recv(8) == b'NBDMAGIC' else 1)"]

# No ENTRYPOINT: each workload names its console script (nbdserver, nbd-agent, nbd-operator).
CMD ["nbdserver", "--help"]
