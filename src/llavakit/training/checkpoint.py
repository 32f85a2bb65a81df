"""Resumable, sharded, atomically written training checkpoints (torch.distributed.checkpoint).

Why: upstream resumes through HF Trainer and breaks for projector-only runs (haotian-liu/LLaVA#1164), and a crash
during ``save`` can leave a half-written ``checkpoint-N`` that the next run then tries to resume from. Here:

    <stage_dir>/checkpoints/
        .partial-step-000020/   <- being written (ignored by resume; removed on the next start)
        step-000010/            <- complete: renamed from .partial-* only after every rank finished writing
            __0_0.distcp ...    model + optimizer, one shard file per rank (DCP; works for single/DDP/FSDP2)
            trainer_state.json  step, epoch, sampler position, loss history
            rank-00000.json         scheduler state, this rank's RNG scalars, the fp16 loss scaler's state (JSON)
            rank-00000.safetensors  this rank's RNG state arrays (torch, CUDA, numpy, Python)

A directory rename is atomic on POSIX, so a ``step-*`` folder is complete by construction. Only the newest
``keep`` checkpoints are kept. Checkpoints are written every ``save_every`` steps, never per step.

Nothing here is unpickled: unpickling a file runs whatever code it names, and checkpoint folders get copied between
machines and people. Our own files are JSON and safetensors; DCP's ``.metadata`` is a pickle (torch writes it with
``pickle.dump`` and reads it back with a plain ``pickle.load``), so we read it with an unpickler that only admits the
classes DCP's metadata is made of, and DCP's non-tensor values (optimizer hyper-parameters) with
``torch.load(weights_only=True)``. Checkpoints from older llavakit versions hold a pickled ``rank-XXXXX.pt``; they
are refused with a conversion recipe (:data:`LEGACY_CONVERSION`) instead of being unpickled.

QLoRA: bitsandbytes' quantised base weights (`llavakit.training.lora.quantised_params`, found by identity, so
under any wrapper's names) and their quantisation constants (``absmax``, ``quant_map``, ``quant_state.*``) are left
out: they are frozen and rebuilt identically from the model source when the stage's model is rebuilt (and 4-bit
modules cannot load their constants back), so a checkpoint holds no base bytes. The load is non-strict for exactly
those weights: any other missing or unexpected key is a `CheckpointError`.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llavakit.distributed import DistContext, barrier
from llavakit.errors import CheckpointError
from llavakit.training.lora import quantised_params

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_QUANT_STATE = re.compile(
    r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*|SCB|weight_format)$"
)
# The globals a DCP ``.metadata`` pickle refers to (torch 2.13), besides torch dtypes.
_DCP_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
}
LEGACY_CONVERSION = (
    'python -c "import sys, torch; from llavakit.training.checkpoint import write_rank_state; '
    'f = sys.argv[1]; write_rank_state(f[:-3], **torch.load(f, weights_only=False))" {file}'
)
"""Shell one-liner that converts one old pickled ``rank-XXXXX.pt`` (``{file}``); run it only on files you trust."""


@dataclass
class TrainerState:
    """Loop position and history saved with every checkpoint.

    Attributes:
        step: optimizer steps done.
        epoch: current epoch (0-based).
        batches_in_epoch: micro-batches this rank consumed in ``epoch`` (the sampler resumes after them).
        tokens_seen: supervised tokens over all ranks so far.
        losses: mean loss of every optimizer step so far.
        world_size: ranks of the run that saved it (None in checkpoints of older llavakit versions).
        skipped_steps: steps (counted in ``step``) whose update an fp16 overflow skipped.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)
    world_size: int | None = None
    skipped_steps: int = 0


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
        return complete_checkpoints(self.directory)

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
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Path:
        """Write a checkpoint for ``state.step`` (collective: every rank must call it) and rotate old ones.

        ``grad_scaler``: the fp16 loss scaler, whose scale and growth tracker are saved (None: not fp16).

        Raises:
            CheckpointError: a file could not be written (e.g. the disk is full); the partial save is removed and
                the previous checkpoints are untouched, so a re-run resumes from the newest of them.
        """
        final = self.directory / f"step-{state.step:06d}"
        partial = self.directory / f".partial-{final.name}"
        try:
            self._write(partial, model, optimizer, scheduler, state, grad_scaler)
        except (OSError, CheckpointException) as error:
            if self.context.is_main:
                shutil.rmtree(partial, ignore_errors=True)  # frees the space the failed save took
            raise CheckpointError(self._write_failure(final, error)) from error
        barrier(self.context)
        if self.context.is_main:
            partial.rename(final)
            self._rotate()
        barrier(self.context)
        return final

    def _write(
        self,
        partial: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: TrainerState,
        grad_scaler: torch.amp.GradScaler | None,
    ) -> None:
        """Write every file of a checkpoint into the ``partial`` folder (collective)."""
        if self.context.is_main:
            partial.mkdir(parents=True, exist_ok=True)
        barrier(self.context)
        model_state, optim_state = _state_dicts(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
        write_rank_state(
            partial / f"rank-{self.context.rank:05d}",
            scheduler.state_dict(),
            _rng_state(),
            None if grad_scaler is None else grad_scaler.state_dict(),
        )
        if self.context.is_main:
            saved = {**asdict(state), "world_size": self.context.world_size}
            (partial / "trainer_state.json").write_text(json.dumps(saved))

    def _write_failure(self, final: Path, error: BaseException) -> str:
        """The message for a save that could not be written (a full disk, a quota, a lost mount)."""
        cause = _os_error(error)
        reason = f"{cause.strerror} ({cause.filename})" if cause.strerror else str(cause)
        latest = self.latest()
        kept = (
            f"the newest complete checkpoint, {latest.name}, is intact and a re-run resumes from it"
            if latest
            else "no earlier checkpoint exists, so a re-run starts the stage from its first step"
        )
        return (
            f"could not write checkpoint {final.name} in {self.directory}: {reason}. The partial save was removed; "
            f"{kept}. Free disk space (or move run_dir to a larger disk) and run the same command again"
        )

    def _rotate(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old)

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> TrainerState:
        """Restore model, optimizer, scheduler, this rank's RNG and the fp16 ``grad_scaler`` from ``path``; returns
        the loop state.

        Raises:
            CheckpointError: files are missing, were written with a different world size, or hold a loss scaler
                state where ``grad_scaler`` is None or none where it is not (fp16 on one side only).
        """
        check_world_size(path, self.context.world_size)
        stem = path / f"rank-{self.context.rank:05d}"
        state_file = path / "trainer_state.json"
        _refuse_legacy(stem)
        rank_files = [stem.with_suffix(".json"), stem.with_suffix(".safetensors")]
        if not all(file.is_file() for file in [*rank_files, state_file]):
            raise CheckpointError(
                f"checkpoint {path} lacks {' or '.join(file.name for file in rank_files)} or trainer_state.json: it "
                "was written with a different world size or by another tool; resume with the same number of ranks "
                "or start a new run_dir"
            )
        reader = _SafeFileSystemReader(path)
        reader.read_metadata()  # raises a refusal here: inside dcp.load it would be wrapped and reworded
        model_state, optim_state = _state_dicts(model, optimizer)
        bundle = {"model": model_state, "optim": optim_state}
        dcp.load(bundle, storage_reader=reader, planner=_SafeLoadPlanner())
        _load_model_state(model, bundle["model"], path)
        set_optimizer_state_dict(model, optimizer, bundle["optim"])
        scheduler_state, rng = read_rank_state(stem)
        scheduler.load_state_dict(scheduler_state)
        _set_rng_state(rng)
        _load_grad_scaler(stem, grad_scaler)
        return TrainerState(**json.loads(state_file.read_text()))


def _os_error(error: BaseException) -> BaseException:
    """The ``OSError`` behind a failed save: DCP wraps each rank's exception in a ``CheckpointException``."""
    if isinstance(error, CheckpointException):
        for failure in error.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, OSError):
                return inner
    return error


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in a stage's ``checkpoints`` folder, oldest first (partial saves are not listed)."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if _STEP_DIR.match(path.name)]
    return sorted(found, key=lambda path: int(_STEP_DIR.match(path.name).group(1)))


