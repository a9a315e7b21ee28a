"""The node plugin's only gRPC module: the unix-socket server, its servicers and its interceptor.

Why it exists: everything gRPC-specific is kept here so the CSI logic (``node.py``,
``identity.py``) stays plain Python over protobuf messages. This module

- binds the Identity servicer and the Node or Controller servicer on ``unix:///path``
  (removing a stale socket file first: after a crash the old file would make bind fail and
  kubelet would never reconnect),
- maps ``CsiError`` to gRPC status codes in exactly one place (anything else is INTERNAL, with
  the traceback logged, never sent), and
- logs every call once through one interceptor, with every field the CSI proto marks
  ``csi_secret`` replaced by a placeholder before it can reach a log line.

What it must not do: decide CSI semantics, or log request fields before stripping secrets.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi._generated import csi_pb2_grpc as pb_grpc
from nbd_agent.csi.controller import ControllerService
from nbd_agent.csi.errors import CsiError
from nbd_agent.csi.identity import IdentityService
from nbd_agent.csi.node import NodeService

log = logging.getLogger(__name__)
REDACTED = "***stripped***"


def strip_secrets(message: Message) -> Message:
    """A copy of ``message`` with every ``(csi.v1.csi_secret) = true`` field's values redacted,
    at any depth. The field option is read from the descriptor, so new secret fields in a future
    proto are covered without code changes."""
    clean = type(message)()
    clean.CopyFrom(message)
    _strip(clean)
    return clean


def _is_secret(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().Extensions[pb.csi_secret])


def _strip(message: Message) -> None:
    for field, value in message.ListFields():
        if _is_secret(field):
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key in list(value):
                    value[key] = REDACTED
            else:
                message.ClearField(field.name)
                if field.type == FieldDescriptor.TYPE_STRING:
                    setattr(message, field.name, REDACTED)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            items = value if field.is_repeated else [value]
            for item in items:
                _strip(item)


def status_code(exc: CsiError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)


class LoggingInterceptor(grpc.ServerInterceptor):
    """Logs method, secret-free request, outcome and duration of every unary call."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method  # type: ignore[attr-defined]
        inner = handler.unary_unary

        def logged(request: Message, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            try:
                line = text_format.MessageToString(strip_secrets(request), as_one_line=True)
            except Exception as exc:  # never log the raw request: it may hold secrets
                line = f"<request not printable: {exc}>"
            log.info("call %s {%s}", method, line)
            try:
                response = inner(request, context)
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
                details = context.details() or ""  # type: ignore[attr-defined]
                if isinstance(details, bytes):
                    details = details.decode(errors="replace")
                log.warning(
                    "done %s: %s %s (%.3fs)", method, code.name, details, time.monotonic() - started
                )
                raise
            log.info("done %s: OK (%.3fs)", method, time.monotonic() - started)
            return response

        return grpc.unary_unary_rpc_method_handler(
            logged,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _wrap(impl: Callable[[Any], Message]) -> Callable[[Any, grpc.ServicerContext], Message]:
    """Run one CSI method; turn CsiError into its status code (the one mapping point)."""

    def call(request: Any, context: grpc.ServicerContext) -> Message:
        try:
            return impl(request)
        except CsiError as exc:
            context.abort(status_code(exc), str(exc))
        except Exception as exc:
            log.exception("unexpected failure in %s", impl.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable: context.abort raises")

    call.__name__ = impl.__name__
    return call


def _servicer(base: type, impl: object, methods: list[str]) -> object:
    attrs = {name: staticmethod(_wrap(getattr(impl, name))) for name in methods}
    return type(f"{base.__name__}Impl", (base,), attrs)()


IDENTITY_METHODS = ["GetPluginInfo", "GetPluginCapabilities", "Probe"]
NODE_METHODS = [
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeGetCapabilities",
    "NodeGetInfo",
    "NodeExpandVolume",
]
CONTROLLER_METHODS = [
    "CreateVolume",
    "DeleteVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "ControllerGetCapabilities",
    "ControllerExpandVolume",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "ControllerModifyVolume",
    "GetCapacity",
]


def socket_path(endpoint: str) -> str:
    """``unix:///csi/csi.sock`` (or a bare absolute path) to ``/csi/csi.sock``."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("/"):
        path = endpoint
    else:
        raise ValueError(f"endpoint must be unix:///absolute/path, got {endpoint!r}")
    if not path.startswith("/"):
        raise ValueError(f"endpoint must be unix:///absolute/path, got {endpoint!r}")
    return path


def build_server(
    endpoint: str,
    identity: IdentityService,
    node: NodeService | None = None,
    workers: int = 8,
    controller: ControllerService | None = None,
) -> grpc.Server:
    """A ready (not yet started) gRPC server bound to the endpoint's unix socket. RPCs of a
    service it is not given (or methods not listed above) answer UNIMPLEMENTED."""
    path = socket_path(endpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csi"),
        interceptors=[LoggingInterceptor()],
    )
    pb_grpc.add_IdentityServicer_to_server(
        _servicer(pb_grpc.IdentityServicer, identity, IDENTITY_METHODS), server
    )
    if node is not None:
        servicer = _servicer(pb_grpc.NodeServicer, node, NODE_METHODS)
        pb_grpc.add_NodeServicer_to_server(servicer, server)
    if controller is not None:
        servicer = _servicer(pb_grpc.ControllerServicer, controller, CONTROLLER_METHODS)
        pb_grpc.add_ControllerServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{path}")
    return server


def log_at(level: str) -> None:
    """Log lines with time and logger at ``level``. The agent's CLI may have configured logging
    already (WARNING): the interceptor's line per call must still show at INFO."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level.upper())


def stop_on_signals() -> threading.Event:
    """An event SIGTERM (kubelet, the Deployment) and SIGINT set."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def run_until(server: grpc.Server, stop: threading.Event, started: str, stopped: str) -> None:
    """Start ``server``, serve until ``stop`` is set, then stop gracefully (in-flight calls
    finish, for up to 10 s)."""
    server.start()
    log.info("%s", started)
    try:
        stop.wait()
    finally:
        server.stop(grace=10).wait()
        log.info("%s", stopped)
