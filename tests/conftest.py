"""Shared pytest fixtures and the root/tool marker bookkeeping.

Tests marked ``root`` or ``tool`` record a ``needs_privilege`` property in the
JUnit report, so that ``.ci/run`` can fail the build if any of them was skipped:
CI runs as root and must exercise them.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

# Property tests check correctness, not speed (benchmarks/ measure speed): on a loaded
# 2-core CI machine one example can take longer than hypothesis's 200 ms default
# deadline, which would fail a correct test. Tests that set their own settings keep them.
settings.register_profile("v6lb", deadline=None)
settings.load_profile("v6lb")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("root") or item.get_closest_marker("tool"):
            item.user_properties.append(("needs_privilege", "1"))
