"""curl in a lab namespace from a chosen source port (lab trace, npt trace)."""

from __future__ import annotations

import json
import random
import subprocess
from typing import Any

from v6lb.lab.plan import LabError


def curl(
    ns: str, url: str, body: bytes | None, fixed: int = 0
) -> tuple[int, dict[str, Any] | None, str]:
    """One curl request in namespace ``ns``, from a port in 40000-59999.

    The port is chosen so the simulator can replay the flow from the same port.

    ``fixed``: from that port only (to repeat a trace's flows exactly).
    """
    for _ in range(1 if fixed else 8):
        port = fixed or random.randint(40000, 59999)
        argv = ["ip", "netns", "exec", ns, "curl", "-6", "-s", "-S", "-m", "10"]
        argv += ["--local-port", str(port)]
        if body is not None:
            argv += ["--data-binary", "@-", "-H", "Content-Type: application/octet-stream"]
        r = subprocess.run(argv + [url], input=body, capture_output=True, timeout=30, check=False)
        if r.returncode == 45:  # the port is taken: pick another
            continue
        if r.returncode != 0:
            raise LabError(
                f"curl {url} from port {port} failed (exit {r.returncode}): "
                + r.stderr.decode(errors="replace").strip()
            )
        try:
            answer = json.loads(r.stdout)
        except ValueError:
            answer = None
        return port, answer, r.stdout.decode(errors="replace")[:200]
    raise LabError(f"curl {url}: no free local port after 8 tries")
