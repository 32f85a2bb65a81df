"""Upstream LLaVA / LLaVA-NeXT LoRA checkpoints (``--lora_enable True``) → a merged llavakit model.

Upstream's LoRA scripts do not save a model: they save what was trained, to be merged onto the base LLM that
``--model-base`` names (upstream's ``load_pretrained_model``). The folder holds::

    config.json                        upstream llava config: the base LLM's fields + mm_* (model_type llava_*)
    adapter_config.json                peft LoraConfig (r, lora_alpha, target_modules, ...)
    adapter_model.safetensors | .bin   LoRA factors of the LLM:
                                       base_model.model.model.layers.N.<module>.lora_{A,B}.weight
    non_lora_trainables.bin            every other trained tensor, under the same prefix:
                                       base_model.model.model.mm_projector.{0,2}.*, .image_newline, maybe
                                       .vision_tower.* (when the tower was tuned) or resized embeddings

Import follows upstream's order: the folder's config builds the model, the base LLM's weights fill it, the non-LoRA
trainables overwrite them, then peft applies the adapter to the LLM and merges it. The vision tower comes from
``non_lora_trainables.bin`` when it was trained, else from ``mm_vision_tower`` (or ``vision``), as upstream loads it.

We write this rather than call upstream's loader for two reasons. Safety: upstream reads ``.bin`` files with a plain
``torch.load``, which runs whatever a pickle holds; here every ``.bin`` is read with ``weights_only=True`` and must
be a dict of tensors, so a hostile file is refused before anything in it runs. Strictness: upstream loads the
trainables with ``strict=False``, so a misnamed projector silently stays random; here every key and shape is checked
and a mismatch names the keys and the file they came from.

The adapter is applied to the LLM alone: upstream wraps the model in peft before it builds the vision tower and the
projector, so ``base_model.model.`` + the LLM's own parameter names is the whole adapter key space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llavakit.conversion.original import (
    _add_image_token,
    _config_from_original,
    _llm_model_type,
    _present_vision_layers,
    _read_json,
    original_to_ours,
    ours_to_original,
)
from llavakit.errors import CheckpointError
from llavakit.model.checkpoint import load_state_strict
from llavakit.model.llava_next import LlavaNextModel, cast_parameters
from llavakit.model.tensor_files import read_tensor_file
from llavakit.model.vision import VISION_BACKBONES, backbone_for_model_type

NON_LORA_FILE = "non_lora_trainables.bin"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PeftModel → LoraModel → the wrapped model, in every saved key
# Files of a base LLM on the hub: configs, weights (transformers' names only: some repos also ship a differently
# keyed consolidated.safetensors), tokenizer.
_BASE_PATTERNS = ["*.json", "model*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
_BASE_BIN_PATTERNS = ["pytorch_model*.bin"]
# Initialisations that rewrite the base weights when the adapter is created (PiSSA, OLoRA, LoftQ...): an adapter
# saved from them is relative to a modified base, which upstream never trains.
_PLAIN_LORA_INITS = (True, False, "gaussian")


def import_upstream_lora(
    lora_dir: str | Path,
    model_base: str | Path,
    vision: str | None = None,
    template: str | None = None,
    dtype: torch.dtype | None = None,
) -> LlavaNextModel:
    """Merge an upstream LoRA checkpoint onto its base LLM as a `LlavaNextModel` (upstream's ``--model-base``).

    Args:
        lora_dir: upstream LoRA output folder (``config.json``, ``adapter_config.json``, ``adapter_model.*``,
            ``non_lora_trainables.bin``).
        model_base: the base LLM the LoRA was trained on (folder or hub id, e.g. ``lmsys/vicuna-7b-v1.5``); its
            tokenizer is the model's, as upstream loads it.
        vision: vision tower hub id or folder; default: the config's ``mm_vision_tower``.
        template: chat template id; default: the LLM family's.
        dtype: parameter dtype of the result (default float32; the merge itself runs in float32).

    Raises:
        CheckpointError: a missing file, a ``.bin`` holding anything but named tensors, or keys/shapes that do not
            match the config (missing, unexpected or misshapen keys are named).
    """
    from transformers import AutoConfig, AutoTokenizer

    lora_dir = Path(lora_dir)
    upstream = _read_json(lora_dir / "config.json")
    model_type = _llm_model_type(upstream, lora_dir)
    adapter_config = _read_adapter_config(lora_dir)
    adapter_file = _adapter_file(lora_dir)
    adapter = read_tensor_file(adapter_file)
    non_lora = _strip_peft_prefix(read_tensor_file(lora_dir / NON_LORA_FILE))
    base_dir = resolve_base(str(model_base))
    base = _read_base_weights(base_dir)

    tower_source = vision or upstream.get("mm_vision_tower")
    if not tower_source:
        raise CheckpointError(
            f"{lora_dir}/config.json has no mm_vision_tower; pass vision=<hub id or folder>"
        )
    tower_config = AutoConfig.from_pretrained(tower_source)
    backbone = backbone_for_model_type(tower_config.model_type)
    tower_config = getattr(tower_config, "vision_config", tower_config)
    vision_config = _present_vision_layers(tower_config.to_dict(), non_lora)
    config = _config_from_original(upstream, model_type, backbone.id, vision_config, template)
    if backbone.id == "siglip" and vision_config["num_hidden_layers"] < tower_config.num_hidden_layers:
        config.select_layer = -1  # LLaVA-NeXT's truncated SigLIP tower reads its last remaining layer
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = LlavaNextModel.from_config(config, tokenizer=tokenizer)

    sources = {f"base LLM {base_dir}": base, str(lora_dir / NON_LORA_FILE): non_lora}
    if not any(key.startswith("model.vision_tower.") for key in non_lora):
        tower = VISION_BACKBONES.get(backbone.id).model_class.from_pretrained(tower_source)
        tower_state = {
            ours_to_original(f"vision_encoder.model.{k}"): v for k, v in tower.state_dict().items()
        }
        sources = {f"vision tower {tower_source}": tower_state, **sources}
    weights = _check_sources(model, sources)
    load_state_strict(model, weights, lora_dir, original_to_ours)
    model.llm = merge_lora(model.llm, adapter_config, _strip_peft_prefix(adapter), adapter_file)
    _add_image_token(model, tokenizer)
    return cast_parameters(model, dtype or torch.float32).eval()


def resolve_base(model_base: str) -> Path:
    """The local folder of ``model_base``: itself when it is a folder, else a hub snapshot of its weights and tokenizer.

    Raises:
        CheckpointError: neither a folder nor a reachable hub repository.
    """
    if Path(model_base).is_dir():
        return Path(model_base)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(model_base, allow_patterns=_BASE_PATTERNS))
        if not any(folder.glob("model*.safetensors")):
            folder = Path(snapshot_download(model_base, allow_patterns=_BASE_PATTERNS + _BASE_BIN_PATTERNS))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"--model-base {model_base!r} is not a folder and could not be fetched from the hub ({err}); "
            f"pass the base LLM folder the LoRA was trained on"
        ) from None
    return folder


def merge_lora(
    llm: nn.Module, adapter_config: dict[str, Any], adapter: dict[str, torch.Tensor], source: Path
) -> nn.Module:
    """Apply a peft LoRA to ``llm`` and merge it into the weights (W += scaling · B @ A, as peft defines it).

    Args:
        llm: the causal LM (transformers ``*ForCausalLM``), modified in place.
        adapter_config: ``adapter_config.json``'s fields.
        adapter: LoRA tensors under the LLM's parameter names (``model.layers.0.self_attn.q_proj.lora_A.weight``).
        source: the adapter file, named in errors.

    Returns:
        ``llm`` with merged weights and no LoRA layers.

    Raises:
        CheckpointError: the adapter's keys or shapes differ from those its config creates on ``llm``.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    known = set(LoraConfig.__dataclass_fields__)
    unknown = {
        k: v for k, v in adapter_config.items() if k not in known and v not in (None, False, "", [], {})
    }
    if unknown:
        raise CheckpointError(
            f"{source.parent}/adapter_config.json sets {sorted(unknown)}, which this peft version does not know; "
            f"merging without them would give different weights: upgrade peft"
        )
    lora_config = LoraConfig(**{k: v for k, v in adapter_config.items() if k in known and k != "peft_type"})
    peft_model = get_peft_model(llm, lora_config)
    expected = {
        k.removeprefix(PEFT_PREFIX): v.shape for k, v in get_peft_model_state_dict(peft_model).items()
    }
    missing = sorted(set(expected) - set(adapter))
    unexpected = sorted(set(adapter) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the LLM its adapter_config.json targets "
            f"({lora_config.target_modules}): missing {_some(missing)}, unexpected {_some(unexpected)}"
        )
    for key, shape in expected.items():
        if adapter[key].shape != shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(adapter[key].shape)} but r={lora_config.r} on this LLM builds "
                f"{tuple(shape)}"
            )
    set_peft_model_state_dict(peft_model, {PEFT_PREFIX + k: v for k, v in adapter.items()})
    return peft_model.merge_and_unload()


