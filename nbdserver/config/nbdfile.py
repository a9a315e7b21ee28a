"""nbd-server's configuration file (nbd-server(5)), read so that kube-nbd is a drop-in.

Why: people migrating from nbd-server bring ``/etc/nbd-server/config`` (Debian's shipped file
included). ``nbdserver serve --config FILE`` reads the same INI dialect: a ``[generic]`` section
first, then one section per export whose *section name* is the export name (``exportname`` is,
for historical reasons, the file path); ``includedir`` adds the export sections of every
``*.conf`` file in a directory. ``read_layer`` turns the file into a ``Layer`` for
``nbdserver.config.assemble``.

What it must not do: silently ignore a key. Every key is either honoured, or reported with file
and line: an error when ignoring it would change what clients get or weaken security
(``prerun``, ``tlsprio``, ``multifile``...), a warning when it only tunes nbd-server's own
implementation (``max_threads``, ``splice``) or is documented as ignored by nbd-server itself
(an export's ``listenaddr``). A boolean feature set to ``false`` is honoured trivially.
All errors of a file are collected and raised together, so one run shows every problem.

The dialect, as the man page states it: whole-line ``#`` comments only; ``key = value``; booleans
are exactly ``true`` or ``false``; no quoting; section names are unique.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from nbdserver.acl import Acl, AclError
from nbdserver.backends.registry import NAMES as BACKENDS
from nbdserver.config.model import Caps, CowMode, ExportConfig, Layer, TlsMode, TlsSettings
from nbdserver.errors import ConfigError

log = logging.getLogger("nbdserver")


class FileError(ConfigError):
    """Every problem of one config file, each as ``file:line: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class GenericSection:
    port: int | None = None
    listenaddr: list[str] = field(default_factory=list)
    allowlist: bool = False  # permits NBD_OPT_LIST; it is NOT an access-control list
    certfile: str | None = None
    keyfile: str | None = None
    cacertfile: str | None = None
    force_tls: bool = False
    maxconnections: int | None = None
    user: str | None = None
    group: str | None = None
    includedir: str | None = None
    unixsock: str | None = None
    duallisten: bool = False


