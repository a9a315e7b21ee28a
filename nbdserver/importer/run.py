"""The order of one import: refuse what cannot work, download (resuming when the record and
the object agree), verify, convert if asked, then mark DEST complete.

Outcomes: a message and the sha256 of the source's bytes; ``ConfigError`` for what a rerun
cannot fix (bad usage, 404/403, a header naming another format: exit 2); ``ImportFailed`` or
``OSError`` for what it may (retries exhausted, a checksum mismatch, a full disk: exit 1).

Must not: print (``progress`` and the command line do), or write DEST before the source has
been opened and its header checked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field

from nbdserver.backends.base import Backend, RemoteOptions
from nbdserver.backends.block import is_block_device
from nbdserver.errors import ConfigError, NBDServerError, RemoteUnavailable
from nbdserver.formats import probe
from nbdserver.formats.registry import RAW
from nbdserver.importer import state as records
from nbdserver.importer.convert import copy_raw, open_image
from nbdserver.importer.dest import CHUNK, open_dest, write
from nbdserver.importer.progress import Progress
from nbdserver.importer.source import Source, chunks, open_source
from nbdserver.importer.state import ImportState

log = logging.getLogger("nbdserver.import")
SAVE_INTERVAL = 1.0  # seconds between resume records (each costs a sync of DEST)
AHEAD = 2  # requests in flight: the next one crosses the link while this one is hashed
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class ImportFailed(NBDServerError):
    """The import did not complete, for a reason a rerun may not share (exit 1)."""


@dataclass(frozen=True)
class ImportRequest:
    source: str
    dest: str
    format: str = RAW
    output_format: str = "same"  # or "raw"
    sha256: str | None = None
    work_dir: str | None = None
    remote: RemoteOptions = field(default_factory=RemoteOptions)


@dataclass(frozen=True)
class _Plan:
    """Where things go: the resume record, and the file the download is written to (DEST
    itself, or a staged copy in the work dir when it is converted afterwards)."""

    record: str
    download: str
    convert: bool


@dataclass(frozen=True)
class Outcome:
    message: str
    sha256: str  # of the source's bytes
    size: int  # of the source


def run_import(req: ImportRequest, progress: Progress) -> Outcome:
    """Import ``req.source`` into ``req.dest``; what happened, on success."""
    plan = _plan(req)
    previous = records.load(plan.record)
    if previous is not None and previous.complete and not os.path.exists(req.dest):
        log.warning("%s: gone since it was imported: importing again", req.dest)
        previous = None  # the record describes a file that is no longer there
    if previous is not None and previous.complete:
        return _already(req, plan, previous)
    if previous is None and os.path.exists(req.dest) and not is_block_device(req.dest):
        raise ConfigError(
            f"{req.dest} exists and no import of it is under way (no {plan.record}): "
            "remove it or choose another DEST"
        )
    try:
        source = open_source(req.source, req.remote)
    except RemoteUnavailable as exc:  # retried already: a later rerun may get through
        raise ImportFailed(str(exc)) from None
    try:
        return _import(req, plan, previous, source, progress)
    finally:
        source.close()


def _plan(req: ImportRequest) -> _Plan:
    if req.output_format not in ("same", RAW):
        raise ConfigError(f"--output-format {req.output_format}: expected raw or same")
    if req.sha256 is not None and not _HEX64.fullmatch(req.sha256):
        raise ConfigError(f"--sha256 {req.sha256}: expected 64 hexadecimal digits")
    block = is_block_device(req.dest)
    if block and req.work_dir is None:
        raise ConfigError(f"{req.dest} is a block device: give --work-dir for the import state")
    work_dir = req.work_dir or os.path.dirname(os.path.abspath(req.dest))
    if not os.path.isdir(work_dir):
        what = f"--work-dir {work_dir}" if req.work_dir else f"{req.dest}: the directory"
        raise ConfigError(f"{what} does not exist")
    name = os.path.basename(req.dest)
    record = os.path.join(work_dir, name) + ".import.json" if block else req.dest + ".import.json"
    convert = req.output_format == RAW and req.format != RAW
    download = os.path.join(work_dir, name + ".download") if convert else req.dest
    return _Plan(record, download, convert)


def _already(req: ImportRequest, plan: _Plan, done: ImportState) -> Outcome:
    """A rerun after success: nothing to do if it asks for the same import."""
    if (done.source, done.format, done.output_format) != (
        req.source,
        req.format,
        req.output_format,
    ):
        raise ConfigError(
            f"{req.dest} already holds an import of {done.source} "
            f"(--format {done.format}, --output-format {done.output_format}): remove it and "
            f"{plan.record} to import another"
        )
    if req.sha256 and req.sha256.lower() != done.sha256:
        raise ImportFailed(f"{req.dest} was imported with sha256 {done.sha256}, not {req.sha256}")
    return Outcome("already imported", done.sha256, done.size)


def _import(
    req: ImportRequest, plan: _Plan, previous: ImportState | None, source: Source, p: Progress
) -> Outcome:
    size = source.size()
    fresh = ImportState(req.source, source.validator, req.format, req.output_format, size, 0)
    start, note = 0, ""
    if previous is not None and previous.same_import(fresh):
        start = min(previous.bytes_done, size)
    elif previous is not None:
        note = (
            "the source changed since the last attempt: starting over"
            if previous.source == req.source
            else f"a partial import of {previous.source} was here: starting over"
        )
        log.warning("%s: %s", req.dest, note)
    if start and _shorter(plan.download, start):
        start, note = 0, f"{plan.download} lost what was written: starting over"
        log.warning("%s", note)
    _check_header(req, source, size)
    target = open_dest(plan.download, size, fresh=start == 0)
    try:
        digest = _download(req, plan, fresh, source, target, start, p, note)
    finally:
        target.close()
    if plan.convert:
        _convert(req, plan, p)
    records.save(plan.record, fresh.completed(digest))
    if plan.convert:
        os.unlink(plan.download)  # after the record: a kill before it converts again
    return Outcome(f"imported {size} bytes from {req.source}", digest, size)


def _shorter(path: str, length: int) -> bool:
    """Whether the file a download continues holds fewer than ``length`` bytes (removed or cut
    since): continuing would hash and keep bytes that were never fetched."""
    try:
        return not is_block_device(path) and os.stat(path).st_size < length
    except FileNotFoundError:
        return True


def _check_header(req: ImportRequest, source: Source, size: int) -> None:
    """Refuse before writing anything when the header names another format (as ``serve``)."""
    head = bytearray(min(512, size))
    if head:
        source.pread(memoryview(head), 0)
    found = probe.detect(bytes(head))
    if req.format == RAW and found is not None:
        raise ConfigError(
            f"{req.source} is a {found} image: give --format {found} (--output-format raw "
            "for its disk, same for its bytes)"
        )
    if req.format != RAW and found != req.format:
        says = f" (its header says {found})" if found else ""
        raise ConfigError(f"{req.source} is not a {req.format} image{says}")


def _download(
    req: ImportRequest,
    plan: _Plan,
    fresh: ImportState,
    source: Source,
    target: Backend,
    start: int,
    p: Progress,
    note: str,
) -> str:
    """The source's bytes from ``start`` on into ``target``, with the resume record kept; the
    sha256 of all of them (the prefix already there is read back and hashed first)."""
    size = fresh.size
    hasher = hashlib.sha256()
    buf = bytearray(CHUNK)
    if start:
        note = f"resuming at byte {start} (re-hashing what is written)"
        log.info("%s: %s", req.dest, note)
        for offset in range(0, start, CHUNK):
            view = memoryview(buf)[: min(CHUNK, start - offset)]
            target.pread(view, offset)
            hasher.update(view)
    records.save(plan.record, fresh.advanced(start))
    p.phase("downloading", start, size, note)
    saved = time.monotonic()
    done = start
    for view in chunks(source, start, size, CHUNK, AHEAD):
        hasher.update(view)
        write(target, view, done)
        done += len(view)
        if time.monotonic() - saved >= SAVE_INTERVAL or done == size:
            target.flush()  # the record may count only bytes that are on disk
            records.save(plan.record, fresh.advanced(done))
            saved = time.monotonic()
        p.advance(done)
    target.flush()
    digest = hasher.hexdigest()
    p.phase("verifying", size, size)
    if req.sha256 is not None and digest != req.sha256.lower():
        records.save(plan.record, fresh.advanced(0))  # not the bytes asked for: start over
        raise ImportFailed(f"{req.source}: sha256 is {digest}, expected {req.sha256.lower()}")
    return digest


def _convert(req: ImportRequest, plan: _Plan, p: Progress) -> None:
    """The staged download written to DEST as its raw disk."""
    image = open_image(plan.download, req.format)
    try:
        dest = open_dest(req.dest, image.size(), fresh=True)
        try:
            p.phase("converting", 0, image.size())
            copy_raw(image, dest, p)
            dest.flush()
        finally:
            dest.close()
    finally:
        image.close()
