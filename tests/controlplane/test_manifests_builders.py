"""The manifest builders: exact shapes, and every object valid against real Kubernetes schemas.

The schemas are the upstream OpenAPI definitions shipped offline by kubernetes-validate, checked
in strict mode (unknown fields are errors) for the newest version it ships and an older one.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from nbd_operator import manifests
from nbd_operator.config import OperatorConfig
from nbd_operator.spec import ExportSpec, SpecError, parse_spec

K8S_VERSIONS = (kubernetes_validate.latest_version(), "1.29.0")
CONFIG = OperatorConfig(server_image="registry.example/kube-nbd:test")


def body(spec: dict[str, Any], name: str = "disk") -> dict[str, Any]:
    return {
        "apiVersion": "nbd.dev/v1alpha1",
        "kind": "NBDExport",
        "metadata": {"name": name, "namespace": "storage", "uid": "u-1", "generation": 3},
        "spec": spec,
    }


SOURCES: dict[str, dict[str, Any]] = {
    "vct-fs": {"source": {"volumeClaimTemplate": {"storageClassName": "fast"}}, "size": "10Gi"},
    "vct-block": {"source": {"volumeClaimTemplate": {"volumeMode": "Block"}}, "size": "1Gi"},
    "pvc-fs": {"source": {"persistentVolumeClaim": {"claimName": "images"}}, "size": "2Gi"},
    "pvc-block": {"source": {"persistentVolumeClaim": {"claimName": "raw", "volumeMode": "Block"}}},
    "host": {"source": {"hostDevice": {"nodeName": "node-a", "path": "/dev/sdb"}}},
    "memory": {"source": {"memory": {}}, "size": "512Mi"},
    "vct-restored": {
        "source": {"volumeClaimTemplate": {"dataSource": {"kind": "VolumeSnapshot", "name": "s"}}},
        "size": "1Gi",
    },
    "vct-cloned": {
        "source": {
            "volumeClaimTemplate": {
                "dataSource": {"kind": "PersistentVolumeClaim", "name": "vol-nbd-data"}
            }
        },
        "size": "1Gi",
    },
}
FULL = {
    "source": {"volumeClaimTemplate": {}},
    "size": "4Gi",
    "readOnly": True,
    "allowedClients": ["10.0.0.0/8", "fd00::/8"],
    "tls": {"secretName": "disk-tls", "requireClientCertificate": True},
    "connections": 8,
    "qos": {"readBytesPerSecond": 1000, "writeIOPS": 50},
    "server": {
        "image": "other/image:1",
        "resources": {"limits": {"memory": "1Gi"}},
        "nodeSelector": {"disk": "ssd"},
        "tolerations": [{"key": "storage", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


METRICS_CONFIG = OperatorConfig(
    server_image="registry.example/kube-nbd:test", server_metrics_port=9100
)


def all_objects(
    spec: ExportSpec, base: ExportSpec | None = None, config: OperatorConfig = CONFIG
) -> list[dict[str, Any]]:
    objects = [manifests.deployment(spec, config, base), manifests.service(spec)]
    if spec.source_kind == "volumeClaimTemplate":
        objects.append(manifests.persistent_volume_claim(spec))
    if (policy := manifests.network_policy(spec, config.server_metrics_port)) is not None:
        objects.append(policy)
    return objects


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", [*SOURCES, "full"])
def test_every_built_object_is_valid_against_the_kubernetes_schema(case: str, version: str) -> None:
    spec = parse_spec(body(FULL if case == "full" else SOURCES[case]))
    for obj in all_objects(spec):
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_with_a_metrics_endpoint_are_valid(version: str) -> None:
    for case in (FULL, SOURCES["memory"], SOURCES["host"]):
        for obj in all_objects(parse_spec(body(case)), config=METRICS_CONFIG):
            kubernetes_validate.validate(obj, version, strict=True)


def test_a_metrics_port_is_named_for_the_pod_monitor_and_open_in_the_policy() -> None:
    spec = parse_spec(body(FULL))
    container = manifests.deployment(spec, METRICS_CONFIG)["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    args = container["args"]
    assert args[args.index("--metrics-port") + 1] == "9100"
    assert args[args.index("--metrics-bind") + 1] == "0.0.0.0"
    policy = manifests.network_policy(spec, 9100)
    assert policy is not None
    # The NBD port stays limited to allowedClients; the metrics port is open to scrapers.
    assert policy["spec"]["ingress"][1] == {"ports": [{"protocol": "TCP", "port": 9100}]}
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 10809}]
    # Without the setting: no flag, no port (the default operator configuration).
    plain = manifests.deployment(spec, CONFIG)["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-port" not in plain["args"]
    assert [p["name"] for p in plain["ports"]] == ["nbd"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"NBD_OPERATOR_SERVER_METRICS_PORT": "0"}, None),
        ({"NBD_OPERATOR_SERVER_METRICS_PORT": ""}, None),
        ({"NBD_OPERATOR_SERVER_METRICS_PORT": "9100"}, 9100),
    ],
)
def test_the_metrics_port_setting_comes_from_the_environment(
    env: dict[str, str], expected: int | None
) -> None:
    assert OperatorConfig.from_env(env).server_metrics_port == expected


@pytest.mark.parametrize("port", ["10809", "70000", "-1", "nine"])
def test_a_bad_metrics_port_is_refused(port: str) -> None:
    with pytest.raises(ValueError):
        OperatorConfig.from_env({"NBD_OPERATOR_SERVER_METRICS_PORT": port})


def test_clone_objects_are_valid_and_mount_the_base_read_only() -> None:
    base = parse_spec(body({**SOURCES["pvc-fs"], "readOnly": True}, name="golden"))
    clone = parse_spec(body({"source": {"export": {"name": "golden"}}}, name="copy"))
    for obj in all_objects(clone, base):
        kubernetes_validate.validate(obj, K8S_VERSIONS[0], strict=True)
    pod = manifests.deployment(clone, CONFIG, base)["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "images", "readOnly": True}
    args = pod["containers"][0]["args"]
    assert args[:4] == ["serve", "/data/disk.img", "--name", "copy"]
    assert "--copy-on-write" in args and "--size" not in args and "--read-only" not in args
    affinity = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert affinity["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "golden"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_a_clones_overlay_claim_is_valid_and_takes_its_class_from_the_spec_or_the_base(
    version: str,
) -> None:
    base_claim = {"spec": {"storageClassName": "fast"}}
    clone = parse_spec(body({"source": {"export": {"name": "golden"}}}, name="copy"))
    claim = manifests.overlay_claim(clone, 10 << 30, base_claim)
    kubernetes_validate.validate(claim, version, strict=True)
    assert claim["metadata"]["name"] == "copy-nbd-overlay"
    assert claim["metadata"]["ownerReferences"][0]["name"] == "copy"
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10560Mi"  # base + 1/32
    own = {"source": {"export": {"name": "golden", "storageClassName": "cheap"}}}
    claim = manifests.overlay_claim(parse_spec(body(own, name="copy")), 1 << 30, base_claim)
    assert claim["spec"]["storageClassName"] == "cheap"
    assert "storageClassName" not in manifests.overlay_claim(clone, 1 << 30, None)["spec"]


def test_a_memory_export_runs_nonroot_with_a_sized_tmpfs_image() -> None:
    dep = manifests.deployment(parse_spec(body(SOURCES["memory"])), CONFIG)
    assert dep["metadata"] == {
        "name": "disk-nbd",
        "namespace": "storage",
        "labels": {
            "app.kubernetes.io/name": "nbdserver",
            "app.kubernetes.io/instance": "disk",
            "app.kubernetes.io/component": "nbd-server",
            "app.kubernetes.io/part-of": "kube-nbd",
            "app.kubernetes.io/managed-by": "nbd-operator",
            "nbd.dev/export": "disk",
        },
        "ownerReferences": [
            {
                "apiVersion": "nbd.dev/v1alpha1",
                "kind": "NBDExport",
                "name": "disk",
                "uid": "u-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    assert container["image"] == "registry.example/kube-nbd:test"
    assert container["command"] == ["nbdserver"]
    assert container["args"] == [
        "serve", "/scratch/disk.img", "--name", "disk", "--port", "10809", "--format", "raw",
        "--size", str(512 * 2**20), "--single-writer",
    ]  # fmt: skip
    assert container["readinessProbe"]["tcpSocket"] == {"port": "nbd"}
    # tmpfs pages count against the pod's memory: the default request and limit grow by the size.
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "576Mi"},
        "limits": {"memory": "1Gi"},
    }
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["volumes"][0] == {
        "name": "data",
        "emptyDir": {"medium": "Memory", "sizeLimit": "512Mi"},
    }


def test_a_host_device_is_pinned_to_its_node_and_privileged() -> None:
    pod = manifests.deployment(parse_spec(body(SOURCES["host"])), CONFIG)["spec"]["template"][
        "spec"
    ]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchFields"] == [
        {"key": "metadata.name", "operator": "In", "values": ["node-a"]}
    ]
    assert pod["volumes"][0]["hostPath"] == {"path": "/dev/sdb", "type": "BlockDevice"}
    assert pod["containers"][0]["securityContext"]["privileged"] is True
    assert pod["securityContext"]["runAsUser"] == 0
    assert "--size" not in pod["containers"][0]["args"]


def test_a_block_claim_is_a_volume_device_not_a_mount() -> None:
    spec = parse_spec(body(SOURCES["vct-block"]))
    container = manifests.deployment(spec, CONFIG)["spec"]["template"]["spec"]["containers"][0]
    assert container["volumeDevices"] == [{"name": "data", "devicePath": "/dev/nbd-backing"}]
    assert container["args"][1] == "/dev/nbd-backing"
    claim = manifests.persistent_volume_claim(spec)
    assert claim["spec"]["volumeMode"] == "Block"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"


def test_a_filesystem_claim_asks_for_room_around_the_image() -> None:
    claim = manifests.persistent_volume_claim(parse_spec(body(SOURCES["vct-fs"])))
    assert claim["metadata"]["name"] == "disk-nbd-data"
    assert claim["metadata"]["labels"]["app.kubernetes.io/component"] == "data"
    assert claim["spec"]["storageClassName"] == "fast"
    # 10 GiB image + 10 GiB/32 for the filesystem around it.
    assert claim["spec"]["resources"]["requests"]["storage"] == "10560Mi"


def test_a_claim_with_a_data_source_is_restored_or_cloned_by_its_storage_class() -> None:
    restored = manifests.persistent_volume_claim(parse_spec(body(SOURCES["vct-restored"])))
    assert restored["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "s",
    }
    cloned = manifests.persistent_volume_claim(parse_spec(body(SOURCES["vct-cloned"])))
    assert cloned["spec"]["dataSource"] == {"kind": "PersistentVolumeClaim", "name": "vol-nbd-data"}
    plain = manifests.persistent_volume_claim(parse_spec(body(SOURCES["vct-fs"])))
    assert "dataSource" not in plain["spec"]


def test_every_spec_option_reaches_the_server_command_line() -> None:
    spec = parse_spec(body(FULL))
    pod = manifests.deployment(spec, CONFIG)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == [
        "serve", "/data/disk.img", "--name", "disk", "--port", "10809", "--format", "raw",
        "--read-only",
        "--tls", "require",
        "--tls-cert", "/etc/nbd/tls/tls.crt", "--tls-key", "/etc/nbd/tls/tls.key",
        "--tls-ca", "/etc/nbd/tls/ca.crt",
        "--allow", "10.0.0.0/8", "--allow", "fd00::/8",
        "--connections", "8", "--qos-read-bps", "1000", "--qos-write-iops", "50",
    ]  # fmt: skip
    assert container["image"] == "other/image:1"
    assert container["resources"] == {"limits": {"memory": "1Gi"}}
    assert {"name": "tls", "mountPath": "/etc/nbd/tls", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert {"name": "tls", "secret": {"secretName": "disk-tls", "defaultMode": 0o440}} in pod[
        "volumes"
    ]
    assert pod["volumes"][0]["persistentVolumeClaim"]["readOnly"] is True
    assert pod["nodeSelector"] == {"disk": "ssd"}
    assert pod["tolerations"][0]["key"] == "storage"


def test_allowed_clients_become_a_network_policy_and_none_means_no_policy() -> None:
    policy = manifests.network_policy(parse_spec(body(FULL)))
    assert policy is not None
    assert policy["metadata"]["name"] == "disk-nbd-clients"
    assert policy["spec"]["ingress"] == [
        {
            "from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}, {"ipBlock": {"cidr": "fd00::/8"}}],
            "ports": [{"protocol": "TCP", "port": 10809}],
        }
    ]
    assert manifests.network_policy(parse_spec(body(SOURCES["memory"]))) is None


def test_the_service_selects_the_server_pod_on_the_nbd_port() -> None:
    spec = parse_spec(body(SOURCES["memory"]))
    svc = manifests.service(spec)
    pod_labels = manifests.deployment(spec, CONFIG)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [
        {"name": "nbd", "port": 10809, "targetPort": "nbd", "protocol": "TCP"}
    ]
    assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_copy_on_write_keeps_the_source_read_only_and_adds_an_overlay() -> None:
    spec = parse_spec(body({**SOURCES["pvc-fs"], "copyOnWrite": True}))
    pod = manifests.deployment(spec, CONFIG)["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["readOnly"] is True
    assert {"name": "cow", "emptyDir": {}} in pod["volumes"]
    args = pod["containers"][0]["args"]
    # An emptyDir overlay dies with the pod: shared by the pod's connections, never kept.
    assert args[args.index("--copy-on-write") + 1 : args.index("--copy-on-write") + 4] == [
        "shared",
        "--cow-dir",
        "/cow",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"source": {}}, "exactly one"),
        (
            {"source": {"memory": {}, "hostDevice": {"nodeName": "n", "path": "/dev/x"}}},
            "exactly one",
        ),
        ({"source": {"memory": {}}}, "size is required"),
        ({"source": {"memory": {}}, "size": "1.5"}, "whole number"),
        ({"source": {"memory": {}}, "size": 0}, "greater than zero"),
        ({"source": {"memory": {}}, "size": "1Gi", "readOnly": True}, "memory export"),
        ({"source": {"memory": {}}, "size": "1Gi", "connections": 0}, "positive"),
        ({"source": {"memory": {}}, "size": "1Gi", "format": "qcow2"}, "memory export is raw"),
        ({"source": {"memory": {}}, "size": "1Gi", "format": "vhdx"}, "format must be one of"),
        ({"source": {"export": {"name": "b"}}, "format": "raw"}, "base's format"),
        (
            {"source": {"hostDevice": {"nodeName": "n", "path": "/dev/x"}}, "format": "vmdk"},
            "read-only",
        ),
    ],
)
def test_a_spec_that_cannot_be_served_is_a_clear_error(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(body(spec))


def test_the_schema_check_would_catch_a_malformed_object() -> None:
    dep = manifests.deployment(parse_spec(body(SOURCES["memory"])), CONFIG)
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["tcpSocket"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)


def _args(spec: ExportSpec, base: ExportSpec | None = None) -> list[str]:
    pod = manifests.deployment(spec, CONFIG, base)["spec"]["template"]["spec"]
    return list(pod["containers"][0]["args"])


def test_the_format_reaches_the_server_and_a_non_raw_image_is_never_sized() -> None:
    qcow2 = parse_spec(body({**SOURCES["pvc-fs"], "format": "qcow2"}))
    args = _args(qcow2)
    assert args[args.index("--format") + 1] == "qcow2"
    assert "--size" not in args  # nbdserver never creates or grows a qcow2 (qemu-img does)
    raw = _args(parse_spec(body(SOURCES["pvc-fs"])))
    assert raw[raw.index("--format") + 1] == "raw" and "--size" in raw
    xz = _args(parse_spec(body({**SOURCES["host"], "format": "xz", "readOnly": True})))
    assert xz[xz.index("--format") + 1] == "xz" and "--read-only" in xz


def test_a_clone_serves_its_base_in_the_bases_format_under_a_persistent_overlay() -> None:
    base = parse_spec(
        body({**SOURCES["pvc-fs"], "format": "vmdk", "readOnly": True}, name="golden")
    )
    clone = parse_spec(body({"source": {"export": {"name": "golden"}}}, name="copy"))
    assert not clone.format_known  # unknown until the base is read
    args = _args(clone, base)
    assert args[args.index("--format") + 1] == "vmdk"
    assert args[args.index("--copy-on-write") + 1] == "persistent"
    assert "--size" not in args
