"""Image formats: how the bytes of an image file become the disk an export serves.

``raw`` is the file itself (the backends in ``nbdserver.backends``); the others (qcow2, VMDK,
xz) are backends that parse a container file, read through ``formats._image.ImageFile``: a
local file's own descriptor, or any other backend's bytes (http, s3, a plugin).
``nbdserver.formats.registry`` lists them; ``nbdserver.formats.probe`` recognises headers so
that a formatted image is never served as raw bytes by accident. Must not wrap filters or know
the configuration model.
"""
