"""Where ``nbd-operator`` finds its cluster, and the connection kopf logs in with.

Why it exists: kopf's stock login handlers read only the kubeconfig's current context, and when
they find no credentials kopf logs a traceback and tries again every minute; a user who started
the operator without a cluster should get one line instead, at once. So the command line decides
the source before kopf starts (``find``, also checked once by ``connection_info`` so that a wrong
file or context fails then), and kopf's login handler calls ``connection_info`` again whenever it
logs in (tokens from exec plugins and service accounts expire; the loaders refresh them).

Order, as kubectl and kopf have it: ``--kubeconfig`` (with ``--context``, or the file's current
context); else, inside a pod, the service account; else ``KUBECONFIG``; else ``~/.kube/config``.
``--context`` without ``--kubeconfig`` picks a context of the kubeconfig found that way.

What it must not do: talk to the API (kopf and ``kube.Kube`` do).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import kopf
import kubernetes_asyncio.client
import kubernetes_asyncio.config
import yaml

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class NoCredentials(Exception):
    """Nothing to log in with; the message is one line for the user."""


@dataclass(frozen=True)
class LoginSource:
    """A kubeconfig (``os.pathsep``-separated files) and context, or in-cluster (None)."""

    kubeconfig: str | None
    context: str | None = None

    def describe(self) -> str:
        if self.kubeconfig is None:
            return "the in-cluster service account"
        context = f", context {self.context}" if self.context else ""
        return f"kubeconfig {self.kubeconfig}{context}"


def find(
    kubeconfig: str | None,
    context: str | None,
    environ: Mapping[str, str],
    home: Path,
    token: Path = SERVICE_ACCOUNT_TOKEN,
) -> LoginSource:
    """The source to log in from; NoCredentials when there is none."""
    if kubeconfig:
        if not Path(kubeconfig).is_file():
            raise NoCredentials(f"--kubeconfig {kubeconfig}: no such file")
        return LoginSource(kubeconfig, context)
    if context is None and environ.get("KUBERNETES_SERVICE_HOST") and token.is_file():
        return LoginSource(None)
    if environ.get("KUBECONFIG"):
        return LoginSource(environ["KUBECONFIG"], context)
    default = home / ".kube" / "config"
    if default.is_file():
        return LoginSource(str(default), context)
    raise NoCredentials(
        f"no Kubernetes cluster to connect to: not running in one, KUBECONFIG is unset and "
        f"{default} does not exist (give --kubeconfig FILE)"
    )


async def connection_info(source: LoginSource) -> kopf.ConnectionInfo:
    """Load the source with kubernetes_asyncio's loaders (exec plugins, OIDC, in-cluster) and
    hand kopf what they found; NoCredentials, in one line, when they cannot."""
    cfg = kubernetes_asyncio.client.Configuration()
    try:
        if source.kubeconfig is None:
            kubernetes_asyncio.config.load_incluster_config(client_configuration=cfg)
        else:
            await kubernetes_asyncio.config.load_kube_config(
                config_file=source.kubeconfig,
                context=source.context,
                client_configuration=cfg,
                persist_config=False,
            )
        header = await cfg.get_api_key_with_prefix("BearerToken")
    except (kubernetes_asyncio.config.ConfigException, OSError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise NoCredentials(f"cannot log in with {source.describe()}: {reason}") from exc
    if not cfg.host:
        raise NoCredentials(f"cannot log in with {source.describe()}: it names no server")
    scheme, token = _bearer(header)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        proxy_url=cfg.proxy,
    )


def _bearer(header: str | None) -> tuple[str | None, str | None]:
    """("Bearer", token) from an Authorization value; a bare token has no scheme."""
    if not header:
        return None, None
    scheme, _, token = header.partition(" ")
    return (scheme, token) if token else (None, scheme)


def default_source() -> LoginSource:
    """The source without command-line flags (``build_registry`` without a source)."""
    return find(None, None, os.environ, Path.home())
