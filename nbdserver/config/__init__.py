"""The server's configuration: one frozen model, three readers, one assembly step.

- ``model``: ``ServerConfig``/``ExportConfig`` (frozen, typed) and the ``Layer`` readers give;
- ``flags``: the command line; ``specs``: ``--export`` specs and sizes; ``nbdfile``: an
  nbd-server(5) config file;
- ``assemble``: flags over file over defaults, once.

Nothing here opens an image or a socket.
"""

from nbdserver.config.assemble import assemble, assemble_from_argv, read_file
from nbdserver.config.model import CowMode, ExportConfig, Layer, ServerConfig, TlsMode, TlsSettings

__all__ = [
    "CowMode",
    "ExportConfig",
    "Layer",
    "ServerConfig",
    "TlsMode",
    "TlsSettings",
    "assemble",
    "assemble_from_argv",
    "read_file",
]
