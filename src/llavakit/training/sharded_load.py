"""Loading a checkpoint straight into FSDP2 shards: no rank ever holds the whole model.

Why: the plain path (`llavakit.model.checkpoint.load_checkpoint` or ``LlavaNextModel.from_parts`` on every rank,
then ``fully_shard``) builds the whole model and reads the whole state dict on every rank before sharding: about 3x
the checkpoint's bytes per rank for a bf16 checkpoint (a 72B model: hundreds of GB of host memory per rank), and a
slow start. Here:

1. The model is built with its parameters on the meta device (no storage) and every parameter is given a source
   (`ShardedSource`): a tensor of a safetensors file, found from the files' headers and checked key by key and
   shape by shape against the model before anything is read, or a whole tensor held in memory (below).
   - `meta_model`: a llava-hf checkpoint folder (``model.path``, the previous stage's export), built from its
     ``config.json``.
   - `meta_model_from_parts`: a fresh model from a vision checkpoint and a causal LM checkpoint (``model.vision`` +
     ``model.llm``, or a preset's parts), built by ``LlavaNextModel.from_parts`` with a parts loader that builds
     each part from its ``config.json`` as transformers' ``from_pretrained`` does and matches its parameter names
     to its files' keys (the part's own names, or under ``vision_model.`` / the model's base prefix, as
     transformers maps them; keys the model lacks, such as CLIP's text tower, are ignored as transformers ignores
     them). ``from_parts`` then initialises the projector and ``image_newline`` for real, from the same seeded
     generator state as the plain path (building the parts without weights draws no random numbers, and neither
     does ``from_pretrained`` when the files hold every weight), so their values are bit-identical to the plain
     path's; they are kept whole as in-memory sources (every rank computes the same values). A tokenizer longer
     than the LLM's vocabulary (``<image>`` added) makes ``from_parts`` grow the embeddings with transformers'
     ``resize_token_embeddings``, whose new rows are drawn from the mean and covariance of all the old ones: the
     input and output embeddings are then read whole on each rank before the resize, and kept whole.
   - `load_projector_file`: upstream's projector file (``model.pretrained_projector``, small) read whole on each
     rank and checked as `llavakit.model.projector.load_upstream_projector_state` checks it, replaces the
     projector's source.
   - `meta_model_from_original`: an original-layout LLaVA folder (``model.path``; what upstream's ``train.py``
     saves and SGLang serves), built from the config `llavakit.conversion.original.original_layout` translates,
     each parameter's source being its original key (`llavakit.conversion.original.original_to_ours`) in the
     folder's files, or, when the folder holds no tower weights, its key in the files of the tower its
     ``mm_vision_tower`` names. A tokenizer without ``<image>`` grows the embeddings as for parts (read whole,
     resized, kept whole).
   Parts or original folders saved only as ``.bin`` pickles (``pytorch_model.bin``) cannot be read by rows: each
   rank reads them whole (`llavakit.model.tensor_files.read_tensor_file`, weights only) and keeps them until the
   shards are filled, so convert large ``.bin`` checkpoints to safetensors.
2. The FSDP2 strategy shards the meta model with ``fully_shard`` (each parameter becomes a DTensor split along
   dim 0), then calls `materialise`: ``to_empty`` allocates only this rank's shards, in the training dtype, and
   each rank reads exactly its rows of every tensor from the safetensors files, or copies them from the
   in-memory tensors.

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
import copy
import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import (
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from llavakit.conversion.original import (
    add_image_token,
    original_layout,
    original_saved_dtype,
    original_to_ours,
    original_weight_files,
)
from llavakit.errors import CheckpointError
from llavakit.model.checkpoint import (
    build_skeleton,
    from_disk_key,
    match_checkpoint,
    unreadable_weights,
    weight_files,
)
from llavakit.model.llava_next import LlavaNextModel, cast_parameters
from llavakit.model.projector import load_upstream_projector_state
from llavakit.model.tensor_files import read_tensor_file
from llavakit.model.tokenizer import ensure_image_token
from llavakit.model.vision import VISION_BACKBONES, VisionBackbone, backbone_for_model_type

# Where `meta_model` leaves the checkpoint a meta model is to be filled from, until `materialise` takes it.
_SOURCE_ATTRIBUTE = "_llavakit_sharded_source"


@dataclass(frozen=True)
class ShardedSource:
    """Where each parameter of a meta model is read from.

    Every parameter and persistent buffer has a source key: a tensor of a safetensors file (read row range by row
    range) or a whole tensor held in memory (fresh initial values, an upstream projector file, a ``.bin`` part).

    Attributes:
        origin: what the model is loaded from (named in errors).
        keys: our state-dict name → its source key (a tied ``lm_head`` may have none).
        entries: source key → where its data is in a file.
        values: source key → the whole tensor, for keys not in ``entries``.
    """

    origin: str
    keys: dict[str, str]
    entries: dict[str, TensorEntry]
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of the tensor under ``key``."""
        return tuple(self.values[key].shape) if key in self.values else self.entries[key].shape


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
    cast_parameters(model, dtype or original_saved_dtype(path))
    entries = {key: entry for file in weight_files(path) for key, entry in read_header(file).items()}
    shapes = {key: entry.shape for key, entry in entries.items()}
    base = model.llm.base_model_prefix
    keys = match_checkpoint(model, shapes, path, lambda key: from_disk_key(key, base))
    setattr(model, _SOURCE_ATTRIBUTE, ShardedSource(str(path), keys, entries))
    return model.eval()


