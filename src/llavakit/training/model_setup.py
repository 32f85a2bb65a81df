"""Where a stage's model comes from, and the checks that run before any weight is loaded.

Why: upstream discovers a wrong projector file, a missing image folder or an indivisible batch only after minutes
of loading a 7B model on every GPU. `preflight` checks all of that from file metadata and ``config.json`` files;
`build_model` then loads the model once per rank from one of:

- a debug preset (``model.preset``): its parts are written to ``run_dir/parts`` by rank 0, then assembled;
- ``model.vision`` + ``model.llm``: a fresh model from two checkpoints (``LlavaNextModel.from_parts``);
- ``model.path`` or the previous stage's export: ``LlavaNextModel.from_pretrained``; an original-layout LLaVA folder
  as ``model.path`` (upstream's ``train.py`` output): `llavakit.conversion.original.load_original`, with the chat
  template the stages name (`original_template`).

Under FSDP2 each of these (but QLoRA, see `_loads_sharded`) is built without weights instead
(`llavakit.training.sharded_load`: `meta_model`, `meta_model_from_parts`, `meta_model_from_original`) and each
rank reads only its own shards after sharding, so no rank ever holds the whole model; the fresh projector and
``image_newline`` get the same values as on the plain path (same seed).

The parameters are built in ``strategy.param_dtype`` (``auto``: as saved / fp32 from parts).

QLoRA (``lora.bits`` 4/8, `llavakit.training.lora`) loads the LLM quantised by bitsandbytes. From parts, the
quantisation config goes to the LLM's ``from_pretrained`` (``LlavaNextModel.from_parts(llm_kwargs=...)``). From a
llavakit checkpoint, the LLM is loaded in full precision with the rest of the model, written once with
``save_pretrained`` to ``<run_dir>/<stage>/llm-to-quantise`` and reloaded quantised: bitsandbytes quantises while
transformers loads, and a llava-hf checkpoint's LLM keys (``language_model.*``) do not load in
``AutoModelForCausalLM`` directly. Disk cost: one full-precision (fp32) copy of the LLM, about 4 bytes per LLM
parameter (28 GB for a 7B LLM), deleted as soon as every rank has loaded it.

The first stage then loads upstream's projector file when ``model.pretrained_projector`` is set
(``--pretrain_mm_mlp_adapter``), checked key by key and shape by shape before anything is copied (under FSDP2 it
becomes the projector's source, copied into the shards: `llavakit.training.sharded_load.load_projector_file`).

Every rank seeds the same generator before building, so fresh weights are identical across ranks (FSDP2, unlike
DDP, does not broadcast rank 0's weights).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import is_flash_attn_2_available

from llavakit.anyres.geometry import parse_pinpoints
from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video_spec import VideoSpec
from llavakit.conversion.original import (
    add_image_token,
    is_original_checkpoint,
    load_original,
    original_saved_dtype,
    original_weight_files,
)
from llavakit.data.templates import check_system_prompt, get_template
from llavakit.data.videos import data_has_videos
from llavakit.distributed import DistContext, barrier
from llavakit.errors import CheckpointError, ConfigError
from llavakit.model.checkpoint import part_config
from llavakit.model.llava_next import LlavaNextModel, cast_parameters, default_image_spec
from llavakit.model.projector import load_upstream_projector_state, read_upstream_projector_file
from llavakit.model.vision import backbone_for_model_type
from llavakit.training.config import StageConfig, TrainConfig
from llavakit.training.lora import (
    check_qlora_fsdp2,
    is_quantised,
    quantization_config,
    require_bitsandbytes,
)
from llavakit.training.sharded_load import (
    load_projector_file,
    meta_model,
    meta_model_from_original,
    meta_model_from_parts,
    original_skeleton,
)

# strategy.param_dtype → the parameters' dtype (None: as loaded).
_PARAM_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


def preflight(config: TrainConfig, world_size: int) -> None:
    """Fail before loading weights: data files, image folders, batch divisibility, projector shapes, reporters.

    Args:
        config: the run config.
        world_size: processes of the run (torchrun's ``WORLD_SIZE``), known before any process group exists.

    Raises:
        ConfigError: a data path is missing, a batch does not divide the world size, a stage's data.system_prompt
            that its template would not train with, an unsupported LoRA setup or a missing reporter package.
        CheckpointError: the projector file does not fit the vision encoder and LLM sizes.
    """
    _check_system_prompts(config)
    for index, stage in enumerate(config.stages):
        where = f"stages.{index} ({stage.name})"
        data = stage.data
        if not data.path or not Path(data.path).exists():
            raise ConfigError(
                f"{where}: data.path {data.path!r} does not exist; point it at a LLaVA JSON/JSONL/YAML"
            )
        if data.image_folder is not None and not Path(data.image_folder).is_dir():
            raise ConfigError(f"{where}: data.image_folder {data.image_folder!r} is not a directory")
        if data.video_folder is not None and not Path(data.video_folder).is_dir():
            raise ConfigError(f"{where}: data.video_folder {data.video_folder!r} is not a directory")
        stage.accumulation_steps(world_size)
    _check_video_support(config)
    for field in ("vision", "llm"):
        if getattr(config.model, field):
            part_config(getattr(config.model, field), f"model.{field}")
    projector_file = config.model.pretrained_projector
    if projector_file and config.model.vision:
        check_projector_file(projector_file, config.model.vision, config.model.llm)
    _check_original(config)
    _check_lora(config)
    if config.logging.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logging.report_to=wandb needs the wandb package: pip install wandb (or report_to=tensorboard)"
        )


def _check_video_support(config: TrainConfig) -> None:
    """A stage whose data has videos needs a model with a video spec; checked from ``config.json`` and the data
    files' bytes (`llavakit.data.videos.data_has_videos`), before anything is loaded.

    Raises:
        ConfigError: the data has videos and the first stage's model has none, with the fix.
    """
    if model_has_video(config) is not False:
        return
    for index, stage in enumerate(config.stages):
        if data_has_videos(stage.data.path):
            raise ConfigError(
                f"stages.{index} ({stage.name}): data.path {stage.data.path} has video samples but the model has no "
                "video support: add model.video_spec (e.g. {frames_upbound: 32, newline: grid}) to build it with "
                "video, start from a checkpoint with video, or remove the video samples"
            )


def model_has_video(config: TrainConfig) -> bool | None:
    """Whether the first stage's model takes videos: from ``model.video_spec``, or a checkpoint's ``config.json``
    (our ``llavakit.video_spec``, or llava-hf OneVision's ``video_token_index``); None when unknown (an original
    upstream layout, an unreadable file: the dataset scan says so later)."""
    model = config.model
    if model.video_spec is not None:
        return True
    if not model.path:
        return False
    try:
        data = json.loads((Path(model.path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "text_config" not in data:
        return None
    section = data.get("llavakit")
    if isinstance(section, dict):
        return "video_spec" in section
    return data.get("video_token_index") not in (None, -1)


def _check_lora(config: TrainConfig) -> None:
    lora = config.lora
    if not lora.enabled:
        if lora.bits != 16:
            raise ConfigError(
                f"lora.bits={lora.bits} (QLoRA) needs lora.enabled=true: the quantised LLM only trains through "
                "LoRA adapters; set lora.enabled=true, or lora.bits=16 for full-precision training"
            )
        return
    if is_quantised(lora):
        require_bitsandbytes()
        if config.strategy.name == "fsdp2":
            check_qlora_fsdp2(lora, config.strategy.cpu_offload)


def check_projector_file(path: str, vision: str, llm: str) -> None:
    """Compare an upstream ``mm_projector.bin``'s shapes with the two parts' hidden sizes (configs only)."""
    state = read_upstream_projector_file(path)
    vision_size = _hidden_size(part_config(vision, "model.vision"))
    llm_size = _hidden_size(part_config(llm, "model.llm"))
    first = state.get("linear_1.weight")
    last = state[
        max((k for k in state if k.endswith(".weight")), key=lambda k: int(k.split("_")[1].split(".")[0]))
    ]
    if first is None or first.shape[1] != vision_size or last.shape[0] != llm_size:
        raise CheckpointError(
            f"projector file {path} maps {tuple(first.shape) if first is not None else '?'}... -> {last.shape[0]}, "
            f"but vision {vision!r} has hidden size {vision_size} and LLM {llm!r} has {llm_size}: "
            "use the projector trained for this encoder and LLM"
        )


def _hidden_size(config: Any) -> int:
    # CLIP/SigLIP checkpoints saved as the full (text+vision) model nest the vision config.
    vision_config = getattr(config, "vision_config", None)
    return int((vision_config or config).hidden_size)


def build_model(
    config: TrainConfig, stage: StageConfig, previous: Path | None, context: DistContext
) -> LlavaNextModel:
    """Load the model a stage starts from (see module docstring) on CPU, identically on every rank (under FSDP2
    from a checkpoint: on the meta device, for the strategy to shard and fill).

    Args:
        config: the run config.
        stage: the stage about to train (gradient checkpointing).
        previous: the previous stage's exported model, or None for the first stage.
        context: rank and world (rank 0 writes preset parts).
    """
    model_config = config.model
    attention = resolve_attention(model_config.attn_implementation)
    quantization = _llm_quantization(config)
    dtype = _PARAM_DTYPES[config.strategy.param_dtype]
    sharded = _loads_sharded(config, previous)
    if previous is None and model_config.path and is_original_checkpoint(model_config.path):
        model = _original_model(config, Path(model_config.path), attention, dtype, sharded)
        if quantization is not None:
            folder = Path(config.run_dir) / stage.name / "llm-to-quantise"
            model.llm = _reload_quantised(model.llm, quantization, folder, attention, context)
    elif sharded and (previous is not None or model_config.path):
        model = meta_model(Path(previous or model_config.path), attention, dtype)
    elif previous is not None or model_config.path:
        model = LlavaNextModel.from_pretrained(
            previous or model_config.path, dtype=dtype, attn_implementation=attention
        )
        if quantization is not None:
            folder = Path(config.run_dir) / stage.name / "llm-to-quantise"
            model.llm = _reload_quantised(model.llm, quantization, folder, attention, context)
    else:
        kwargs = _from_parts_kwargs(config, context)
        if quantization is not None:
            kwargs["llm_kwargs"] = {"quantization_config": quantization, "device_map": "cpu"}
        # Seed after the preset parts are written: only rank 0 writes them, and that consumes random numbers.
        torch.manual_seed(config.seed)
        if sharded:
            model = meta_model_from_parts(kwargs, dtype)
        else:
            model = LlavaNextModel.from_parts(**kwargs, dtype=dtype)
    if model_config.pretrained_projector and previous is None:
        if sharded:
            load_projector_file(model, model_config.pretrained_projector)
        else:
            load_upstream_projector_state(model.projector, model_config.pretrained_projector)
    apply_stage_settings(model, stage)
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _loads_sharded(config: TrainConfig, previous: Path | None) -> bool:
    """Whether the stage's model is built without weights and read shard by shard (`llavakit.training.sharded_load`):
    under FSDP2, but not for QLoRA (its LLM is loaded quantised through transformers, `_reload_quantised`, and
    stays whole on every rank: `llavakit.training.strategies.fsdp`). LoRA adapters are filled after the shards are
    read, with the values of the 1-process run (`llavakit.training.lora.initialise_adapters`)."""
    return config.strategy.name == "fsdp2" and not is_quantised(config.lora)


def _original_model(
    config: TrainConfig, path: Path, attention: str, dtype: torch.dtype | None, sharded: bool
) -> LlavaNextModel:
    """An original-layout ``model.path`` as `llavakit.conversion.original.import_original` loads it (the tower from
    the folder's weights, else from its ``mm_vision_tower``; ``auto`` dtype: as saved), or on the meta device under
    FSDP2. A tokenizer without ``<image>`` grows the embeddings by mean-resizing, which draws the new rows: both
    paths draw them right after seeding with the run's seed, so they are identical."""
    template = original_template(config)
    torch.manual_seed(config.seed)
    if sharded:
        return meta_model_from_original(path, attention, dtype, template)
    model, tokenizer = load_original(path, template=template, attn_implementation=attention)
    torch.manual_seed(config.seed)  # building drew random numbers the meta build does not draw
    add_image_token(model, tokenizer)
    return cast_parameters(model, dtype or original_saved_dtype(path)).eval()


def original_template(config: TrainConfig) -> str:
    """The chat template recorded with an original-layout ``model.path``: the first conversation template a stage's
    ``data.template`` names (the layout records none: upstream does not save its ``--version``).

    Raises:
        ConfigError: a stage would train with the model's own template before any stage names one.
    """
    for index, stage in enumerate(config.stages):
        if stage.data.template is None:
            raise ConfigError(
                f"stages.{index} ({stage.name}): model.path {config.model.path} is an original-layout LLaVA "
                "checkpoint, which records no chat template (upstream does not save its --version); set this "
                "stage's data.template (e.g. vicuna_v1, llava_llama_3, qwen_2)"
            )
        if stage.data.template != "plain":
            return stage.data.template
    raise ConfigError(
        f"model.path {config.model.path} is an original-layout LLaVA checkpoint, which records no chat template, "
        "and every stage trains with 'plain'; name the model's conversation template in a stage's data.template, "
        "or convert the folder with `llavakit convert from-original SRC OUT --template T` first"
    )


def _check_original(config: TrainConfig) -> None:
    """Check an original-layout ``model.path`` from its files' headers and config (template, tower, every key and
    shape) before any weight loads; a ``.bin`` folder is checked when loaded (pickles have no header)."""
    path = config.model.path
    if not path or not is_original_checkpoint(path):
        return
    template = original_template(config)
    if original_weight_files(Path(path))[0].suffix == ".safetensors":
        original_skeleton(Path(path), None, template)


def _llm_quantization(config: TrainConfig) -> Any:
    """The LLM's ``BitsAndBytesConfig`` for QLoRA (compute dtype = the run's dtype), else None."""
    if not is_quantised(config.lora):
        return None
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.strategy.mixed_precision, torch.float32)
    return quantization_config(config.lora, compute_dtype)


def _reload_quantised(
    llm: torch.nn.Module, quantization: Any, folder: Path, attention: str, context: DistContext
) -> torch.nn.Module:
    """``llm`` reloaded through transformers with ``quantization`` (see module docstring for the disk cost)."""
    if context.is_main:
        shutil.rmtree(folder, ignore_errors=True)
        llm.save_pretrained(folder)
    barrier(context)
    quantised = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=quantization,
        device_map="cpu",
        dtype=llm.dtype,
        attn_implementation=attention,
    )
    barrier(context)
    if context.is_main:
        shutil.rmtree(folder)
    return quantised


