"""Volume sources: PV handle, ephemeral inline export, direct URI; and the access checks."""

from __future__ import annotations

import pytest
from nbd_agent.csi.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from nbd_agent.csi.sources import check_access, resolve
from nbd_api import ExportStatus


def export(name: str, ns: str = "team", ready: bool = True, **status) -> ExportStatus:
    return ExportStatus.from_object(
        {
            "metadata": {"name": name, "namespace": ns, "generation": 1},
            "status": {
                "phase": "Ready" if ready else "Provisioning",
                "uri": f"nbd://{name}.{ns}.svc:10809/{name}",
                "sizeBytes": 1 << 30,
                "observedGeneration": 1,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                **status,
            },
        }
    )


class Lookup:
    def __init__(self, *exports: ExportStatus) -> None:
        self.exports = {(e.namespace, e.name): e for e in exports}
        self.asked: list[tuple[str, str]] = []

    def get_export(self, namespace: str, name: str) -> ExportStatus | None:
        self.asked.append((namespace, name))
        return self.exports.get((namespace, name))


def test_pv_handle_resolves_through_the_export_status() -> None:
    source = resolve("team/db", {}, Lookup(export("db", accessMode="ReadWriteOnce")))
    assert source.uri == "nbd://db.team.svc:10809/db"
    assert (source.export, source.access_mode, source.size_bytes) == (
        "team/db",
        "ReadWriteOnce",
        1 << 30,
    )


def test_ephemeral_export_uses_the_pod_namespace() -> None:
    lookup = Lookup(export("scratch", ns="pods-ns"))
    context = {
        "export": "scratch",
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/pod.namespace": "pods-ns",
    }
    assert resolve("csi-123", context, lookup).export == "pods-ns/scratch"
    assert lookup.asked == [("pods-ns", "scratch")]


def test_ephemeral_export_without_pod_namespace_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="podInfoOnMount"):
        resolve("csi-1", {"export": "x", "csi.storage.k8s.io/ephemeral": "true"}, Lookup())


def test_direct_uri_needs_no_kubernetes() -> None:
    source = resolve("anything", {"uri": "nbds://backup.example:10809/disk"}, None)
    assert (source.uri, source.export) == ("nbds://backup.example:10809/disk", "")


@pytest.mark.parametrize(
    "uri", ["http://h/x", "nbd:///noname", "nbd+unix:///e", "file:///etc/passwd", ""]
)
def test_bad_uris_are_invalid_arguments(uri: str) -> None:
    with pytest.raises(InvalidArgument):
        resolve("v", {"uri": uri}, None)


def test_missing_export_is_not_found_and_unready_export_unavailable() -> None:
    with pytest.raises(NotFound):
        resolve("team/none", {}, Lookup())
    with pytest.raises(Unavailable, match="not ready"):
        resolve("team/db", {}, Lookup(export("db", ready=False)))


@pytest.mark.parametrize("handle", ["Team/db", "team/../etc", "team/", "/db", "a/b/c"])
def test_malformed_handles_are_invalid_arguments(handle: str) -> None:
    with pytest.raises(InvalidArgument):
        resolve(handle, {}, Lookup())


def test_access_checks_follow_the_export() -> None:
    rox = resolve("team/ro", {}, Lookup(export("ro", accessMode="ReadOnlyMany")))
    with pytest.raises(FailedPrecondition, match="ReadOnlyMany"):
        check_access(rox, wants_write=True, multi_node_write=False)
    check_access(rox, wants_write=False, multi_node_write=False)
    rwo = resolve("team/db", {}, Lookup(export("db")))
    with pytest.raises(FailedPrecondition, match="ReadWriteMany"):
        check_access(rwo, wants_write=True, multi_node_write=True)
    ro = resolve("team/img", {}, Lookup(export("img", readOnly=True)))
    with pytest.raises(FailedPrecondition, match="read-only"):
        check_access(ro, wants_write=True, multi_node_write=False)
