"""The NBDExport CRD: a valid CustomResourceDefinition whose schema and CEL rules say what the
API contract says, checked with sample objects (the examples/ and hand-made invalid ones).

How: the CRD is validated against the real apiextensions.k8s.io/v1 schema (kubernetes-validate);
samples get the schema's defaults applied (as the API server does before validation), are
checked with jsonschema against openAPIV3Schema, and every x-kubernetes-validations rule on a
present field is evaluated with cel-python, with ``oldSelf`` for updates.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import nbd_api
import pytest
import yaml
from test_chart_support import KUBE_VERSIONS, schema_nodes

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "nbdexport.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
EXAMPLES = sorted((ROOT / "examples").glob("nbdexport-*.yaml"))
CEL = celpy.Environment()


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: absent fields with a default get it."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_defaults(schema["items"], item)
    return value


def rules_at(
    schema: dict[str, Any], new: Any, old: Any, path: str = ""
) -> Iterator[tuple[str, dict[str, Any], Any, Any]]:
    """Every (path, rule, self, oldSelf) where the rule applies to a present value."""
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, rule, new, old
    if isinstance(new, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in new:
                old_sub = old.get(key) if isinstance(old, dict) else None
                yield from rules_at(sub, new[key], old_sub, f"{path}.{key}")


def cel_errors(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    errors = []
    for path, rule, new, previous in rules_at(SCHEMA, obj, old):
        transition = "oldSelf" in rule["rule"]
        if transition and previous is None:
            continue  # transition rules run on updates only, where the old value exists
        activation = {"self": celpy.json_to_cel(new)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(previous)
        program = CEL.program(CEL.compile(rule["rule"]))
        result = program.evaluate(activation)
        assert isinstance(result, celpy.celtypes.BoolType), f"{path}: {rule['rule']} -> {result!r}"
        if not result:
            errors.append(f"{path}: {rule['message']}")
    return errors


def admit(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """What the API server would say: schema errors first, then CEL rule failures."""
    obj = apply_defaults(SCHEMA, copy.deepcopy(obj))
    if old is not None:
        old = apply_defaults(SCHEMA, copy.deepcopy(old))
    validator = jsonschema.Draft7Validator(SCHEMA)
    errors = [f"schema: {e.message}" for e in validator.iter_errors(obj)]
    return errors or cel_errors(obj, old)


def export(spec: dict[str, Any], name: str = "disk") -> dict[str, Any]:
    return {
        "apiVersion": "nbd.dev/v1alpha1",
        "kind": "NBDExport",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


MEMORY = {"source": {"memory": {}}, "size": "1Gi"}


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_crd_is_a_valid_custom_resource_definition(version: str) -> None:
    """On the oldest Kubernetes the chart admits (Chart.yaml kubeVersion) and the newest."""
    kubernetes_validate.validate(CRD, version, strict=True)


def test_the_oldest_version_checked_is_the_one_the_chart_admits() -> None:
    chart = yaml.safe_load((ROOT / "charts" / "kube-nbd" / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}.0-0"


def test_the_crd_names_match_the_api_package() -> None:
    names = CRD["spec"]["names"]
    assert CRD["metadata"]["name"] == f"{nbd_api.PLURAL}.{nbd_api.GROUP}"
    assert CRD["spec"]["group"] == nbd_api.GROUP
    assert VERSION["name"] == nbd_api.VERSION
    assert (names["kind"], names["plural"], names["singular"]) == (
        nbd_api.KIND,
        nbd_api.PLURAL,
        nbd_api.SINGULAR,
    )
    assert names["shortNames"] == [nbd_api.SHORT_NAME]
    assert CRD["spec"]["scope"] == "Namespaced"
    assert VERSION["subresources"] == {"status": {}}
    phases = SCHEMA["properties"]["status"]["properties"]["phase"]["enum"]
    assert tuple(phases) == nbd_api.PHASES
    modes = SCHEMA["properties"]["spec"]["properties"]["accessMode"]["enum"]
    assert tuple(modes) == nbd_api.ACCESS_MODES


def test_printer_columns_show_phase_reason_size_uri_attachments_and_age() -> None:
    columns = {c["name"]: c["jsonPath"] for c in VERSION["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Reason": ".status.reason",  # why a Failed (or not yet Ready) export is not Ready
        "Size": ".status.sizeBytes",  # what is served: also for host devices and raw claims
        "URI": ".status.uri",
        "Attached": ".status.attachmentCount",
        "Age": ".metadata.creationTimestamp",
        "Format": ".status.format",  # what is served, a clone's inherited from its base
        "Message": ".status.message",
    }
    wide = {c["name"] for c in VERSION["additionalPrinterColumns"] if c.get("priority")}
    assert wide == {"Format", "Message"}  # only with kubectl get -o wide
    for path in columns.values():
        if path.startswith(".metadata."):
            continue  # metadata is the API server's, not the CRD's schema
        node = SCHEMA
        for part in path.strip(".").split("."):
            node = node["properties"][part]  # KeyError: a column points at nothing


def test_the_schema_is_structural_and_prunes_unknown_fields() -> None:
    for path, node in schema_nodes(SCHEMA):
        assert not node.get("x-kubernetes-preserve-unknown-fields"), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_admitted(path: pathlib.Path) -> None:
    assert admit(yaml.safe_load(path.read_text())) == []


def test_there_is_an_example_for_every_source_kind() -> None:
    kinds = {next(iter(yaml.safe_load(p.read_text())["spec"]["source"])) for p in EXAMPLES}
    assert kinds == set(SCHEMA["properties"]["spec"]["properties"]["source"]["properties"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # Exactly one source, said by minProperties/maxProperties (no CEL: docs/operator.md).
        ({"source": {}}, "should be non-empty"),
        ({"source": {"memory": {}, "export": {"name": "a"}}, "size": "1Gi"}, "too many properties"),
        ({"source": {"memory": {}}}, "size is required"),
        ({"source": {"volumeClaimTemplate": {}}}, "size is required"),
        ({"source": {"persistentVolumeClaim": {"claimName": "c"}}}, "size is required"),
        (
            {"source": {"hostDevice": {"nodeName": "n", "path": "/dev/sdb"}}, "size": "1Gi"},
            "size must not",
        ),
        ({**MEMORY, "accessMode": "ReadWriteMany"}, "clusterFilesystemAcknowledged"),
        ({**MEMORY, "accessMode": "ReadOnlyMany"}, "needs readOnly"),
        ({**MEMORY, "readOnly": True}, "memory export starts empty"),
        ({"source": {"export": {"name": "base"}}, "readOnly": True}, "readOnly must be false"),
        ({"source": {"hostDevice": {"nodeName": "n", "path": "/etc/passwd"}}}, "schema"),
        ({"source": {"hostDevice": {"nodeName": "n", "path": "/dev/../etc"}}}, "'..'"),
        (
            {
                "source": {"persistentVolumeClaim": {"claimName": "c", "path": "a/../../x"}},
                "size": 1,
            },
            "inside the claim",
        ),
        ({**MEMORY, "size": "1.5Gx"}, "schema"),
        ({**MEMORY, "size": "-1"}, "schema"),
        ({**MEMORY, "allowedClients": ["10.0.0.0"]}, "schema"),
        ({**MEMORY, "allowedClients": ["10.0.0.0/33"]}, "schema"),
        ({**MEMORY, "accessMode": "ReadWriteSometimes"}, "schema"),
        ({**MEMORY, "connections": 0}, "schema"),
        ({**MEMORY, "qos": {"readIOPS": 0}}, "schema"),
        ({**MEMORY, "tls": {}}, "schema"),
        ({**MEMORY, "tls": {"secretName": "s", "mode": "Sometimes"}}, "schema"),
        ({**MEMORY, "format": "qcow3"}, "schema"),
        ({**MEMORY, "format": "qcow2"}, "memory export is raw"),
        ({"source": {"export": {"name": "base"}}, "format": "raw"}, "base's format"),
        (
            {"source": {"persistentVolumeClaim": {"claimName": "c"}}, "size": 1, "format": "vmdk"},
            "served read-only",
        ),
        (
            {"source": {"hostDevice": {"nodeName": "n", "path": "/dev/sdb"}}, "format": "xz"},
            "served read-only",
        ),
    ],
)
def test_an_invalid_export_is_rejected_with_a_reason(spec: dict[str, Any], message: str) -> None:
    errors = admit(export(spec))
    assert errors, "admitted, but should have been rejected"
    assert any(message in e for e in errors), errors


def test_read_write_many_is_admitted_with_the_acknowledgement() -> None:
    spec = {**MEMORY, "accessMode": "ReadWriteMany", "clusterFilesystemAcknowledged": True}
    assert admit(export(spec)) == []


def test_the_export_name_must_fit_a_service_name() -> None:
    assert admit(export(MEMORY, name="a" * 50)) == []
    assert any("DNS-1035" in e for e in admit(export(MEMORY, name="a" * 51)))
    assert any("DNS-1035" in e for e in admit(export(MEMORY, name="9lives")))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, None),  # no change at all
        ({"size": "2Gi"}, None),  # growth is allowed (the operator resizes)
        ({"readOnly": False, "qos": {"readIOPS": 10}}, None),
        ({"source": {"volumeClaimTemplate": {}}}, "source is immutable"),
        ({"source": {"hostDevice": {"nodeName": "n", "path": "/dev/sdb"}}}, "source is immutable"),
        (
            {"accessMode": "ReadWriteMany", "clusterFilesystemAcknowledged": True},
            "accessMode is immutable",
        ),
        ({"tls": {"secretName": "s"}}, "tls cannot be switched"),
        ({"format": "raw"}, "format is immutable"),  # absent (raw) to explicit raw: still a change
    ],
)
def test_updates_keep_immutable_fields_immutable(
    change: dict[str, Any], message: str | None
) -> None:
    old = export(MEMORY)
    new = copy.deepcopy(old)
    new["spec"].update(copy.deepcopy(change))
    errors = admit(new, old)
    if message is None:
        assert errors == []
    else:
        assert any(message in e for e in errors), errors


def test_defaults_are_applied_where_the_api_server_applies_them() -> None:
    obj = apply_defaults(
        SCHEMA, export({"source": {"persistentVolumeClaim": {"claimName": "c"}}, "size": 1})
    )
    spec = obj["spec"]
    assert spec["accessMode"] == "ReadWriteOnce"
    assert spec["readOnly"] is False and spec["copyOnWrite"] is False
    assert spec["source"]["persistentVolumeClaim"] == {
        "claimName": "c",
        "volumeMode": "Filesystem",
        "path": "disk.img",
    }


def test_kubectl_explain_describes_every_spec_field() -> None:
    undescribed = [
        path
        for path, node in schema_nodes(SCHEMA["properties"]["spec"], ".spec")
        if not str(node.get("description") or "").strip()
    ]
    assert undescribed == []
    qos = SCHEMA["properties"]["spec"]["properties"]["qos"]
    assert "limit" in qos["description"]  # kubectl explain nbdexport.spec.qos


def test_kubectl_explain_says_memory_is_volatile_and_clones_persist() -> None:
    source = SCHEMA["properties"]["spec"]["properties"]["source"]["properties"]
    assert "lost whenever the server pod restarts" in source["memory"]["description"]
    assert "PersistentVolumeClaim the operator owns" in source["export"]["description"]
    assert "scratch" in SCHEMA["properties"]["spec"]["properties"]["copyOnWrite"]["description"]


def test_a_clone_may_name_its_overlays_storage_class() -> None:
    spec = {"source": {"export": {"name": "golden", "storageClassName": "fast"}}}
    assert admit(export(spec)) == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "xz"])
def test_every_format_is_admitted_where_it_can_be_served(fmt: str) -> None:
    claim = {"source": {"persistentVolumeClaim": {"claimName": "c"}}, "size": 1, "format": fmt}
    assert admit(export({**claim, "readOnly": True, "accessMode": "ReadOnlyMany"})) == []
    assert admit(export({**claim, "copyOnWrite": True})) == []
    writable = admit(export(claim))
    assert (writable == []) == (fmt in ("raw", "qcow2")), writable


def test_a_format_may_stay_as_it_was() -> None:
    old = export({**SAMPLES["hostDevice"], "format": "qcow2"})
    assert admit(copy.deepcopy(old), old) == []
    changed = export({**SAMPLES["hostDevice"], "format": "raw"})
    assert any("format is immutable" in e for e in admit(changed, old))


# One minimal, valid spec per source kind: a kind added to the schema without a sample here
# fails the tests below (a KeyError), so the rules that single out memory get revisited.
SAMPLES: dict[str, dict[str, Any]] = {
    "volumeClaimTemplate": {"source": {"volumeClaimTemplate": {}}, "size": "1Gi"},
    "persistentVolumeClaim": {"source": {"persistentVolumeClaim": {"claimName": "c"}}, "size": 1},
    "hostDevice": {"source": {"hostDevice": {"nodeName": "n", "path": "/dev/sdb"}}},
    "memory": MEMORY,
    "export": {"source": {"export": {"name": "base"}}},
    "image": {"source": {"image": {"url": "https://images.example/disk.img"}}, "size": "4Gi"},
}
SOURCE_KINDS = sorted(SCHEMA["properties"]["spec"]["properties"]["source"]["properties"])


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_only_a_memory_source_refuses_copy_on_write(kind: str) -> None:
    """The memory rules name every other kind instead of memory (the API server's CEL cannot
    look at memory's empty object); this checks that the complement is the right one."""
    spec = {**SAMPLES[kind], "copyOnWrite": True}
    refused = any("memory export starts empty" in e for e in admit(export(spec)))
    assert refused == (kind == "memory")
    assert admit(export(SAMPLES[kind])) == []


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_only_a_memory_source_refuses_a_non_raw_format(kind: str) -> None:
    """As for copyOnWrite, the memory rule names the other kinds; a clone refuses any format
    (it inherits its base's)."""
    spec = {**SAMPLES[kind], "format": "qcow2"}
    errors = admit(export(spec))
    assert any("memory export is raw" in e for e in errors) == (kind == "memory"), errors
    assert any("base's format" in e for e in errors) == (kind == "export"), errors
    if kind not in ("memory", "export"):
        assert errors == []


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_size_is_required_exactly_where_the_source_has_no_size_of_its_own(kind: str) -> None:
    spec = {k: v for k, v in SAMPLES[kind].items() if k != "size"}
    required = any("size is required" in e for e in admit(export(spec)))
    assert required == ("size" in SAMPLES[kind])


@pytest.mark.parametrize("old_kind", SOURCE_KINDS)
@pytest.mark.parametrize("new_kind", SOURCE_KINDS)
def test_the_source_kind_never_changes(old_kind: str, new_kind: str) -> None:
    errors = admit(export(SAMPLES[new_kind]), export(SAMPLES[old_kind]))
    assert any("source is immutable" in e for e in errors) == (old_kind != new_kind), errors


URL = "https://images.example/disk.qcow2"
S3 = {"bucket": "golden-images", "key": "debian/12.qcow2"}


@pytest.mark.parametrize(
    "spec",
    [
        {"source": {"image": {"url": URL}}, "size": "10Gi", "format": "qcow2"},
        {"source": {"image": {"url": URL, "sha256": "a" * 64}}, "size": "10Gi"},
        {
            "source": {"image": {"s3": {**S3, "endpoint": "http://minio:9000", "region": "eu"}}},
            "size": "10Gi",
            "format": "vmdk",
            "readOnly": True,
        },
        {"source": {"image": {"url": URL, "volumeMode": "Block"}}, "size": "10Gi"},
        {"source": {"image": {"url": URL, "secretRef": {"name": "creds"}}}, "size": 1},
        # stream: read-only at the remote's size, or writable over an overlay of spec.size
        {"source": {"image": {"url": URL, "mode": "stream"}}, "readOnly": True},
        {"source": {"image": {"s3": S3, "mode": "stream", "cacheSize": "256Mi"}}, "size": "1Gi"},
        # any format streams: read by nbdserver from the remote, writes on the overlay
        {"source": {"image": {"url": URL, "mode": "stream"}}, "readOnly": True, "format": "qcow2"},
        {"source": {"image": {"url": URL, "mode": "stream"}}, "size": "1Gi", "format": "xz"},
    ],
)
def test_valid_image_sources_are_admitted(spec: dict[str, Any]) -> None:
    assert admit(export(spec)) == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"source": {"image": {}}, "size": "1Gi"}, "exactly one of url and s3"),
        ({"source": {"image": {"url": URL, "s3": S3}}, "size": "1Gi"}, "exactly one of url"),
        ({"source": {"image": {"url": "ftp://x/disk.img"}}, "size": "1Gi"}, "schema"),
        ({"source": {"image": {"url": URL}}}, "size is required"),
        ({"source": {"image": {"url": URL, "mode": "stream"}}}, "size is required"),
        (
            {"source": {"image": {"url": URL, "mode": "stream"}}, "readOnly": True, "size": 1},
            "size must not be set",
        ),
        ({"source": {"image": {"url": URL, "mode": "copy"}}, "size": "1Gi"}, "schema"),
        ({"source": {"image": {"url": URL, "sha256": "ABC"}}, "size": "1Gi"}, "schema"),
        ({"source": {"image": {"s3": {"bucket": "b"}}}, "size": "1Gi"}, "schema"),
        ({"source": {"image": {"s3": {**S3, "bucket": "Not_A_Bucket"}}}, "size": 1}, "schema"),
        (
            {
                "source": {"image": {"url": URL, "volumeMode": "Block"}},
                "size": 1,
                "format": "qcow2",
            },
            "volumeMode Block needs format raw",
        ),
        (
            {"source": {"image": {"url": URL, "mode": "stream", "volumeMode": "Block"}}, "size": 1},
            "mode import only",
        ),
        ({"source": {"image": {"url": URL, "cacheSize": "1Gi"}}, "size": 1}, "mode stream only"),
        ({"source": {"image": {"url": URL}}, "size": 1, "format": "xz"}, "served read-only"),
    ],
)
def test_invalid_image_sources_are_rejected_with_a_reason(
    spec: dict[str, Any], message: str
) -> None:
    errors = admit(export(spec))
    assert any(message in e for e in errors), errors


def test_an_image_source_is_immutable() -> None:
    old = export({"source": {"image": {"url": URL}}, "size": "1Gi"})
    new = export({"source": {"image": {"url": URL + "2"}}, "size": "1Gi"})
    assert any("source is immutable" in e for e in admit(new, old))
    assert admit(copy.deepcopy(old), old) == []


def test_an_image_source_defaults_to_an_import_into_a_filesystem_claim() -> None:
    obj = apply_defaults(SCHEMA, export({"source": {"image": {"url": URL}}, "size": 1}))
    assert obj["spec"]["source"]["image"] == {
        "url": URL,
        "mode": "import",
        "volumeMode": "Filesystem",
    }
