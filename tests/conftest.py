"""Shared pytest fixtures and the root/tool marker bookkeeping.

Tests marked ``root`` or ``tool`` record a ``needs_privilege`` property in the
JUnit report, so that ``.ci/run`` can fail the build if any of them was skipped:
CI runs as root and must exercise them.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("root") or item.get_closest_marker("tool"):
            item.user_properties.append(("needs_privilege", "1"))
