"""Status computation and the nbd_api helpers, as pure functions: phase and conditions from
observed children, transition times kept while a condition holds, the agent's typed view,
quantities, and attachment Lease naming."""

from __future__ import annotations

from typing import Any

import nbd_api
import pytest
import yaml
from nbd_operator.import_progress import FIELDS, JobOutcome, import_status
from nbd_operator.spec import parse_spec
from nbd_operator.status import Observed, compute_status, deployment_available
from test_chart_support import ROOT

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
SPEC = parse_spec(
    {
        "metadata": {"name": "d", "namespace": "ns", "uid": "u"},
        "spec": {"source": {"volumeClaimTemplate": {}}, "size": "1Gi"},
    }
)
AVAILABLE = {
    "metadata": {"generation": 2},
    "status": {"observedGeneration": 2, "availableReplicas": 1, "updatedReplicas": 1},
}
BOUND = {"status": {"phase": "Bound"}}


def observe(**kw: Any) -> Observed:
    return Observed(**{"name": "d", "namespace": "ns", "generation": 4, "spec": SPEC, **kw})


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


@pytest.mark.parametrize(
    ("observed", "phase", "ready_reason"),
    [
        ({}, "Pending", "ClaimPending"),
        ({"claim": BOUND}, "Pending", "NotCreated"),
        (
            {"claim": BOUND, "deployment": {"metadata": {}, "status": {}}},
            "Provisioning",
            "ServerUnavailable",
        ),
        ({"claim": {}, "deployment": AVAILABLE}, "Provisioning", "ClaimPending"),
        ({"claim": BOUND, "deployment": AVAILABLE}, "Ready", "Ready"),
        ({"source_problem": ("ClaimNotFound", "no claim")}, "Failed", "ClaimNotFound"),
        ({"spec": None, "spec_problem": ("InvalidSpec", "bad")}, "Failed", "InvalidSpec"),
        (
            {"claim": BOUND, "deployment": AVAILABLE, "deleting": True},
            "Terminating",
            "Terminating",
        ),
    ],
)
def test_phase_and_ready_follow_the_observed_children(
    observed: dict[str, Any], phase: str, ready_reason: str
) -> None:
    status = compute_status(observe(**observed), T0)
    assert status["phase"] == phase
    ready = conditions(status)["Ready"]
    assert ready == ("True" if phase == "Ready" else "False", ready_reason)
    # kubectl's Reason column: why it is not Ready; a Ready export clears it.
    assert status["reason"] == (None if phase == "Ready" else ready_reason)


def test_a_refused_shrink_keeps_ready_but_says_spec_invalid() -> None:
    obs = observe(claim=BOUND, deployment=AVAILABLE, refused=("ShrinkRefused", "too small"))
    status = compute_status(obs, T0)
    assert status["phase"] == "Ready"
    assert conditions(status)["SpecValid"] == ("False", "ShrinkRefused")
    assert "too small" in status["message"]


def test_a_deployment_that_has_not_seen_its_new_template_is_not_available() -> None:
    lagging = {
        "metadata": {"generation": 3},
        "status": {"observedGeneration": 2, "availableReplicas": 1},
    }
    assert not deployment_available(lagging)
    assert deployment_available(AVAILABLE)
    assert not deployment_available({"metadata": {}, "status": {"availableReplicas": 0}})


def test_transition_times_change_only_when_a_condition_flips() -> None:
    first = compute_status(observe(claim=BOUND, deployment=AVAILABLE), T0)
    again = compute_status(
        observe(claim=BOUND, deployment=AVAILABLE, previous_conditions=first["conditions"]), T1
    )
    assert {c["lastTransitionTime"] for c in again["conditions"]} == {T0}
    flipped = compute_status(observe(claim=BOUND, previous_conditions=again["conditions"]), T1)
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times == {"Ready": T1, "ServerAvailable": T1, "SourceBound": T0, "SpecValid": T0}


def test_deletion_blocked_is_said_in_ready_and_attachments_are_listed() -> None:
    att = nbd_api.Attachment(node="n1", device="/dev/nbd0", mode="ReadOnly")
    obs = observe(
        deleting=True,
        attachments=[att],
        deletion_blocked=("DetachPending", "waits for n1"),
    )
    status = compute_status(obs, T0)
    assert status["phase"] == "Terminating"
    assert conditions(status)["Ready"] == ("False", "DetachPending")
    assert status["attachments"] == [{"nodeName": "n1", "device": "/dev/nbd0", "mode": "ReadOnly"}]
    assert status["attachmentCount"] == 1


