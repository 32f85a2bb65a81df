"""Resumable, sharded, atomically written training checkpoints (torch.distributed.checkpoint).

Why: upstream resumes through HF Trainer and breaks for projector-only runs (haotian-liu/LLaVA#1164), and a crash
during ``save`` can leave a half-written ``checkpoint-N`` that the next run then tries to resume from. Here:

    <stage_dir>/checkpoints/
        .partial-step-000020/   <- being written (ignored by resume; removed on the next start)
        step-000010/            <- complete: renamed from .partial-* only after every rank finished writing
            __0_0.distcp ...    model + optimizer, one shard file per rank (DCP; works for single/DDP/FSDP2)
            trainer_state.json  step, epoch, sampler position, loss history
            rank-00000.pt       scheduler state and this rank's RNG states

A directory rename is atomic on POSIX, so a ``step-*`` folder is complete by construction. Only the newest
``keep`` checkpoints are kept. Checkpoints are written every ``save_every`` steps, never per step.

bitsandbytes' quantisation constants (``absmax``, ``quant_map``, ``quant_state.*``: QLoRA) are left out: they are
frozen, rebuilt identically when the stage's model is rebuilt, and their modules cannot load them back.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from llavakit.distributed import DistContext, barrier
from llavakit.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_QUANT_STATE = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*|SCB|weight_format)$")


@dataclass
class TrainerState:
    """Loop position and history saved with every checkpoint.

    Attributes:
        step: optimizer steps done.
        epoch: current epoch (0-based).
        batches_in_epoch: micro-batches this rank consumed in ``epoch`` (the sampler resumes after them).
        tokens_seen: supervised tokens over all ranks so far.
        losses: mean loss of every optimizer step so far.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)


class CheckpointManager:
    """Saves, finds, loads and rotates checkpoints of one stage.

    Args:
        directory: ``<stage_dir>/checkpoints``.
        context: this process's rank and world.
        keep: how many complete checkpoints to keep (upstream ``save_total_limit``).
    """

    def __init__(self, directory: str | Path, context: DistContext, keep: int) -> None:
        self.directory = Path(directory)
        self.context = context
        self.keep = keep

    def remove_partial(self) -> None:
        """Delete folders left by a save that crashed (rank 0; call before training starts)."""
        if self.context.is_main and self.directory.is_dir():
            for stale in self.directory.glob(".partial-*"):
                shutil.rmtree(stale)
        barrier(self.context)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [path for path in self.directory.iterdir() if _STEP_DIR.match(path.name)]
        return sorted(found, key=lambda path: int(_STEP_DIR.match(path.name).group(1)))

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.complete()
        return found[-1] if found else None

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: TrainerState,
    ) -> Path:
        """Write a checkpoint for ``state.step`` (collective: every rank must call it) and rotate old ones."""
        final = self.directory / f"step-{state.step:06d}"
        partial = self.directory / f".partial-{final.name}"
        if self.context.is_main:
            partial.mkdir(parents=True, exist_ok=True)
        barrier(self.context)
        model_state, optim_state = _state_dicts(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
        torch.save(
            {"scheduler": scheduler.state_dict(), "rng": _rng_state()},
            partial / f"rank-{self.context.rank:05d}.pt",
        )
        if self.context.is_main:
            (partial / "trainer_state.json").write_text(json.dumps(asdict(state)))
        barrier(self.context)
        if self.context.is_main:
            partial.rename(final)
            self._rotate()
        barrier(self.context)
        return final

    def _rotate(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old)

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> TrainerState:
        """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns the loop state.

        Raises:
            CheckpointError: files are missing or were written with a different world size.
        """
        extra_file = path / f"rank-{self.context.rank:05d}.pt"
        state_file = path / "trainer_state.json"
        if not extra_file.is_file() or not state_file.is_file():
            raise CheckpointError(
                f"checkpoint {path} lacks {extra_file.name} or trainer_state.json: it was written with a different "
                "world size or by another tool; resume with the same number of ranks or start a new run_dir"
            )
        model_state, optim_state = _state_dicts(model, optimizer)
        bundle = {"model": model_state, "optim": optim_state}
        dcp.load(bundle, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"])
        extra = torch.load(extra_file, weights_only=False)
        scheduler.load_state_dict(extra["scheduler"])
        _set_rng_state(extra["rng"])
        return TrainerState(**json.loads(state_file.read_text()))


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state as DCP saves them, without bitsandbytes' quantisation constants."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {k: v for k, v in model_state.items() if not _QUANT_STATE.search(k)}, optim_state


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
