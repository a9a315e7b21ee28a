"""Storage backends: where the bytes of an export live.

Backends see only requests the protocol core already validated (range, flags, read-only,
negotiated features), so they stay small. Filters in ``nbdserver.filters`` wrap a backend and
present the same interface.
"""
