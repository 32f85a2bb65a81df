"""lmms-eval's task modules, the oracle of every benchmark test."""

from __future__ import annotations

import pytest


@pytest.fixture
def lmms_eval_task():
    """``lmms_eval_task("mme")`` → lmms-eval's ``tasks.mme.utils`` module (scripts/install.sh installs lmms-eval)."""
    import importlib

    def get(name: str, module: str = "utils"):
        return importlib.import_module(f"lmms_eval.tasks.{name}.{module}")

    return get