def _check_system_prompts(config: TrainConfig) -> None:
    """Refuse a stage's ``data.system_prompt`` that the template it trains with would ignore, where that template is
    known before loading (as `apply_stage_settings` will set it); otherwise the dataset refuses it when built."""
    template, system_prompt = _initial_template(config), None
    for index, stage in enumerate(config.stages):
        stage_template, stage_system = stage.data.chat_template(template, system_prompt)
        if stage.data.system_prompt is not None and stage_template is not None:
            where = f"stages.{index} ({stage.name}): data.system_prompt"
            check_system_prompt(get_template(stage_template, system_prompt=stage_system), where)
        if stage_template != "plain":
            template, system_prompt = stage_template, stage_system


def _initial_template(config: TrainConfig) -> str | None:
    """The first stage's model template where it is known without loading weights (None: the LLM's family decides)."""
    from llavakit.model.checkpoint import read_config
    from llavakit.model.presets import PRESETS

    model = config.model
    if model.template:
        return model.template
    if model.preset:
        return PRESETS.get(model.preset).template
    if model.path and is_original_checkpoint(model.path):
        return original_template(config)
    if model.path and Path(model.path).is_dir():
        return read_config(Path(model.path)).template
    return None


def apply_stage_settings(model: LlavaNextModel, stage: StageConfig) -> None:
    """Apply a stage's image-spec changes and chat template to the model config (saved with its export).

    The ``plain`` template of align stages is not recorded: inference uses the conversation template of the
    stages that teach the model to chat, with the system prompt they trained with.

    Raises:
        ConfigError: the stage changes ``merge_type`` to or from ``spatial_unpad`` (that adds or removes the
            trained ``image_newline`` parameter; set it on the first stage instead).
    """
    if stage.image_spec:
        old = model.config.image_spec
        new = _spec_with(old, stage.image_spec, "the previous stage's encoder")
        if (old.merge_type == "spatial_unpad") != (new.merge_type == "spatial_unpad"):
            raise ConfigError(
                f"stage {stage.name!r} changes merge_type {old.merge_type!r} -> {new.merge_type!r}: image_newline "
                "exists only with spatial_unpad; choose the merge type in model.image_spec of the first stage"
            )
        model.config.image_spec = new
    template, system_prompt = stage.data.chat_template(model.config.template, model.config.system_prompt)
    if template != "plain":
        model.config.template, model.config.system_prompt = template, system_prompt


