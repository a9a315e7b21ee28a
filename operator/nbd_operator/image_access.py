"""How a pod reaches an image source's remote: environment, CA bundle and nbdserver flags.

Why it exists: the import Job (``nbdserver import``) and a stream's server (``nbdserver serve
URL``) read the same remote with the same credentials; one builder keeps the two pods alike.

What it must not do: I/O. The reconciler reads the Secret and passes its key names in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nbd_operator.spec import ExportSpec

CA_DIR = "/etc/nbd/image-ca"
CA_KEY = "ca.crt"
# What a kubelet accepts as an environment variable's name; other keys (ca.crt) are not env.
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class RemoteAccess:
    env: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    args: list[str] = field(default_factory=list)  # nbdserver flags, the same for both commands


def remote_access(spec: ExportSpec, secret_keys: Iterable[str] = ()) -> RemoteAccess:
    """The pieces a container needs to read ``spec``'s image from its remote."""
    access = RemoteAccess()
    s3 = spec.source.get("s3") or {}
    if s3.get("region"):
        access.env.append({"name": "AWS_REGION", "value": str(s3["region"])})
    if s3.get("endpoint"):
        access.args.extend(["--s3-endpoint", str(s3["endpoint"])])
    secret = (spec.source.get("secretRef") or {}).get("name")
    if not secret:
        return access
    keys = sorted(set(secret_keys))
    for key in keys:
        if _ENV_NAME.match(key):
            ref = {"secretKeyRef": {"name": secret, "key": key}}
            access.env.append({"name": key, "valueFrom": ref})
    if CA_KEY in keys:
        items = [{"key": CA_KEY, "path": CA_KEY}]
        volume = {"secretName": secret, "items": items, "defaultMode": 0o444}
        access.volumes.append({"name": "image-ca", "secret": volume})
        access.mounts.append({"name": "image-ca", "mountPath": CA_DIR, "readOnly": True})
        access.args.extend(["--ca-bundle", f"{CA_DIR}/{CA_KEY}"])
    return access
