#!/usr/bin/env python3
"""Copy the CRDs from crds/ (their one source of truth) into the Helm chart as templates.

Why it exists: the chart must install the NBDExport CRD only when ``crds.enabled`` is true and
must mark it ``helm.sh/resource-policy: keep``. Helm's own ``crds/`` folder can do neither (it is
never templated), so, like cert-manager, the chart carries the CRD as a template. This script
writes that template: the source's ``metadata`` block is replaced by one that adds the chart's
labels and the keep annotation, and every other line of the source is copied byte for byte, so
no YAML round trip can reorder, re-quote or reinterpret anything in the schema (YAML 1.1 would
turn a key like ``n`` into ``false``).

What it must not do: edit crds/ or accept a source it cannot copy faithfully (Helm template
delimiters in the source, several documents in one file); those are errors, not warnings.

    python scripts/sync_chart_crds.py          # write charts/kube-nbd/templates/crd-*.yaml
    python scripts/sync_chart_crds.py --check  # exit 1 if a template is missing or stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CRDS_DIR = ROOT / "crds"
DEFAULT_CHART_DIR = ROOT / "charts" / "kube-nbd"
TEMPLATE_PREFIX = "crd-"
# Keys the chart adds to the CRD's metadata; the equality test strips exactly these.
KEEP_ANNOTATION = "helm.sh/resource-policy"
CHART_LABELS = frozenset(
    {
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/component",
        "app.kubernetes.io/part-of",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
        "helm.sh/chart",
    }
)

_TOP_LEVEL_KEY = re.compile(r"^([A-Za-z][A-Za-z0-9]*):")


class SyncError(Exception):
    """A CRD source the script refuses to copy; the message says which file and why."""


@dataclass(frozen=True)
class Crd:
    source: Path
    name: str
    labels: dict[str, str]
    annotations: dict[str, str]
    body: str  # every top-level block except apiVersion, kind and metadata, verbatim


def _split_top_level(text: str) -> list[tuple[str | None, list[str]]]:
    """Split a YAML document into (top-level key, its lines); leading comments have key None."""
    blocks: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines(keepends=True):
        match = _TOP_LEVEL_KEY.match(line)
        if match:
            blocks.append((match.group(1), [line]))
        else:
            blocks[-1][1].append(line)
    return blocks


def load_crd(path: Path) -> Crd:
    text = path.read_text(encoding="utf-8")
    if "{{" in text or "}}" in text:
        raise SyncError(f"{path}: contains '{{{{' or '}}}}', which Helm would treat as a template")
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(documents) != 1:
        raise SyncError(f"{path}: expected exactly one YAML document, found {len(documents)}")
    doc: dict[str, Any] = documents[0]
    if doc.get("kind") != "CustomResourceDefinition":
        raise SyncError(f"{path}: kind is {doc.get('kind')!r}, not CustomResourceDefinition")
    if doc.get("apiVersion") != "apiextensions.k8s.io/v1":
        raise SyncError(f"{path}: apiVersion must be apiextensions.k8s.io/v1")
    metadata = doc.get("metadata") or {}
    extra = set(metadata) - {"name", "labels", "annotations"}
    if extra:
        raise SyncError(f"{path}: unexpected metadata fields {sorted(extra)}")
    annotations = dict(metadata.get("annotations") or {})
    # The chart sets its own recommended labels (with the release's instance and version); a
    # source label of the same key gives way, every other source label is kept.
    labels = {k: v for k, v in (metadata.get("labels") or {}).items() if k not in CHART_LABELS}
    if KEEP_ANNOTATION in annotations:
        raise SyncError(f"{path}: {KEEP_ANNOTATION} is the chart's decision (crds.keep)")

    body: list[str] = []
    seen: set[str] = set()
    for key, lines in _split_top_level(text):
        if key is None:
            continue  # the source's header comment and "---" stay with the source
        seen.add(key)
        if key not in {"apiVersion", "kind", "metadata"}:
            body.extend(lines)
    if "spec" not in seen:
        raise SyncError(f"{path}: no top-level spec")
    return Crd(
        source=path,
        name=str(metadata["name"]),
        labels={str(k): str(v) for k, v in labels.items()},
        annotations={str(k): str(v) for k, v in annotations.items()},
        body="".join(body).rstrip("\n") + "\n",
    )


def _scalar(value: str) -> str:
    # JSON strings are valid YAML double-quoted scalars: no value can change meaning.
    return json.dumps(value)


def render_template(crd: Crd, source_label: str) -> str:
    labels = "".join(f"    {_scalar(k)}: {_scalar(v)}\n" for k, v in crd.labels.items())
    annotations = "".join(f"    {_scalar(k)}: {_scalar(v)}\n" for k, v in crd.annotations.items())
    if crd.annotations:
        annotations_block = (
            "  annotations:\n"
            "    {{- if .Values.crds.keep }}\n"
            f"    {KEEP_ANNOTATION}: keep\n"
            "    {{- end }}\n"
            f"{annotations}"
        )
    else:
        annotations_block = (
            "  {{- if .Values.crds.keep }}\n"
            "  annotations:\n"
            f"    {KEEP_ANNOTATION}: keep\n"
            "  {{- end }}\n"
        )
    return (
        f"{{{{- /* Generated by scripts/sync_chart_crds.py from {source_label}; do not edit: "
        "change the source and run `make chart`. */}}\n"
        "{{- if .Values.crds.enabled }}\n"
        "apiVersion: apiextensions.k8s.io/v1\n"
        "kind: CustomResourceDefinition\n"
        "metadata:\n"
        f"  name: {_scalar(crd.name)}\n"
        "  labels:\n"
        '    {{- include "kube-nbd.labels" (dict "ctx" $ "component" "crd") | nindent 4 }}\n'
        f"{labels}"
        f"{annotations_block}"
        f"{crd.body}"
        "{{- end }}\n"
    )


def expected_templates(crds_dir: Path, chart_dir: Path) -> dict[Path, str]:
    sources = sorted([*crds_dir.glob("*.yaml"), *crds_dir.glob("*.yml")])
    if not sources:
        raise SyncError(f"{crds_dir}: no CRD files (*.yaml)")
    out: dict[Path, str] = {}
    for source in sources:
        crd = load_crd(source)
        try:
            label = source.relative_to(ROOT).as_posix()
        except ValueError:
            label = source.name
        target = chart_dir / "templates" / f"{TEMPLATE_PREFIX}{source.stem}.yaml"
        out[target] = render_template(crd, label)
    return out


def sync(crds_dir: Path, chart_dir: Path, check: bool) -> list[str]:
    """Write (or, with check, compare) the templates; return a list of problems found."""
    wanted = expected_templates(crds_dir, chart_dir)
    problems: list[str] = []
    existing = set((chart_dir / "templates").glob(f"{TEMPLATE_PREFIX}*.yaml"))
    for stale in sorted(existing - set(wanted)):
        problems.append(f"{stale}: no source in {crds_dir}")
        if not check:
            stale.unlink()
    for target, content in wanted.items():
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == content:
            continue
        problems.append(f"{target}: {'missing' if current is None else 'differs from source'}")
        if not check:
            target.write_text(content, encoding="utf-8")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if stale")
    parser.add_argument("--crds-dir", type=Path, default=DEFAULT_CRDS_DIR)
    parser.add_argument("--chart-dir", type=Path, default=DEFAULT_CHART_DIR)
    args = parser.parse_args(argv)
    try:
        problems = sync(args.crds_dir, args.chart_dir, args.check)
    except SyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(("stale: " if args.check else "updated: ") + problem, file=sys.stderr)
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