def saved_world_size(path: Path) -> int:
    """Ranks of the run that wrote checkpoint ``path``: recorded in ``trainer_state.json``, else (older checkpoints)
    the number of per-rank state files."""
    state_file = path / "trainer_state.json"
    if state_file.is_file():
        recorded = json.loads(state_file.read_text()).get("world_size")
        if recorded is not None:
            return int(recorded)
    return len({file.stem for file in path.glob("rank-*.*")})


def check_world_size(path: Path, world_size: int) -> None:
    """Refuse to resume checkpoint ``path`` with another number of ranks than the run that wrote it.

    Why not reshard: DCP could reshard the model and optimizer, but each rank's sampler position, scheduler and RNG
    stream belong to the layout that wrote them; a resumed run must see exactly the samples the uninterrupted one
    would have, so a different world size is a new run.

    Raises:
        CheckpointError: the world sizes differ; the message names both and the two ways out.
    """
    saved = saved_world_size(path)
    if saved != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by a run of {saved} rank(s) but this launch has {world_size}: relaunch "
            f"with {saved} rank(s) (torchrun --nnodes x --nproc_per_node = {saved}) to resume it, or delete "
            f"{path.parent} to restart the stage from its first step"
        )


def write_rank_state(
    stem: str | Path,
    scheduler: dict[str, Any],
    rng: dict[str, Any],
    grad_scaler: dict[str, Any] | None = None,
) -> None:
    """Write one rank's scheduler and RNG state as ``<stem>.json`` and ``<stem>.safetensors`` (no pickle).

    Args:
        stem: the files' path without suffix, e.g. ``<checkpoint>/rank-00000``.
        scheduler: ``scheduler.state_dict()``; plain numbers and lists for transformers' LambdaLR schedules.
        rng: as :func:`_rng_state` returns it (also the ``"rng"`` entry of an old ``rank-XXXXX.pt``).
        grad_scaler: ``GradScaler.state_dict()`` under fp16 (plain numbers), else None (not written).
    """
    stem = Path(stem)
    py_version, py_state, py_gauss = rng["python"]
    np_algorithm, np_keys, np_pos, np_has_gauss, np_cached = rng["numpy"]
    tensors = {
        "torch": rng["torch"],
        "python": torch.tensor(py_state, dtype=torch.int64),  # 624 uint32 words + position
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),  # 624 uint32 words
    }
    if "cuda" in rng:
        tensors["cuda"] = rng["cuda"]
    scalars = {
        "python": [py_version, py_gauss],
        "numpy": [np_algorithm, int(np_pos), int(np_has_gauss), float(np_cached)],
    }
    try:
        extra = {} if grad_scaler is None else {"grad_scaler": grad_scaler}
        values = json.dumps({"scheduler": scheduler, "rng": scalars, **extra})
    except TypeError as error:
        raise CheckpointError(
            f"scheduler state is not plain JSON ({error}); only schedules whose state_dict() holds numbers, "
            "strings and lists can be checkpointed"
        ) from error
    save_file(
        {name: tensor.contiguous() for name, tensor in tensors.items()}, str(stem.with_suffix(".safetensors"))
    )
    stem.with_suffix(".json").write_text(values)


