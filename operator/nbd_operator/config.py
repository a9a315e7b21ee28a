"""Operator-wide settings: the server image, default resources, retry delays.

Why it exists: the chart and the command line configure the operator; the handlers and the
manifest builders need those values without each reading the environment on its own.

What it must not do: read anything at import time. ``OperatorConfig.from_env`` is called once
by the command line; tests build the dataclass directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nbd_api import NBD_PORT

DEFAULT_SERVER_IMAGE = "ghcr.io/kube-nbd/kube-nbd:0.1.0"


def _default_resources() -> dict[str, Any]:
    return {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}


@dataclass(frozen=True)
class OperatorConfig:
    """Settings that apply to every export unless its spec.server overrides them."""

    server_image: str = DEFAULT_SERVER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    server_resources: Mapping[str, Any] = field(default_factory=_default_resources)
    # How long kopf waits before retrying an export whose inputs are missing (no PVC, no
    # Secret, unknown node). A retry is how a fixed input is noticed; tests shorten it.
    retry_delay: float = 15.0
    # Deletion waiting for nodes to detach re-checks when the Lease watch reports a change;
    # this is the slow fallback (a re-check after this many seconds without one).
    detach_poll_delay: float = 30.0
    # The uid/gid the server runs as when it needs no root (file-backed and memory sources).
    server_uid: int = 65532
    # nbdserver's Prometheus endpoint in each server pod (--metrics-port, a container port
    # named "metrics" that the chart's PodMonitor scrapes); None: no endpoint.
    server_metrics_port: int | None = None
    server_metrics_bind: str = "0.0.0.0"
    # An image import's Job: how many failed pods it retries (with the Job controller's
    # exponential backoff) before it gives up, and how often the importer's progress is read.
    import_backoff_limit: int = 6
    import_poll_interval: float = 5.0

    def __post_init__(self) -> None:
        port = self.server_metrics_port
        if port is not None and not (0 < port < 65536 and port != NBD_PORT):
            raise ValueError(
                f"server metrics port {port} must be 1-65535 and not the NBD port {NBD_PORT}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """Read NBD_OPERATOR_* variables (set by the chart); missing ones keep the defaults."""
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        if image := env.get("NBD_OPERATOR_SERVER_IMAGE"):
            kwargs["server_image"] = image
        if policy := env.get("NBD_OPERATOR_IMAGE_PULL_POLICY"):
            kwargs["image_pull_policy"] = policy
        if delay := env.get("NBD_OPERATOR_RETRY_DELAY"):
            kwargs["retry_delay"] = float(delay)
        if delay := env.get("NBD_OPERATOR_DETACH_POLL_DELAY"):
            kwargs["detach_poll_delay"] = float(delay)
        # Empty or 0 leaves the endpoint off (the chart's metrics.serverPort: 0).
        if (port := env.get("NBD_OPERATOR_SERVER_METRICS_PORT", "").strip()) not in ("", "0"):
            kwargs["server_metrics_port"] = int(port)
        if bind := env.get("NBD_OPERATOR_SERVER_METRICS_BIND"):
            kwargs["server_metrics_bind"] = bind
        if limit := env.get("NBD_OPERATOR_IMPORT_BACKOFF_LIMIT"):
            kwargs["import_backoff_limit"] = int(limit)
        if interval := env.get("NBD_OPERATOR_IMPORT_POLL_INTERVAL"):
            kwargs["import_poll_interval"] = float(interval)
        return cls(**kwargs)