@dataclass
class ExportSection:
    name: str
    line: int
    file: str = ""
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
    temporary: bool = False
    virtstyle: str = "ipliteral"


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
    "user": "str",
    "group": "str",
    "includedir": "str",
    "unixsock": "str",
    "duallisten": "bool",
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
    "temporary": "bool",
    "virtstyle": "str",
}
# Keys whose only effect is on how nbd-server itself works: warn, then carry on.
_WARN_GENERIC = {
    "max_threads": "nbdserver runs a thread per connection; max_threads has no meaning here",
    "splice": "nbdserver chooses its own zero-copy paths; splice is ignored",
}
_WARN_EXPORT = {"listenaddr": "ignored (nbd-server ignores it too; it belonged to oldstyle)"}
# Keys we cannot honour: an error when set (a boolean set to false is harmless).
_UNSUPPORTED_GENERIC = {
    "oldstyle": "oldstyle negotiation is not supported (nbd-server dropped it in 3.10 too)",
    "tlsprio": "GnuTLS priority strings cannot be mapped to OpenSSL; nbdserver enforces TLS >= 1.2",
}
_UNSUPPORTED_EXPORT = {
    "multifile": "serve one file per export",
    "treefiles": "serve one file per export",
    "prerun": "run hooks outside the server",
    "postrun": "run hooks outside the server",
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
    """Parse ``path`` and its ``includedir``; raise FileError listing every problem with its
    file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise FileError([f"{p}: cannot read config: {exc.strerror}"]) from None
    return parse(text, str(p))


def parse(text: str, filename: str = "<config>") -> NbdConfig:
    r = _Reader(filename)
    r.read(text, filename, main=True)
    r.include()
    return r.finish()


class _Reader:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.generic = GenericSection()
        self.exports: list[ExportSection] = []
        self.seen_sections: dict[str, str] = {}
        self.has_generic = False
        self.includedir_line = ""

    def read(self, text: str, filename: str, main: bool) -> None:
        seen_keys: dict[str, int] = {}
        section: str | None = None
        current: ExportSection | None = None
        for lineno, line in enumerate(text.splitlines(), start=1):
            where = f"{filename}:{lineno}"
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = _SECTION.match(line)
            if m:
                name = m.group(1)
                first = main and not self.seen_sections
                if name in self.seen_sections:
                    first_at = self.seen_sections[name]
                    if first_at.startswith(f"{filename}:"):
                        first_at = "line " + first_at.rsplit(":", 1)[1]
                    self.problems.append(f"{where}: section [{name}] already defined at {first_at}")
                elif first and name != "generic":
                    self.problems.append(
                        f"{where}: the first section must be [generic], not [{name}]"
                    )
                elif name == "generic" and not main:
                    self.problems.append(f"{where}: [generic] belongs in the main config file")
                self.seen_sections[name] = where
                seen_keys = {}
                section, current = name, None
                if name == "generic":
                    self.has_generic = self.has_generic or main
                else:
                    current = ExportSection(name=name, line=lineno, file=filename)
                    self.exports.append(current)
                continue
            m = _OPTION.match(line)
            if not m:
                self.problems.append(f"{where}: not a section header, comment or key = value line")
                continue
            key, raw = m.group(1), m.group(2)
            if section is None:
                self.problems.append(f"{where}: {key} appears before any [section]")
                continue
            if key in seen_keys:
                self.problems.append(f"{where}: {key} already set at line {seen_keys[key]}")
                continue
            seen_keys[key] = lineno
            self._option(where, section, current, key, raw)

    def _option(
        self, where: str, section: str, current: ExportSection | None, key: str, raw: str
    ) -> None:
        is_generic = current is None
        types = _TYPES_GENERIC if is_generic else _TYPES_EXPORT
        warn = _WARN_GENERIC if is_generic else _WARN_EXPORT
        unsupported = _UNSUPPORTED_GENERIC if is_generic else _UNSUPPORTED_EXPORT
        if key in warn:
            self.warnings.append(f"{where}: [{section}] {key}: {warn[key]}")
            return
        if key in unsupported:
            if raw.strip() in ("false", "none"):
                return  # an unsupported feature explicitly turned off is honoured
            self.problems.append(
                f"{where}: [{section}] {key} is not supported by nbdserver: {unsupported[key]}"
            )
            return
        if key not in types:
            self.problems.append(f"{where}: [{section}] unknown key {key!r}")
            return
        try:
            value = _convert(types[key], raw)
        except ValueError as exc:
            self.problems.append(f"{where}: [{section}] {key}: {exc}")
            return
        if key == "force_tls" and current is not None:
            key = "tlsonly"  # nbd-server documents both spellings for the per-export switch
        setattr(self.generic if current is None else current, key, value)
        if key == "includedir":
            self.includedir_line = where
        if current is not None and key == "exportname" and not str(value).startswith("/"):
            self.problems.append(
                f"{where}: [{section}] exportname must be an absolute path, not {value!r}"
            )
        if key == "virtstyle" and value != "ipliteral":
            self.problems.append(
                f"{where}: [{section}] virtstyle {value!r} is not supported (ipliteral is: "
                "%s in exportname becomes the client's address)"
            )
        if key == "listenaddr" and isinstance(value, list) and len(value) > 1:
            self.problems.append(
                f"{where}: [generic] listenaddr: nbdserver listens on one address; "
                f"give one (0.0.0.0 or ::), not {', '.join(value)}"
            )
        if key == "sparse_cow" and value is False:
            self.warnings.append(f"{where}: [{section}] sparse_cow: the overlay is always sparse")
        if current is not None and key == "authfile":
            try:
                current.acl = Acl.from_authfile(str(value))
            except (AclError, OSError) as exc:
                self.problems.append(f"{where}: [{section}] authfile: {exc}")

    def include(self) -> None:
        """nbd-server's includedir: every ``*.conf`` in it, in name order, export sections only;
        a directory that does not exist is an error (as in nbd-server)."""
        folder = self.generic.includedir
        if folder is None:
            return
        try:
            names = sorted(p for p in Path(folder).iterdir() if p.name.endswith(".conf"))
        except OSError as exc:
            self.problems.append(f"{self.includedir_line}: includedir {folder}: {exc.strerror}")
            return
        for path in names:
            try:
                self.read(path.read_text(encoding="utf-8"), str(path), main=False)
            except OSError as exc:
                self.problems.append(f"{path}: cannot read: {exc.strerror}")

    def finish(self) -> NbdConfig:
        problems, g = self.problems, self.generic
        if not self.has_generic:
            problems.append(f"{self.filename}: no [generic] section (nbd-server(5) requires one)")
        for exp in self.exports:
            if not exp.exportname:
                problems.append(
                    f"{exp.file}:{exp.line}: [{exp.name}] has no exportname (the file to serve)"
                )
        if g.cacertfile and not (g.certfile or g.keyfile):
            problems.append(f"{self.filename}: cacertfile needs certfile and keyfile in [generic]")
        if (g.force_tls or any(e.tlsonly for e in self.exports)) and not (g.certfile or g.keyfile):
            problems.append(
                f"{self.filename}: force_tls/tlsonly set but no certfile/keyfile in [generic]"
            )
        if problems:
            raise FileError(problems)
        return NbdConfig(self.filename, g, self.exports, self.warnings)


def _export(e: ExportSection) -> ExportConfig:
    caps = Caps(trim=e.trim, flush=e.flush, fua=e.fua, rotational=e.rotational)
    cfg = ExportConfig(
        name=e.name,
        path=e.exportname,
        size=e.filesize,
        read_only=e.readonly,
        connections=e.maxconnections or 0,
        idle_timeout=float(e.timeout),
        tls=e.tlsonly,
        acl=e.acl,
        cow=CowMode.CONNECTION if e.copyonwrite else CowMode.OFF,  # per connection, as nbd-server
        cow_dir=e.cowdir,
        caps=caps,
        temporary=e.temporary,
    )
    cfg.validate(BACKENDS)
    return cfg


def read_layer(path: str) -> Layer:
    """The settings ``path`` gives, as a ``Layer``; warnings are logged, problems raised."""
    conf = load(path)
    for warning in conf.warnings:
        log.warning("%s", warning)
    g = conf.generic
    tls = None
    if conf.tls_enabled:
        mode = TlsMode.REQUIRE if g.force_tls else TlsMode.ON
        tls = TlsSettings(mode, g.certfile or g.keyfile, g.keyfile, g.cacertfile)
    return Layer(
        exports=tuple(_export(e) for e in conf.exports),
        bind=g.listenaddr[0] if g.listenaddr else None,
        port=g.port,
        unix=g.unixsock,
        no_tcp=(not g.duallisten) if g.unixsock else None,  # unixsock alone: no TCP (nbd-server)
        max_connections=g.maxconnections,
        tls=tls,
        list_allowed=g.allowlist,
        user=g.user,
        group=g.group,
    )
