"""Which user-mode-linux kernel boots on this host: find one, prepare one, say which.

Why it exists: not every UML kernel runs on every CPU. On hosts with AMX (a large XSAVE area)
Debian bookworm's 6.1 and trixie's 6.12 panic at the first user process ("ptrace set fp regs
failed, errno = 14"); a newer kernel boots there. So the kernel tier never assumes a kernel: it
probes the candidates in order and uses the first that boots and loads ``nbd.ko``:

1. the system's ``linux.uml`` (Debian stable's package, ``/usr/bin/linux.uml``);
2. newer kernels kept in a project-local cache, ``.cache/uml/<suite>/`` (testing, then
   unstable), which ``python -m tests.kernel.kernels prepare`` (run by ``scripts/setup.sh``)
   downloads from Debian's archive only when the system's kernel does not boot.

A cached kernel is Debian's ``user-mode-linux`` package of that suite, unpacked with ``dpkg -x``
next to that suite's ``libc6`` (newer UML builds need a newer glibc than stable's); ``patchelf``
points the binary at that private loader and libc. Nothing is installed system-wide and no
suites are mixed. Only the kernel process uses the private libc: the programs the guest runs
are this machine's own, through hostfs.

Standard library only (``scripts/setup.sh`` runs ``prepare`` before anything else exists).
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.debian_archive import ArchiveError, SuiteIndex

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "uml"
SYSTEM_BINARY = Path("/usr/bin/linux.uml")
SYSTEM_MODULES = Path("/usr/lib/uml/modules")
NEWER_SUITES = ("testing", "unstable")
PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class UmlKernel:
    """One bootable candidate: the binary, its modules folder and where it came from."""

    binary: Path
    modules: Path  # .../uml/modules/<version>
    origin: str  # "system" or the Debian suite of a cached kernel

    @property
    def version(self) -> str:
        return self.modules.name

    @property
    def nbd_module(self) -> Path:
        return self.modules / "kernel" / "drivers" / "block" / "nbd.ko"

    def describe(self) -> str:
        return f"Linux {self.version} (user-mode-linux from Debian {self.origin}: {self.binary})"

    def argv(self, init: Path, uml_dir: Path, mem: str) -> list[str]:
        """The command line that boots this kernel with the host's / as root (hostfs), runs
        ``init`` as its first process and puts the console on stdout. Each boot gets its own
        ``umid`` and ``uml_dir`` so parallel boots never share a pid file or socket."""
        return [
            str(self.binary),
            f"mem={mem}",
            "root=/dev/root",
            "rootfstype=hostfs",
            "rootflags=/",
            "rw",
            f"init={init}",
            "con=null",
            "con0=fd:0,fd:1",
            f"umid=kn-{uuid.uuid4().hex[:12]}",
            f"uml_dir={uml_dir}",
        ]


@dataclass(frozen=True)
class ProbeResult:
    kernel: UmlKernel
    booted: bool
    reason: str  # why it did not boot, from the console; empty when it did


def _modules_of(modules_root: Path) -> Path | None:
    if not modules_root.is_dir():
        return None
    versions = sorted(p for p in modules_root.iterdir() if p.is_dir())
    return versions[-1] if versions else None


def system_kernel() -> UmlKernel | None:
    binary = Path(shutil.which("linux.uml") or SYSTEM_BINARY)
    modules = _modules_of(SYSTEM_MODULES)
    if not binary.exists() or modules is None:
        return None
    return UmlKernel(binary, modules, _system_release())


def _system_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip('"') or "stable"
    except OSError:
        pass
    return "stable"


def cached_kernel(suite: str) -> UmlKernel | None:
    root = CACHE / suite / "root"
    binary = root / "usr" / "bin" / "linux.uml"
    modules = _modules_of(root / "usr" / "lib" / "uml" / "modules")
    if not binary.exists() or modules is None:
        return None
    return UmlKernel(binary, modules, suite)


def candidates() -> list[UmlKernel]:
    found = [system_kernel(), *(cached_kernel(suite) for suite in NEWER_SUITES)]
    return [kernel for kernel in found if kernel is not None]


_PROBE_INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
insmod {nbd} nbds_max=2 && test -e /sys/block/nbd1 && uname -r > {marker}.tmp \\
    && mv {marker}.tmp {marker}
poweroff -f
"""


