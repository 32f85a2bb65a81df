"""Fixtures for the AnyRes tests (helpers live in ``anyres_helpers`` so test modules can import them by a unique name)."""

from __future__ import annotations

import pytest
from anyres_helpers import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer with ``<image>`` as a special token, built offline once per session."""
    return build_tiny_tokenizer()
