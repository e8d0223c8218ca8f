"""The master port a node offers, held open from its join until its TCPStore server takes it over."""

from __future__ import annotations

import socket
import threading

__all__ = ["PortReservation"]


class PortReservation:
    """Keeps a listening socket open on the master port this node offers, from its join until it serves.

    The core handler asks for a port at every join (``port_factory``); if this node becomes rank 0, the TCPStore
    server is started on that very socket (``master_listen_fd``), so the agreed port cannot be lost to another
    process in between. A node that does not lead the round releases its socket at the next join or shutdown.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    def reserve(self, addr: str) -> int:
        """Listen on a free port of ``addr``; ``""`` (no local_addr): on every interface, IPv6 too where the
        host has it (peers probe rank 0's address candidates on this port, see ``fsrdzv._address``)."""
        if not addr and socket.has_dualstack_ipv6():
            sock = socket.create_server(("", 0), family=socket.AF_INET6, backlog=128, dualstack_ipv6=True)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((addr, 0))
            except OSError:
                sock.bind(("", 0))  # local_addr may be a name other hosts resolve but this one cannot bind
            sock.listen(128)
        with self._lock:
            old, self._socket = self._socket, sock
        if old is not None:
            old.close()
        port: int = sock.getsockname()[1]
        return port

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
