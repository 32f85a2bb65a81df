"""Original LLaVA / LLaVA-NeXT checkpoints (``LlavaLlamaForCausalLM``, ``LlavaQwenForCausalLM``, ...) ⇄ llavakit.

Original checkpoints (``liuhaotian/llava-v1.6-*``, ``lmms-lab/*``) are what SGLang serves; llava-hf ones are what
transformers and vLLM serve. This module is a declarative key map plus config mapping in both directions, so a
model trained anywhere can be served everywhere. Original key layout::

    model.embed_tokens.weight, model.layers.N.*, model.norm.weight, lm_head.weight      (the LLM)
    model.mm_projector.{0,2}.{weight,bias}                                                (mlp2x_gelu projector)
    model.image_newline
    model.vision_tower.vision_tower.vision_model.*                                        (when saved; else hub)

Upstream marks images with the sentinel id -200 rather than a vocabulary token, so import adds ``<image>`` to the
tokenizer and grows the embeddings by one row (mean-initialised, as transformers' converter does in spirit).
Upstream stores pinpoints as (width, height); they are converted here.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llavakit.anyres.geometry import parse_pinpoints
from llavakit.anyres.spec import ImageSpec
from llavakit.errors import CheckpointError
from llavakit.io_safety import check_separate, write_folder
from llavakit.model.checkpoint import load_state_strict
from llavakit.model.config import LlavaKitConfig
from llavakit.model.llava_next import LlavaNextModel, cast_parameters
from llavakit.model.tensor_files import read_tensor_file
from llavakit.model.tokenizer import ensure_image_token
from llavakit.model.vision import VISION_BACKBONES, backbone_for_model_type

# Original model_type → transformers LLM model_type (upstream registers one subclass per family).
ORIGINAL_MODEL_TYPES = {
    "llava_llama": "llama",
    "llava": "llama",
    "llava_mistral": "mistral",
    "llava_mixtral": "mixtral",
    "llava_qwen": "qwen2",
    "llava_qwen_moe": "qwen2_moe",
    "llava_gemma": "gemma",
}
ARCHITECTURES = {"llama": "LlavaLlamaForCausalLM", "mistral": "LlavaMistralForCausalLM", "mixtral": "LlavaMixtralForCausalLM",
                 "qwen2": "LlavaQwenForCausalLM", "qwen2_moe": "LlavaQwenMoeForCausalLM", "gemma": "LlavaGemmaForCausalLM"}
_MM_KEYS = re.compile(r"^(mm_|image_|tokenizer_|tune_mm|use_mm|unfreeze_mm|freeze_mm|vision_tower|add_faster|faster_|"
                      r"pos_skipping|use_pos|force_sample|frames_upbound|delay_load)")
_VISION_PREFIX = re.compile(r"^model\.vision_tower\.vision_tower\.(vision_model\.)?")
_PROJECTOR = re.compile(r"^model\.mm_projector\.(\d+)\.(weight|bias)$")


def original_to_ours(key: str) -> str | None:
    """Original weight key → llavakit parameter name (None for keys that carry no weight, e.g. rotary buffers)."""
    if key.endswith(".inv_freq"):
        return None
    if _VISION_PREFIX.match(key):
        return _VISION_PREFIX.sub("vision_encoder.model.", key)
    projector = _PROJECTOR.match(key)
    if projector:
        return f"projector.linear_{int(projector.group(1)) // 2 + 1}.{projector.group(2)}"
    if key == "model.image_newline":
        return "image_newline"
    if key.startswith(("model.", "lm_head.")):
        return f"llm.{key}"
    return None


def ours_to_original(name: str) -> str:
    """llavakit parameter name → original weight key."""
    if name.startswith("vision_encoder.model."):
        rest = name.removeprefix("vision_encoder.model.").removeprefix("vision_model.")
        return f"model.vision_tower.vision_tower.vision_model.{rest}"
    match = re.match(r"^projector\.linear_(\d+)\.(weight|bias)$", name)
    if match:
        return f"model.mm_projector.{2 * (int(match.group(1)) - 1)}.{match.group(2)}"
    if name == "image_newline":
        return "model.image_newline"
    if name.startswith("llm."):
        return name.removeprefix("llm.")
    raise CheckpointError(f"parameter {name!r} has no place in the original LLaVA layout")


def import_original(
    path: str | Path, vision: str | None = None, template: str | None = None, dtype: torch.dtype | None = None
) -> LlavaNextModel:
    """Load an original LLaVA/LLaVA-NeXT checkpoint folder as a `LlavaNextModel`.

    Args:
        path: folder with ``config.json``, weights (``*.safetensors`` or ``pytorch_model*.bin``) and the tokenizer.
        vision: vision tower checkpoint to take the architecture (and weights, when the folder has none) from;
            default: the folder's ``mm_vision_tower`` hub id.
        template: chat template id; default: the LLM family's (upstream never stores its ``--version``).
        dtype: parameter dtype (default float32).
    """
    model, tokenizer = load_original(path, vision, template)
    add_image_token(model, tokenizer)
    return cast_parameters(model, dtype or torch.float32).eval()


def is_original_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder of an original-layout LLaVA checkpoint (an original ``model_type`` in its
    ``config.json``, no llava-hf ``text_config``)."""
    config_path = Path(path) / "config.json"
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") in ORIGINAL_MODEL_TYPES and "text_config" not in data


