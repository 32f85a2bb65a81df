"""The memory planner behind ``llavakit plan``: per-GPU bytes of a run, stage by stage, before anything is loaded.

Why: a 7B–72B recipe that does not fit fails minutes into loading, on every GPU, with an allocator message that
says nothing about what to change. The planner builds the run's model on the ``meta`` device (shapes only, no
weights, no downloads), applies each stage's trainable parts (and LoRA adapters) exactly as the trainer does, and
counts what the trainer's strategy allocates:

- ``single`` / ``ddp``: the whole model in float32 (the trainer builds every part in float32; ``bf16`` is autocast
  only), float32 gradients of the trainable parameters, AdamW's two float32 states (``exp_avg``, ``exp_avg_sq``)
  plus one float32 ``step`` scalar per trainable tensor; DDP adds its gradient buckets (a second copy of the
  trainable gradients, as ``gradient_as_bucket_view`` is off).
- ``fsdp2``: every parameter sharded over the GPUs along dim 0 (padded to a multiple of N; rank 0's share is the
  largest, so it is the one counted), float32 shards, gradients and states as above but sharded. On top: the
  gathered ``param_dtype`` copies (bf16 with ``mixed_precision: bf16``) of the root group (everything outside the
  shard units the strategy wraps, `llavakit.training.strategies.fsdp.sharded_units`: embeddings, head, projector,
  unused vision layers; FSDP2 keeps the root gathered from forward to backward) and of the shard units (two at a
  time with ``reshard_after_forward``, current and prefetched; all of them without, ZeRO-2) and the largest unit's
  gradient while it is reduce-scattered (its bf16 gradient and float32 reduce copy). Gradients are reduce-scattered
  after every micro-batch, so accumulation keeps no unsharded copy.
- ``cpu_offload``: sharded parameters, gradients and optimizer states live on the host; the GPU holds the gathered
  copies and the activations.

Activations are counted per token from the tensors autograd saves in a decoder layer (Llama/Qwen2 layout: RMSNorm,
rotary attention through SDPA, gated MLP) and per tile for the vision tower (CLIP/SigLIP layers up to
``select_layer``), in the dtype each is stored in (autocast keeps the residual stream and norms in float32 and
casts each linear layer's input to bf16 again; FSDP2's bf16 parameters store everything in bf16 except RMSNorm's
float32 upcast). With gradient checkpointing a layer keeps only its input, and one layer's full activations are
rebuilt at a time in backward. The loss adds, per supervised token, the ``[N, V]`` logits, their float32
log-softmax and its gradient (``loss_kernel: logits``), or one chunk of ``CHUNK_LOGITS_BYTES`` and the head's
float32 weight gradient (``chunked``/``liger``). A micro-batch is ``micro_batch_size`` rows of ``max_length``
tokens (the worst case of padding); each row is assumed to hold one image at the largest grid (``1 + rows x cols``
tiles of the spec), and, unless told otherwise, every token is assumed supervised (the worst case of the loss).

Model sizes come from config.json files only: local folders (read offline), debug presets, a ``--model-config``
mapping of hub id → config.json, or the published configs of the shipped recipes' checkpoints
(`KNOWN_CONFIGS`). A hub id none of these covers is reported as unknown instead of guessed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llavakit.anyres.spec import ImageSpec
from llavakit.errors import ConfigError
from llavakit.model.config import LlavaKitConfig
from llavakit.model.fused_loss import CHUNK_LOGITS_BYTES
from llavakit.model.presets import CLIP_L_336, QWEN25_05B, SIGLIP_SO400M_384, VICUNA_7B_SLICE
from llavakit.training.config import StageConfig, TrainConfig
from llavakit.training.strategies.fsdp import sharded_units

GIB = 2**30
# CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation, kept free on every GPU.
RESERVED_BYTES = 3 * GIB
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})

# Published config.json values of the checkpoints the shipped recipes name (for offline planning). ``vocab_size``
# is the embedding size after `LlavaNextModel.from_parts` adds ``<image>``: Vicuna's and Llama 3's tokenizers fill
# their vocabularies, so one row is added; Qwen's leave room.
_CLIP_L_336 = {"model_type": "clip_vision_model", **CLIP_L_336, "image_size": 336, "patch_size": 14}
_SIGLIP_SO400M_384 = {"model_type": "siglip_vision_model", **SIGLIP_SO400M_384, "image_size": 384, "patch_size": 14}
_LLAMA = {"model_type": "llama", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
_QWEN2 = {"model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1e6}
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": _CLIP_L_336,
    "google/siglip-so400m-patch14-384": _SIGLIP_SO400M_384,
    "lmsys/vicuna-7b-v1.5": {"model_type": "llama", **VICUNA_7B_SLICE, "num_hidden_layers": 32, "vocab_size": 32001},
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        **_LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128257,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    },
    "Qwen/Qwen2.5-0.5B-Instruct": {"model_type": "qwen2", **QWEN25_05B},
    "Qwen/Qwen1.5-72B-Chat": {
        **_QWEN2,
        "hidden_size": 8192,
        "intermediate_size": 24576,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
    },
}


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StaticMemory:
    """Bytes per GPU that do not depend on the micro-batch (rank 0, the largest shard).

    Attributes:
        parameters: parameter storage on the GPU (float32 master weights or their shards; 0 when offloaded).
        buffers: module buffers (RoPE frequencies, position ids).
        gradients: gradients of the trainable parameters after backward (their shards under FSDP2).
        optimizer: AdamW states (``exp_avg``, ``exp_avg_sq``, ``step``) of the trainable parameters.
        gathered: FSDP2's unsharded ``param_dtype`` copies held during forward/backward (see module docstring).
        transient: gradient buffers alive during backward only: DDP's buckets, FSDP2's reduce-scatter of one unit.
        host: bytes held in host memory instead (CPU offload).
    """

    parameters: int
    buffers: int
    gradients: int
    optimizer: int
    gathered: int
    transient: int
    host: int = 0

    @property
    def total(self) -> int:
        """GPU bytes before any activation."""
        return (
            self.parameters + self.buffers + self.gradients + self.optimizer + self.gathered + self.transient
        )


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes of one micro-batch as a linear function of its tokens, with and without checkpointing.

    Attributes:
        llm_per_token: decoder layers (+ embeddings, final norm), without / with gradient checkpointing.
        vision_per_tile: the vision tower and projector per tile, without / with checkpointing (only the projector
            input when the tower is frozen).
        tiles_per_row: vision-tower inputs of the largest row: the largest grid (one image per row of ``max_length``
            tokens) or a video's ``frames_upbound`` frames, whichever is more.
        loss_per_token: the loss's bytes per supervised token.
        fixed: bytes independent of the token count: a fused loss kernel's chunk and head-weight gradient.
    """

    llm_per_token: tuple[int, int]
    vision_per_tile: tuple[int, int]
    tiles_per_row: int
    loss_per_token: int
    fixed: int

    def per_token(self, checkpointing: bool, max_length: int, supervised_fraction: float) -> float:
        """Bytes per token of a row of ``max_length`` tokens (its tiles spread over its tokens)."""
        index = int(checkpointing)
        vision = self.vision_per_tile[index] * self.tiles_per_row / max_length
        return self.llm_per_token[index] + vision + self.loss_per_token * supervised_fraction

    def bytes_for(self, tokens: int, checkpointing: bool, max_length: int, supervised_fraction: float) -> int:
        """Activation bytes of a micro-batch of ``tokens`` tokens."""
        per_token = self.per_token(checkpointing, max_length, supervised_fraction)
        return int(tokens * per_token) + self.fixed


