"""`llavakit.load` refuses a device it cannot use with a clear error, before reading the checkpoint."""

from __future__ import annotations

import pytest
import torch

import llavakit
from llavakit.errors import ConfigError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_a_cpu_only_machine(tmp_path):
    with pytest.raises(ConfigError, match="no CUDA device; use --device cpu"):
        llavakit.load(tmp_path / "never-read", device="cuda")


def test_unknown_device_string(tmp_path):
    with pytest.raises(ConfigError, match="not a torch device"):
        llavakit.load(tmp_path / "never-read", device="gpu0")
