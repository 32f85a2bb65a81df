"""Loading a checkpoint straight into FSDP2 shards: no rank ever holds the whole model.

Why: the plain path (`llavakit.model.checkpoint.load_checkpoint` on every rank, then ``fully_shard``) builds the
whole model in fp32 and reads the whole state dict on every rank before sharding: about 3x the checkpoint's bytes
per rank for a bf16 checkpoint (a 72B model: hundreds of GB of host memory per rank), and a slow start. Here:

1. `meta_model` builds the model from ``config.json`` with its parameters on the meta device (no storage) and
   checks every checkpoint key and shape against it; nothing is read yet.
2. The FSDP2 strategy shards the meta model with ``fully_shard`` (each parameter becomes a DTensor split along
   dim 0), then calls `materialise`: ``to_empty`` allocates only this rank's shards, in the training dtype, and
   each rank reads exactly its rows of every tensor from the safetensors files.

Each rank reads its own slices rather than rank 0 reading and scattering: every rank's memory stays about 1/W of
the model (rank 0 never holds a full tensor set), no collective moves weights (a scatter would send W-1 shards
over the network that every node can read from the shared checkpoint folder anyway), and the files are read in
parallel.

Rows are read with plain positioned reads at the offsets of the safetensors header (the format is a JSON header
of dtype, shape and byte range per tensor, then row-major data, so a dim-0 row range is one contiguous byte range),
not through ``safetensors.safe_open``: that maps the file, and every mapped page a rank touches counts toward its
resident memory until the file is closed (measured: about 0.5x the checkpoint per rank on top of the shards with
2 ranks). A read buffer lives only until its rows are copied into the shard.

FSDP2 shards dim 0 like ``torch.chunk``: rank r holds rows ``[r*c, min((r+1)*c, n))`` with ``c = ceil(n / W)``
(the last ranks' shards are shorter or empty, padded internally). `materialise` checks each local shard's shape
against that rule and fails loudly if a torch release ever shards differently.

Buffers: `empty_parameters` puts parameters on the meta device but computes buffers on the CPU as their modules'
constructors do. Non-persistent buffers (RoPE ``inv_freq``, vision position ids) are not in the checkpoint;
building them under ``torch.device("meta")`` would leave them to be recomputed by each module's own logic, which
differs between transformers releases. ``to_empty`` also replaces buffers with uninitialised memory, so
`materialise` puts the constructed buffers back, then loads any persistent buffer the checkpoint holds.

Tied weights (``tie_word_embeddings``) stay one parameter: FSDP2 shards it once, and it is read once, under
whichever of its names the checkpoint holds.

DCP resume checkpoints (`llavakit.training.checkpoint`) already load shard by shard into the sharded model; a
resumed stage first materialises from the stage's model checkpoint as above, then DCP overwrites the shards.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from llavakit.errors import CheckpointError
from llavakit.model.checkpoint import (
    build_skeleton,
    from_disk_key,
    match_checkpoint,
    unreadable_weights,
    weight_files,
)
from llavakit.model.llava_next import LlavaNextModel, cast_parameters

# Where `meta_model` leaves the checkpoint a meta model is to be filled from, until `materialise` takes it.
_SOURCE_ATTRIBUTE = "_llavakit_sharded_source"


@dataclass(frozen=True)
class ShardedSource:
    """The checkpoint a meta model's parameters are read from.

    Attributes:
        path: the checkpoint folder (named in errors).
        keys: our state-dict name → the checkpoint key holding it (a tied ``lm_head`` may have none).
        entries: checkpoint key → where its data is.
    """

    path: Path
    keys: dict[str, str]
    entries: dict[str, TensorEntry]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, from its header.

    Attributes:
        file: the file.
        dtype: its dtype on disk.
        shape: its shape.
        offset: the byte offset of its (row-major) data in the file.
    """

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one index of dim 0 (of the whole tensor for a scalar)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize


@dataclass(frozen=True)
class LoadStats:
    """What `materialise` did on this rank.

    Attributes:
        bytes_read: bytes of the tensor rows read from the files, in their on-disk dtype.
        bytes_materialised: bytes of this rank's parameter shards and buffers, in the training dtype.
    """

    bytes_read: int
    bytes_materialised: int


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Inside, every parameter a module registers moves to the meta device; buffers stay as constructed (CPU).

    Constructors still run their initialisers, on meta tensors, which costs nothing. The parameter briefly exists
    as the constructor's ``torch.empty`` on the CPU first: allocated, never written, so never paged in.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            if type(param) is not nn.Parameter:
                raise CheckpointError(
                    f"{type(module).__name__}.{name} is a {type(param).__name__}, which cannot be built without "
                    "storage; load this model with strategy.name=ddp or single"
                )
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def meta_model(path: Path, attn_implementation: str | None, dtype: torch.dtype | None) -> LlavaNextModel:
    """The model of a llava-hf checkpoint folder with meta parameters in ``dtype``, to be sharded then filled.

    Args:
        path: the checkpoint folder.
        attn_implementation: as for `LlavaNextModel.from_pretrained`.
        dtype: the training dtype of the parameters; None keeps the checkpoint's saved dtype.

    Raises:
        CheckpointError: the files' keys or shapes do not match the config (before any weight is read).
    """
    with empty_parameters():
        model, saved_dtype = build_skeleton(LlavaNextModel, path, attn_implementation)
    cast_parameters(model, dtype or saved_dtype)
    entries = {key: entry for file in weight_files(path) for key, entry in read_header(file).items()}
    shapes = {key: entry.shape for key, entry in entries.items()}
    base = model.llm.base_model_prefix
    keys = match_checkpoint(model, shapes, path, lambda key: from_disk_key(key, base))
    setattr(model, _SOURCE_ATTRIBUTE, ShardedSource(path, keys, entries))
    return model.eval()


