"""A downloaded qcow2, VMDK or xz image written out as its raw disk, with nbdserver's own
format readers; zero and unallocated extents are not written (holes in a file).

Why local: the verbatim download is staged first (it is what the sha256 covers, and what a
resumed download continues), then converted at disk speed.

Must not: follow a backing file: an imported image must stand alone (its backing name came
from whoever made the image, and the import's directory is nobody's backing store).
"""

from __future__ import annotations

from nbdserver.backends.base import Backend
from nbdserver.errors import ConfigError
from nbdserver.formats.registry import FORMATS
from nbdserver.importer.dest import CHUNK, write, write_zeroes
from nbdserver.importer.progress import Progress
from nbdserver.protocol.constants import NBD_STATE_ZERO


def open_image(path: str, fmt: str) -> Backend:
    """The disk inside the staged image at ``path``, read-only; a backing file is refused."""
    kind = FORMATS[fmt]
    image = kind.open(path, True, allow_outside=False) if kind.confined else kind.open(path, True)
    if getattr(image, "backing_files", ()):
        image.close()
        raise ConfigError(f"the {fmt} image names a backing file: an import must stand alone")
    return image


def copy_raw(image: Backend, dest: Backend, progress: Progress) -> None:
    """Every data extent of ``image`` into ``dest`` at the same offset; zeroes as holes."""
    size = image.size()
    buf = bytearray(CHUNK)
    offset = 0
    while offset < size:
        end = min(offset + CHUNK, size)
        pos = offset
        for extent in image.extents(offset, end - offset):
            length = min(extent.length, end - pos)
            if length <= 0:
                break
            if extent.flags & NBD_STATE_ZERO:
                write_zeroes(dest, pos, length)
            else:
                view = memoryview(buf)[:length]
                image.pread(view, pos)
                write(dest, view, pos)
            pos += length
        if pos < end:  # extents stopped short: the rest is read as data
            view = memoryview(buf)[: end - pos]
            image.pread(view, pos)
            write(dest, view, pos)
        offset = end
        progress.advance(offset)
