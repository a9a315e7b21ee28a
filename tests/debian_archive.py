"""Read any Debian suite's package index without touching the machine's own apt state.

Why it exists: two things need packages of a Debian release other than the one installed here:
the kernel tier (a newer user-mode-linux where this CPU cannot run stable's, see
``tests/kernel/kernels.py``) and the Dockerfile check (are its pinned versions in the base
image's release?). Adding a suite to ``/etc/apt`` would mix suites system-wide; instead each suite
gets a private apt state (sources list, lists, cache) under a project-local folder, and apt is
told to use only that.

The archive's address is the one this machine's apt already uses for Debian (read from
``/etc/apt``), so no mirror is named here and a machine with its own mirror keeps using it.

Standard library only: ``scripts/setup.sh`` runs this before the venv has anything installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


class ArchiveError(RuntimeError):
    """The Debian archive could not be read: the message says which step and why."""


def _apt_source_texts() -> list[str]:
    texts = []
    for path in APT_SOURCES:
        files = sorted(path.glob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file() and file.name.endswith((".list", ".sources")):
                texts.append(file.read_text(errors="replace"))
    return texts


def debian_archive_uri(*, security: bool = False) -> str:
    """The URI this machine's apt sources use for Debian's main (or security) archive.

    Third-party repositories are passed over: Debian's archives are the ones whose path ends in
    ``/debian`` (``/debian-security``) and whose entry lists a Debian suite.
    """
    tail = "/debian-security" if security else "/debian"
    for text in _apt_source_texts():
        # deb822 stanzas ("URIs: X" with "Suites: a b" in the same paragraph), then the
        # one-line format ("deb [opts] URI SUITE COMPONENTS").
        entries = [
            (uris.group(1), suites.group(1))
            for stanza in re.split(r"\n\s*\n", text)
            if (uris := re.search(r"^URIs:\s*(\S+)", stanza, re.M))
            and (suites := re.search(r"^Suites:\s*(.+)$", stanza, re.M))
        ]
        entries += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M)
        for uri, suites_text in entries:
            if uri.rstrip("/").endswith(tail) and re.search(r"\b[a-z]+\b", suites_text):
                return uri.rstrip("/")
    raise ArchiveError(f"no Debian archive ({tail}) in this machine's apt sources (/etc/apt)")


@dataclass(frozen=True)
class SuiteIndex:
    """A private apt state for one or more suites of the Debian archive, kept in ``root``."""

    root: Path
    suites: tuple[str, ...]

    def _options(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::SourceList={self.root / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={self.root / 'lists'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", "Dir::State::status=/dev/null",
            "-o", "APT::Architecture=amd64",
            # A private state needs no lock against the system's apt, and root's downloads
            # into a project folder need not be handed to the _apt user.
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root",
            "-q",
        ]  # fmt: skip

    def update(self) -> None:
        """Fetch the suites' package lists (about 10 MB per suite)."""
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            f"deb [signed-by={KEYRING}] "
            f"{debian_archive_uri(security=suite.endswith('-security'))} {suite} main"
            for suite in self.suites
        ]
        (self.root / "sources.list").write_text("\n".join(lines) + "\n")
        self._apt("apt-get", "update")

    def versions(self, package: str) -> list[str]:
        """Every version of ``package`` the suites' indexes hold (empty if none)."""
        out = self._apt("apt-cache", "madison", package)
        return [line.split("|")[1].strip() for line in out.splitlines() if "|" in line]

    def download(self, packages: list[str], dest: Path) -> list[Path]:
        """Download the candidate .deb of each package into ``dest``; return their paths."""
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        self._apt("apt-get", "download", *packages, cwd=dest)
        return sorted(set(dest.glob("*.deb")) - before) or sorted(dest.glob("*.deb"))

    def _apt(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        if shutil.which(tool) is None:
            raise ArchiveError(f"{tool} not found: this needs a Debian machine")
        proc = subprocess.run(
            [tool, *self._options(), *args],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=cwd,
        )
        if proc.returncode != 0:
            raise ArchiveError(
                f"{tool} {' '.join(args)} for {', '.join(self.suites)} failed "
                f"(exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}"
            )
        return proc.stdout