def read_rank_state(stem: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read what :func:`write_rank_state` wrote: ``(scheduler state, rng state)``."""
    stem = Path(stem)
    values = json.loads(stem.with_suffix(".json").read_text())
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    py_version, py_gauss = values["rng"]["python"]
    np_algorithm, np_pos, np_has_gauss, np_cached = values["rng"]["numpy"]
    rng = {
        "python": (py_version, tuple(tensors["python"].tolist()), py_gauss),
        "numpy": (np_algorithm, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_cached),
        "torch": tensors["torch"],
    }
    if "cuda" in tensors:
        rng["cuda"] = tensors["cuda"]
    return values["scheduler"], rng


def read_grad_scaler_state(stem: str | Path) -> dict[str, Any] | None:
    """The fp16 loss scaler state :func:`write_rank_state` wrote to ``<stem>.json``, or None (not an fp16 run)."""
    return json.loads(Path(stem).with_suffix(".json").read_text()).get("grad_scaler")


def _load_grad_scaler(stem: Path, grad_scaler: torch.amp.GradScaler | None) -> None:
    """Restore the loss scale and growth tracker, refusing an fp16 state mismatch (never a silent reset)."""
    saved = read_grad_scaler_state(stem)
    if (saved is None) != (grad_scaler is None):
        written, running = ("with", "without") if saved is not None else ("without", "with")
        raise CheckpointError(
            f"checkpoint {stem.parent} was written {written} an fp16 loss scaler and this run is {running} one "
            "(strategy.mixed_precision changed): resume with the mixed_precision it was saved with, or start a "
            "new run_dir"
        )
    if grad_scaler is not None:
        grad_scaler.load_state_dict(saved)


def _refuse_legacy(stem: Path) -> None:
    """Refuse a checkpoint whose rank state is only in an old pickled ``rank-XXXXX.pt`` (never unpickle it)."""
    legacy = stem.with_suffix(".pt")
    if legacy.is_file() and not stem.with_suffix(".json").is_file():
        raise CheckpointError(
            f"{legacy} was written by an older llavakit as a pickle, and unpickling runs any code the file names, "
            "so llavakit no longer loads it. If you trust this checkpoint, convert each rank-*.pt in it once with\n  "
            + LEGACY_CONVERSION.format(file=legacy)
            + "\nand resume again; otherwise delete the checkpoint or start a new run_dir"
        )


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only the classes a DCP ``.metadata`` file is made of (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _DCP_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise CheckpointError(
                f"DCP metadata refers to {module}.{name}, which DCP metadata never holds: the file is corrupt or "
                "malicious, so it is not unpickled; restore the checkpoint from a trusted copy or start a new run_dir"
            )
        return super().find_class(module, name)


class _SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read by :class:`_SafeUnpickler` instead of a plain ``pickle.load``.

    ``read_metadata`` takes no ``rank``: we never write per-rank metadata, so DCP must not fall back to it.
    """

    def read_metadata(self) -> Metadata:  # type: ignore[override]
        path = Path(self.path) / ".metadata"
        try:
            with path.open("rb") as file:
                metadata = _SafeUnpickler(file).load()
        except FileNotFoundError as error:
            raise CheckpointError(
                f"{path} is missing: the checkpoint is incomplete; start a new run_dir"
            ) from error
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values are read with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state as DCP saves them, without bitsandbytes' quantised weights and constants."""
    model_state, optim_state = get_state_dict(model, optimizer)
    # A state dict holds a parameter detached: same storage, another tensor object.
    quantised = {param.data_ptr() for param in quantised_params(model)}
    kept = {
        key: value
        for key, value in model_state.items()
        if not (_QUANT_STATE.search(key) or (isinstance(value, torch.Tensor) and value.data_ptr() in quantised))
    }
    return kept, optim_state


def _load_model_state(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load ``state`` (from `_state_dicts`) into ``model``: every parameter and buffer but the quantised weights.

    Raises:
        CheckpointError: a key other than a quantised weight is missing, or one is unexpected.
    """
    result = set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    quantised = quantised_params(model)
    parameters = dict(model.named_parameters())
    missing = [key for key in result.missing_keys if parameters.get(key) not in quantised]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not fit this stage's model (missing: {missing[:3]}, unexpected: "
            f"{list(result.unexpected_keys)[:3]}): it was written for another model or LoRA setup; resume with the "
            "config that wrote it or start a new run_dir"
        )


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
