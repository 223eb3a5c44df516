"""Refuse to run the HIL tests without their plugin, saying how to load it."""

from __future__ import annotations

import pytest

PLUGIN = "hil_tests.plugin"


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN):
        raise pytest.UsageError(f"hil_tests needs its pytest plugin: add -p {PLUGIN} (e.g. pytest hil_tests -p "
                                f"{PLUGIN} --hil-target local); see docs/hil.md")
