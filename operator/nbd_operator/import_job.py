"""The Job that copies an image source into its export's claim (``source.image``, mode import).

Why it exists: an import is a one-off copy that must survive a pod dying halfway. A Job gives
retries with backoff; ``nbdserver import`` keeps a state file next to the image in the claim,
so each new pod resumes where the last one stopped, and it verifies the checksum before it
exits 0. A permanent failure (exit 2: 404/403, a bad format) fails the Job at once through a
pod failure policy instead of burning the backoff.

What it must not do: I/O. The reconciler decides when to create it and reads its outcome.
"""

from __future__ import annotations

from typing import Any

from nbd_operator.config import OperatorConfig
from nbd_operator.image_access import remote_access
from nbd_operator.manifests import BACKING_DEVICE, DATA_DIR, IMAGE_FILE, owner_reference
from nbd_operator.spec import ExportSpec, child_labels, claim_name, import_job_name

CONTAINER = "importer"
WORK_DIR = "/work"
PERMANENT_EXIT = 2  # the importer's "retrying cannot help" (the contract)


def import_args(spec: ExportSpec, access_args: list[str]) -> list[str]:
    """``nbdserver import SOURCE DEST ...``: the command line is the contract with nbdserver."""
    block = spec.volume_mode == "Block"
    dest = BACKING_DEVICE if block else f"{DATA_DIR}/{IMAGE_FILE}"
    args = ["import", spec.image_location, dest, "--format", spec.format]
    # A Filesystem claim keeps the image as published (served with --format F); a Block
    # claim's device is the disk itself, so it receives raw bytes (the CRD allows raw only).
    args += ["--output-format", "raw" if block else "same"]
    if block:
        # No file can sit next to a device: the resume state lives in the pod's scratch.
        args += ["--work-dir", WORK_DIR]
    if spec.source.get("sha256"):
        args += ["--sha256", str(spec.source["sha256"])]
    args += access_args
    args += ["--progress", "json"]
    return args


def import_job(
    spec: ExportSpec, config: OperatorConfig, secret_keys: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The import Job ``<name>-nbd-import``, owned by the export."""
    access = remote_access(spec, secret_keys)
    block = spec.volume_mode == "Block"
    volumes: list[dict[str, Any]] = [
        {"name": "data", "persistentVolumeClaim": {"claimName": claim_name(spec.name)}},
        {"name": "tmp", "emptyDir": {}},
        *access.volumes,
    ]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}, *access.mounts]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.server.image or config.server_image,
        "imagePullPolicy": spec.server.image_pull_policy or config.image_pull_policy,
        "command": ["nbdserver"],
        "args": import_args(spec, access.args),
        "resources": {k: dict(v) for k, v in config.server_resources.items()},
        "volumeMounts": mounts,
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if access.env:
        container["env"] = access.env
    pod_security: dict[str, Any]
    if block:
        container["volumeDevices"] = [{"name": "data", "devicePath": BACKING_DEVICE}]
        volumes.append({"name": "work", "emptyDir": {}})
        mounts.append({"name": "work", "mountPath": WORK_DIR})
        # Opening a device node needs uid 0 (no capabilities), as for the server.
        pod_security = {"runAsUser": 0, "runAsNonRoot": False}
    else:
        mounts.insert(0, {"name": "data", "mountPath": DATA_DIR})
        uid = config.server_uid
        # The server runs as the same uid and must be able to open the file read-write.
        pod_security = {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "runAsNonRoot": True}
    pod_security["seccompProfile"] = {"type": "RuntimeDefault"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": import_job_name(spec.name),
            "namespace": spec.namespace,
            "labels": child_labels(spec.name, "import"),
            "ownerReferences": [owner_reference(spec)],
        },
        "spec": {
            "backoffLimit": config.import_backoff_limit,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": [PERMANENT_EXIT],
                        },
                    }
                ]
            },
            "template": {
                "metadata": {"labels": child_labels(spec.name, "import")},
                "spec": {
                    "restartPolicy": "Never",  # a pod failure policy requires it
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