def take_source(model: nn.Module) -> ShardedSource | None:
    """The checkpoint `meta_model` attached to ``model`` (removed from it), or None for a model with weights."""
    source = getattr(model, _SOURCE_ATTRIBUTE, None)
    if source is not None:
        delattr(model, _SOURCE_ATTRIBUTE)
    return source


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file (8-byte little-endian header size, JSON header, data), checked.

    Raises:
        CheckpointError: a header that does not parse, an unknown dtype or a byte range that does not fit the shape.
    """
    try:
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        entries = {}
        for key, info in header.items():
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{key}: {end - begin} bytes for shape {shape} in {info['dtype']}")
            entries[key] = TensorEntry(file, dtype, shape, 8 + size + begin)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise unreadable_weights(file, err) from None
    return entries


# safetensors dtype names → torch dtypes (those a llava-hf checkpoint can hold).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_rows(handle: BinaryIO, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of dim 0 of ``entry`` (of a scalar: the scalar, with ``0, 1``), in its dtype."""
    buffer = bytearray((stop - start) * entry.row_bytes)
    handle.seek(entry.offset + start * entry.row_bytes)
    if handle.readinto(buffer) != len(buffer):
        raise CheckpointError(f"{entry.file} ends inside a tensor; re-download or re-save it")
    shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
    return torch.frombuffer(buffer, dtype=entry.dtype).reshape(shape)


@torch.no_grad()
def materialise(model: nn.Module, source: ShardedSource, device: torch.device) -> LoadStats:
    """Allocate this rank's shards of the (``fully_shard``-ed) meta ``model`` on ``device`` and read them.

    Args:
        model: a `meta_model` after ``fully_shard``; parameters are DTensors sharded on dim 0 of a 1-D mesh.
        source: its checkpoint (`take_source`).
        device: where the shards live (the CPU under FSDP2's CPU offload).

    Raises:
        CheckpointError: a file that does not read, or a shard that is not FSDP2's dim-0 chunk of its parameter.
    """
    buffers = dict(model.named_buffers())
    model.to_empty(device=device)
    for name, buffer in buffers.items():
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, buffer)
    read = 0
    with contextlib.ExitStack() as stack:
        files = {entry.file for entry in source.entries.values()}
        handles = {file: stack.enter_context(file.open("rb", buffering=0)) for file in files}
        for names, tensor in _unique_tensors(model):
            key = next((source.keys[name] for name in names if name in source.keys), None)
            if key is None:
                continue  # a buffer the checkpoint does not hold (computed by its module)
            entry = source.entries[key]
            if isinstance(tensor, DTensor):
                local, (start, stop) = tensor.to_local(), _local_rows(tensor, names[0], source.path)
            else:  # buffers are replicated: every rank reads all of them
                local, start, stop = tensor, 0, entry.shape[0] if entry.shape else 1
            if stop == start:
                continue  # an empty last shard
            part = _read_rows(handles[entry.file], entry, start, stop)
            local.copy_(part)
            read += part.numel() * part.element_size()
    materialised = sum(
        (t.to_local() if isinstance(t, DTensor) else t).untyped_storage().nbytes()
        for _, t in _unique_tensors(model)
    )
    return LoadStats(bytes_read=read, bytes_materialised=materialised)


def _unique_tensors(model: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """Each parameter and buffer once, with all the names it goes by (tied weights have several)."""
    named: dict[int, tuple[list[str], torch.Tensor]] = {}
    entries = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in entries:
        named.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(named.values())


def _local_rows(tensor: DTensor, name: str, path: Path) -> tuple[int, int]:
    """``[start, stop)`` of dim 0 this rank holds of the sharded ``tensor``."""
    mesh, local = tensor.device_mesh, tensor.to_local()
    if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        raise CheckpointError(
            f"{name} is sharded as {tensor.placements} over a {mesh.ndim}-D mesh; loading {path} shard by shard "
            "expects FSDP2's Shard(0) over one mesh dimension"
        )
    rows, world = tensor.shape[0], mesh.size()
    chunk = math.ceil(rows / world)
    start = min(mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if local.shape[0] != stop - start:
        raise CheckpointError(
            f"{name}: this rank's shard has {local.shape[0]} rows, but FSDP2's dim-0 chunking of {rows} rows over "
            f"{world} ranks gives rows [{start}, {stop}); this torch release shards differently, so {path} cannot "
            "be loaded shard by shard"
        )
    return start, stop
