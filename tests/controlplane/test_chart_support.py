"""Shared helpers for the chart, Dockerfile and example tests (no tests of its own).

Why it exists: the chart tests, the example tests and the CRD-copy test all need the same three
things, done the same way: render the chart with the real Helm engine (helm-python-sdk binds
Helm's Go library; no helm binary), validate an object against the Kubernetes OpenAPI schemas
that kubernetes-validate ships (strict: unknown fields are errors, as with `kubectl apply`'s
default server-side field validation), and validate an NBDExport against the CRD's own
openAPIV3Schema. Also the few API-server rules that OpenAPI cannot express and that the chart
could break (privileged vs. allowPrivilegeEscalation, Bidirectional propagation, selectors).

What it must not do: decide what is correct for the chart; the tests state that. It must stay
cheap: schemas are loaded once per Kubernetes version and renders are cached per value set.

It is named test_chart_*.py only to sit inside the files this engineer owns; it defines no tests.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "kube-nbd"
CRD_FILE = ROOT / "crds" / "nbdexport.yaml"
EXAMPLES_DIR = ROOT / "examples"
RELEASE = "nbd"
NAMESPACE = "kube-nbd"
# Oldest supported (Chart.yaml kubeVersion) and newest schemas kubernetes-validate ships.
KUBE_VERSIONS = (
    "1.29",
    kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()),
)

CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "CSIDriver",
    "StorageClass",
    "VolumeSnapshotClass",
    "CustomResourceDefinition",
    "PersistentVolume",
    "Namespace",
}


# --------------------------------------------------------------------------- rendering


@functools.cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


@functools.cache
def _render_cached(values_json: str, name: str, namespace: str) -> str:
    manifests = _chart().render(json.loads(values_json), name=name, namespace=namespace)
    return json.dumps(manifests)


def render_manifests(
    values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path -> rendered text, exactly as `helm template` would produce it."""
    key = json.dumps(values or {}, sort_keys=True)
    return dict(json.loads(_render_cached(key, name, namespace)))