@dataclass(frozen=True)
class StagePlan:
    """The plan of one stage on one GPU.

    Attributes:
        name: the stage's name.
        trainable_parameters: parameters that train in this stage (LoRA matrices only with LoRA).
        accumulation: micro-batches per optimizer step per GPU.
        static: `StaticMemory`.
        activations: `ActivationMemory`.
        checkpointing: whether the stage enables gradient checkpointing.
        configured_tokens: ``micro_batch_size x max_length``.
        max_tokens: the largest micro-batch in tokens that fits (with the stage's checkpointing setting; 0: none).
        max_tokens_checkpointed: the same with gradient checkpointing on.
        peak: static + activations of the configured micro-batch.
        fits: whether ``peak`` fits the GPU.
        advice: why it does not fit and what to change (empty when it fits).
    """

    name: str
    trainable_parameters: int
    accumulation: int
    static: StaticMemory
    activations: ActivationMemory
    checkpointing: bool
    configured_tokens: int
    max_tokens: int
    max_tokens_checkpointed: int
    peak: int
    fits: bool
    advice: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunPlan:
    """The plan of a whole run: the model's size and one `StagePlan` per stage.

    Attributes:
        source: what was planned (recipe name and/or config file).
        gpus: GPUs of the run (the world size).
        gpu_memory: bytes per GPU.
        strategy: the strategy name (``single`` / ``ddp`` / ``fsdp2``) with its options.
        parameters: parameters of the model (LoRA adapters included).
        stages: one plan per stage (empty when the model's size is unknown).
        unknown: why the model's size is unknown (a hub id without a local or known config), else None.
    """

    source: str
    gpus: int
    gpu_memory: int
    strategy: str
    parameters: int
    stages: tuple[StagePlan, ...]
    unknown: str | None = None

    @property
    def fits(self) -> bool:
        """Whether every stage fits (False when the size is unknown)."""
        return self.unknown is None and all(stage.fits for stage in self.stages)


