"""kube-nbd's node agent: attaches NBD exports to /dev/nbdX through the kernel's generic netlink
and keeps them attached (``nbd-agent`` CLI), plus the CSI node plugin (``nbd_agent.csi``).

Layering: ``genl`` (framing) < ``netlink`` (the only netlink socket) < ``devices`` / ``attach`` /
``reconnect`` < ``persist`` < ``cli``. The NBD handshake comes from ``nbdserver.client``.
"""

__version__ = "0.1.0"
