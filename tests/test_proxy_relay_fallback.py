"""proxy-l4 ``relay: kernel`` where the kernel relay cannot load: one log line, user space.

The relay itself (half-close, resets, backpressure, timeouts, counters, PROXY v2) is
tested in test_proxy_l4.py, every test with both relays.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_proxy_fixtures import _LOOP, Backend_, l4_vip, loop_kind, run  # noqa: F401 (autouse)
from v6lb.engines.proxy import ProxyServer, kernel_relay
from v6lb.model.config import Relay

pytestmark = pytest.mark.timeout(60)
SRC = Path(__file__).resolve().parents[1] / "src"


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.readexactly(52)  # the PROXY v2 header
    while data := await r.read(1000):
        w.write(data)
    w.write_eof()


async def _relay_once(log: list[str]) -> tuple[bytes, ProxyServer]:
    be = await Backend_(_echo).start()
    async with ProxyServer([l4_vip([be.port], relay=Relay.KERNEL)], log=log.append) as s:
        r, w = await asyncio.open_connection("::1", s.addresses("tcp")[0][1])
        w.write(b"ping")
        await asyncio.sleep(0.1)
        w.write_eof()
        got = await asyncio.wait_for(r.read(), 5)
        w.close()
    await be.stop()
    return got, s


def test_missing_object_falls_back_with_one_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_relay, "OBJECT", Path("/nonexistent/sockmap_relay.o"))
    log: list[str] = []
    got, s = run(_relay_once(log))
    assert got == b"ping" and s.kernel_relay is None
    said = [line for line in log if "relay" in line]
    assert said == [
        "proxy-l4 relay: kernel: unavailable (/nonexistent/sockmap_relay.o is missing (build"
        " it with `make xdp`)); relaying in user space instead"
    ]


CHILD = """
import asyncio, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import test_proxy_fixtures as f
import test_proxy_relay_fallback as t
f._LOOP[0] = sys.argv[3]
log = []
got, s = f.run(t._relay_once(log))
print(got.decode(), s.kernel_relay is None, [x for x in log if "relay" in x])
"""


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to drop capabilities)")
def test_process_without_bpf_capabilities_falls_back() -> None:
    """bpf(2) refused, as in a container or a locked-down host: root without CAP_BPF,
    CAP_SYS_ADMIN and CAP_PERFMON (setpriv drops them from the bounding set)."""
    assert kernel_relay.OBJECT.is_file(), "`make xdp` builds it"
    tests = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        ["setpriv", "--bounding-set=-bpf,-sys_admin,-perfmon", "--", sys.executable]
        + ["-c", CHILD, str(SRC), tests, _LOOP[0]],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=True,
    ).stdout.strip()
    assert out == (
        "ping True ['proxy-l4 relay: kernel: unavailable (bpftool prog load: Operation not"
        " permitted); relaying in user space instead']"
    )
