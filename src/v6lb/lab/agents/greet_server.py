"""A TCP server that tells each client which backend it reached.

``python -m v6lb.lab.agents.greet_server ME PORT`` listens on ``[::]:PORT`` and prints
``ready`` once it does. It greets each new connection with ``ME <client port>\\n`` and
answers every later read that brings bytes with ``ME\\n``; an empty read (the client
closed) closes the connection. One thread and one selector serve every connection, so a
few hundred flows cost next to nothing. The failover lab runs one on every backend
(``ME`` is the backend's address): a client learns its backend from the greeting and
notices a moved flow when an answer names another.
"""

from __future__ import annotations

import selectors
import socket
import sys
import threading
from collections.abc import Sequence

__all__ = ["listen", "main", "serve"]


def listen(port: int, host: str = "::") -> socket.socket:
    """A listening IPv6 TCP socket on ``[host]:port`` (port 0: any free port)."""
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(1024)
    return ls


def serve(me: str, listener: socket.socket, *, stop: threading.Event | None = None) -> None:
    """Serve ``listener`` until ``stop`` is set (forever without one); closes what it accepted."""
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, listener)
    timeout = None if stop is None else 0.05
    try:
        while stop is None or not stop.is_set():
            for key, _ in sel.select(timeout):
                s: socket.socket = key.data
                try:
                    if s is listener:
                        c, peer = listener.accept()
                        c.sendall(f"{me} {peer[1]}\n".encode())
                        sel.register(c, selectors.EVENT_READ, c)
                    elif s.recv(256):
                        s.sendall(f"{me}\n".encode())
                    else:
                        sel.unregister(s)
                        s.close()
                except OSError:
                    if s is not listener:
                        sel.unregister(s)
                        s.close()
    finally:
        for key in list(sel.get_map().values()):
            if key.data is not listener:
                key.data.close()
        sel.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or not args[1].isdigit():
        sys.stderr.write("usage: python -m v6lb.lab.agents.greet_server ME PORT\n")
        return 2
    listener = listen(int(args[1]))
    print("ready", flush=True)
    serve(args[0], listener)
    return 0


if __name__ == "__main__":
    sys.exit(main())