@dataclass(frozen=True)
class OriginalLayout:
    """What an original checkpoint folder becomes, read from its ``config.json`` and its tower's (no weights).

    Attributes:
        config: the llavakit config `import_original` builds the model from (before ``<image>`` is added).
        tower: where the vision tower's architecture (and weights, when the folder has none) come from.
    """

    config: LlavaKitConfig
    tower: str


def original_layout(
    path: str | Path, weight_keys: Iterable[str], vision: str | None = None, template: str | None = None
) -> OriginalLayout:
    """The llavakit config of the original folder ``path`` whose weight files hold ``weight_keys``.

    Args:
        path: the folder.
        weight_keys: the keys of its weight files (they tell how many vision layers a saved tower kept).
        vision, template: as for `import_original`.

    Raises:
        CheckpointError: not an original checkpoint, or no readable vision tower config.
    """
    from transformers import AutoConfig

    path = Path(path)
    original = _read_json(path / "config.json")
    model_type = _llm_model_type(original, path)
    tower_source = vision or original.get("mm_vision_tower")
    if not tower_source:
        raise CheckpointError(f"{path}/config.json has no mm_vision_tower; pass vision=<hub id or folder>")
    try:
        tower_config = AutoConfig.from_pretrained(tower_source)
    except OSError as err:
        raise CheckpointError(
            f"{path}: its vision tower {tower_source!r} (mm_vision_tower, or the vision given) cannot be read "
            f"({err}); download it, or point mm_vision_tower in {path}/config.json at a local copy"
        ) from None
    backbone = backbone_for_model_type(tower_config.model_type)
    tower_config = getattr(tower_config, "vision_config", tower_config)
    vision_config = _present_vision_layers(tower_config.to_dict(), weight_keys)
    config = _config_from_original(original, model_type, backbone.id, vision_config, template)
    if backbone.id == "siglip" and vision_config["num_hidden_layers"] < tower_config.num_hidden_layers:
        # LLaVA-NeXT's SigLIP tower deletes its last layer and reads the output of the (new) last one,
        # ignoring mm_vision_select_layer: reproduce that exactly.
        config.select_layer = -1
    return OriginalLayout(config, str(tower_source))


def original_saved_dtype(path: str | Path) -> torch.dtype:
    """The dtype an original folder's ``config.json`` records its weights in (float32 when it records none)."""
    original = _read_json(Path(path) / "config.json")
    saved = str(original.get("torch_dtype") or original.get("dtype") or "float32")
    return getattr(torch, saved, torch.float32)


