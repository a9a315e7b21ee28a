"""The resume record of one import: ``DEST.import.json`` (for a block device, in the work dir).

Why: an import killed half-way (a pod evicted, a node rebooted) should continue where it
stopped, but only if the object is still the one it started on, which its validator (ETag or
Last-Modified, with the size) says. ``bytesDone`` is written only after the bytes it counts are
on disk (the caller syncs DEST first); the record is replaced atomically (a new file renamed
over the old one), so a kill at any moment leaves the old record or the new, never half of one.

Must not: read or write the image itself.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace

log = logging.getLogger("nbdserver.import")


@dataclass(frozen=True)
class ImportState:
    source: str
    validator: str
    format: str
    output_format: str
    size: int
    bytes_done: int
    complete: bool = False
    sha256: str = ""

    def same_import(self, other: ImportState) -> bool:
        """Whether ``other`` continues this one: same source and validator, same formats."""
        return bool(self.validator) and (
            self.source,
            self.validator,
            self.format,
            self.output_format,
            self.size,
        ) == (other.source, other.validator, other.format, other.output_format, other.size)

    def advanced(self, done: int) -> ImportState:
        return replace(self, bytes_done=done)

    def completed(self, sha256: str) -> ImportState:
        return replace(self, bytes_done=self.size, complete=True, sha256=sha256)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


_KEYS = {_camel(f.name): f.name for f in fields(ImportState)}  # JSON keys, as the operator reads


def load(path: str) -> ImportState | None:
    """The record at ``path``; None when there is none. A record that does not parse (written
    by something else) is reported and counts as none: the import then starts over."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        return ImportState(**{_KEYS[k]: v for k, v in raw.items()})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("%s: unreadable import state (%s): starting over", path, exc)
        return None


def save(path: str, state: ImportState) -> None:
    """Write ``state`` to ``path`` atomically and durably."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({_camel(k): v for k, v in asdict(state).items()}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
