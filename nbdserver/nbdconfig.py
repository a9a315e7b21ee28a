"""nbd-server's configuration file (nbd-server(5)), read so that kube-nbd is a drop-in.

Why: people migrating from nbd-server bring ``/etc/nbd-server/config``. ``nbdserver serve
--config FILE`` reads the same INI dialect: a ``[generic]`` section first, then one section per
export whose *section name* is the export name (``exportname`` is, for historical reasons, the
file path).

What it must not do: silently ignore a key. Every key is either honoured, or reported with file
and line: an error when ignoring it would change what clients get or weaken security (``user``,
``prerun``, ``tlsprio``, ``multifile``...), a warning when it only tunes nbd-server's own
implementation (``max_threads``, ``splice``) or is documented as ignored by nbd-server itself
(an export's ``listenaddr``). A boolean feature set to ``false`` is honoured trivially.
All errors of a file are collected and raised together, so one run shows every problem.

The dialect, as the man page states it: whole-line ``#`` comments only; ``key = value``; booleans
are exactly ``true`` or ``false``; no quoting; section names are unique.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nbdserver.acl import Acl, AclError

DEFAULT_PORT = 10809


class ConfigError(ValueError):
    """Every problem of one config file, each as ``file:line: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class GenericSection:
    port: int = DEFAULT_PORT
    listenaddr: list[str] = field(default_factory=lambda: ["0.0.0.0"])
    allowlist: bool = False  # permits NBD_OPT_LIST; it is NOT an access-control list
    certfile: str | None = None
    keyfile: str | None = None
    cacertfile: str | None = None
    force_tls: bool = False
    maxconnections: int | None = None


@dataclass
class ExportSection:
    name: str
    line: int
    exportname: str = ""
    filesize: int | None = None
    readonly: bool = False
    copyonwrite: bool = False
    sparse_cow: bool = False
    cowdir: str | None = None
    authfile: str | None = None
    acl: Acl | None = None  # loaded from authfile; None: everyone (as nbd-server)
    trim: bool = False
    flush: bool = False
    fua: bool = False
    rotational: bool = False
    tlsonly: bool = False
    maxconnections: int | None = None
    timeout: int = 0


@dataclass
class NbdConfig:
    path: str
    generic: GenericSection
    exports: list[ExportSection]
    warnings: list[str]

    @property
    def tls_enabled(self) -> bool:
        return self.generic.keyfile is not None or self.generic.certfile is not None


_TYPES_GENERIC: dict[str, str] = {
    "port": "port",
    "listenaddr": "addrs",
    "allowlist": "bool",
    "certfile": "str",
    "keyfile": "str",
    "cacertfile": "str",
    "force_tls": "bool",
    "maxconnections": "int",
}
_TYPES_EXPORT: dict[str, str] = {
    "exportname": "str",
    "filesize": "int",
    "readonly": "bool",
    "copyonwrite": "bool",
    "sparse_cow": "bool",
    "cowdir": "str",
    "authfile": "str",
    "trim": "bool",
    "flush": "bool",
    "fua": "bool",
    "rotational": "bool",
    "tlsonly": "bool",
    "force_tls": "bool",
    "maxconnections": "int",
    "timeout": "int",
}
# Keys whose only effect is on how nbd-server itself works: warn, then carry on.
_WARN_GENERIC = {
    "max_threads": "nbdserver runs a thread per connection; max_threads has no meaning here",
    "splice": "nbdserver chooses its own zero-copy paths; splice is ignored",
}
_WARN_EXPORT = {"listenaddr": "ignored (nbd-server ignores it too; it belonged to oldstyle)"}
# Keys we cannot honour: an error when set (a boolean set to false is harmless).
_UNSUPPORTED_GENERIC = {
    "user": "drop privileges with the container's securityContext or systemd's User=",
    "group": "drop privileges with the container's securityContext or systemd's Group=",
    "includedir": "put every export in this one file",
    "oldstyle": "oldstyle negotiation is not supported (nbd-server dropped it in 3.10 too)",
    "tlsprio": "GnuTLS priority strings cannot be mapped to OpenSSL; nbdserver enforces TLS >= 1.2",
    "unixsock": "use `nbdserver serve --unix PATH`",
    "duallisten": "use `nbdserver serve --unix PATH`",
}
_UNSUPPORTED_EXPORT = {
    "multifile": "serve one file per export",
    "treefiles": "serve one file per export",
    "temporary": "use a scratch file or a memory export",
    "prerun": "run hooks outside the server",
    "postrun": "run hooks outside the server",
    "virtstyle": "per-client files are not supported",
    "transactionlog": "transaction logs are not supported",
    "waitfile": "live migration by waitfile is not supported",
    "sdp": "Socket Direct Protocol is not supported",
    "sync": "fsync after every write is not supported; clients may send FUA or FLUSH",
}
_SECTION = re.compile(r"^\s*\[([^\]]*)\]\s*$")
_OPTION = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=(.*)$")