def render(
    values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for ``values`` (NOTES.txt excluded)."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render_manifests(values, name, namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                doc.setdefault("metadata", {})
                doc["metadata"].setdefault("annotations", None)
                if doc["metadata"]["annotations"] is None:
                    del doc["metadata"]["annotations"]
                objects.append(doc)
    return objects


def merged_values(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Chart defaults coalesced with ``values``, as an install would use them."""
    return _chart().merge_values(values or {})


def validate_values(values: dict[str, Any] | None = None) -> None:
    """Helm's own values.schema.json check of the merged values (raises HelmValuesError)."""
    _chart().validate_schema(merged_values(values))


def find(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, f"expected one {kind} *{name_suffix}, found {len(hits)}"
    return hits[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return dict(obj["spec"])
    return dict(obj["spec"]["template"]["spec"])


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(obj)
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


# --------------------------------------------------------------------------- Kubernetes schemas


def _schema_dir(version: str) -> Path:
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    matches = sorted(base.glob(f"v{version}.*-local-strict"))
    assert matches, f"kubernetes-validate has no strict schemas for {version}"
    return matches[-1]


@functools.cache
def _registry(version: str) -> Registry:
    definitions = json.loads((_schema_dir(version) / "_definitions.json").read_text())
    resource: Resource[Any] = Resource.from_contents(definitions)
    return resource @ Registry()


@functools.cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Validator:
    # Same file naming as kubernetes_validate.validate: rbac.authorization.k8s.io/v1 -> rbac-v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = _schema_dir(version) / f"{kind.lower()}-{group_version}.json"
    if not path.exists():
        raise kubernetes_validate.SchemaNotFoundError(kind, version, api_version)
    schema = json.loads(path.read_text())
    registry = Resource.from_contents(schema) @ _registry(version)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def k8s_errors(obj: dict[str, Any], version: str) -> list[str]:
    """Schema violations of a built-in Kubernetes object at ``version`` (empty when valid)."""
    validator = _validator(version, obj["kind"], obj["apiVersion"])
    return [
        f"{obj['kind']}/{obj['metadata'].get('name')} @ {'/'.join(map(str, e.absolute_path))}: "
        f"{e.message}"
        for e in validator.iter_errors(obj)
    ]


def api_server_errors(obj: dict[str, Any]) -> list[str]:
    """Rules the API server enforces beyond OpenAPI, for the fields the chart and examples use."""
    errors: list[str] = []
    name = f"{obj['kind']}/{obj['metadata'].get('name')}"
    if obj["kind"] in {"Deployment", "DaemonSet", "StatefulSet"}:
        selector = obj["spec"]["selector"]["matchLabels"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in selector.items()):
            errors.append(f"{name}: selector {selector} does not match template labels")
    if obj["kind"] in {"Deployment", "DaemonSet", "StatefulSet", "Pod"}:
        spec = pod_spec(obj)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in containers(obj):
            sc = c.get("securityContext", {})
            if sc.get("privileged") and sc.get("allowPrivilegeEscalation") is False:
                errors.append(f"{name}/{c['name']}: privileged with allowPrivilegeEscalation false")
            ports = [p.get("name") for p in c.get("ports", []) if p.get("name")]
            if len(ports) != len(set(ports)) or any(len(p) > 15 for p in ports):
                errors.append(f"{name}/{c['name']}: port names must be unique and <= 15 chars")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    errors.append(f"{name}/{c['name']}: mount of unknown volume {m['name']}")
                if m.get("mountPropagation") == "Bidirectional" and not sc.get("privileged"):
                    errors.append(f"{name}/{c['name']}: Bidirectional needs a privileged container")
    meta_name = obj["metadata"].get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta_name) or len(meta_name) > 253:
        errors.append(f"{name}: invalid object name")
    if obj["kind"] == "Service" and len(meta_name) > 63:
        errors.append(f"{name}: Service names are DNS-1035 labels (<= 63 characters)")
    return errors


# --------------------------------------------------------------------------- the NBDExport CRD


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (path, schema) under an openAPIV3Schema node: .field, .* (a map's values), []."""
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from schema_nodes(sub, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        yield from schema_nodes(node["items"], f"{path}[]")


def load_crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD_FILE.read_text()))


def _structural_to_jsonschema(node: Any) -> Any:
    """The CRD's structural schema as JSON Schema with the API server's strictness.

    Unknown fields: the API server prunes them or, under kubectl's default strict field
    validation, rejects them; here they are errors wherever the schema lists properties and
    does not say x-kubernetes-preserve-unknown-fields.
    """
    if isinstance(node, list):
        return [_structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural_to_jsonschema(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator() -> jsonschema.Validator:
    crd = load_crd()
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = _structural_to_jsonschema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """NBDExport violations of the CRD's openAPIV3Schema (CEL rules are not evaluated here)."""
    return [
        f"{obj['metadata'].get('name')} @ {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _crd_validator().iter_errors(obj)
    ]


def _apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it, before CEL rules run."""
    if isinstance(value, dict):
        for key, child in node.get("properties", {}).items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                value[key] = _apply_defaults(child, value[key])
    elif isinstance(value, list) and "items" in node:
        value = [_apply_defaults(node["items"], v) for v in value]
    return value


@functools.cache
def _cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_walk(node: dict[str, Any], value: Any, path: str, errors: list[str]) -> None:
    for validation in node.get("x-kubernetes-validations", []):
        rule = validation["rule"]
        if "oldSelf" in rule:
            continue  # transition rules run on update only; these are create-time checks
        try:
            ok = _cel_program(rule).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as exc:  # a rule that cannot evaluate is a failed validation too
            errors.append(f"{path or '.'}: rule {rule!r} failed to evaluate: {exc}")
            continue
        if not ok:
            errors.append(f"{path or '.'}: {validation.get('message', rule)}")
    if isinstance(value, dict):
        for key, child in node.get("properties", {}).items():
            if key in value:
                _cel_walk(child, value[key], f"{path}.{key}", errors)
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            _cel_walk(node["items"], item, f"{path}[{i}]", errors)


def crd_cel_errors(obj: dict[str, Any]) -> list[str]:
    """The CRD's x-kubernetes-validations (CEL) that ``obj`` breaks on create, after defaulting.

    Evaluated with cel-python, the CEL implementation available here; rules that compare with
    oldSelf (immutability) only apply to updates and are skipped.
    """
    crd = load_crd()
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = version["schema"]["openAPIV3Schema"]
    value = _apply_defaults(schema, copy.deepcopy(obj))
    errors: list[str] = []
    _cel_walk(schema, value, "", errors)
    return errors


# --------------------------------------------------------------------------- values.yaml text


def values_key_lines(text: str) -> list[tuple[tuple[str, ...], bool]]:
    """Each mapping key of values.yaml as (path, has a comment right above it).

    Block-style YAML only (which values.yaml is); list items are not descended into, because
    the chart treats lists as opaque Kubernetes objects.
    """
    result: list[tuple[tuple[str, ...], bool]] = []
    stack: list[tuple[int, str]] = []
    previous = ""
    key_line = re.compile(r"^(\s*)([A-Za-z0-9_.\-/]+):(\s|$)")
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            previous = ""
            continue
        match = key_line.match(line)
        if match and not stripped.startswith("-"):
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = (*[k for _, k in stack], match.group(2))
            result.append((path, previous.startswith("#")))
            stack.append((indent, match.group(2)))
        previous = stripped
    return result


def schema_node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The schema for a values path, following local $refs; None when the path is undeclared."""
    node: dict[str, Any] = schema
    for key in path:
        while "$ref" in node:
            node = _resolve_ref(schema, node["$ref"])
        props = node.get("properties")
        if props is None or key not in props:
            return None
        node = props[key]
    while "$ref" in node:
        node = _resolve_ref(schema, node["$ref"])
    return node


def _resolve_ref(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/"), ref
    node: Any = schema
    for part in ref[2:].split("/"):
        node = node[part]
    return dict(node)
