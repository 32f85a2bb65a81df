"""Checkpoints are read without unpickling anything: a malicious file is refused and never executed.

Unpickling runs whatever callable a pickle names, so a checkpoint folder from elsewhere must not be unpickled. These
tests scan the source for unsafe loads, plant malicious pickles (whose unpickling would create a marker file) in a
real checkpoint folder, and check that resume state still round-trips exactly without pickle.
"""

from __future__ import annotations

import ast
import pickle
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llavakit
from llavakit.distributed import init_distributed
from llavakit.errors import CheckpointError
from llavakit.training.checkpoint import LEGACY_CONVERSION, CheckpointManager, TrainerState, _rng_state
from llavakit.training.config import OptimConfig
from llavakit.training.optim import build_scheduler


class _CreatesMarker:
    """Unpickling this creates ``marker``: the stand-in for any code a malicious pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _calls(tree: ast.AST, module: str, name: str) -> list[ast.Call]:
    """Calls of ``module.name(...)`` (also through ``from module import name``)."""
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
        if alias.name == name
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            (
                isinstance(node.func, ast.Attribute)
                and node.func.attr == name
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == module
            )
            or (isinstance(node.func, ast.Name) and node.func.id in imported)
        )
    ]


def test_every_torch_load_in_the_source_is_weights_only():
    sources = sorted(Path(llavakit.__file__).parent.rglob("*.py"))
    loads, unsafe = 0, []
    for source in sources:
        tree = ast.parse(source.read_text(), filename=str(source))
        for call in _calls(tree, "torch", "load"):
            loads += 1
            flag = next((kw.value for kw in call.keywords if kw.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                unsafe.append(f"{source}:{call.lineno}")
        unsafe += [
            f"{source}:{call.lineno} (plain pickle)"
            for name in ("load", "loads")
            for call in _calls(tree, "pickle", name)
        ]
    assert loads > 0, "the scan found no torch.load at all: it is not looking at the source"
    assert unsafe == []


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1e-2, warmup_ratio=0.25, schedule="cosine"), 10)
    return model, optimizer, scheduler


def _manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(tmp_path / "checkpoints", init_distributed(needs_process_group=False), keep=2)


def _trained_checkpoint(tmp_path: Path, steps: int = 3) -> tuple[CheckpointManager, Path, tuple]:
    model, optimizer, scheduler = _parts()
    for _ in range(steps):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    manager = _manager(tmp_path)
    return (
        manager,
        manager.save(model, optimizer, scheduler, TrainerState(step=steps)),
        (model, optimizer, scheduler),
    )


def _draws() -> list[float]:
    """The next values of every generator a training step uses (including the cached Gaussians)."""
    return [
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.randn()),
        *torch.rand(3).tolist(),
    ]


def test_save_load_restores_rng_scheduler_and_optimizer_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state (gauss_next)
    np.random.randn()  # and in numpy's (has_gauss, cached_gaussian)
    manager, path, (model, optimizer, scheduler) = _trained_checkpoint(tmp_path)
    assert not list(path.glob("*.pt"))
    expected = _draws()
    scheduler_state = scheduler.state_dict()
    expected_lrs = [scheduler.get_last_lr(), *_lrs_after_steps(optimizer, scheduler)]

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    fresh_model, fresh_optimizer, fresh_scheduler = _parts(seed=5)
    state = manager.load(path, fresh_model, fresh_optimizer, fresh_scheduler)

    assert _draws() == expected
    assert state.step == 3
    assert fresh_scheduler.state_dict() == scheduler_state
    for key, tensor in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[key], tensor)
    saved_groups = fresh_optimizer.state_dict()["param_groups"]
    assert saved_groups[0]["weight_decay"] == 0.1 and saved_groups[0]["betas"] == (0.9, 0.999)
    assert [
        fresh_scheduler.get_last_lr(),
        *_lrs_after_steps(fresh_optimizer, fresh_scheduler),
    ] == expected_lrs


def _lrs_after_steps(optimizer, scheduler, steps: int = 3) -> list[list[float]]:
    lrs = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr())
    return lrs


def test_malicious_legacy_rank_file_is_refused_and_never_unpickled(tmp_path):
    manager, path, parts = _trained_checkpoint(tmp_path)
    (path / "rank-00000.json").unlink()
    (path / "rank-00000.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"scheduler": _CreatesMarker(marker), "rng": _rng_state()}, path / "rank-00000.pt")

    with pytest.raises(CheckpointError, match="older llavakit as a pickle") as error:
        manager.load(path, *_parts())
    assert "weights_only=False" in str(error.value) and "new run_dir" in str(error.value)
    assert not marker.exists()

    torch.load(path / "rank-00000.pt", weights_only=False)  # the file really is malicious: the test can fail
    assert marker.exists()


def test_malicious_dcp_metadata_is_refused_and_never_unpickled(tmp_path):
    manager, path, _ = _trained_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_CreatesMarker(marker)))

    with pytest.raises(CheckpointError, match=r"refers to io\.open.*corrupt or malicious"):
        manager.load(path, *_parts())
    assert not marker.exists()


def test_trusted_legacy_checkpoint_converts_with_the_documented_one_liner(tmp_path):
    random.seed(3)
    np.random.seed(4)
    manager, path, (_, _, scheduler) = _trained_checkpoint(tmp_path)
    legacy = path / "rank-00000.pt"
    torch.save({"scheduler": scheduler.state_dict(), "rng": _rng_state()}, legacy)  # the old format
    (path / "rank-00000.json").unlink()
    (path / "rank-00000.safetensors").unlink()
    expected = _draws()
    with pytest.raises(CheckpointError) as error:
        manager.load(path, *_parts())
    one_liner = LEGACY_CONVERSION.format(file=shlex.quote(str(legacy)))
    assert one_liner.replace(shlex.quote(str(legacy)), str(legacy)) in str(error.value)

    command = shlex.quote(sys.executable) + one_liner.removeprefix("python")
    subprocess.run(command, shell=True, check=True, capture_output=True)

    random.seed(99)
    model, optimizer, fresh_scheduler = _parts()
    manager.load(path, model, optimizer, fresh_scheduler)
    assert _draws() == expected
    assert fresh_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