# ---------------------------------------------------------------------------------------------- parsing


def parse_size(text: str) -> int:
    """Bytes of a size string: ``80GiB``, ``24 GB``, ``81920MiB``, ``1.5TiB`` or a plain byte count.

    Raises:
        ConfigError: not a positive number with one of the units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(
            f"bad memory size {text!r}: give a positive number with a unit, e.g. 80GiB, 24GB or 81920MiB"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _count(number: int) -> str:
    return f"{number / 1e9:.2f}B" if number >= 10**8 else f"{number / 1e6:.1f}M"


def format_bytes(count: float) -> str:
    """``count`` bytes as GiB (or MiB below 1 GiB), for tables."""
    if abs(count) >= GIB:
        return f"{count / GIB:.1f}G"
    return f"{count / 2**20:.0f}M"


# ---------------------------------------------------------------------------------------------- the model


class UnknownModelSize(Exception):
    """A part's config.json is not available offline (raised and turned into `RunPlan.unknown`)."""


def model_config_for(config: TrainConfig, model_configs: Mapping[str, str] | None = None) -> LlavaKitConfig:
    """The `LlavaKitConfig` of the run's first model, from config.json files only.

    Args:
        config: the run config.
        model_configs: hub id → path of a config.json (or folder holding one), for ids not on this machine.

    Raises:
        UnknownModelSize: a part has no local, given or known config.
    """
    model = config.model
    if model.preset:
        from llavakit.model.presets import PRESETS, preset_model_config
        from llavakit.model.tokenizer import build_bpe_tokenizer

        preset = PRESETS.get(model.preset)
        model_config = preset_model_config(preset, build_bpe_tokenizer(preset.llm))
    elif model.path:
        from llavakit.conversion.original import is_original_checkpoint
        from llavakit.model.checkpoint import read_config

        path = Path(model.path)
        if not (path / "config.json").is_file():
            raise UnknownModelSize(f"model.path {model.path!r} has no config.json on this machine")
        model_config = _original_config(path) if is_original_checkpoint(path) else read_config(path)
    else:
        model_config = _config_from_parts(config, model_configs or {})
    overrides = {name: getattr(model, name) for name in ("projector", "template", "select_layer")}
    model_config = replace(model_config, **{k: v for k, v in overrides.items() if v is not None})
    if model.image_spec:
        model_config = replace(model_config, image_spec=_spec_with(model_config.image_spec, model.image_spec))
    return model_config


def _original_config(path: Path) -> Any:
    """The llavakit config of an original-layout folder, from its config files and weight-file headers only."""
    from llavakit.conversion.original import original_layout, original_weight_files
    from llavakit.training.sharded_load import read_header

    files = [file for file in original_weight_files(path) if file.suffix == ".safetensors"]
    return original_layout(path, [key for file in files for key in read_header(file)]).config


def _config_from_parts(config: TrainConfig, model_configs: Mapping[str, str]) -> LlavaKitConfig:
    from llavakit.model.llava_next import default_image_spec
    from llavakit.model.vision import backbone_for_model_type

    vision = _part_config(config.model.vision, model_configs)
    vision = vision.get("vision_config", vision)  # two-tower CLIP/SigLIP checkpoints nest the vision half
    vision_type = str(vision.get("model_type", ""))
    backbone = backbone_for_model_type(vision_type)
    vision = {**vision, "model_type": vision_type}
    if backbone.id == "siglip":
        vision["vision_use_head"] = False
    text = _part_config(config.model.llm, model_configs)
    vision_object = backbone.config_class(**{k: v for k, v in vision.items() if k != "model_type"})
    return LlavaKitConfig(
        vision_encoder=backbone.id,
        vision_config=vision,
        text_config=text,
        image_spec=default_image_spec(vision_object, backbone.image_mean, backbone.image_std),
    )


