"""Image formats: how the bytes of an image file become the disk an export serves.

``raw`` is the file itself (the backends in ``nbdserver.backends``); the others (qcow2) are
backends that parse a container format over a path. ``nbdserver.formats.registry`` lists them;
``nbdserver.formats.probe`` recognises headers so that a formatted image is never served as raw
bytes by accident.
"""
