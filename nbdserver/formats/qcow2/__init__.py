"""qcow2 (QEMU copy-on-write, versions 2 and 3) read and write, after qemu's
``docs/interop/qcow2.txt``: ``header`` parses and checks the header, ``tables`` maps guest
clusters through L1/L2 tables, ``refcounts`` allocates and frees host clusters, ``backend``
is the ``Backend`` an export serves.

Why here and not a library: no maintained Python library reads *and* writes qcow2 (PyPI has
libqcow-python, libyal's read-only binding, and helpers that shell out to qemu-img).
"""
