#!/usr/bin/env bash
# Set up a fresh Debian machine for kube-nbd: Debian packages (clients, peers, the UML kernel)
# and a virtualenv in .venv with the project installed in editable mode with its dev extras;
# then makes sure a user-mode-linux kernel boots on this CPU for the kernel tests (Debian stable's,
# or a newer one unpacked into .cache/uml/: see tests/kernel/kernels.py).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

mapfile -t pkgs < <(grep -v '^\s*#' scripts/apt-packages.txt | grep -v '^\s*$')
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# The kernel tier's kernel: probe, and prepare a newer one only where stable's does not boot.
# Not fatal here: if none boots, every kernel test fails with the probes' reasons.
.venv/bin/python -m tests.kernel.kernels prepare || echo "setup: no bootable user-mode-linux kernel yet (see above)" >&2
