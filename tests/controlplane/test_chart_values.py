"""values.yaml and values.schema.json stay in step, and every value is documented.

The schema is what Helm checks on install and upgrade, so a value missing from it is a value a
user cannot set (additionalProperties: false), and a typo in a user's values file is an error
instead of a silently ignored setting.
"""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from test_chart_support import (
    CHART_DIR,
    render,
    schema_node,
    validate_values,
    values_key_lines,
)

VALUES_TEXT = (CHART_DIR / "values.yaml").read_text()
SCHEMA: dict[str, Any] = json.loads((CHART_DIR / "values.schema.json").read_text())


def _is_free_form(node: dict[str, Any]) -> bool:
    """Kubernetes objects passed through verbatim (resources, securityContext, ...)."""
    return node.get("type") == "object" and node.get("additionalProperties") is not False


def _checked_keys() -> list[tuple[tuple[str, ...], bool]]:
    """values.yaml keys outside free-form Kubernetes objects, with their 'has comment' flag."""
    out = []
    for path, commented in values_key_lines(VALUES_TEXT):
        parents = [schema_node(SCHEMA, path[:i]) for i in range(1, len(path))]
        if any(p is not None and _is_free_form(p) for p in parents):
            continue
        out.append((path, commented))
    return out


def test_the_schema_itself_is_valid_draft_7() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)


def test_every_values_key_is_declared_in_the_schema() -> None:
    undeclared = [".".join(p) for p, _ in _checked_keys() if schema_node(SCHEMA, p) is None]
    assert undeclared == []


def test_every_values_key_has_a_comment() -> None:
    bare = [".".join(p) for p, commented in _checked_keys() if not commented]
    assert bare == []


def test_every_schema_property_exists_in_values_yaml() -> None:
    declared = {p for p, _ in values_key_lines(VALUES_TEXT)}

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> list[str]:
        missing = []
        if "$ref" in node:
            return []
        for key, child in node.get("properties", {}).items():
            if (*path, key) not in declared:
                missing.append(".".join((*path, key)))
            elif not _is_free_form(child):
                missing += walk(child, (*path, key))
        return missing

    assert walk(SCHEMA, ()) == []


def test_every_schema_property_has_a_description_or_a_shared_definition() -> None:
    def walk(node: dict[str, Any], path: str) -> list[str]:
        bad = []
        for key, child in node.get("properties", {}).items():
            if "$ref" not in child and not child.get("description"):
                bad.append(f"{path}{key}")
            bad += walk(child, f"{path}{key}.")
        return bad

    assert walk(SCHEMA, "") == []


def test_the_defaults_validate_against_the_schema() -> None:
    defaults = yaml.safe_load(VALUES_TEXT)
    jsonschema.Draft7Validator(SCHEMA).validate(defaults)
    validate_values({})


def test_the_comment_checker_notices_a_bare_key() -> None:
    text = "# documented\na: 1\nb: 2\n"
    assert values_key_lines(text) == [(("a",), True), (("b",), False)]


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"operator": {"replicaz": 2}}, "replicaz"),
        ({"agent": {"nbdModule": {"nbdsMax": 0}}}, "nbdsMax"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"agent": {"kubeletDir": "var/lib/kubelet"}}, "kubeletDir"),
        ({"csiDriver": {"fsGroupPolicy": "Always"}}, "fsGroupPolicy"),
        ({"agent": {"logLevel": "verbose"}}, "logLevel"),
        ({"operator": {"replicas": -1}}, "replicas"),
        ({"operator": {"leaderElection": {"enabled": "yes"}}}, "enabled"),
        ({"metrics": {"podMonitor": {"interval": "often"}}}, "interval"),
        ({"unknownTopLevel": True}, "unknownTopLevel"),
        ({"metrics": {"serverPort": 10809}}, "serverPort"),
    ],
)
def test_helm_rejects_invalid_values_before_rendering(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=where):
        render(values)
