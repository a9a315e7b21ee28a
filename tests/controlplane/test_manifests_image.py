"""An image source's objects, built by pure functions: the import Job and a stream's server.

Both are checked against the real Kubernetes schemas (kubernetes-validate, strict). The Job's
command line and the stream's both go through nbdserver's own parser, as every other server
command line does.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from nbd_operator import manifests
from nbd_operator.config import OperatorConfig
from nbd_operator.import_job import import_job
from nbd_operator.spec import parse_spec, selector_labels

from nbdserver.config import assemble
from nbdserver.config.flags import build_parser, read_layer

K8S_VERSIONS = (kubernetes_validate.latest_version(), "1.29.0")
CONFIG = OperatorConfig(server_image="registry.example/kube-nbd:test", import_backoff_limit=4)
URL = "https://images.example/disk.qcow2"
SHA = "0" * 64


def spec_of(spec: dict[str, Any], name: str = "disk") -> Any:
    body = {"metadata": {"name": name, "namespace": "storage", "uid": "u-1"}, "spec": spec}
    return parse_spec(body)


def container_of(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(obj["spec"]["template"]["spec"]["containers"][0])


IMPORT = {"source": {"image": {"url": URL, "sha256": SHA}}, "size": "10Gi", "format": "qcow2"}
BLOCK = {"source": {"image": {"url": URL, "volumeMode": "Block"}}, "size": "10Gi"}
S3 = {
    "source": {
        "image": {
            "s3": {
                "bucket": "golden",
                "key": "d.raw",
                "endpoint": "http://minio:9000",
                "region": "eu",
            },
            "secretRef": {"name": "creds"},
        }
    },
    "size": "1Gi",
}
STREAM_RO = {
    "source": {"image": {"url": URL.replace("qcow2", "raw"), "mode": "stream"}},
    "readOnly": True,
}
STREAM_RW = {
    "source": {
        "image": {"url": URL.replace("qcow2", "raw"), "mode": "stream", "cacheSize": "256Mi"}
    },
    "size": "10Gi",
}
KEYS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ca.crt", "not-an-env-name"})


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", ["import", "block", "s3"])
def test_the_import_job_is_a_valid_job(case: str, version: str) -> None:
    spec = {"import": IMPORT, "block": BLOCK, "s3": S3}[case]
    kubernetes_validate.validate(import_job(spec_of(spec), CONFIG, KEYS), version, strict=True)


def test_the_import_job_runs_the_importer_into_the_claim_and_fails_fast_on_exit_2() -> None:
    job = import_job(spec_of(IMPORT), CONFIG)
    assert job["metadata"]["name"] == "disk-nbd-import"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    container = container_of(job)
    assert container["command"] == ["nbdserver"]
    assert container["args"] == [
        "import", URL, "/data/disk.img", "--format", "qcow2", "--output-format", "same",
        "--sha256", SHA, "--progress", "json",
    ]  # fmt: skip
    args = build_parser().parse_args(container["args"])
    assert (args.source, args.dest, args.format, args.progress) == (
        URL,
        "/data/disk.img",
        "qcow2",
        "json",
    )
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["volumes"][0] == {
        "name": "data",
        "persistentVolumeClaim": {"claimName": "disk-nbd-data"},
    }
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert job["spec"]["backoffLimit"] == 4
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"] == {"containerName": "importer", "operator": "In", "values": [2]}
    # The server's Deployment selects its pods by component: an importer pod is never one.
    labels = job["spec"]["template"]["metadata"]["labels"]
    server = selector_labels("disk")
    assert any(labels.get(k) != v for k, v in server.items())


def test_a_block_import_writes_the_raw_disk_to_the_device() -> None:
    job = import_job(spec_of(BLOCK), CONFIG)
    container = container_of(job)
    args = build_parser().parse_args(container["args"])
    assert (args.dest, args.output_format, args.work_dir) == ("/dev/nbd-backing", "raw", "/work")
    assert container["volumeDevices"] == [{"name": "data", "devicePath": "/dev/nbd-backing"}]
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 0


def test_the_secret_becomes_environment_and_a_ca_bundle() -> None:
    job = import_job(spec_of(S3), CONFIG, KEYS)
    container = container_of(job)
    env = {e["name"]: e for e in container["env"]}
    assert sorted(env) == ["AWS_ACCESS_KEY_ID", "AWS_REGION", "AWS_SECRET_ACCESS_KEY"]
    assert env["AWS_REGION"] == {"name": "AWS_REGION", "value": "eu"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "creds", "key": "AWS_ACCESS_KEY_ID"}
    }
    args = build_parser().parse_args(container["args"])
    assert args.source == "s3://golden/d.raw"
    assert args.s3_endpoint == "http://minio:9000"
    assert args.ca_bundle == "/etc/nbd/image-ca/ca.crt"
    assert args.sha256 is None
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "image-ca")
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    # Without the Secret's keys known, nothing of it is referenced.
    assert "--ca-bundle" not in container_of(import_job(spec_of(S3), CONFIG))["args"]


def test_an_imported_export_serves_the_claims_file_in_its_format_never_sized() -> None:
    dep = manifests.deployment(spec_of(IMPORT), CONFIG)
    args = container_of(dep)["args"]
    assert args[:2] == ["serve", "/data/disk.img"]
    assert args[args.index("--format") + 1] == "qcow2"
    assert "--size" not in args
    claim = manifests.persistent_volume_claim(spec_of(IMPORT))
    assert claim["metadata"]["name"] == "disk-nbd-data"
    assert claim["spec"]["volumeMode"] == "Filesystem"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", ["ro", "rw"])
def test_a_streams_server_is_valid(case: str, version: str) -> None:
    spec = spec_of(STREAM_RO if case == "ro" else STREAM_RW)
    kubernetes_validate.validate(manifests.deployment(spec, CONFIG), version, strict=True)
    overlay = manifests.overlay_claim(spec, 10 * 2**30, None)
    kubernetes_validate.validate(overlay, version, strict=True)


def test_a_read_only_stream_serves_the_remote_with_nothing_mounted() -> None:
    dep = manifests.deployment(spec_of(STREAM_RO), CONFIG)
    pod = dep["spec"]["template"]["spec"]
    args = build_parser().parse_args(container_of(dep)["args"])
    assert args.image == [URL.replace("qcow2", "raw")]
    assert args.read_only is True and args.copy_on_write is None
    assert args.format == "raw" and args.size is None
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert assemble(read_layer(args), None) is not None


def test_a_writable_stream_keeps_its_writes_on_its_overlay_claim() -> None:
    spec = spec_of(STREAM_RW)
    assert spec.copy_on_write and spec.persistent_overlay
    dep = manifests.deployment(spec, CONFIG)
    args = build_parser().parse_args(container_of(dep)["args"])
    assert (args.copy_on_write, args.cow_dir) == ("persistent", "/cow")
    assert args.cache_size == str(256 * 2**20)
    assert args.single_writer is True
    cow = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "cow")
    assert cow["persistentVolumeClaim"] == {"claimName": "disk-nbd-overlay"}
    assert assemble(read_layer(args), None) is not None


def test_a_stream_from_s3_reaches_its_endpoint_with_the_secrets_keys() -> None:
    spec = spec_of(
        {**S3, "source": {"image": {**S3["source"]["image"], "mode": "stream"}}, "readOnly": True}
        | {"size": None}
    )
    container = container_of(manifests.deployment(spec, CONFIG, secret_keys=KEYS))
    args = build_parser().parse_args(container["args"])
    assert args.image == ["s3://golden/d.raw"]
    assert (args.s3_endpoint, args.ca_bundle) == ("http://minio:9000", "/etc/nbd/image-ca/ca.crt")
    assert {e["name"] for e in container["env"]} == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    }
    assert assemble(read_layer(args), None) is not None


def test_the_import_settings_come_from_the_environment() -> None:
    env = {"NBD_OPERATOR_IMPORT_BACKOFF_LIMIT": "2", "NBD_OPERATOR_IMPORT_POLL_INTERVAL": "0.5"}
    config = OperatorConfig.from_env(env)
    assert (config.import_backoff_limit, config.import_poll_interval) == (2, 0.5)
    assert OperatorConfig.from_env({}).import_backoff_limit == 6


@pytest.mark.parametrize(("fmt", "read_only"), [("qcow2", True), ("qcow2", False), ("xz", False)])
def test_a_stream_serves_its_format_from_the_remote(fmt: str, read_only: bool) -> None:
    body: dict[str, Any] = {
        "source": {"image": {"url": URL, "mode": "stream"}},
        "format": fmt,
        "readOnly": read_only,
    }
    if not read_only:
        body["size"] = "1Gi"
    dep = manifests.deployment(spec_of(body), CONFIG)
    args = build_parser().parse_args(container_of(dep)["args"])
    assert (args.image, args.format) == ([URL], fmt)
    # a format is opened read-only under its overlay: never created, grown or written remotely
    assert args.size is None
    assert args.read_only is True if read_only else args.copy_on_write == "persistent"
    assert assemble(read_layer(args), None) is not None
