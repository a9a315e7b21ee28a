"""kube-nbd's CSI node plugin (driver ``nbd.dev``): Identity and Node services over gRPC.

Layout, one concern per module: ``server`` (the only gRPC code), ``identity`` and ``node`` (the
CSI services over plain protobuf messages), ``volumes`` (bring-up and tear-down with rollback),
``sources`` (volume id and context to an NBD URI), ``kube`` (the only Kubernetes API code),
``attacher`` (the narrow interface to the kernel attach layer), ``mounter`` (probe, mkfs, mount),
``state`` (the persisted node state), ``reconcile`` (start-up repair), ``main`` (the subcommand).
Generated protobuf code lives apart, in ``_generated``, made by ``generate`` from ``proto/``.
"""