def _convert(kind: str, raw: str) -> object:
    value = raw.strip()
    if kind == "bool":
        if value not in ("true", "false"):
            raise ValueError(f"boolean must be true or false, not {value!r}")
        return value == "true"
    if kind in ("int", "port"):
        if not re.fullmatch(r"\d+", value):
            raise ValueError(f"expected a non-negative integer, not {value!r}")
        number = int(value)
        if kind == "port" and not 0 < number < 65536:
            raise ValueError(f"port {number} out of range 1-65535")
        return number
    if kind == "addrs":
        addrs = [a.strip() for a in value.split(",") if a.strip()]
        if not addrs:
            raise ValueError("listenaddr is empty")
        return addrs
    if not value:
        raise ValueError("empty value")
    return value


def load(path: str | Path) -> NbdConfig:
    """Parse ``path``; raise ConfigError listing every problem with its file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read config: {exc.strerror}"]) from None
    return parse(text, str(p))


def parse(text: str, filename: str = "<config>") -> NbdConfig:
    problems: list[str] = []
    warnings: list[str] = []
    generic = GenericSection()
    exports: list[ExportSection] = []
    seen_sections: dict[str, int] = {}
    seen_keys: dict[str, int] = {}
    section: str | None = None
    current: ExportSection | None = None

    def where(n: int) -> str:
        return f"{filename}:{n}"

    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _SECTION.match(line)
        if m:
            name = m.group(1)
            if name in seen_sections:
                problems.append(f"{where(lineno)}: section [{name}] already defined at line "
                                f"{seen_sections[name]}")  # fmt: skip
            elif not seen_sections and name != "generic":
                problems.append(
                    f"{where(lineno)}: the first section must be [generic], not [{name}]"
                )
            seen_sections[name] = lineno
            seen_keys = {}
            section = name
            current = None
            if name != "generic":
                current = ExportSection(name=name, line=lineno)
                exports.append(current)
            continue
        m = _OPTION.match(line)
        if not m:
            problems.append(f"{where(lineno)}: not a section header, comment or key = value line")
            continue
        key, raw = m.group(1), m.group(2)
        if section is None:
            problems.append(f"{where(lineno)}: {key} appears before any [section]")
            continue
        if key in seen_keys:
            problems.append(f"{where(lineno)}: {key} already set at line {seen_keys[key]}")
            continue
        seen_keys[key] = lineno
        is_generic = current is None
        types = _TYPES_GENERIC if is_generic else _TYPES_EXPORT
        warn = _WARN_GENERIC if is_generic else _WARN_EXPORT
        unsupported = _UNSUPPORTED_GENERIC if is_generic else _UNSUPPORTED_EXPORT
        if key in warn:
            warnings.append(f"{where(lineno)}: [{section}] {key}: {warn[key]}")
            continue
        if key in unsupported:
            if raw.strip() in ("false", "none") or (key == "oldstyle" and raw.strip() == "false"):
                continue  # an unsupported feature explicitly turned off is honoured
            problems.append(
                f"{where(lineno)}: [{section}] {key} is not supported by nbdserver: "
                f"{unsupported[key]}"
            )
            continue
        if key not in types:
            problems.append(f"{where(lineno)}: [{section}] unknown key {key!r}")
            continue
        try:
            value = _convert(types[key], raw)
        except ValueError as exc:
            problems.append(f"{where(lineno)}: [{section}] {key}: {exc}")
            continue
        if key == "force_tls" and current is not None:
            key = "tlsonly"  # nbd-server documents both spellings for the per-export switch
        setattr(generic if current is None else current, key, value)
        if current is not None and key == "exportname" and not str(value).startswith("/"):
            problems.append(f"{where(lineno)}: [{section}] exportname must be an absolute path, "
                            f"not {value!r}")  # fmt: skip
        if key == "listenaddr" and isinstance(value, list) and len(value) > 1:
            problems.append(
                f"{where(lineno)}: [generic] listenaddr: nbdserver listens on one address; "
                f"give one (0.0.0.0 or ::), not {', '.join(value)}"
            )
        if key == "sparse_cow" and value is False:
            warnings.append(
                f"{where(lineno)}: [{section}] sparse_cow: the overlay is always a sparse file"
            )
        if current is not None and key == "authfile":
            try:
                current.acl = Acl.from_authfile(str(value))
            except (AclError, OSError) as exc:
                problems.append(f"{where(lineno)}: [{section}] authfile: {exc}")

    if "generic" not in seen_sections:
        problems.append(f"{filename}: no [generic] section (nbd-server(5) requires one)")
    for exp in exports:
        if not exp.exportname:
            problems.append(
                f"{where(exp.line)}: [{exp.name}] has no exportname (the file to serve)"
            )
    if not exports and not problems:
        problems.append(f"{filename}: no export sections")
    g = generic
    if g.cacertfile and not (g.certfile or g.keyfile):
        problems.append(f"{filename}: cacertfile needs certfile and keyfile in [generic]")
    if (g.force_tls or any(e.tlsonly for e in exports)) and not (g.certfile or g.keyfile):
        problems.append(f"{filename}: force_tls/tlsonly set but no certfile/keyfile in [generic]")
    if problems:
        raise ConfigError(problems)
    return NbdConfig(filename, generic, exports, warnings)
