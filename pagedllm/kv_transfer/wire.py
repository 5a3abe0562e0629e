"""The control channel the KV connectors share (tcp.py, ipc.py): messages over TCP, each an 8-byte little-endian
length then JSON (a payload of raw bytes may follow, as the TcpConnector's blocks do), and the threaded server that
answers them."""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import threading
from typing import Any, Callable

TIMEOUT_S = 30.0


class KVTransferError(RuntimeError):
    """A producer refused the pairing (its blocks mean something else here) or answered nonsense."""


# What a broken, closed or nonsensical peer raises: the transfer fails, the engine goes on.
CLOSED = (OSError, struct.error, ValueError, KeyError, TypeError, KVTransferError)


def send_message(sock: socket.socket, message: dict[str, Any], payload: bytes = b"") -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("<Q", len(data)) + data + payload)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    out = bytearray(size)
    view, got = memoryview(out), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError("KV transfer peer closed the connection")
        got += n
    return bytes(out)


def recv_message(sock: socket.socket) -> dict[str, Any]:
    (size,) = struct.unpack("<Q", recv_exact(sock, 8))
    message = json.loads(recv_exact(sock, size))
    if not isinstance(message, dict):
        raise KVTransferError(f"KV transfer peer sent {type(message).__name__}, not an object")
    return message


class MessageServer:
    """A TCP server on its own thread; `handle(sock)` runs on a thread per connection until it returns."""

    def __init__(self, host: str, port: int, handle: Callable[[socket.socket], None], name: str) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                handle(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name=name, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