def take_source(model: nn.Module) -> ShardedSource | None:
    """The checkpoint `meta_model` attached to ``model`` (removed from it), or None for a model with weights."""
    source = getattr(model, _SOURCE_ATTRIBUTE, None)
    if source is not None:
        delattr(model, _SOURCE_ATTRIBUTE)
    return source


def meta_model_from_parts(parts: dict[str, Any], dtype: torch.dtype | None) -> LlavaNextModel:
    """The model `LlavaNextModel.from_parts` builds, with meta parameters, to be sharded then filled.

    The two parts are built from their ``config.json`` files without weights and checked key by key and shape by
    shape against their files (`_PartsOnMeta`) before anything is read. Parameters that ``from_parts`` initialises
    (projector, ``image_newline``, the embedding rows a grown vocabulary adds) are computed whole by the same code
    as on the plain path, from the same random numbers, then kept in memory as their own source and replaced by meta
    tensors. Call it where the plain path calls ``from_parts``: after seeding the generator.

    Args:
        parts: the keywords of ``from_parts`` except ``dtype`` (no ``llm_kwargs``: a quantised LLM is not sharded).
        dtype: the training dtype of the parameters (None: float32, as ``from_parts``).

    Raises:
        CheckpointError: a part's files miss a parameter or hold one of another shape than its config builds.
    """
    loader = _PartsOnMeta()
    model = LlavaNextModel.from_parts(**parts, dtype=dtype, load_parts=loader)
    keys = {f"vision_encoder.model.{name}": key for name, key in loader.keys["vision"].items()}
    keys.update({f"llm.{name}": key for name, key in loader.keys["llm"].items()})
    values = dict(loader.values)
    for names, tensor in _unique_tensors(model):
        if isinstance(tensor, nn.Parameter) and not tensor.is_meta:
            key = f"initialised:{names[0]}"
            values[key] = tensor.detach()
            keys.update(dict.fromkeys(names, key))
            _to_meta(model, names, tensor)
    unfilled = [names[0] for names, t in _unique_tensors(model) if t.is_meta and not any(n in keys for n in names)]
    if unfilled:
        raise CheckpointError(f"{unfilled} of the model from {parts['vision']} + {parts['llm']} have no source")
    origin = f"the parts {parts['vision']} + {parts['llm']}"
    setattr(model, _SOURCE_ATTRIBUTE, ShardedSource(origin, keys, loader.entries, _used(values, keys)))
    return model


def meta_model_from_original(
    path: str | Path, attn_implementation: str | None, dtype: torch.dtype | None, template: str
) -> LlavaNextModel:
    """The model `llavakit.conversion.original.import_original` loads, with meta parameters, to be sharded then
    filled. Call it where the plain path adds ``<image>`` (`add_image_token`): after seeding the generator, since a
    tokenizer without ``<image>`` grows the embeddings by mean-resizing, which draws the new rows.

    Args:
        path: the original-layout folder; its tower comes from its own weights, else from its ``mm_vision_tower``.
        attn_implementation: as for `LlavaNextModel.from_config`.
        dtype: the training dtype of the parameters; None keeps the saved dtype (``config.json``'s).
        template: the chat template recorded in the model's config (the folder records none).

    Raises:
        CheckpointError: the files miss a parameter, hold an unexpected key or one of another shape than the
            translated config builds, or the tower cannot be read (before any weight of a safetensors folder is read).
    """
    model, source = original_skeleton(Path(path), attn_implementation, template)
    keys, values = dict(source.keys), dict(source.values)
    tokenizer = model.tokenizer
    ensure_image_token(tokenizer)
    if len(tokenizer) > model.llm.get_input_embeddings().weight.shape[0]:
        llm_keys = {name.removeprefix("llm."): key for name, key in keys.items() if name.startswith("llm.")}
        _read_embeddings(model.llm, llm_keys, source.entries, values)
    add_image_token(model, tokenizer)
    cast_parameters(model, dtype or original_saved_dtype(path))
    for names, tensor in _unique_tensors(model):
        if isinstance(tensor, nn.Parameter) and not tensor.is_meta:
            key = f"resized:{names[0]}"
            values[key] = tensor.detach()
            keys.update(dict.fromkeys(names, key))
            _to_meta(model, names, tensor)
    setattr(model, _SOURCE_ATTRIBUTE, dataclasses.replace(source, keys=keys, values=_used(values, keys)))
    return model.eval()


