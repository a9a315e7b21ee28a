"""A local stand-in for the python:3.11-slim base, made from Debian's archive, named as the
Dockerfile expects it.

Why it exists: no registry is reachable here, but Debian's archive is. The official slim image
is a minimal Debian of one release plus ca-certificates, netbase and tzdata, with a Python built
from source under /usr/local (``/usr/local/bin/python``, ``python3``, ``python3.11``) that dpkg
does not know about. The stand-in is the same release made with mmdebstrap (minbase, with the
documentation, manual pages and translations left out as the slim image leaves them out), with
Debian's python3.11 linked into /usr/local/bin and then unregistered from dpkg: a package that
depends on python3 (xfsprogs does) therefore pulls Debian's Python into the image layer here just
as it does over the official base, and the size the tests measure includes it.

mmdebstrap's tarball is cached in ``.cache/image/`` (ignored by git), keyed by the recipe and the
archive address and at most a week old; a fresh machine makes it in about half a minute. The
archive address is this machine's own (``tests.debian_archive``), never written here.

What it must not do: change the Dockerfile, or make the base nicer than the official one (no pip
in /usr/local/bin, no extra packages): a build that works here must not depend on a stand-in
convenience.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

from tests.debian_archive import debian_archive_uri
from tests.image.buildah_store import BuildahStore, ImageError

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "image"
MAX_AGE_S = 7 * 24 * 3600
# The official slim image's extra packages; python3.11 brings the libraries Python links against.
PACKAGES = ("python3.11", "python3.11-venv", "ca-certificates", "netbase", "tzdata")
SLIM_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
)
# Run inside the stand-in before it is committed: the official image's Python layout, and no
# dpkg record of Debian's Python (the official image's Python is not a Debian package).
FINISH = r"""
set -eu
ln -s /usr/bin/python3.11 /usr/local/bin/python3.11
ln -s python3.11 /usr/local/bin/python3
ln -s python3 /usr/local/bin/python
rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
python3.11 - <<'EOF'
import pathlib, re
status = pathlib.Path("/var/lib/dpkg/status")
keep, gone = [], []
for stanza in status.read_text().strip().split("\n\n"):
    name = re.search(r"^Package: (\S+)", stanza, re.M).group(1)
    if not re.match(r"(lib)?python3", name):
        keep.append(stanza)
        continue
    gone.append(name)
    for info in pathlib.Path("/var/lib/dpkg/info").glob(name + "[.:]*"):
        info.unlink()
status.write_text("\n\n".join(keep) + "\n")
print("unregistered from dpkg:", " ".join(gone))
EOF
/usr/local/bin/python --version
"""


def dockerfile_base(dockerfile: Path) -> tuple[str, str]:
    """(image name, Debian codename) of the Dockerfile's PYTHON_IMAGE argument's default."""
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile.read_text(), re.M)
    if not match:
        raise ImageError(f"{dockerfile} has no ARG PYTHON_IMAGE=... default")
    image = match.group(1).split("@")[0]
    codename = re.search(r"-(bookworm|trixie|bullseye)$", image)
    if not codename:
        raise ImageError(f"base image {image} names no Debian release")
    return image, codename.group(1)


def _sources(codename: str) -> list[str]:
    main, security = debian_archive_uri(), debian_archive_uri(security=True)
    return [
        f"deb {main} {codename} main",
        f"deb {main} {codename}-updates main",
        f"deb {security} {codename}-security main",
    ]


def rootfs_tarball(codename: str) -> Path:
    """mmdebstrap's root filesystem of the stand-in, from the cache or made now."""
    sources = _sources(codename)
    recipe = "\n".join([codename, *PACKAGES, *SLIM_EXCLUDES, *sources])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    tarball = CACHE / f"base-{codename}-{key}.tar"
    if tarball.exists() and time.time() - tarball.stat().st_mtime < MAX_AGE_S:
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(f".{os.getpid()}.partial")
    command = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=tar",
        # merged /usr as Debian's images have it, without the usrmerge package (and its Perl)
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        f"--include={','.join(PACKAGES)}",
        *(f"--dpkgopt={option}" for option in SLIM_EXCLUDES),
        "--aptopt=Acquire::Languages none",
        codename,
        str(partial),
        *sources,
    ]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise ImageError(f"mmdebstrap failed: {proc.stderr.strip()[-2000:]}")
        partial.rename(tarball)
    except FileNotFoundError as exc:
        raise ImageError("mmdebstrap is needed for the base: see scripts/apt-packages.txt") from exc
    finally:
        partial.unlink(missing_ok=True)
    for stale in CACHE.glob(f"base-{codename}-*.tar"):
        if stale != tarball:
            stale.unlink(missing_ok=True)
    return tarball


def base_image(store: BuildahStore, dockerfile: Path) -> str:
    """Commit the stand-in into ``store`` under the Dockerfile's base image name; that name."""
    name, codename = dockerfile_base(dockerfile)
    tarball = rootfs_tarball(codename)
    container = store.buildah("from", "scratch").strip()
    try:
        store.buildah("add", container, str(tarball), "/")
        store.buildah("run", "--network=none", container, "--", "sh", "-c", FINISH)
        store.buildah(
            "config",
            "--env=PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env=LANG=C.UTF-8",
            "--cmd=python3",
            container,
        )
        store.buildah("commit", "--format=docker", container, name)
    finally:
        store.buildah("rm", container)
    return name