def _from_parts_kwargs(config: TrainConfig, context: DistContext) -> dict[str, Any]:
    model_config = config.model
    kwargs = (
        _preset_kwargs(model_config.preset, Path(config.run_dir), context)
        if model_config.preset
        else {
            "vision": model_config.vision,
            "llm": model_config.llm,
        }
    )
    for name in ("projector", "template", "select_layer"):
        if getattr(model_config, name) is not None:
            kwargs[name] = getattr(model_config, name)
    if model_config.image_spec:
        kwargs["image_spec"] = _spec_with(kwargs.get("image_spec"), model_config.image_spec, kwargs["vision"])
    if model_config.video_spec is not None:
        kwargs["video_spec"] = VideoSpec.from_dict(model_config.video_spec)
    kwargs["attn_implementation"] = resolve_attention(model_config.attn_implementation)
    return kwargs


def resolve_attention(requested: str) -> str:
    """``flash_attention_2`` when asked for and installed; otherwise (asked but missing) ``sdpa_varlen``, warning.

    Upstream's scripts default to flash-attention; the seed scripts must run on machines without it (CPU CI).
    ``sdpa_varlen`` computes the same attention as flash-attention, on padded batches and on packed rows split by
    ``position_ids`` alike, at flash-attention's ``sum(l_i^2)`` cost on packed rows (plain ``sdpa`` needs a
    ``T x T`` mask there, and ``data.padding_free`` refuses it), so this is the documented selection, not a silent
    change of results.
    """
    if requested != "flash_attention_2" or is_flash_attn_2_available():
        return requested
    warnings.warn(
        "flash_attention_2 requested but flash-attn is not installed: using sdpa_varlen", stacklevel=2
    )
    return "sdpa_varlen"


