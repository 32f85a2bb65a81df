"""The GPU test tier (``pytest -m gpu``): marker, skip rule and fixtures of the tests in this folder.

Every test here gets the ``gpu`` marker and is skipped without a CUDA device, so the CPU suite (plain ``pytest``)
only collects and skips them. ``LLAVAKIT_GPU_TESTS_ON_CPU=1`` is a dry run: the same tests on the CPU (``device`` is
then ``cpu``), to catch Python errors before a run on a GPU machine; tests of CUDA-only kernels (liger, torch's
``varlen_attn``) skip there with their reason (`gpu_helpers.skip_in_dry_run`). Helpers live in ``gpu_helpers.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpu_helpers import DRY_RUN, HERE, SKIP_REASON


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """The training tests' 48-scene synthetic LLaVA dataset (align.json, finetune.json, images/)."""
    from llavakit.data.synth import SynthConfig, generate_synth

    return generate_synth(tmp_path_factory.mktemp("synth"), SynthConfig(n_train=48, n_heldout=1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests ``gpu``; skip them without CUDA unless this is the dry run."""
    skip = not DRY_RUN and not torch.cuda.is_available()
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.gpu)
            if skip:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture
def device() -> torch.device:
    """``cuda`` on a GPU machine; ``cpu`` in the dry run."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture
def world_of_one():
    """A one-process default process group (NCCL on CUDA, gloo on CPU) for FSDP2, destroyed after the test."""
    import torch.distributed as dist

    from llavakit.distributed import init_distributed

    existed = dist.is_initialized()
    context = init_distributed(needs_process_group=True)
    yield context
    if not existed and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def fresh_model(preset_parts):
    """``fresh_model(name, **from_parts_kwargs)`` → a `LlavaNextModel` of preset ``name``, the same weights every call.

    Unlike ``preset_model``, the preset's folders are written before seeding: writing them consumes random numbers,
    so the first ``preset_model(name)`` of a session gets another projector than the later ones.
    """
    from llavakit.model.llava_next import LlavaNextModel

    def build(name: str, **kwargs: Any) -> LlavaNextModel:
        parts = preset_parts(name)
        torch.manual_seed(0)
        return LlavaNextModel.from_parts(**{**parts.from_parts_kwargs(), **kwargs})

    return build