def original_skeleton(
    path: Path, attn_implementation: str | None, template: str
) -> tuple[LlavaNextModel, ShardedSource]:
    """An original-layout folder's model before ``<image>`` is added, with meta parameters, and every parameter's
    source, found and checked from the files' headers (``.bin`` files are read whole). Nothing of a safetensors
    folder's weights is read: training also runs it as the check before anything loads.

    Raises:
        CheckpointError: as `meta_model_from_original`.
    """
    entries, values = _tensor_sources(original_weight_files(path), "")
    shapes = {key: entry.shape for key, entry in entries.items()}
    shapes.update({key: tuple(value.shape) for key, value in values.items()})
    layout = original_layout(path, shapes, template=template)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.random.fork_rng(), empty_parameters():
        model = LlavaNextModel.from_config(layout.config, tokenizer=tokenizer, attn_implementation=attn_implementation)
    tower: dict[str, str] = {}
    if not any(key.startswith("model.vision_tower.") for key in shapes):
        # As the plain path: the tower model's names (with or without ``vision_model.``) under ours; keys it has no
        # place for (a text tower, a pooling head) are ignored as transformers' from_pretrained ignores them.
        ours = set(model.state_dict())
        tower_entries, tower_values = _tensor_sources(_part_files(_local_folder(layout.tower)), "tower:")
        tower_shapes = {key: entry.shape for key, entry in tower_entries.items()}
        tower_shapes.update({key: tuple(value.shape) for key, value in tower_values.items()})
        for key, shape in tower_shapes.items():
            name = "vision_encoder.model." + key.removeprefix("tower:").removeprefix("vision_model.")
            if name in ours:
                tower[key], shapes[key] = name, shape
        entries.update({key: entry for key, entry in tower_entries.items() if key in tower})
        values.update({key: value for key, value in tower_values.items() if key in tower})
    keys = match_checkpoint(model, shapes, path, lambda key: tower.get(key) or original_to_ours(key))
    source = ShardedSource(f"the original checkpoint {path}", keys, entries, _used(values, keys))
    return model, source


def _tensor_sources(files: list[Path], prefix: str) -> tuple[dict[str, TensorEntry], dict[str, torch.Tensor]]:
    """The tensors of weight files by ``prefix`` + key: safetensors headers, or ``.bin`` files read whole."""
    if files[0].suffix != ".safetensors":
        return {}, {f"{prefix}{key}": value for file in files for key, value in read_tensor_file(file).items()}
    return {f"{prefix}{key}": entry for file in files for key, entry in read_header(file).items()}, {}


def load_projector_file(model: LlavaNextModel, path: str | Path) -> None:
    """Make upstream's projector file (``mm_projector.bin``) the source of a meta model's projector.

    The file is small; it is read whole on each rank, checked as `load_upstream_projector_state` checks it (keys,
    shapes), cast to the projector's dtype, and each rank copies its rows into its shards in `materialise`.

    Raises:
        CheckpointError: the file does not fit the projector.
    """
    source: ShardedSource = getattr(model, _SOURCE_ATTRIBUTE)
    projector = copy.deepcopy(model.projector).to_empty(device="cpu")
    load_upstream_projector_state(projector, path)
    keys, values = dict(source.keys), dict(source.values)
    for name, tensor in projector.state_dict().items():
        keys[f"projector.{name}"] = f"{path}:{name}"
        values[f"{path}:{name}"] = tensor
    setattr(model, _SOURCE_ATTRIBUTE, dataclasses.replace(source, keys=keys, values=_used(values, keys)))


