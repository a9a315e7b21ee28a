"""``nbdserver import``: copy an image from a URL, S3 or a local path into a file or a block
device, resumably, with its checksum verified and its progress reported.

Why a package of its own: the copy has nothing to do with the NBD protocol, and its pieces are
testable apart: ``source`` (what is read: the http and s3 backends, or a local file), ``state``
(the resume record beside DEST), ``progress`` (JSON lines or a terminal bar), ``dest`` (the file
or device written), ``convert`` (a staged qcow2/VMDK/xz to raw) and ``run`` (the order of it all).

Must not: speak NBD, open a listener, or hold a second HTTP client (reads go through
``nbdserver.backends.http``/``s3``, with their retries).
"""