def load_original(
    path: str | Path,
    vision: str | None = None,
    template: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[LlavaNextModel, Any]:
    """`import_original` up to ``<image>``: the model with the folder's weights (before any cast), and its tokenizer.

    `add_image_token` then gives ``<image>`` its row; training draws that row from its own seed
    (`llavakit.training.model_setup`).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    _llm_model_type(_read_json(path / "config.json"), path)  # a folder of another kind fails before reading weights
    weights = _read_weights(path)
    layout = original_layout(path, weights, vision, template)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = LlavaNextModel.from_config(layout.config, tokenizer=tokenizer, attn_implementation=attn_implementation)
    if not any(key.startswith("model.vision_tower.") for key in weights):
        backbone = VISION_BACKBONES.get(layout.config.vision_encoder)
        vision_model = backbone.model_class.from_pretrained(layout.tower)
        weights = {**weights, **{ours_to_original(f"vision_encoder.model.{k}"): v for k, v in vision_model.state_dict().items()}}
    load_state_strict(model, weights, path, original_to_ours)
    return model, tokenizer


def _llm_model_type(original: dict[str, Any], path: Path) -> str:
    model_type = ORIGINAL_MODEL_TYPES.get(original.get("model_type", ""))
    if model_type is None:
        raise CheckpointError(
            f"{path}/config.json: model_type {original.get('model_type')!r} is not an original LLaVA type "
            f"({', '.join(ORIGINAL_MODEL_TYPES)}); llava-hf checkpoints load with LlavaNextModel.from_pretrained"
        )
    return model_type


def _config_from_original(
    original: dict[str, Any], model_type: str, backbone_id: str, vision_config: dict[str, Any], template: str | None
) -> LlavaKitConfig:
    from llavakit.model.family import family_for

    text_config = {k: v for k, v in original.items() if not _MM_KEYS.match(k) and k not in ("architectures", "auto_map")}
    text_config["model_type"] = model_type
    backbone = VISION_BACKBONES.get(backbone_id)
    tile = int(vision_config["image_size"])
    aspect = original.get("image_aspect_ratio", "square")
    pinpoints = original.get("image_grid_pinpoints") or [[tile, 2 * tile]]
    spec = ImageSpec(
        tile_size=tile,
        patch_size=int(vision_config["patch_size"]),
        aspect_ratio=aspect,
        pinpoints=parse_pinpoints(pinpoints, tile, order="wh"),
        merge_type=original.get("mm_patch_merge_type", "flat"),
        image_mean=backbone.image_mean,
        image_std=backbone.image_std,
        select_feature=original.get("mm_vision_select_feature", "patch"),
        unpad_rounding="floor",  # upstream's unpad_image truncates with int(); the layout has no field for it
    )
    return LlavaKitConfig(
        vision_encoder=backbone_id,
        vision_config=vision_config,
        text_config=text_config,
        projector=original.get("mm_projector_type", "linear"),
        select_layer=int(original.get("mm_vision_select_layer", -1)),
        image_spec=spec,
        template=template or family_for(model_type).default_template,
        image_token_id=-1,  # upstream has no <image> token; `add_image_token` assigns one
        pad_token_id=original.get("pad_token_id"),
        padding_side=original.get("tokenizer_padding_side", "right"),
    )


def _present_vision_layers(vision_config: dict[str, Any], weights: Iterable[str]) -> dict[str, Any]:
    """The vision config, with ``num_hidden_layers`` cut to the layers the checkpoint holds (if it holds any)."""
    indices = {int(m.group(1)) for key in weights if (m := re.search(r"vision_tower\.vision_tower\..*encoder\.layers\.(\d+)\.", key))}
    if indices:
        vision_config = {**vision_config, "num_hidden_layers": max(indices) + 1}
    return vision_config


def add_image_token(model: LlavaNextModel, tokenizer: Any) -> None:
    """Give ``<image>`` a vocabulary row (upstream uses the out-of-vocabulary sentinel -200).

    A tokenizer without ``<image>`` grows the embeddings (and an untied head) by transformers' mean-resizing, which
    draws the new rows from the generator."""
    old_size = model.llm.get_input_embeddings().weight.shape[0]
    model.config.image_token_id = ensure_image_token(tokenizer)
    if len(tokenizer) > old_size:
        model.llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        model.config.text_config["vocab_size"] = len(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


_add_image_token = add_image_token  # the name `llavakit.conversion.xtuner` imports


def export_original(model: LlavaNextModel, path: str | Path, sources: Iterable[str | Path] = ()) -> Path:
    """Write ``model`` in the original LLaVA layout (config with ``mm_*`` fields, original keys, tokenizer).

    The layout has no field for a system prompt: a model trained with its own (``config.system_prompt``) is exported
    with a warning, since upstream code prompts it with the template's default unless ``conv.system`` is set.
    Like `llavakit.model.checkpoint.save_checkpoint`, the files are written into a partial folder and then moved
    in (`llavakit.io_safety`): an error while writing leaves ``path`` as it was, and other files there are kept.

    Args:
        model: the model to export.
        path: the output folder.
        sources: the folders the model was read from; ``path`` must be none of them, nor inside or around one
            (the export would replace a llava-hf checkpoint's ``config.json`` and weights, and with them its
            template and system prompt).

    Raises:
        CheckpointError: ``path`` overlaps a source, is a file, or holds a ``config.json`` that is not an
            original-layout LLaVA checkpoint's (a llava-hf checkpoint, an LLM), which the export would overwrite.
    """
    path = Path(path)
    check_separate(path, sources, CheckpointError, "export_original")
    _refuse_foreign_config(path)
    if model.config.system_prompt is not None:
        warnings.warn(
            f"{path}: the original LLaVA layout cannot record the system prompt this model was trained with "
            f"({model.config.system_prompt!r}); set conv.system to it in upstream code",
            stacklevel=2,
        )
    spec = model.config.image_spec
    if spec.unpad_rounding == "round" and spec.uses_anyres and "unpad" in spec.merge_type:
        warnings.warn(
            f"{path}: this model unpads with round(x, 7) (image_spec.unpad_rounding 'round'), but upstream's code "
            "truncates with int(): on rare image sizes (about 1 in 10^5) it keeps two fewer rows or columns of "
            "the tiled feature map than the model was trained with; `llavakit convert from-original` reads the "
            "folder back with upstream's rule",
            stacklevel=2,
        )
    return write_folder(path, lambda folder: _write_original(model, folder), CheckpointError)


def _write_original(model: LlavaNextModel, path: Path) -> None:
    from safetensors.torch import save_file

    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        pointer = tensor.data_ptr()
        state[ours_to_original(name)] = tensor.detach().cpu().clone() if pointer in seen else tensor.detach().cpu()
        seen.add(pointer)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(_original_config(model.config), indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(path)


def _refuse_foreign_config(path: Path) -> None:
    """Refuse a folder whose ``config.json`` is not an original LLaVA checkpoint's: the export would overwrite it."""
    config_path = path / "config.json"
    if not config_path.is_file():
        return
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and data.get("model_type") in ORIGINAL_MODEL_TYPES and "text_config" not in data:
        return
    model_type = data.get("model_type") if isinstance(data, dict) else "unreadable"
    raise CheckpointError(
        f"{path} holds a config.json (model_type {model_type!r}) that is not an original-layout LLaVA "
        "checkpoint's; exporting there would overwrite that model. Choose a new or empty output folder"
    )


def _original_config(config: LlavaKitConfig) -> dict[str, Any]:
    spec = config.image_spec
    family = config.family
    return {
        **config.text_config,
        "architectures": [ARCHITECTURES.get(family, "LlavaLlamaForCausalLM")],
        "model_type": next((k for k, v in ORIGINAL_MODEL_TYPES.items() if v == family and k != "llava"), "llava_llama"),
        "mm_vision_tower": config.vision_config.get("_name_or_path") or config.vision_encoder,
        "mm_projector_type": config.projector,
        "mm_hidden_size": int(config.vision_config["hidden_size"]),
        "mm_vision_select_layer": config.select_layer,
        "mm_vision_select_feature": spec.select_feature,
        "mm_patch_merge_type": spec.merge_type,
        "image_aspect_ratio": spec.aspect_ratio,
        "image_grid_pinpoints": [[w, h] for h, w in spec.pinpoints],
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_padding_side": config.padding_side,
        "use_mm_proj": True,
    }


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: not a checkpoint folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: invalid JSON at line {err.lineno}: {err.msg}") from None


def original_weight_files(path: Path) -> list[Path]:
    """The weight files of an original folder: its ``*.safetensors``, else its ``pytorch_model*.bin`` pickles."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors or pytorch_model*.bin weight files")
    return files


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in original_weight_files(path):
        state.update(read_tensor_file(file))
    return state
