"""`v6lb run` for the proxy VIPs: the engine, and the control socket that reports on it.

:func:`run_proxies` blocks until ``stop`` is set. It adds the ``proxy`` section
to every status answer of this process (:func:`~v6lb.engines.control.add_status_section`),
so when the L3/L4 data plane runs next to it (``own_control=False``), that data
plane's control socket answers for the proxy VIPs too: one socket per instance.
With proxy VIPs only (``own_control=True``), it opens ``lb.control_socket``
itself and answers it on a thread of its own; the event loop never waits on a
control client, and the snapshot itself is taken on the loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from v6lb.engines.control import (
    ControlError,
    ControlServer,
    add_status_section,
    remove_status_section,
)
from v6lb.model.config import Config

from .server import ProxyServer, serve
from .status import ProxyStatus, instance_status

__all__ = ["run_proxies"]


def run_proxies(
    config: Config,
    *,
    engine: str,
    stop: threading.Event,
    file: str,
    netns: str | None = None,
    own_control: bool = True,
    on_ready: Callable[[ProxyServer], None] | None = None,
) -> dict[str, Any]:
    """Serve the proxy VIPs until ``stop`` is set; the engine's final counters.

    Raises :class:`~v6lb.engines.control.ControlError` before any
    VIP is served when the control socket cannot be opened.
    """
    status = ProxyStatus(config, engine)
    control: ControlServer | None = None
    answering: threading.Thread | None = None
    if own_control:
        started = time.time()

        def base(request: Mapping[str, Any]) -> dict[str, Any]:
            return instance_status(config, path=file, netns=netns, engine=engine, started=started)

        path = config.lb.control_socket
        try:
            control = ControlServer(path, {"status": base})
        except OSError as exc:
            raise ControlError(
                f"cannot open the control socket {path}: {exc.strerror or exc}; fix: run as"
                " root, or give a writable path with lb.control_socket (or --control-socket)"
            ) from None
    add_status_section("proxy", status.section)
    try:
        if control is not None:
            answering = control.serve_thread(stop)
        return serve(config, proxy=engine, stop_event=stop, status=status, on_ready=on_ready)
    finally:
        stop.set()
        if answering is not None:
            answering.join(5)
        if control is not None:
            control.close()
        remove_status_section("proxy")