def _part_config(source: str, model_configs: Mapping[str, str]) -> dict[str, Any]:
    """config.json of one part: a local folder, a ``--model-config`` entry, the HF cache, or `KNOWN_CONFIGS`."""
    given = model_configs.get(source)
    for candidate in [given, source] if given else [source]:
        path = Path(candidate)
        file = path / "config.json" if path.is_dir() else path
        if file.is_file() and file.suffix == ".json":
            data = json.loads(file.read_text())
            return _with_tokenizer_vocab(data, path) if path.is_dir() else data
    if given:
        raise ConfigError(f"--model-config {source}={given}: no config.json there")
    cached = _cached_config(source)
    if cached is not None:
        return cached
    known = {**KNOWN_CONFIGS, **_demo_configs()}
    if source in known:
        return dict(known[source])
    raise UnknownModelSize(
        f"{source!r}: no config.json on this machine and no published config known; pass "
        f"--model-config {source}=PATH/config.json (or download the checkpoint's config.json)"
    )


def _with_tokenizer_vocab(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """An LLM folder's config with the vocabulary ``from_parts`` resizes to after adding ``<image>`` and a pad."""
    if "vocab_size" not in data or not any(folder.glob("tokenizer*")):
        return data
    from transformers import AutoTokenizer

    from llavakit.model.family import family_for, set_pad_token
    from llavakit.model.tokenizer import ensure_image_token

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ensure_image_token(tokenizer)
    set_pad_token(tokenizer, family_for(data["model_type"]))
    return {**data, "vocab_size": max(int(data["vocab_size"]), len(tokenizer))}


def _cached_config(source: str) -> dict[str, Any] | None:
    """A hub id's config.json from the local Hugging Face cache, never from the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        path = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not a hub id (a missing local folder): huggingface_hub's validation error
        return None
    return json.loads(Path(path).read_text()) if isinstance(path, str) else None


def _demo_configs() -> dict[str, dict[str, Any]]:
    """The parts the demo-tiny recipe names (``llavakit demo`` writes them; `llavakit.demo.parts` sizes them)."""
    from llavakit.demo import parts
    from llavakit.model.presets import vision_config

    vision = vision_config("clip", parts.TILE_SIZE, parts.PATCH_SIZE, **parts.VISION_DIMS).to_dict()
    # The demo's tokenizer: VOCAB_SIZE entries, then <image> (pads with unk).
    llm = {**_LLAMA, **parts.LLM_DIMS, "vocab_size": parts.VOCAB_SIZE + 1}
    return {"runs/demo/parts/vision": vision, "runs/demo/parts/llm": llm}


def _spec_with(base: ImageSpec, overrides: Mapping[str, Any]) -> ImageSpec:
    """``base`` with ``overrides``; pinpoint strings in upstream's (width, height) notation, as the trainer reads."""
    from llavakit.anyres.geometry import parse_pinpoints

    values = dict(overrides)
    if isinstance(values.get("pinpoints"), str):
        values["pinpoints"] = parse_pinpoints(
            values["pinpoints"], values.get("tile_size", base.tile_size), order="wh"
        )
    return ImageSpec.from_dict({**base.to_dict(), **values})


def build_meta_model(model_config: LlavaKitConfig, attn_implementation: str = "sdpa") -> nn.Module:
    """The model on the ``meta`` device: every parameter's shape and dtype (float32, as the trainer builds it)."""
    from llavakit.model.llava_next import LlavaNextModel

    with torch.device("meta"):
        return LlavaNextModel.from_config(model_config, attn_implementation=attn_implementation)


# ---------------------------------------------------------------------------------------------- static memory


def _numel(param: torch.Tensor) -> int:
    return int(param.numel())


def _shard_numel(param: torch.Tensor, gpus: int) -> int:
    """Rank 0's share of ``param`` under FSDP2 (dim 0 split in ``ceil(dim0 / N)`` rows)."""
    if param.dim() == 0:
        return 1
    rows = math.ceil(param.shape[0] / gpus)
    return min(rows, int(param.shape[0])) * int(param[0].numel())


def _element_size(param: torch.Tensor, strategy: Any) -> int:
    """Bytes per element of a parameter as the trainer keeps it: ``strategy.param_dtype: bf16`` halves the float32
    it is built in (read with getattr: the field is newer than this planner's first version)."""
    return 2 if getattr(strategy, "param_dtype", "auto") == "bf16" else param.element_size()


def static_memory(
    model: nn.Module, config: TrainConfig, stage: StageConfig, gpus: int, accumulation: int
) -> StaticMemory:
    """Bytes per GPU of parameters, gradients, optimizer states and FSDP2's gathered copies (module docstring)."""
    strategy = config.strategy
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    step_bytes = 4 * len(trainable)  # AdamW's float32 ``step`` per parameter tensor
    if strategy.name != "fsdp2":
        param_bytes = sum(_numel(p) * _element_size(p, strategy) for p in params)
        grad_bytes = sum(_numel(p) * _element_size(p, strategy) for p in trainable)
        optimizer = 2 * grad_bytes + step_bytes
        buckets = grad_bytes if strategy.name == "ddp" else 0
        return StaticMemory(param_bytes, buffers, grad_bytes, optimizer, 0, buckets)
    shards = sum(_shard_numel(p, gpus) * _element_size(p, strategy) for p in params)
    grad_shards = sum(_shard_numel(p, gpus) * _element_size(p, strategy) for p in trainable)
    optimizer = 2 * grad_shards + step_bytes
    gathered_size = 2 if strategy.mixed_precision in ("bf16", "fp16") else 4
    units = sharded_units(model)
    unit_sizes = [sum(_numel(p) for p in unit.parameters()) for unit in units]
    in_units = {id(p) for unit in units for p in unit.parameters()}
    root = sum(_numel(p) for p in params if id(p) not in in_units)
    held_units = sum(sorted(unit_sizes)[-2:]) if strategy.reshard_after_forward else sum(unit_sizes)
    gathered = gathered_size * (root + held_units)
    reduce_scatter = (gathered_size + 4) * max(unit_sizes, default=0)
    if strategy.cpu_offload:
        host = shards + grad_shards + optimizer
        return StaticMemory(0, buffers, 0, 0, gathered, reduce_scatter, host)
    return StaticMemory(shards, buffers, grad_shards, optimizer, gathered, reduce_scatter)


# ---------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class _Dtypes:
    """Bytes per element of what autograd stores: linear outputs, the residual stream, a norm's saved tensors per
    hidden element, and extra bf16 copies autocast makes of each linear layer's float32 input."""

    linear: int
    residual: int
    rms_norm: int
    layer_norm: int
    autocast_cast: int

    @classmethod
    def of(cls, config: TrainConfig) -> _Dtypes:
        bf16 = config.strategy.mixed_precision in ("bf16", "fp16")  # both 16-bit: the same bytes
        if not bf16:
            # float32: RMSNorm keeps x * rsqrt and weight * that (the input is the saved residual).
            return cls(linear=4, residual=4, rms_norm=8, layer_norm=4, autocast_cast=0)
        if config.strategy.name == "fsdp2":
            # bf16 parameters: RMSNorm upcasts (4), normalises (4), casts back (2), scales (2).
            return cls(linear=2, residual=2, rms_norm=12, layer_norm=2, autocast_cast=0)
        # Autocast: float32 residual stream and norms, bf16 copies of each linear input.
        return cls(linear=2, residual=4, rms_norm=8, layer_norm=4, autocast_cast=2)


def decoder_layer_bytes(text: Mapping[str, Any], dtypes: _Dtypes, lora_inputs: int = 0) -> int:
    """Bytes one decoder layer saves for backward per token (Llama/Qwen2 layout).

    Saved: two RMSNorms, q and k after RoPE, v, the attention output and its contiguous copy, the residual after
    attention and after the MLP, the MLP's gate, up, activation and product, SDPA's float32 log-sum-exp per head;
    under autocast the bf16 copies of the normalised input for q/k/v and gate/up; with LoRA the dropout copies of
    each adapted layer's input (``lora_inputs`` elements).
    """
    hidden, inter = int(text["hidden_size"]), int(text["intermediate_size"])
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    kv = int(text.get("num_key_value_heads") or heads) * head_dim
    q = heads * head_dim
    linear = dtypes.linear * (2 * q + 2 * kv + 4 * inter)
    return (
        2 * dtypes.rms_norm * hidden
        + 2 * dtypes.residual * hidden
        + linear
        + dtypes.autocast_cast * 5 * hidden
        + 4 * heads
        + (dtypes.linear + 1) * lora_inputs
    )


def vision_layer_bytes(vision: Mapping[str, Any], dtypes: _Dtypes) -> int:
    """Bytes one CLIP/SigLIP encoder layer saves per patch token: two LayerNorm outputs, q/k/v, the attention
    output and its contiguous copy, two residuals, fc1 and its activation (quick_gelu keeps a sigmoid too)."""
    hidden, inter = int(vision["hidden_size"]), int(vision["intermediate_size"])
    heads = int(vision["num_attention_heads"])
    act_tensors = 3 if vision.get("hidden_act") == "quick_gelu" else 2
    return (
        2 * dtypes.layer_norm * hidden
        + 2 * dtypes.residual * hidden
        + dtypes.linear * (5 * hidden + act_tensors * inter)
        + dtypes.autocast_cast * 4 * hidden
        + 4 * heads
    )


def activation_memory(
    model: nn.Module, model_config: LlavaKitConfig, config: TrainConfig, stage: StageConfig
) -> ActivationMemory:
    """The stage's `ActivationMemory` (module docstring: what is counted and assumed)."""
    dtypes = _Dtypes.of(config)
    text, vision = model_config.text_config, model_config.vision_config
    hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
    llm_trains = any(p.requires_grad for p in model.llm.parameters())
    lora_inputs = _lora_input_elements(model) if config.lora.enabled and llm_trains else 0
    layer = decoder_layer_bytes(text, dtypes, lora_inputs)
    hidden_state = dtypes.residual * hidden
    final_norm = dtypes.rms_norm * hidden
    llm_full = layers * layer + hidden_state + final_norm
    # Checkpointed: each layer keeps its input; backward rebuilds one layer's activations at a time.
    llm_checkpointed = (layers + 1) * hidden_state + final_norm + layer

    spec = model_config.image_spec
    tokens = spec.grid_side**2 + (1 if _has_cls(model_config) else 0)
    tower_trains = any(p.requires_grad for p in model.vision_encoder.parameters())
    vision_hidden = int(vision["hidden_size"])
    run_layers = int(model.vision_encoder.num_layers_run)
    pixels = 3 * spec.tile_size**2 * (4 + (2 if dtypes.linear == 2 else 0))
    projector = tokens * (dtypes.linear * vision_hidden + (dtypes.linear * 3) * hidden)
    if tower_trains:
        v_layer = tokens * vision_layer_bytes(vision, dtypes)
        v_state = tokens * dtypes.residual * vision_hidden
        vision_full = pixels + run_layers * v_layer + v_state + projector
        vision_checkpointed = pixels + (run_layers + 1) * v_state + v_layer + projector
    else:
        vision_full = vision_checkpointed = pixels + projector
    vocab = int(text["vocab_size"])
    if config.strategy.loss_kernel == "logits":
        loss_per_token = vocab * (dtypes.linear + 12)
        loss_fixed = 0
    else:
        loss_per_token = hidden * (dtypes.linear + 4)
        loss_fixed = CHUNK_LOGITS_BYTES * 3 // 2 + 4 * vocab * hidden
    return ActivationMemory(
        llm_per_token=(llm_full, llm_checkpointed),
        vision_per_tile=(vision_full, vision_checkpointed),
        tiles_per_row=_tiles_per_row(model_config),
        loss_per_token=loss_per_token,
        fixed=loss_fixed,
    )


def _has_cls(model_config: LlavaKitConfig) -> bool:
    from llavakit.model.vision import VISION_BACKBONES

    return VISION_BACKBONES.get(model_config.vision_encoder).has_cls_token


def _tiles_per_row(model_config: LlavaKitConfig) -> int:
    """Vision-tower inputs of the largest row: one image's largest grid, or one video's frames if more.

    Raises:
        ConfigError: a video spec with no ``frames_upbound`` (a row's frames are then unbounded).
    """
    tiles = _tiles_per_image(model_config.image_spec)
    video = model_config.video_spec
    if video is None:
        return tiles
    if video.frames_upbound == 0:
        raise ConfigError(
            "video_spec.frames_upbound is 0 (every sampled frame, however long the video): the planner cannot bound "
            "a row's frames; set frames_upbound (LLaVA-Video: 64, OneVision: 32)"
        )
    return max(tiles, video.frames_upbound)


def _tiles_per_image(spec: ImageSpec) -> int:
    """Tiles of the largest grid the spec allows: the base view plus rows x cols (one tile without anyres)."""
    if not spec.uses_anyres:
        return 1
    return 1 + max((h // spec.tile_size) * (w // spec.tile_size) for h, w in spec.pinpoints)


def _lora_input_elements(model: nn.Module) -> int:
    """Per token, the input elements of the LLM layers carrying LoRA adapters (one decoder layer)."""
    from peft.tuners.lora import LoraLayer

    layers = model.shard_units()[0]
    return sum(m.get_base_layer().in_features for m in layers.modules() if isinstance(m, LoraLayer))


# ---------------------------------------------------------------------------------------------- planning


def _prepare_stage_model(
    model: nn.Module, config: TrainConfig, stage: StageConfig, frozen: frozenset[str]
) -> None:
    """Set ``requires_grad`` as `Trainer._set_trainable` does (LoRA already applied)."""
    from llavakit.training.lora import restrict_llm_to_lora
    from llavakit.training.model_setup import apply_stage_settings
    from llavakit.training.stages import apply_trainable_parts

    apply_stage_settings(model, stage)
    apply_trainable_parts(model, stage.trainable, frozen)
    if config.lora.enabled:
        restrict_llm_to_lora(model, "language_model" in stage.trainable)


def plan_stage(
    model: nn.Module,
    model_config: LlavaKitConfig,
    config: TrainConfig,
    stage: StageConfig,
    gpus: int,
    gpu_memory: int,
    supervised_fraction: float = 1.0,
) -> StagePlan:
    """Plan one stage of ``model`` (trainable parts already set) on ``gpus`` GPUs of ``gpu_memory`` bytes."""
    accumulation = stage.accumulation_steps(gpus)
    static = static_memory(model, config, stage, gpus, accumulation)
    activations = activation_memory(model, model_config, config, stage)
    max_length = stage.data.max_length
    configured = stage.micro_batch_size * max_length
    free = gpu_memory - RESERVED_BYTES - static.total

    def largest(checkpointing: bool) -> int:
        room = free - activations.fixed
        per_token = activations.per_token(checkpointing, max_length, supervised_fraction)
        return max(0, int(room // per_token))

    checkpointing = stage.gradient_checkpointing
    peak = static.total + activations.bytes_for(configured, checkpointing, max_length, supervised_fraction)
    plan = StagePlan(
        name=stage.name,
        trainable_parameters=sum(_numel(p) for p in model.parameters() if p.requires_grad),
        accumulation=accumulation,
        static=static,
        activations=activations,
        checkpointing=checkpointing,
        configured_tokens=configured,
        max_tokens=largest(checkpointing),
        max_tokens_checkpointed=largest(True),
        peak=peak,
        fits=peak + RESERVED_BYTES <= gpu_memory,
    )
    return plan if plan.fits else replace(plan, advice=advise(plan, config, gpus, gpu_memory))


def advise(plan: StagePlan, config: TrainConfig, gpus: int, gpu_memory: int) -> tuple[str, ...]:
    """Why ``plan`` does not fit and what to change, most effective first."""
    static = plan.static
    strategy = config.strategy
    advice = [
        f"needs {format_bytes(plan.peak + RESERVED_BYTES)} per GPU of {format_bytes(gpu_memory)} "
        f"(weights/grads/optimizer {format_bytes(static.total)}, activations "
        f"{format_bytes(plan.peak - static.total)}, reserve {format_bytes(RESERVED_BYTES)})"
    ]
    if static.total + RESERVED_BYTES > gpu_memory:
        if strategy.name != "fsdp2":
            advice.append(
                "shard the model: strategy.name=fsdp2 (parameters, gradients and states divided by GPUs)"
            )
        else:
            if static.gathered and not strategy.reshard_after_forward:
                advice.append(
                    f"{format_bytes(static.gathered)} of gathered bf16 parameters (root group and shard units): "
                    "strategy.reshard_after_forward=true"
                )
            if not strategy.cpu_offload:
                advice.append("strategy.cpu_offload=true (parameters and optimizer states on the host)")
            advice.append(f"more GPUs than {gpus} (FSDP2 divides parameters, gradients and states)")
    if plan.max_tokens < plan.configured_tokens:
        if not plan.checkpointing and plan.max_tokens_checkpointed > plan.max_tokens:
            advice.append(
                f"gradient_checkpointing=true (fits {plan.max_tokens_checkpointed} tokens per micro-batch)"
            )
        if strategy.loss_kernel == "logits":
            advice.append("strategy.loss_kernel=chunked (no [N, V] logits held)")
        if plan.max_tokens > 0:
            advice.append(
                f"at most {plan.max_tokens} tokens per micro-batch fit: lower micro_batch_size or data.max_length "
                f"(configured {plan.configured_tokens})"
            )
    return tuple(advice)


def plan_run(
    config: TrainConfig,
    gpus: int = 1,
    gpu_memory: int = 80 * GIB,
    model_configs: Mapping[str, str] | None = None,
    supervised_fraction: float = 1.0,
    source: str = "",
) -> RunPlan:
    """Plan every stage of ``config`` on ``gpus`` GPUs of ``gpu_memory`` bytes each.

    Args:
        config: the resolved run config (`llavakit.training.recipes.resolve_config`).
        gpus: the world size; must divide each stage's global batch with its micro-batch.
        gpu_memory: bytes per GPU.
        model_configs: hub id → config.json path for parts not available offline.
        supervised_fraction: share of a micro-batch's tokens that carry a label (the loss's memory).
        source: a label for the report.

    Raises:
        ConfigError: ``gpus`` or ``gpu_memory`` not positive, ``gpus`` not 1 for ``single``, a batch that does not
            divide, or a given model config that does not exist.
    """
    if gpus <= 0 or gpu_memory <= 0:
        raise ConfigError(f"gpus and gpu memory must be positive, got {gpus} GPUs of {gpu_memory} bytes")
    if config.strategy.name == "single" and gpus != 1:
        raise ConfigError(f"strategy single runs on one GPU, not {gpus}: set strategy.name=ddp or fsdp2")
    if not 0 < supervised_fraction <= 1:
        raise ConfigError(f"supervised fraction must be in (0, 1], got {supervised_fraction}")
    strategy = _describe_strategy(config)
    try:
        model_config = model_config_for(config, model_configs)
    except UnknownModelSize as err:
        return RunPlan(source, gpus, gpu_memory, strategy, 0, (), unknown=str(err))
    model = build_meta_model(model_config, _planning_attention(config.model.attn_implementation))
    from llavakit.training.stages import model_frozen_names

    frozen = model_frozen_names(model)
    if config.lora.enabled:
        from llavakit.training.lora import apply_lora

        with torch.device("meta"):
            apply_lora(model, replace(config.lora, bits=16))
    stages = []
    for stage in config.stages:
        _prepare_stage_model(model, config, stage, frozen)
        stages.append(plan_stage(model, model.config, config, stage, gpus, gpu_memory, supervised_fraction))
    parameters = sum(_numel(p) for p in model.parameters())
    return RunPlan(source, gpus, gpu_memory, strategy, parameters, tuple(stages))


def _planning_attention(requested: str) -> str:
    # flash-attention may be missing here; every implementation has the same parameters.
    return "sdpa" if requested == "flash_attention_2" else requested


def _describe_strategy(config: TrainConfig) -> str:
    strategy = config.strategy
    options = [strategy.mixed_precision]
    if strategy.name == "fsdp2":
        options.append("zero3" if strategy.reshard_after_forward else "zero2")
    if strategy.cpu_offload:
        options.append("offload")
    if config.lora.enabled:
        options.append(
            f"lora r={config.lora.r}" + (f" {config.lora.bits}bit" if config.lora.bits != 16 else "")
        )
    return f"{strategy.name} ({', '.join(options)})"


def format_plan(plan: RunPlan) -> str:
    """The plan as a text table, one row per stage, with advice under stages that do not fit.

    Columns: trainable parameters; per-GPU bytes of parameters, gradients, optimizer states, FSDP2's gathered
    copies and backward-only gradient buffers; activation bytes per token of the decoder layers without / with
    checkpointing, of the vision tower per tile (as the stage trains it) and of the loss per supervised token; the
    configured micro-batch in tokens, the largest that fits (as configured / with checkpointing), and the verdict.
    """
    head = f"{plan.source}: {plan.gpus} x {format_bytes(plan.gpu_memory)} GPU, {plan.strategy}"
    if plan.unknown:
        return f"{head}: model size unknown: {plan.unknown}"
    lines = [
        f"{head}, {_count(plan.parameters)} parameters",
        f"{'stage':<9}{'train':>8}{'params':>8}{'grads':>7}{'optim':>7}{'gather':>7}{'trans':>7}"
        f"{'llm/tok':>9}{'ckpt':>7}{'vis/tile':>9}{'loss/tok':>9}{'tokens':>8}{'max':>8}{'max ckpt':>9}  fits",
    ]
    for stage in plan.stages:
        static, act = stage.static, stage.activations
        vision = act.vision_per_tile[int(stage.checkpointing)]
        lines.append(
            f"{stage.name:<9}{_count(stage.trainable_parameters):>8}{format_bytes(static.parameters):>8}"
            f"{format_bytes(static.gradients):>7}{format_bytes(static.optimizer):>7}"
            f"{format_bytes(static.gathered):>7}{format_bytes(static.transient):>7}"
            f"{act.llm_per_token[0] / 1024:>8.0f}K{act.llm_per_token[1] / 1024:>6.0f}K"
            f"{format_bytes(vision):>9}{act.loss_per_token / 1024:>8.0f}K{stage.configured_tokens:>8}"
            f"{stage.max_tokens:>8}{stage.max_tokens_checkpointed:>9}  {'yes' if stage.fits else 'NO'}"
        )
        if static.host:
            lines.append(f"{'':9}host (CPU offload): {format_bytes(static.host)}")
        lines.extend(f"{'':9}- {line}" for line in stage.advice)
    return "\n".join(lines)
