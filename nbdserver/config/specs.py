"""Reader for ``--export NAME=PATH[,key=value...]`` specs and for sizes such as ``512M``.

Why: the command line's export specs are one of the three sources ``nbdserver.config.assemble``
merges; this module turns one spec into an ``ExportConfig`` and nothing else.

What it must not do: apply server-wide flags (the assembly step does) or open anything.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from nbdserver.acl import Acl, AclError
from nbdserver.backends.registry import NAMES as BACKENDS
from nbdserver.config.model import CowMode, ExportConfig
from nbdserver.errors import ConfigError
from nbdserver.filters.qos import QosLimits

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """'1G', '512M', '4096', '1.5G', '2GiB' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([BKMGTP]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ConfigError(f"bad size {text!r}: use bytes or a number with K, M, G or T")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value != int(value):
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_bool(text: str) -> bool:
    if text.lower() in ("", "1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"bad boolean {text!r}")


def parse_cow(text: str) -> CowMode:
    """``cow=`` values: a mode name, or a boolean (true: shared, as ``--copy-on-write``)."""
    try:
        return CowMode(text.lower())
    except ValueError:
        return CowMode.SHARED if parse_bool(text) else CowMode.OFF


# option key in "--export NAME=PATH,key=value" -> (ExportConfig field, converter)
_OPTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "size": ("size", parse_size),
    "ro": ("read_only", parse_bool),
    "read-only": ("read_only", parse_bool),
    "readonly": ("read_only", parse_bool),
    "description": ("description", str),
    "backend": ("backend", str),
    "connections": ("connections", int),
    "idle-timeout": ("idle_timeout", float),
    "tls": ("tls", parse_bool),
    "cow": ("cow", parse_cow),
    "copy-on-write": ("cow", parse_cow),
    "cow-dir": ("cow_dir", str),
    "format": ("format", str),
    "backing-anywhere": ("backing_anywhere", parse_bool),
    "cache-size": ("cache_size", parse_size),
    "cache-dir": ("cache_dir", str),
    "ca-bundle": ("ca_bundle", str),
    "remote-timeout": ("remote_timeout", float),
    "s3-endpoint": ("s3_endpoint", str),
}
_QOS_OPTIONS = ("qos-read-bps", "qos-write-bps", "qos-read-iops", "qos-write-iops")


def parse_export_spec(spec: str) -> ExportConfig:
    """Parse ``NAME=PATH[,key=value...]``; PATH may be ``memory`` (with ``size=``)."""
    name, sep, rest = spec.partition("=")
    if not sep:
        raise ConfigError(f"bad --export {spec!r}: expected NAME=PATH[,key=value...]")
    path, *opts = rest.split(",")
    changes: dict[str, Any] = {"path": path or None}
    if path == "memory":
        changes.update(path=None, backend="memory")
    allow: list[str] = []
    qos: dict[str, int] = {}
    params: list[tuple[str, str]] = []
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "allow":
            allow.append(value)
        elif key.startswith("plugin.") and len(key) > 7:  # a plugin's config(key, value)
            params.append((key[7:], value))
        elif key in _QOS_OPTIONS:  # qos-read-bps=N etc.: this export's own rate limits
            if not value.isdigit():
                raise ConfigError(f"bad value for {key!r} in {spec!r}: expected an integer")
            qos[key[4:].replace("-", "_")] = int(value)
        elif key in _OPTIONS:
            attr, conv = _OPTIONS[key]
            try:
                changes[attr] = conv(value)
            except ValueError as e:
                raise ConfigError(f"bad value for {key!r} in {spec!r}: {e}") from None
        else:
            raise ConfigError(f"unknown export option {key!r} in {spec!r}")
    try:
        acl = Acl.from_rules(allow, f"allow= of {name!r}") if allow else None
    except AclError as e:
        raise ConfigError(str(e)) from None
    if params:
        changes["plugin_params"] = tuple(params)
    cfg = dataclasses.replace(
        ExportConfig(name=name), acl=acl, qos=QosLimits(**qos) if qos else None, **changes
    )
    cfg.validate(BACKENDS)
    return cfg