class _PartsOnMeta:
    """A `llavakit.model.llava_next.PartsLoader` that builds both parts with meta parameters.

    Each part is built as transformers' ``from_pretrained`` builds it (its config, the vision tower without
    SigLIP's head, the LLM with the attention implementation and its ``generation_config.json``, eval mode) and
    matched against its files. transformers draws no random numbers when every weight is in the files; the meta
    build runs under ``fork_rng`` so that it draws none either whatever the constructors do, and ``from_parts``
    initialises the projector from the same generator state as the plain path.

    When the tokenizer (with ``<image>``) is longer than the LLM's vocabulary, ``from_parts`` grows the embeddings
    with transformers' ``resize_token_embeddings``, whose new rows depend on all the old ones (mean and covariance):
    the input and output embeddings are then read whole on each rank (in the load dtype, as the plain path holds
    them), the only tensors that are.

    Attributes:
        keys: per part (``vision``, ``llm``), the part's state-dict name → source key.
        entries: source key → its place in a safetensors file.
        values: source key → a tensor of a ``.bin`` part (read whole on each rank: pickles cannot be read by rows).
    """

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, str]] = {}
        self.entries: dict[str, TensorEntry] = {}
        self.values: dict[str, torch.Tensor] = {}

    def __call__(
        self,
        vision_encoder: str | None,
        vision: str,
        llm: str,
        tokenizer: PreTrainedTokenizerBase,
        load_kwargs: dict[str, Any],
        attn_implementation: str | None,
        llm_kwargs: dict[str, Any],
    ) -> tuple[VisionBackbone, PreTrainedModel, PreTrainedModel]:
        if llm_kwargs:
            raise CheckpointError(f"an LLM loaded with {sorted(llm_kwargs)} cannot be built without weights")
        vision_dir, llm_dir = _local_folder(vision), _local_folder(llm)
        model_type = AutoConfig.from_pretrained(vision_dir).model_type
        backbone = VISION_BACKBONES.get(vision_encoder) if vision_encoder else backbone_for_model_type(model_type)
        # As `llavakit.model.vision.load_vision_model`: LLaVA never uses SigLIP's pooling head.
        vision_kwargs = {"vision_use_head": False} if backbone.id == "siglip" else {}
        llm_config = AutoConfig.from_pretrained(llm_dir)
        with torch.random.fork_rng(), empty_parameters():
            vision_config = backbone.config_class.from_pretrained(vision_dir, **vision_kwargs)
            vision_model = backbone.model_class._from_config(vision_config, **load_kwargs)
            language_model = AutoModelForCausalLM.from_config(
                llm_config, attn_implementation=attn_implementation, **load_kwargs
            )
        # The names the user gave, as from_pretrained records them (saved in the model's config.json).
        vision_model.config.name_or_path, language_model.config.name_or_path = vision, llm
        generation_file = llm_dir / GENERATION_CONFIG_NAME
        if generation_file.is_file():
            language_model.generation_config = GenerationConfig.from_pretrained(llm_dir)
        self.keys["vision"] = self._match(vision_model, vision_dir, "vision")
        self.keys["llm"] = self._match(language_model, llm_dir, "llm")
        if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
            _read_embeddings(language_model, self.keys["llm"], self.entries, self.values)
        return backbone, vision_model.eval(), language_model.eval()

    def _match(self, part: PreTrainedModel, folder: Path, tag: str) -> dict[str, str]:
        """The part's state-dict name → source key, checked: every parameter found, every shape as built."""
        shapes = self._tensors(folder, tag)
        prefixes = ("", "vision_model.", f"{part.base_model_prefix}.")
        keys: dict[str, str] = {}
        missing = []
        persistent = set(part.state_dict())  # non-persistent buffers are never loaded, as in transformers
        for names, tensor in _unique_tensors(part):
            if not persistent.intersection(names):
                continue
            candidates = [f"{tag}:{prefix}{name}" for name in names for prefix in prefixes]
            candidates += [f"{tag}:{name.removeprefix(prefixes[2])}" for name in names]
            key = next((key for key in candidates if key in shapes), None)
            if key is None:
                if isinstance(tensor, nn.Parameter):
                    missing.append(names[0])
                continue  # a buffer the files do not hold keeps its constructed value
            if shapes[key] != tuple(tensor.shape):
                raise CheckpointError(
                    f"{folder}: {key.partition(':')[2]} has shape {shapes[key]} but its config.json builds "
                    f"{tuple(tensor.shape)} ({names[0]}); the weights and config.json of this {tag} part disagree"
                )
            keys.update(dict.fromkeys(names, key))
        if missing:
            raise CheckpointError(
                f"{folder} lacks {len(missing)} parameters of the {tag} model its config.json builds "
                f"(first: {missing[:4]}); use the full checkpoint of this {tag} part"
            )
        return keys

    def _tensors(self, folder: Path, tag: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the part's tensors by source key: from safetensors headers, or ``.bin`` files read whole."""
        entries, values = _tensor_sources(_part_files(folder), f"{tag}:")
        self.entries.update(entries)
        self.values.update(values)
        return {key: entry.shape for key, entry in entries.items()} | {k: tuple(v.shape) for k, v in values.items()}


def _read_embeddings(
    language_model: PreTrainedModel,
    keys: dict[str, str],
    entries: dict[str, TensorEntry],
    values: dict[str, torch.Tensor],
) -> None:
    """Give the LLM's meta input and output embeddings their values, read whole, for a resize to see.

    Args:
        language_model: the LLM with meta parameters.
        keys: its state-dict names → source keys.
        entries, values: where the source keys' tensors are (`ShardedSource`).
    """
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(language_model, getter)()
        if module is None or not module.weight.is_meta:
            continue  # no head, or one tied to the embeddings just read
        name = next(n for n, p in language_model.named_parameters() if p is module.weight)
        key = keys[name]
        if key in values:
            whole = values[key]
        else:
            entry = entries[key]
            with entry.file.open("rb", buffering=0) as handle:
                whole = _read_rows(handle, entry, 0, entry.shape[0])
        tied = [n for n, p in language_model.named_parameters(remove_duplicate=False) if p is module.weight]
        real = nn.Parameter(whole.to(module.weight.dtype), requires_grad=module.weight.requires_grad)
        for tied_name in tied:
            owner, _, attribute = tied_name.rpartition(".")
            language_model.get_submodule(owner)._parameters[attribute] = real

def _part_files(folder: Path) -> list[Path]:
    """A part's weight files: its safetensors (one, or those its index names), else its ``.bin`` pickles."""
    if (folder / SAFE_WEIGHTS_NAME).is_file() or (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return weight_files(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise CheckpointError(
        f"{folder} has no {SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or an index of them; point the part at its checkpoint"
    )


def _local_folder(name: str) -> Path:
    """The folder of a part: ``name`` itself, or the hub repository's snapshot in the local cache (downloaded)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    metadata = ["*.json", "*.jinja", "*.model", "*.txt"]
    folder = Path(snapshot_download(name, allow_patterns=[*metadata, "*.safetensors"]))
    if not any(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(name, allow_patterns=[*metadata, "*.bin"]))
    return folder


def _to_meta(model: nn.Module, names: list[str], tensor: torch.Tensor) -> None:
    """Replace the parameter ``tensor`` (under all its ``names``) by one meta parameter."""
    meta = nn.Parameter(tensor.detach().to("meta"), requires_grad=tensor.requires_grad)
    for name in names:
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner)._parameters[attribute] = meta


def _used(values: dict[str, torch.Tensor], keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """``values`` without those no name refers to any more (dropped, not held until the load)."""
    referenced = set(keys.values())
    return {key: value for key, value in values.items() if key in referenced}


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
            shape = source.shape(key)
            if isinstance(tensor, DTensor):
                local, (start, stop) = tensor.to_local(), _local_rows(tensor, names[0], source.origin)
            else:  # buffers are replicated: every rank reads all of them
                local, start, stop = tensor, 0, shape[0] if shape else 1
            if stop == start:
                continue  # an empty last shard
            if key in source.values:
                value = source.values[key]
                local.copy_(value[start:stop] if shape else value)
                continue
            entry = source.entries[key]
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


def _local_rows(tensor: DTensor, name: str, origin: str) -> tuple[int, int]:
    """``[start, stop)`` of dim 0 this rank holds of the sharded ``tensor``."""
    mesh, local = tensor.device_mesh, tensor.to_local()
    if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        raise CheckpointError(
            f"{name} is sharded as {tensor.placements} over a {mesh.ndim}-D mesh; loading {origin} shard by shard "
            "expects FSDP2's Shard(0) over one mesh dimension"
        )
    rows, world = tensor.shape[0], mesh.size()
    chunk = math.ceil(rows / world)
    start = min(mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if local.shape[0] != stop - start:
        raise CheckpointError(
            f"{name}: this rank's shard has {local.shape[0]} rows, but FSDP2's dim-0 chunking of {rows} rows over "
            f"{world} ranks gives rows [{start}, {stop}); this torch release shards differently, so {origin} cannot "
            "be loaded shard by shard"
        )
    return start, stop
