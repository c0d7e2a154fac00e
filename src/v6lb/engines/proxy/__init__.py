"""The builtin proxy engine (``--proxy builtin``): asyncio ``proxy-l4`` and ``proxy-l7``.

See docs/proxy.md. The pure parts (scheduling, header rewriting) are in
:mod:`.policy`; the I/O is in :mod:`.l4`, :mod:`.l7`, :mod:`.health` and :mod:`.server`.
"""

from .server import ProxyServer, install_uvloop, serve

__all__ = ["ProxyServer", "install_uvloop", "serve"]
