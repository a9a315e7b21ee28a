"""kube-nbd's NBD server: protocol, backends, filters and a network edge.

This package knows nothing of Kubernetes. ``nbdserver.protocol`` is pure (standard library only,
no I/O) and is shared with the node agent, which needs the client side of the handshake before
it hands sockets to the kernel.
"""

__version__ = "0.1.0"
