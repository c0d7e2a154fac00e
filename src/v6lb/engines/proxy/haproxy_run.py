"""``--proxy haproxy``: render haproxy.cfg and run Debian's haproxy until told to stop."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from v6lb.model.config import Config
from v6lb.render.haproxy import render_haproxy

__all__ = ["check_config", "run_haproxy"]


def _binary() -> str:
    path = shutil.which("haproxy")
    if path is None:
        raise RuntimeError("--proxy haproxy needs haproxy on PATH (apt-get install haproxy)")
    return path


def check_config(text: str) -> tuple[bool, str]:
    """``haproxy -c`` on a rendered config: (valid, haproxy's output)."""
    with tempfile.TemporaryDirectory(prefix="v6lb-haproxy-") as d:
        cfg = Path(d) / "haproxy.cfg"
        cfg.write_text(text)
        r = subprocess.run(
            [_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
        )
        return r.returncode == 0, r.stdout + r.stderr


def run_haproxy(
    config: Config,
    *,
    stop_event: threading.Event | None = None,
    poll: float = 0.2,
    **render: Any,
) -> dict[str, Any]:
    """Run haproxy in the foreground on the rendered config until ``stop_event`` is set."""
    text = render_haproxy(config, **render)
    ok, out = check_config(text)
    if not ok:
        raise RuntimeError(f"haproxy rejects the rendered config:\n{out}")
    with tempfile.TemporaryDirectory(prefix="v6lb-haproxy-") as d:
        cfg = Path(d) / "haproxy.cfg"
        cfg.write_text(text)
        proc = subprocess.Popen([_binary(), "-db", "-f", str(cfg)])
        try:
            while proc.poll() is None:
                if stop_event is not None and stop_event.wait(poll):
                    break
                if stop_event is None:
                    proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        return {"engine": "haproxy", "config": str(cfg), "exit": proc.returncode}