def test_the_agent_view_reads_what_the_operator_writes() -> None:
    status = compute_status(observe(claim=BOUND, deployment=AVAILABLE, served_size=2**30), T0)
    obj = {"metadata": {"name": "d", "namespace": "ns", "generation": 4}, "status": status}
    view = nbd_api.ExportStatus.from_object(obj)
    assert view.usable and view.current
    assert (view.uri, view.size_bytes, view.access_mode) == (
        "nbd://d-nbd.ns.svc:10809/d",
        2**30,
        "ReadWriteOnce",
    )
    obj["metadata"]["generation"] = 5  # a newer spec the operator has not handled yet
    assert not nbd_api.ExportStatus.from_object(obj).usable
    assert not nbd_api.ExportStatus.from_object({"metadata": {"name": "x"}}).usable


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("10Gi", 10 * 2**30),
        ("1G", 10**9),
        ("1.5Ki", 1536),
        ("2e3", 2000),
    ],
)
def test_quantities_become_whole_bytes(value: int | str, expected: int) -> None:
    assert nbd_api.parse_quantity(value) == expected


@pytest.mark.parametrize("value", ["1.5", "100m", "-1", "ten", "", -5, True])
def test_a_quantity_that_is_not_whole_bytes_is_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        nbd_api.parse_quantity(value)


def test_lease_names_are_deterministic_bounded_and_read_back() -> None:
    node = "n" * 250
    name = nbd_api.attachment_lease_name("e" * 50, node)
    assert len(name) <= 253 and name == nbd_api.attachment_lease_name("e" * 50, node)
    assert name != nbd_api.attachment_lease_name("e" * 50, node[:-1] + "m")
    lease = nbd_api.attachment_lease("ns", "disk", node, "/dev/nbd1", "ReadOnly")
    assert nbd_api.LABEL_NODE not in lease["metadata"]["labels"]  # too long for a label value
    assert nbd_api.attachment_from_lease(lease) == nbd_api.Attachment(node, "/dev/nbd1", "ReadOnly")
    writer = nbd_api.writer_lease("ns", "disk", "n1")
    assert writer["metadata"]["name"] == "nbd-writer-disk"
    assert nbd_api.attachment_from_lease(writer) is None


def test_every_status_field_the_operator_writes_is_in_the_crd() -> None:
    """The API server prunes what the schema does not declare (the API substitute does not):
    a field missing there would silently never reach kubectl or the agent."""
    crd = yaml.safe_load((ROOT / "crds" / "nbdexport.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    att = nbd_api.Attachment(node="n1", device="/dev/nbd0", mode="ReadOnly")
    for observed in ({"served_size": 1}, {"source_problem": ("ClaimNotFound", "no claim")}):
        status = compute_status(observe(attachments=[att], **observed), T0)
        assert set(status) <= set(schema["properties"]), set(status) - set(schema["properties"])
        condition_fields = schema["properties"]["conditions"]["items"]["properties"]
        assert all(set(c) <= set(condition_fields) for c in status["conditions"])
        attachment_fields = schema["properties"]["attachments"]["items"]["properties"]
        assert all(set(a) <= set(attachment_fields) for a in status["attachments"])


def test_an_imports_status_fields_are_in_the_crd_and_it_provisions_while_importing() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "nbdexport.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    declared = schema["properties"]["import"]["properties"]
    assert set(FIELDS) == set(declared)
    image = parse_spec(
        {
            "metadata": {"name": "d", "namespace": "ns", "uid": "u"},
            "spec": {"source": {"image": {"url": "https://x/d.img"}}, "size": "1Gi"},
        }
    )
    progress = {"phase": "downloading", "bytes": 1, "totalBytes": 4, "rateBytesPerSecond": 1}
    state = import_status(JobOutcome("Running", attempts=1), progress)
    assert set(state) <= set(declared)
    assert state["phase"] in declared["phase"]["enum"]
    status = compute_status(
        observe(spec=image, image_import=state, importing=("Importing", "importing: 25%")), T0
    )
    assert status["phase"] == "Provisioning" and status["reason"] == "Importing"
    assert status["import"]["percent"] == 25
    assert status["import"]["sha256"] is None  # a merge patch removes what is no longer known
    done = compute_status(observe(spec=image, claim=BOUND, deployment=AVAILABLE), T0)
    assert done["phase"] == "Ready" and conditions(done)["SourceBound"] == ("True", "Imported")
