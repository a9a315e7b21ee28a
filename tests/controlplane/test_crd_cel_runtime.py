"""The CRD's CEL rules are ones a real API server can evaluate, not only cel-python.

Why a static check: no kube-apiserver runs here, and cel-python evaluates a rule over any JSON.
The API server first converts each value it hands to CEL through the value's schema
(k8s.io/apiserver's ``UnstructuredToVal``). An object schema that declares neither properties
nor an additionalProperties schema cannot be converted, and every rule that touches such a value
fails ("invalid object type, expected either Properties or AdditionalProperties ..."): a field
lookup converts the field's value, so ``has(self.memory)`` and ``self == oldSelf`` over a parent
of ``memory: {}`` fail too. A kube-apiserver 1.28.7 rejected every memory export that way.

So the checks below walk the schema the way that runtime does: every object carrying rules
declares its fields; every ``self.a.b`` path a rule names resolves to declared properties, and
nothing the rule may convert (the value it names and everything under it) is a property-less
object. Transition rules (``oldSelf``) sit where the API server can correlate old and new
values (no list items but those of a map list), and rules call only the standard CEL functions
that every Kubernetes version the chart admits offers (docs/operator.md says where from).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from test_chart_support import ROOT, schema_nodes

CRD = yaml.safe_load((ROOT / "crds" / "nbdexport.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

# The root's metadata: the API server supplies its schema to CEL, with these fields only.
ROOT_METADATA_FIELDS = frozenset({"name", "generateName"})
# CEL standard macros and functions: in every Kubernetes with validation rules (GA in 1.29).
STANDARD_CEL = frozenset(
    {"has", "all", "exists", "exists_one", "map", "filter", "size", "matches", "contains"}
    | {"startsWith", "endsWith", "int", "uint", "double", "string", "bool", "bytes", "dyn"}
)
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_ROOT_VAR = re.compile(r"\b(self|oldSelf)\b")
_FIELD = re.compile(r"\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")
_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")


def without_literals(rule: str) -> str:
    """The rule with its string literals blanked (a regex literal is not a field path)."""
    return _QUOTED.sub("''", rule)


def field_paths(rule: str) -> Iterator[tuple[str, ...]]:
    """Every field path a rule reads from self or oldSelf; a trailing method call ends it."""
    text = without_literals(rule)
    for match in _ROOT_VAR.finditer(text):
        path: list[str] = []
        end = match.end()
        while field := _FIELD.match(text, end):
            if text[field.end() :].lstrip().startswith("("):
                break  # self.x.size(): a method on x, not a field named size
            path.append(field.group(1))
            end = field.end()
        yield tuple(path)


def is_fieldless_object(node: dict[str, Any]) -> bool:
    """An object schema the API server's CEL runtime cannot convert."""
    return (
        node.get("type") == "object"
        and not node.get("properties")
        and not isinstance(node.get("additionalProperties"), dict)
        and not node.get("x-kubernetes-preserve-unknown-fields")
    )


def rules(
    node: dict[str, Any], path: str = "", correlatable: bool = True
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], bool]]:
    """(path, schema node, rule, whether oldSelf can be correlated there) for every rule."""
    for rule in node.get("x-kubernetes-validations") or []:
        yield path, node, rule, correlatable
    for key, sub in (node.get("properties") or {}).items():
        yield from rules(sub, f"{path}.{key}", correlatable)
    if isinstance(node.get("additionalProperties"), dict):
        yield from rules(node["additionalProperties"], f"{path}.*", correlatable)
    if isinstance(node.get("items"), dict):
        keyed = node.get("x-kubernetes-list-type") == "map"
        yield from rules(node["items"], f"{path}[]", correlatable and keyed)


def runtime_problems(schema: dict[str, Any]) -> list[str]:
    """What the API server's CEL runtime would refuse in ``schema``'s rules."""
    problems: list[str] = []
    for where, node, rule, correlatable in rules(schema):
        text = rule["rule"]
        at = where or "<root>"
        if node.get("type") == "object" and is_fieldless_object(node):
            problems.append(f"{at}: a rule on an object that declares no properties")
        if "oldSelf" in text and not correlatable:
            problems.append(f"{at}: a transition rule where oldSelf cannot be correlated")
        for name in _CALL.findall(without_literals(text)):
            if name not in STANDARD_CEL:
                problems.append(f"{at}: {name}() is not a standard CEL function")
        for path in field_paths(text):
            problems.extend(_path_problems(schema, where, node, path, at))
    return problems


def _path_problems(
    schema: dict[str, Any], where: str, node: dict[str, Any], path: tuple[str, ...], at: str
) -> list[str]:
    if not where and path[:1] == ("metadata",):
        ok = len(path) == 2 and path[1] in ROOT_METADATA_FIELDS
        return [] if ok else [f"{at}: self.{'.'.join(path)} is not name or generateName"]
    target = node
    for step in path:
        props = target.get("properties") or {}
        if step not in props:
            return [f"{at}: self.{'.'.join(path)} names no declared property"]
        target = props[step]
    named = "self" + "".join(f".{p}" for p in path)
    return [
        f"{at}: {named} reaches {named}{sub or ''}, an object without properties"
        for sub, inner in schema_nodes(target)
        if is_fieldless_object(inner)
    ]


def test_no_rule_of_the_crd_reaches_an_object_the_api_servers_cel_cannot_convert() -> None:
    assert runtime_problems(SCHEMA) == []


# What the checker must catch: the rules that the 1.28.7 API server refused, and their kin.
_MEMORY = {"type": "object"}
_SOURCE = {"type": "object", "properties": {"memory": _MEMORY, "other": {"type": "string"}}}


@pytest.mark.parametrize(
    ("where", "rule", "finding"),
    [
        ("source", "has(self.memory) || has(self.other)", "self.memory reaches"),
        ("source", "self == oldSelf", "self reaches self.memory"),
        ("spec", "has(self.source.memory)", "self.source.memory reaches"),
        ("spec", "self.source == oldSelf.source", "self.source reaches"),
        ("spec", "'memory' in self.source && self.source.memory == {}", "reaches"),
        ("spec", "self.source.nothing == 1", "names no declared property"),
        ("spec", "self.source.other.lowerAscii() == 'a'", "not a standard CEL function"),
        ("memory", "true", "declares no properties"),
    ],
)
def test_the_checker_finds_rules_the_real_runtime_refuses(
    where: str, rule: str, finding: str
) -> None:
    source = {**_SOURCE, "properties": {**_SOURCE["properties"], "memory": dict(_MEMORY)}}
    spec: dict[str, Any] = {"type": "object", "properties": {"source": source}}
    target = {"spec": spec, "source": source, "memory": source["properties"]["memory"]}[where]
    target["x-kubernetes-validations"] = [{"rule": rule, "message": "m"}]
    schema = {"type": "object", "properties": {"spec": spec}}
    problems = runtime_problems(schema)
    assert any(finding in p for p in problems), problems


def test_the_checker_admits_rules_that_stay_clear_of_fieldless_objects() -> None:
    spec = {
        "type": "object",
        "x-kubernetes-validations": [
            {"rule": "has(self.source.other) && self.source.other.size() < 3", "message": "m"}
        ],
        "properties": {"source": _SOURCE},
    }
    assert runtime_problems({"type": "object", "properties": {"spec": spec}}) == []


def test_a_transition_rule_under_an_atomic_list_is_found() -> None:
    items = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "m"}],
    }
    schema = {"type": "object", "properties": {"l": {"type": "array", "items": items}}}
    assert any("cannot be correlated" in p for p in runtime_problems(schema))