def probe(kernel: UmlKernel, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Boot ``kernel`` with a minimal init that loads nbd.ko; it booted if the init reported
    back its version."""
    work = Path(tempfile.mkdtemp(prefix="uml-probe-"))
    try:
        marker = work / "booted"
        init = work / "init.sh"
        init.write_text(_PROBE_INIT.format(nbd=kernel.nbd_module, marker=marker))
        init.chmod(0o755)
        argv = kernel.argv(init, uml_dir=work, mem="128M")
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                start_new_session=True,
            )
            console = (proc.stdout + proc.stderr).decode(errors="replace")
        except subprocess.TimeoutExpired as exc:
            console = f"no power-off within {timeout:.0f} s; " + (
                (exc.stdout or b"").decode(errors="replace")
            )
        except OSError as exc:
            console = f"cannot run {kernel.binary}: {exc}"
        if marker.exists() and marker.read_text().strip() == kernel.version:
            return ProbeResult(kernel, True, "")
        return ProbeResult(kernel, False, _failure_reason(console))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _failure_reason(console: str) -> str:
    """The console line that says why, else its last lines."""
    for line in console.splitlines():
        if any(key in line for key in ("panic", "failed, errno", "not found", "cannot run")):
            return line.strip()
    tail = [line.strip() for line in console.splitlines() if line.strip()][-3:]
    return " / ".join(tail) or "the kernel printed nothing"


class NoBootableKernel(RuntimeError):
    pass


def selected_kernel() -> UmlKernel:
    """The first candidate that boots here; probed once per process.

    Raises NoBootableKernel naming every candidate and why it failed (also once per process:
    a failed probe is not repeated for every kernel test).
    """
    selection = _selection()
    if isinstance(selection, NoBootableKernel):
        raise selection
    return selection


def probed() -> bool:
    """Whether this process has probed already (what a run's summary may report)."""
    return _selection.cache_info().currsize > 0


@functools.cache
def _selection() -> UmlKernel | NoBootableKernel:
    reasons = []
    for kernel in candidates():
        result = probe(kernel)
        if result.booted:
            return kernel
        reasons.append(f"{kernel.describe()}: {result.reason}")
    if not reasons:
        reasons.append("no linux.uml found (install user-mode-linux: ./scripts/setup.sh)")
    return NoBootableKernel(
        "no user-mode-linux kernel boots on this host; run ./scripts/setup.sh to prepare a "
        "newer one. Tried:\n  " + "\n  ".join(reasons)
    )


def prepare_cached(suite: str) -> UmlKernel:
    """Download ``suite``'s user-mode-linux and libc6 into .cache/uml/<suite> and patch the
    binary to use that libc."""
    if shutil.which("patchelf") is None:
        raise ArchiveError("patchelf not found (Debian package patchelf; ./scripts/setup.sh)")
    base = CACHE / suite
    index = SuiteIndex(base / "apt", (suite,))
    index.update()
    debs = index.download(["user-mode-linux", "libc6"], base / "debs")
    root = base / "root"
    shutil.rmtree(root, ignore_errors=True)
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    # Only the unpacked tree is kept: the .debs and the suite's package lists (~60 MB) are
    # fetched again on the next prepare, which is rare.
    shutil.rmtree(base / "debs", ignore_errors=True)
    shutil.rmtree(base / "apt", ignore_errors=True)
    libdir = root / "usr" / "lib" / "x86_64-linux-gnu"
    binary = root / "usr" / "bin" / "linux.uml"
    subprocess.run(
        [
            "patchelf",
            "--set-interpreter",
            str(libdir / "ld-linux-x86-64.so.2"),
            "--set-rpath",
            str(libdir),
            str(binary),
        ],
        check=True,
    )
    kernel = cached_kernel(suite)
    if kernel is None:
        raise ArchiveError(f"{suite}'s user-mode-linux has no modules folder")
    return kernel


def prepare() -> UmlKernel:
    """Make sure one kernel boots here: the system's, a cached one, or a newly cached one."""

    def boots(kernel: UmlKernel) -> bool:
        result = probe(kernel)
        print(f"uml kernel probe: {kernel.describe()}: {result.reason or 'boots'}")
        return result.booted

    for kernel in candidates():
        if boots(kernel):
            return kernel
    for suite in NEWER_SUITES:
        if cached_kernel(suite) is not None:
            continue  # already probed above, and it did not boot
        kernel = prepare_cached(suite)
        if boots(kernel):
            return kernel
    raise NoBootableKernel("no user-mode-linux kernel boots on this host (see the probes above)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kernel.kernels", description=__doc__)
    parser.add_argument("command", choices=["prepare", "show"])
    args = parser.parse_args(argv)
    try:
        kernel = prepare() if args.command == "prepare" else selected_kernel()
    except (NoBootableKernel, ArchiveError, subprocess.CalledProcessError) as exc:
        print(f"kernel tier: {exc}", file=sys.stderr)
        return 1
    print(f"kernel tier uses {kernel.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
