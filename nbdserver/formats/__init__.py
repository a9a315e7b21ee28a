"""Image formats served read through their metadata (VMDK, xz) as backends.

Why a package beside ``nbdserver.backends``: a format backend reads another format's bytes
from a file and serves the disk they describe; it shares the Backend interface but not the
fd-based I/O of the raw backends. Must not wrap filters or know the configuration model.
"""
