"""``nbd-operator``'s console entry: one line, not a traceback, when the operator extra is missing.

Why it exists: a plain ``pip install kube-nbd`` brings nbdserver only (the standard library); the
operator needs kopf, aiohttp and the Kubernetes client from the ``operator`` extra. The entry
imports the real CLI and, if one of those is what is missing, says which extra to install.
"""

from __future__ import annotations

import sys

# Top-level modules that the 'operator' extra installs (and their own dependencies' names).
OPERATOR_EXTRA_MODULES = frozenset({"kopf", "aiohttp", "kubernetes_asyncio", "yarl", "multidict"})


def main() -> int:
    try:
        from nbd_operator import cli
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in OPERATOR_EXTRA_MODULES:
            raise
        print(
            f"nbd-operator: needs the 'operator' extra ({exc.name} is not installed): "
            "pip install 'kube-nbd[operator]'",
            file=sys.stderr,
        )
        return 2
    return cli.main()


if __name__ == "__main__":
    raise SystemExit(main())
