"""Regenerate the CSI protobuf and gRPC modules in ``_generated/`` from ``proto/csi.proto``.

Why it exists: the generated code is committed (the agent image must not need grpcio-tools), so
one command has to produce it byte for byte the same way every time, and a test has to be able to
regenerate it into a scratch folder and compare. Run ``python -m nbd_agent.csi.generate`` (or
``make proto``); ``--out DIR`` writes elsewhere, ``--check`` exits 1 when the committed files are
stale.

What it must not do: edit the generated code beyond the single import fix below, or run at agent
start-up (grpcio-tools is a development dependency only).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "proto" / "csi.proto"
GENERATED = HERE / "_generated"
FILES = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")

# grpc_tools emits a top-level import of the message module; inside a package it must be relative.
_ABSOLUTE_IMPORT = "import csi_pb2 as csi__pb2"
_RELATIVE_IMPORT = "from . import csi_pb2 as csi__pb2"


def generate(out: Path) -> list[Path]:
    """Run protoc (grpc_tools) on the proto and write the three modules into ``out``."""
    from grpc_tools import protoc  # development dependency: imported only when generating

    out.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"-I{well_known}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            str(PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        grpc_module = Path(scratch) / "csi_pb2_grpc.py"
        text = grpc_module.read_text()
        if text.count(_ABSOLUTE_IMPORT) != 1:
            raise RuntimeError("grpc_tools output changed shape: the import fix no longer applies")
        grpc_module.write_text(text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT))
        written = []
        for name in FILES:
            shutil.copyfile(Path(scratch) / name, out / name)
            written.append(out / name)
    init = out / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from ../proto/csi.proto by nbd_agent.csi.generate."""\n')
    return written


def stale_files(committed: Path = GENERATED) -> list[str]:
    """Names of generated files that differ from a fresh generation (empty when up to date)."""
    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        return [
            name
            for name in FILES
            if not (committed / name).exists()
            or not filecmp.cmp(Path(scratch) / name, committed / name, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=GENERATED, help="target folder")
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for name in stale:
            print(f"stale: {args.out / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
