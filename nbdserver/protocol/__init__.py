"""The NBD wire protocol, with no I/O: constants, packet codecs and handshake state.

Everything here follows doc/proto.md of the NetworkBlockDevice project, with the spec's names.
Both the server and the userspace client handshake (used by the agent) build on this package.
"""
