"""nbd-server's ``user`` and ``group``: become them once everything privileged is open.

Why: Debian's shipped config runs nbd-server as ``nbd``; the server opens its images, listeners
and metrics port first (they may need root), then gives root up for good, as nbd-server does.

What it must not do: change anything when neither is given, or carry on half-switched (a
failure is a ``ConfigError``: one line, exit 2).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd

from nbdserver.errors import ConfigError

log = logging.getLogger("nbdserver.server")


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become ``user``/``group`` (nbd-server's keys) once everything privileged is open."""
    if user is None and group is None:
        return
    try:
        pw = pwd.getpwnam(user) if user is not None else None
        gid = grp.getgrnam(group).gr_gid if group is not None else (pw.pw_gid if pw else None)
    except KeyError as e:
        raise ConfigError(f"user/group {e.args[0]}") from None
    try:
        if gid is not None and gid != os.getegid():
            if os.geteuid() == 0:
                os.setgroups([gid])
            os.setgid(gid)
        if pw is not None and pw.pw_uid != os.geteuid():
            os.setuid(pw.pw_uid)
    except OSError as e:
        raise ConfigError(f"cannot switch to user {user!r} group {group!r}: {e.strerror}") from None
    log.info("running as user %s, group %s", user or os.geteuid(), group or os.getegid())