def _read_adapter_config(lora_dir: Path) -> dict[str, Any]:
    config = _read_json(lora_dir / "adapter_config.json")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{lora_dir}/adapter_config.json: peft_type {config['peft_type']!r} is not LORA"
        )
    if config.get("init_lora_weights", True) not in _PLAIN_LORA_INITS:
        raise CheckpointError(
            f"{lora_dir}/adapter_config.json: init_lora_weights={config['init_lora_weights']!r} changes the base "
            f"weights when the adapter is made; only plain LoRA ({', '.join(map(repr, _PLAIN_LORA_INITS))}) imports"
        )
    return config


def _adapter_file(lora_dir: Path) -> Path:
    for name in ADAPTER_FILES:
        if (lora_dir / name).is_file():
            return lora_dir / name
    raise CheckpointError(
        f"{lora_dir} has no {' or '.join(ADAPTER_FILES)}: not an upstream LoRA output folder"
    )


def _strip_peft_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved peft keys → the wrapped model's names (upstream strips the same prefix when it loads)."""
    return {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in state.items()}


def _read_base_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The base LLM's tensors (original layout: ``model.*``, ``lm_head.*``) from transformers' weight files."""
    files = _base_weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_tensor_file(file))
    return state


def _base_weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = _read_json(folder / index).get("weight_map", {})
            return [folder / name for name in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder} has no model.safetensors, pytorch_model.bin or a sharded index of them")


def _check_sources(
    model: LlavaNextModel, sources: dict[str, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Merge ``sources`` (later ones win, as upstream loads them in that order) and check keys and shapes.

    Args:
        model: the model built from the LoRA folder's config.
        sources: label (named in errors) → tensors under original-layout keys.

    Returns:
        the merged original-layout state.

    Raises:
        CheckpointError: a key with no place in the model, a shape the config does not build, or a parameter no
            source holds; each named with the sources it came from or was looked for in.
    """
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    weights: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for label, state in sources.items():
        weights.update(state)
        origin.update(dict.fromkeys(state, label))
    unexpected, covered = [], set()
    for key, tensor in weights.items():
        if key.endswith(".inv_freq"):  # rotary buffers are recomputed, never loaded
            continue
        name = original_to_ours(key)
        if name is None or name not in expected:
            unexpected.append(f"{key} ({origin[key]})")
            continue
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{origin[key]}: {key} has shape {tuple(tensor.shape)} but {model.config.family} with this LoRA "
                f"folder's config.json builds {expected[name]}"
            )
        covered.add(name)
    missing = sorted(set(expected) - covered)
    if model.config.tie_word_embeddings:
        missing = [name for name in missing if name != "llm.lm_head.weight"]
    if unexpected or missing:
        raise CheckpointError(
            f"upstream LoRA import: unexpected keys {_some(sorted(unexpected))}; missing "
            f"{_some([ours_to_original(name) for name in missing])} in all of {', '.join(sources)} "
            f"(upstream saves the projector and image_newline in {NON_LORA_FILE})"
        )
    return weights


def _some(keys: list[str], limit: int = 8) -> str:
    return f"{keys[:limit]}{' ...' if len(keys) > limit else ''}"