def _preset_kwargs(name: str, run_dir: Path, context: DistContext) -> dict[str, Any]:
    from llavakit.model.presets import PRESETS, PresetParts, build_parts

    parts_dir = run_dir / "parts" / name
    if context.is_main:
        build_parts(name, parts_dir)
    barrier(context)
    # Every rank reads the folders rank 0 wrote; `PresetParts` only records paths.
    return PresetParts(PRESETS.get(name), parts_dir / "vision", parts_dir / "llm").from_parts_kwargs()


def _spec_with(base: ImageSpec | None, overrides: dict[str, Any], vision: str) -> ImageSpec:
    """``base`` (or, without one, the vision checkpoint's default spec) with ``overrides`` applied."""
    if base is None:
        base = _encoder_default_spec(vision)
    overrides = dict(overrides)
    if isinstance(overrides.get("pinpoints"), str):
        # Upstream notation ("(1x1),...,(6x6)" or "[(336, 672), ...]") is (width, height) ordered.
        tile_size = overrides.get("tile_size", base.tile_size)
        overrides["pinpoints"] = parse_pinpoints(overrides["pinpoints"], tile_size, order="wh")
    return ImageSpec.from_dict({**base.to_dict(), **overrides})


def _encoder_default_spec(vision: str) -> ImageSpec:
    # Reads only config.json: tile and patch size from the checkpoint, mean/std from the registered backbone.
    config = AutoConfig.from_pretrained(vision)
    backbone = backbone_for_model_type(config.model_type)
    return default_image_spec(
        getattr(config, "vision_config", None) or config, backbone.image_mean, backbone.image_std
    )
