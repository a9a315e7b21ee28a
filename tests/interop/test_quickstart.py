"""README's first command, as a new user runs it: a plain venv with ``pip install .`` serves a
disk image that a real client reads, and the components that need extras say which.

The command is read from README.md itself, so the README and this test cannot drift apart. The
install runs in a copy of the working tree (not this checkout's .venv), exactly as written; the
final ``serve`` gets ``--bind 127.0.0.1 --port N`` appended so the test stays on loopback.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not shutil.which("nbdinfo"), reason="libnbd-bin is not installed")


def readme_quickstart() -> list[str]:
    """The '&&'-separated steps of README's first indented command."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    command = next(line.strip() for line in section.splitlines() if line.startswith("    "))
    return [step.strip() for step in command.split("&&")]


@pytest.fixture(scope="module")
def quickstart_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the working tree with README's install steps run in it."""
    tree = tmp_path_factory.mktemp("quickstart") / "kube-nbd"
    shutil.copytree(
        REPO,
        tree,
        ignore=shutil.ignore_patterns(".venv", ".cache", ".git", "*.egg-info", "build", "*.img"),
    )
    *install, _serve = readme_quickstart()
    for step in install:
        done = subprocess.run(
            step, shell=True, cwd=tree, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"README step failed: {step}\n{done.stdout}{done.stderr}"
    yield tree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "nbdserver exited before listening"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # poll interval inside a deadline loop
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {deadline_s} s")


def test_the_quickstart_installs_only_the_standard_library_server(quickstart_tree: Path) -> None:
    steps = readme_quickstart()
    assert any(re.search(r"pip install( -q)? \.(\s|$)", step) for step in steps), steps
    listed = subprocess.run(
        [".venv/bin/python", "-m", "pip", "list", "--format", "json"],
        cwd=quickstart_tree,
        capture_output=True,
        text=True,
        check=True,
    )
    names = {pkg["name"].lower() for pkg in json.loads(listed.stdout)}
    # kube-nbd and the venv's own tools; no extra's dependency came along.
    assert not names & {"grpcio", "kopf", "aiohttp", "kubernetes-asyncio", "protobuf"}, names


def test_the_quickstart_serves_the_image_to_a_real_client(quickstart_tree: Path) -> None:
    serve = readme_quickstart()[-1]
    port = _free_port()
    argv = [*shlex.split(serve), "--bind", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(argv, cwd=quickstart_tree, stderr=subprocess.PIPE)
    try:
        _wait_for_port(port, proc)
        info = subprocess.run(
            ["nbdinfo", "--json", f"nbd://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        export = json.loads(info.stdout)["exports"][0]
        assert export["export-size"] == 1 << 30
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert (quickstart_tree / "disk.img").stat().st_size == 1 << 30


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["nbd-operator"], "operator"),
        (["nbd-operator", "--help"], "operator"),
        (["nbd-agent", "csi", "--endpoint", "unix:///nonexistent.sock", "--node-id", "n"], "agent"),
    ],
)
def test_components_without_their_extra_name_it_in_one_line(
    quickstart_tree: Path, argv: list[str], extra: str
) -> None:
    done = subprocess.run(
        [str(quickstart_tree / ".venv" / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"pip install 'kube-nbd[{extra}]'" in done.stderr


def test_the_rest_of_the_agent_works_without_its_extra(quickstart_tree: Path) -> None:
    done = subprocess.run(
        [str(quickstart_tree / ".venv" / "bin" / "nbd-agent"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "attach" in done.stdout and "needs the 'agent' extra" in done.stdout
