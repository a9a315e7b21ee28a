"""Drive the server's transmission loop directly over a socket pair, with no handshake.

For tests that need to hold a backend call back (a slow FLUSH) or read replies byte by byte:
they build the export and the negotiated state the handshake would have produced, here, once.
"""

from __future__ import annotations

from nbdserver.backends.base import Backend
from nbdserver.connection import export_info
from nbdserver.exports import Export, ExportConfig
from nbdserver.protocol.constants import TransmissionFlag
from nbdserver.protocol.events import Negotiated


def negotiated_memory_export(
    backend: Backend, *, structured: bool = False, extra_flags: int = 0
) -> tuple[Export, Negotiated]:
    """The export "" over ``backend`` and what GO would have negotiated for it."""
    export = Export(ExportConfig(name="", backend="memory", size=backend.size()), backend)
    info = export_info(export)
    negotiated = Negotiated(
        export_name="",
        export=info,
        transmission_flags=info.flags | TransmissionFlag.NBD_FLAG_HAS_FLAGS | extra_flags,
        structured_replies=structured,
        extended_headers=False,
        meta_contexts=(),
        block_size_requested=False,
        tls=False,
        via_go=True,
    )
    return export, negotiated
