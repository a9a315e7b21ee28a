"""An example kube-nbd plugin with parameters: the bytes of one file, read-only (docs/nbdserver.md,
"Python plugins").

    nbdserver serve --plugin examples/plugin_file.py file=/srv/disk.img
    nbdserver serve --plugin examples/plugin_file.py file=/srv/vm.qcow2 --format qcow2

``file=PATH`` arrives through ``config`` (as nbdkit passes ``key=value`` to its plugins) and
``config_complete`` refuses to start without it. Reads use ``os.pread`` at explicit offsets,
so the plugin is safe to call from every connection at once: ``thread_model = "parallel"``.
Because it is a plain byte source, every filter composes over it: ``--format qcow2`` reads the
qcow2 inside, ``--copy-on-write`` takes writes in an overlay, ``--cache-size`` keeps blocks.
"""

from __future__ import annotations

import os

thread_model = "parallel"
can_multi_conn = True
_settings: dict[str, str] = {}


def config(key: str, value: str) -> None:
    if key != "file":
        raise ValueError(f"unknown parameter {key!r} (this plugin takes file=PATH)")
    _settings[key] = value


def config_complete() -> None:
    if "file" not in _settings:
        raise ValueError("file=PATH is required")


def open(readonly: bool, size: int | None) -> int:
    return os.open(_settings["file"], os.O_RDONLY | os.O_CLOEXEC)


def size(fd: int) -> int:
    return os.fstat(fd).st_size


def identity(fd: int) -> str:
    st = os.fstat(fd)  # the same file, unchanged, is the same data across restarts
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def pread(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise OSError(5, f"{_settings['file']} ended at {offset + done}")
        done += n


def close(fd: int) -> None:
    os.close(fd)
