"""The CSI node state file: round trip, atomic replacement, refusal of unknown formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from nbd_agent.csi.state import STATE_FILE, NodeState, Target, VolumeRecord


def record(vid: str = "ns/data") -> VolumeRecord:
    return VolumeRecord(
        volume_id=vid,
        uri="nbd://srv.ns.svc:10809/data",
        device="/dev/nbd3",
        staging_path="/var/lib/kubelet/plugins/x/globalmount",
        lease="ns/nbd-writer-data",
        targets={"/var/lib/kubelet/pods/p/volumes/v": Target(read_only=True)},
    )


def test_a_saved_state_loads_back_identically(tmp_path: Path) -> None:
    NodeState(tmp_path).load().put(record())
    loaded = NodeState(tmp_path).load()
    assert loaded.volumes == {"ns/data": record()}
    assert loaded.find_target("/var/lib/kubelet/pods/p/volumes/v") == record()


def test_writes_replace_the_file_and_leave_no_temporaries(tmp_path: Path) -> None:
    state = NodeState(tmp_path).load()
    state.put(record("a/b"))
    inode = os.stat(tmp_path / STATE_FILE).st_ino
    state.put(record("c/d"))
    assert os.stat(tmp_path / STATE_FILE).st_ino != inode  # renamed into place, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    state.remove("a/b")
    assert set(json.loads((tmp_path / STATE_FILE).read_text())["volumes"]) == {"c/d"}


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    state = NodeState(tmp_path).load()
    state.put(record("a/b"))
    before = (tmp_path / STATE_FILE).read_text()

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError):
        state.put(record("c/d"))
    assert (tmp_path / STATE_FILE).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


def test_an_unknown_format_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"version": 99, "volumes": {}}))
    with pytest.raises(ValueError, match="unknown state format"):
        NodeState(tmp_path).load()
