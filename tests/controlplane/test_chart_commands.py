"""The command lines and environment the chart gives each container are what the code accepts.

A flag the program does not know crashes the pod at start (argparse exits 2): a class of bug no
schema catches. So the rendered args are fed to the real argument parsers of nbd-operator and
nbd-agent, and the operator's environment to its real configuration reader.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import trustme
from nbd_agent.cli import build_parser as agent_parser
from nbd_operator import manifests
from nbd_operator.cli import parse_args as operator_args
from nbd_operator.config import OperatorConfig
from nbd_operator.spec import parse_spec
from test_chart_render import EVERYTHING_ON
from test_chart_support import ROOT, containers, find, render


def _kubelet_expand(args: list[str], env: dict[str, str]) -> list[str]:
    """$(VAR) references, substituted from the container's env as the kubelet does."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The literal env values (downward-API ones have valueFrom instead)."""
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _container(values: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    """The container ``name`` of the one ``kind`` whose object name ends in its component."""
    suffix = {"operator": "-operator", "controller": "-controller"}.get(name, "")
    return next(c for c in containers(find(render(values), kind, suffix)) if c["name"] == name)


def test_every_command_is_a_console_script_of_the_image() -> None:
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    commands = {
        c["command"][0]
        for o in render()
        if o["kind"] in {"Deployment", "DaemonSet"}
        for c in containers(o)
        if c["image"].startswith("ghcr.io/kube-nbd/")
    }
    assert commands == {"nbd-operator", "nbd-agent", "modprobe"}
    assert commands - {"modprobe"} <= scripts


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_the_operator_accepts_its_rendered_arguments(values: dict[str, Any]) -> None:
    container = _container(values, "Deployment", "operator")
    assert container["command"] == ["nbd-operator"]
    args = operator_args(container["args"])
    watched = values.get("operator", {}).get("watchNamespaces", [])
    assert args.namespace == watched
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    port = container["livenessProbe"]["httpGet"]["port"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[port] == 8080
    assert args.verbose is bool(values.get("operator", {}).get("verbose"))
    # Leader election (on by default): the Lease the chart's Role grants, the pod's identity.
    assert args.leader_elect is True
    assert args.leader_lease == "nbd-kube-nbd-operator"
    fields = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container["env"]
        if "valueFrom" in e
    }
    assert fields == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    leader_role = next(
        o
        for o in render(values)
        if o["kind"] == "Role" and o["metadata"]["name"].endswith("-leader")
    )
    assert leader_role["metadata"]["namespace"] == "kube-nbd"
    assert any(args.leader_lease in r.get("resourceNames", []) for r in leader_role["rules"])


def test_the_operator_reads_the_server_image_and_pull_policy_the_chart_sets() -> None:
    values = {"image": {"pullPolicy": "Never", "tag": "dev"}}
    container = _container(values, "Deployment", "operator")
    env = _env(container)
    config = OperatorConfig.from_env(env)
    assert config.server_image == "ghcr.io/kube-nbd/kube-nbd:dev"
    assert config.image_pull_policy == "Never"
    container = _container({"operator": {"serverImage": "mirror/nbd:1"}}, "Deployment", "operator")
    env = _env(container)
    assert OperatorConfig.from_env(env).server_image == "mirror/nbd:1"


def test_the_pod_monitor_finds_the_metrics_port_of_the_servers_the_operator_builds() -> None:
    objects = render({"metrics": {"podMonitor": {"enabled": True}, "serverPort": 9300}})
    operator = next(
        c for c in containers(find(objects, "Deployment", "-operator")) if c["name"] == "operator"
    )
    config = OperatorConfig.from_env(_env(operator))
    assert config.server_metrics_port == 9300
    body = {"metadata": {"name": "disk", "namespace": "ns", "uid": "u"}}
    spec = parse_spec({**body, "spec": {"source": {"memory": {}}, "size": "1Gi"}})
    server = manifests.deployment(spec, config)["spec"]["template"]
    monitor = find(objects, "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= server["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in server["spec"]["containers"][0]["ports"]}
    assert ports[monitor["podMetricsEndpoints"][0]["port"]] == 9300
    # The endpoint is off with serverPort 0, and a PodMonitor then refuses to render.
    off = _container({"metrics": {"serverPort": 0}}, "Deployment", "operator")
    assert OperatorConfig.from_env(_env(off)).server_metrics_port is None
    with pytest.raises(helm.HelmRenderError, match=r"metrics\.serverPort"):
        render({"metrics": {"podMonitor": {"enabled": True}, "serverPort": 0}})


def test_the_agent_accepts_its_rendered_arguments() -> None:
    container = _container({}, "DaemonSet", "agent")
    assert container["command"] == ["nbd-agent"]
    env = {"NODE_NAME": "node-1"}
    args = agent_parser().parse_args(_kubelet_expand(container["args"], env))
    assert args.command == "csi"
    assert args.endpoint == "unix:///csi/csi.sock"
    assert args.node_id == "node-1"
    assert args.state_dir == "/var/lib/kube-nbd"
    # The socket the agent listens on is the one both sidecars dial.
    socket_path = args.endpoint.removeprefix("unix://")
    daemonset = find(render(), "DaemonSet")
    for sidecar in containers(daemonset):
        if sidecar["name"] in {"node-driver-registrar", "liveness-probe"}:
            assert f"--csi-address={socket_path}" in sidecar["args"]
    node_name = next(e for e in container["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_the_agents_state_dir_is_a_host_path() -> None:
    daemonset = find(render({"agent": {"stateDir": "/srv/nbd-state"}}), "DaemonSet")
    agent = next(c for c in containers(daemonset) if c["name"] == "agent")
    args = agent_parser().parse_args(_kubelet_expand(agent["args"], {"NODE_NAME": "n"}))
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == args.state_dir)
    volume = next(
        v for v in daemonset["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    assert volume["hostPath"] == {"path": "/srv/nbd-state", "type": "DirectoryOrCreate"}


# Runs in a child process, because SSL_CERT_FILE is read when OpenSSL loads its default paths:
# a TLS server with the export's certificate on one end of a socketpair, the NBD client's own
# context builder (what the agent uses for nbds:// exports) on the other.
_HANDSHAKE = textwrap.dedent(
    """
    import socket, ssl, sys, threading
    from nbdserver.client import tls_context_for
    from nbdserver.protocol.uri import parse_uri

    server_pem, uri = sys.argv[1], parse_uri(sys.argv[2])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(server_pem)
    a, b = socket.socketpair()
    def serve():
        try:
            server_ctx.wrap_socket(a, server_side=True).close()
        except (ssl.SSLError, OSError):
            a.close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        tls_context_for(uri).wrap_socket(b, server_hostname=uri.server_hostname).close()
    except ssl.SSLCertVerificationError as exc:
        print(exc.verify_message)
        raise SystemExit(3)
    print("verified")
    """
)


def test_the_agents_tls_client_trusts_the_ca_the_chart_mounts(tmp_path: Path) -> None:
    daemonset = find(render({"agent": {"trustedCA": {"secretName": "nbd-ca"}}}), "DaemonSet")
    agent = next(c for c in containers(daemonset) if c["name"] == "agent")
    (cert_file,) = [e["value"] for e in agent["env"] if e["name"] == "SSL_CERT_FILE"]
    mount = next(m for m in agent["volumeMounts"] if cert_file.startswith(m["mountPath"] + "/"))
    volume = next(
        v for v in daemonset["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    assert volume["secret"]["secretName"] == "nbd-ca"
    key = cert_file.removeprefix(mount["mountPath"] + "/")
    assert volume["secret"]["items"] == [{"key": key, "path": key}]

    # The Secret's ca.crt, laid out where the chart mounts it (re-rooted under tmp_path).
    ca = trustme.CA()
    host = "tls-demo-nbd.default.svc"
    server_pem = tmp_path / "server.pem"
    ca.issue_cert(host).private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    local_cert_file = tmp_path / cert_file.lstrip("/")
    local_cert_file.parent.mkdir(parents=True)
    ca.cert_pem.write_to_path(str(local_cert_file))

    def handshake(extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSL_CERT_")}
        return subprocess.run(
            [sys.executable, "-c", _HANDSHAKE, str(server_pem), f"nbds://{host}/tls-demo"],
            env={**env, **extra_env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    trusted = handshake({"SSL_CERT_FILE": str(local_cert_file)})
    assert trusted.returncode == 0 and "verified" in trusted.stdout, trusted.stderr
    untrusted = handshake({})  # the system bundle does not know a private CA
    assert untrusted.returncode == 3, untrusted.stderr


def test_without_a_trusted_ca_the_agent_keeps_the_system_bundle() -> None:
    agent = _container({}, "DaemonSet", "agent")
    assert not [e for e in agent["env"] if e["name"].startswith("SSL_CERT")]
    assert not [m for m in agent["volumeMounts"] if m["name"] == "trusted-ca"]


def test_the_controller_accepts_its_rendered_arguments_and_shares_its_socket() -> None:
    container = _container({}, "Deployment", "controller")
    assert container["command"] == ["nbd-agent"]
    env = {"POD_NAMESPACE": "kube-nbd"}
    args = agent_parser().parse_args(_kubelet_expand(container["args"], env))
    assert args.command == "csi-controller"
    assert args.namespace == "kube-nbd"
    assert args.log_level == "INFO"
    socket_path = args.endpoint.removeprefix("unix://")
    deployment = find(render(), "Deployment", "-controller")
    sidecars = [c for c in containers(deployment) if c["name"] != "controller"]
    assert [c["name"] for c in sidecars] == ["csi-provisioner", "csi-resizer"]
    for sidecar in sidecars:
        assert f"--csi-address={socket_path}" in sidecar["args"]
        mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
        assert str(Path(socket_path).parent) in mounts
        assert "--leader-election=true" in sidecar["args"]
