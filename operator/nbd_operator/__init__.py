"""The kube-nbd operator: turns NBDExport objects into running NBD servers.

Layout (dependencies point downwards only):

- ``handlers``  kopf registry and thin handlers; maps our errors to kopf's in one place
- ``reconcile`` one export's sync and deletion, in terms of ``kube`` and the pure modules
- ``kube``      the only module that talks to the Kubernetes API (besides kopf itself)
- ``manifests``, ``status``, ``spec``, ``config``  pure functions and data, no I/O

The operator must not import ``nbdserver`` or the agent: its contract with the server is the
server's command line (``manifests.server_args``), and with the agent the ``nbd_api`` package.
"""

__all__: list[str] = []
