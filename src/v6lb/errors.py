"""The error root: every error a command reports carries a message, a fix and an exit code.

Exit codes are decided here and nowhere else:

- 2 (:class:`UsageError`): the command line or the config file is wrong; nothing was
  changed. The fix says what to change.
- 1 (:class:`RuntimeFailure`): the request was valid but the host refused it (a kernel
  rule failed to install, a control socket did not answer, a process died).

Lower layers raise their own exceptions (``ConfigError``, ``KernelError``,
``ControlError``, ...); each subclasses one of these two, or the CLI maps it once in
:func:`v6lb.cli.main`. Leaf module: imports nothing from v6lb.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["EXIT_RUNTIME", "EXIT_USAGE", "RuntimeFailure", "UsageError", "V6lbError"]

EXIT_USAGE = 2
EXIT_RUNTIME = 1


class V6lbError(Exception):
    """Base of every error v6lb reports to a user: ``message``, ``fix`` and ``exit_code``."""

    exit_code: ClassVar[int] = EXIT_RUNTIME

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        # one "fix:" part: an error wrapping another's text keeps the inner, specific fix
        if self.fix and self.fix not in self.message and "fix: " not in self.message:
            return f"{self.message}; fix: {self.fix}"
        return self.message


class UsageError(V6lbError):
    """The command line or the config is wrong (exit 2); nothing was changed."""

    exit_code: ClassVar[int] = EXIT_USAGE


class CommandLineError(UsageError):
    """The command line itself is wrong (exit 2): the CLI prints the command's usage too."""


class RuntimeFailure(V6lbError):
    """A valid request failed on this host (exit 1)."""

    exit_code: ClassVar[int] = EXIT_RUNTIME
