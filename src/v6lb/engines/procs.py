"""What ``/proc`` says of a process: its state letter (proc(5))."""

from __future__ import annotations

from pathlib import Path

__all__ = ["process_state"]


def process_state(pid: int) -> str:
    """The state of ``pid`` in ``/proc/PID/stat``: R running or runnable, S sleeping, Z zombie...

    The field after the command name, which is in parentheses and may hold ")" itself:
    hence the last one. OSError when there is no such process (FileNotFoundError) or
    ``/proc`` cannot be read.
    """
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
