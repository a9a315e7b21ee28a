"""The NBD wire protocol, with no I/O: constants, packet codecs and handshake state.

Everything here follows doc/proto.md of the NetworkBlockDevice project, with the spec's names.
Both the server and the userspace client handshake (used by the agent) build on this package.
It imports only the standard library and never touches sockets, threads, clocks or asyncio.

The contract with the network edge (``nbdserver.server``), in the order a connection uses it:

1. ``handshake.ServerHandshake(resolve, list_exports, tls="off"|"on"|"require")`` queues the
   greeting. Loop: send ``data_to_send()``; on ``next_event()``:
   ``NEED_DATA`` -> ``receive_data(sock.recv(...))`` (``b""`` on EOF);
   ``StartTLS`` -> send pending bytes, upgrade the socket, call ``tls_started()``;
   ``Aborted`` / ``Closed`` -> send pending bytes, close (log ``reason``);
   ``Negotiated`` -> send pending bytes, switch to transmission; ``event.leftover`` holds bytes
   already received that belong to the transmission phase.
   ``resolve(name) -> events.ExportInfo | events.Refused | None`` maps export names (including
   "") to exports; ``None`` is "no such export" (NBD_REP_ERR_UNKNOWN), a ``Refused`` carries
   the error reply and message for an export this client may not open.
2. ``transmission.RequestValidator(negotiated)``: ``header_size`` bytes per request header,
   ``unpack(buf, pos) -> (flags, cmd, cookie, offset, length)`` (raises ``wire.ProtocolError`` on
   bad magic: disconnect), ``payload_length(flags, cmd, length)`` (bytes to read or discard;
   raises ``ProtocolError`` when too big to skip), ``validate(flags, cmd, offset, length) -> errno``
   (0 means pass it to the backend).
3. ``transmission.ReplyEncoder.for_negotiated(negotiated)``: ``ok``, ``read`` (header only; the
   data follows), ``error``, ``data_chunk``, ``hole_chunk``, ``block_status``, ``error_offset``,
   ``done``.

The client side (``client_handshake``) and the URI parser (``uri``) serve ``nbdserver.client``.
"""
