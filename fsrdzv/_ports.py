"""The port a node offers as rank 0, held from its join until the program's server takes it over.

The core handler asks for a port at every join (``port_factory``); the node holds it so that the agreed port cannot
be lost to another process before rank 0's server uses it. Two ways to hand it over, one per face:

- **listening** (torchrun): the socket listens from the join, and the TCPStore server is started on that very socket
  (``master_listen_fd``, :meth:`PortReservation.take`).
- **bound only** (JAX): the socket is bound, not listening, with ``SO_REUSEPORT``, which JAX's gRPC server also sets:
  the server binds the port itself while it is held (a second listening socket would take half its connections).

Peers probe rank 0's address candidates on this port (``fsrdzv._address``); an accepted and a refused connection
both show that the address reaches rank 0's host, so both ways serve.

Nothing here imports torch: the torchrun face and the JAX plug-in share it.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["PortReservation"]


class PortReservation:
    """Holds the port this node offers, from its join until its server takes it (or the next join, or shutdown).

    :param listen: listen on the socket from the join (torchrun) rather than only bind it with ``SO_REUSEPORT``
        for a server that binds the port itself (JAX).
    """

    def __init__(self, *, listen: bool = True) -> None:
        self._listen = listen
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    def reserve(self, addr: str) -> int:
        """Hold a free port of ``addr``; ``""`` (no local_addr): on every interface, for a listening reservation
        IPv6 too where the host has it. The previous reservation is released."""
        sock = self._open(addr)
        with self._lock:
            old, self._socket = self._socket, sock
        if old is not None:
            old.close()
        port: int = sock.getsockname()[1]
        return port

    def _open(self, addr: str) -> socket.socket:
        if self._listen and not addr and socket.has_dualstack_ipv6():
            return socket.create_server(("", 0), family=socket.AF_INET6, backlog=128, dualstack_ipv6=True)
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not self._listen and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((addr, 0))
        except OSError:
            sock.bind(("", 0))  # local_addr may be a name other hosts resolve but this one cannot bind
        if self._listen:
            sock.listen(128)
        return sock

    def take(self, port: int) -> socket.socket | None:
        """Hand over the socket reserved for ``port`` (None if there is none, e.g. another handler's port)."""
        with self._lock:
            sock = self._socket
            if sock is None or sock.getsockname()[1] != port:
                return None
            self._socket = None
            return sock

    def release(self) -> None:
        with self._lock:
            sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
