"""An example kube-nbd plugin: a sparse RAM disk in 64 KiB pages (docs/nbdserver.md, "Python
plugins").

Serve it with ``nbdserver serve --plugin examples/plugin_example.py --size 64M`` (or the older
``--backend plugin examples/plugin_example.py``).
Every function but ``open``, ``size`` and ``pread`` is optional: drop ``pwrite`` and the export
is read-only; drop ``extents`` and clients see it as all data. Calls are serialised by the
server (no ``thread_model = "parallel"`` here), so the plugin needs no locks.
"""

from __future__ import annotations

PAGE = 64 * 1024
HOLE, ZERO = 1, 2


class Disk:
    def __init__(self, size: int) -> None:
        self.size = size
        self.pages: dict[int, bytearray] = {}


def open(readonly: bool, size: int | None) -> Disk:
    return Disk(size if size is not None else 64 * 1024 * 1024)


def size(h: Disk) -> int:
    return h.size


def identity(h: Disk) -> str:
    return f"ram-{id(h):x}"  # new with every open: the data lives in this process only


def pread(h: Disk, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        page, within = divmod(offset + done, PAGE)
        n = min(len(buf) - done, PAGE - within)
        data = h.pages.get(page)
        buf[done : done + n] = data[within : within + n] if data else bytes(n)
        done += n


def pwrite(h: Disk, data: bytes, offset: int) -> None:
    done = 0
    while done < len(data):
        page, within = divmod(offset + done, PAGE)
        n = min(len(data) - done, PAGE - within)
        h.pages.setdefault(page, bytearray(PAGE))[within : within + n] = data[done : done + n]
        done += n


def zero(h: Disk, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        page, within = divmod(offset, PAGE)
        n = min(end - offset, PAGE - within)
        if n == PAGE:
            h.pages.pop(page, None)
        elif page in h.pages:
            h.pages[page][within : within + n] = bytes(n)
        offset += n


def trim(h: Disk, offset: int, length: int) -> None:
    zero(h, offset, length)


def flush(h: Disk) -> None:
    """Nothing to make durable: RAM."""


def extents(h: Disk, offset: int, length: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    end = min(offset + length, h.size)
    while offset < end:
        page, within = divmod(offset, PAGE)
        n = min(end - offset, PAGE - within)
        flags = 0 if page in h.pages else HOLE | ZERO
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        else:
            out.append((n, flags))
        offset += n
    return out
