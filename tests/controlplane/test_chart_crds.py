"""The chart installs the NBDExport CRD from crds/, unchanged, gated and kept on uninstall.

crds/nbdexport.yaml is the schema's one source. The chart carries a generated template of it
(scripts/sync_chart_crds.py); these tests prove the rendered CRD equals the source apart from
the labels and the annotation the chart adds, that the committed template is not stale, and that
the generator refuses sources it could not copy faithfully.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_chart_support import CHART_DIR, CRD_FILE, ROOT, find, load_crd, render

SCRIPT = ROOT / "scripts" / "sync_chart_crds.py"
sys.path.insert(0, str(SCRIPT.parent))
import sync_chart_crds  # noqa: E402


def _strip_chart_metadata(crd: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(crd)
    meta = out["metadata"]
    labels = {
        k: v for k, v in meta.pop("labels", {}).items() if k not in sync_chart_crds.CHART_LABELS
    }
    annotations = {
        k: v for k, v in meta.pop("annotations", {}).items() if k != sync_chart_crds.KEEP_ANNOTATION
    }
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    return out


def test_the_rendered_crd_equals_the_source_apart_from_chart_metadata() -> None:
    rendered = find(render(), "CustomResourceDefinition")
    assert _strip_chart_metadata(rendered) == _strip_chart_metadata(load_crd())


def test_the_rendered_crd_is_labelled_and_kept_on_uninstall() -> None:
    rendered = find(render(), "CustomResourceDefinition")
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert rendered["metadata"]["labels"]["app.kubernetes.io/component"] == "crd"
    assert rendered["metadata"]["labels"]["app.kubernetes.io/instance"] == "nbd"


def test_crds_can_be_left_out_or_left_to_helm_uninstall() -> None:
    assert not [
        o for o in render({"crds": {"enabled": False}}) if o["kind"] == "CustomResourceDefinition"
    ]
    unkept = find(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in unkept["metadata"].get("annotations", {})


def test_the_committed_chart_copy_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_chart_does_not_use_helms_untemplated_crds_folder() -> None:
    # Helm installs charts/kube-nbd/crds/ unconditionally and never upgrades it.
    assert not (CHART_DIR / "crds").exists()


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[Path, Path]:
    crds = tmp_path / "crds"
    chart = tmp_path / "chart"
    crds.mkdir()
    (chart / "templates").mkdir(parents=True)
    (crds / "nbdexport.yaml").write_text(CRD_FILE.read_text())
    return crds, chart


def test_the_check_mode_notices_a_changed_source(workspace: tuple[Path, Path]) -> None:
    crds, chart = workspace
    assert sync_chart_crds.sync(crds, chart, check=False)  # first write reports "missing"
    assert sync_chart_crds.sync(crds, chart, check=True) == []
    source = crds / "nbdexport.yaml"
    source.write_text(source.read_text().replace("shortNames: [nbdx]", "shortNames: [nbdy]"))
    problems = sync_chart_crds.sync(crds, chart, check=True)
    assert len(problems) == 1 and "differs from source" in problems[0]


def test_the_copy_is_verbatim_even_for_yaml_1_1_traps(workspace: tuple[Path, Path]) -> None:
    crds, chart = workspace
    source = crds / "nbdexport.yaml"
    # "on" and "n" are booleans to YAML 1.1 parsers; a dump/load round trip would change them.
    text = source.read_text().replace("    categories: [nbd]", "    categories: [nbd, on, n]")
    source.write_text(text)
    sync_chart_crds.sync(crds, chart, check=False)
    template = (chart / "templates" / "crd-nbdexport.yaml").read_text()
    assert "    categories: [nbd, on, n]\n" in template


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.replace("group: nbd.dev", "group: '{{ nbd.dev }}'"), "Helm would treat"),
        (lambda t: t + "---\napiVersion: v1\nkind: ConfigMap\n", "exactly one YAML document"),
        (lambda t: t.replace("kind: CustomResourceDefinition", "kind: ConfigMap"), "not Custom"),
        (
            lambda t: t.replace(
                "  name: nbdexports.nbd.dev\n",
                "  name: nbdexports.nbd.dev\n  annotations:\n    helm.sh/resource-policy: keep\n",
            ),
            "chart's decision",
        ),
    ],
)
def test_sources_that_cannot_be_copied_faithfully_are_refused(
    workspace: tuple[Path, Path], change: Any, message: str
) -> None:
    crds, chart = workspace
    source = crds / "nbdexport.yaml"
    source.write_text(change(source.read_text()))
    with pytest.raises(sync_chart_crds.SyncError, match=message):
        sync_chart_crds.sync(crds, chart, check=True)


def test_source_annotations_and_labels_survive_next_to_the_charts(
    workspace: tuple[Path, Path],
) -> None:
    crds, chart = workspace
    source = crds / "nbdexport.yaml"
    source.write_text(
        source.read_text().replace(
            "  name: nbdexports.nbd.dev\n",
            "  name: nbdexports.nbd.dev\n  annotations:\n    nbd.dev/schema: v1\n",
        )
    )
    sync_chart_crds.sync(crds, chart, check=False)
    template = (chart / "templates" / "crd-nbdexport.yaml").read_text()
    body = template.split("metadata:\n", 1)[1].split("spec:\n", 1)[0]
    assert '"nbd.dev/schema": "v1"' in body and "helm.sh/resource-policy: keep" in body
    assert yaml.safe_load(source.read_text())["spec"]["group"] == "nbd.dev"
