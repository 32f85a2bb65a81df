"""Checkpoint I/O in the llava-hf layout, with our own key map.

On disk (what ``llava-hf/*`` repositories and transformers 4.x write, and what vLLM reads)::

    vision_tower.vision_model.<encoder keys>     language_model.model.<decoder keys>
    multi_modal_projector.linear_{1,2}.*         language_model.lm_head.weight
    image_newline

We write these keys ourselves instead of relying on transformers' ``save_pretrained``: some transformers 5.x
releases drop the ``vision_model.`` level when saving a model assembled from a vision encoder and an LLM, and 4.57
then loads such a checkpoint with a randomly initialised vision tower and only a warning. Our own key map makes the
layout independent of the installed transformers version. ``language_model.lm_head.weight`` is always written, even when the LLM ties it to the
embeddings, so no loader can end up with a random head (the LLaVA-OneVision-0.5B trap).

Loading accepts the on-disk layout, the flattened ≥5.6 layout and transformers' in-memory names, and fails with
the list of missing or unexpected keys rather than initialising anything at random. LLaVA-1.5-style models (one
``pad`` / ``square`` tile per image, no ``image_newline``) use the same keys with ``model_type: llava``; a llava-hf
``llava`` folder's preprocessing is read from its image processor config (``processor_config.json``'s
``image_processor``, else ``preprocessor_config.json``, transformers' order).

The chat template travels with the checkpoint so that other servers prompt it as it was trained: saving writes the
Jinja generated from the template id and system prompt (`llavakit.data.templates.jinja`) as the tokenizer's and the
processor's ``chat_template`` (transformers 5 and 4.57 both write and read ``chat_template.jinja``; vLLM reads it
through them). Loading a transformers / llava-hf checkpoint (no ``"llavakit"`` section) that carries a chat template
(``chat_template.jinja``, the legacy processor file ``chat_template.json``, or ``tokenizer_config.json``'s
``chat_template``, in transformers' order) prompts with that template (id ``processor``) instead of guessing one
from the LLM family.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from llavakit.errors import CheckpointError
from llavakit.io_safety import check_separate, write_folder
from llavakit.model.config import LlavaKitConfig
from llavakit.model.llava_next import cast_parameters

if TYPE_CHECKING:
    from llavakit.model.llava_next import LlavaNextModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_NAME = "chat_template.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"
IMAGE_PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
# Files a save writes that an earlier save may have left and this one not rewritten (see `_owned_files`).
_WEIGHT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
_OWNED_NAMES = frozenset(
    {
        INDEX_NAME,
        CHAT_TEMPLATE_NAME,
        LEGACY_CHAT_TEMPLATE_NAME,
        PROCESSOR_CONFIG_NAME,
        IMAGE_PROCESSOR_CONFIG_NAME,
    }
)
# config.json model types of the llava-hf checkpoints saving may replace.
_LLAVA_HF_TYPES = ("llava_next", "llava_onevision", "llava", "llavakit")
# transformers 5 saves generic fast tokenizers under a class name 4.x lacks; 4.x knows the same class by this name.
_TOKENIZER_CLASS_RENAMES = {"TokenizersBackend": "PreTrainedTokenizerFast"}

# Our module prefix → on-disk prefix (save direction). The vision entry also strips a 4.x ``vision_model.`` level.
_SAVE_PREFIXES = (
    ("vision_encoder.model.", "vision_tower.vision_model."),
    ("projector.", "multi_modal_projector."),
    ("llm.", "language_model."),
)
# On-disk or in-memory transformers prefixes → our prefixes (load direction); first match wins.
_LOAD_RULES = (
    (re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?"), "vision_encoder.model."),
    (re.compile(r"^(model\.)?multi_modal_projector\."), "projector."),
    (re.compile(r"^(model\.)?image_newline$"), "image_newline"),
    (re.compile(r"^language_model\."), "llm."),
    (re.compile(r"^model\.language_model\."), "llm.{base}."),
    (re.compile(r"^lm_head\."), "llm.lm_head."),
)


def to_disk_key(name: str) -> str:
    """Our parameter name → llava-hf on-disk key."""
    if name == "image_newline":
        return name
    for ours, disk in _SAVE_PREFIXES:
        if name.startswith(ours):
            rest = name[len(ours) :]
            if ours.startswith("vision") and rest.startswith("vision_model."):
                rest = rest[len("vision_model.") :]
            return disk + rest
    raise CheckpointError(f"parameter {name!r} has no place in the llava-hf layout")


def from_disk_key(key: str, base_prefix: str) -> str | None:
    """llava-hf key (on-disk or in-memory form) → our parameter name; None for keys we do not load."""
    if key.endswith(".inv_freq"):
        return None
    for pattern, replacement in _LOAD_RULES:
        if pattern.match(key):
            return pattern.sub(replacement.format(base=base_prefix), key, count=1)
    return None


def save_checkpoint(
    model: LlavaNextModel, path: str | Path, max_shard_size: str = "5GB", sources: Iterable[str | Path] = ()
) -> Path:
    """Write ``model`` to ``path`` (weights, config, tokenizer, transformers processor when representable).

    The files are written into a partial folder next to ``path`` and then moved in (`llavakit.io_safety`): an error
    while writing leaves an earlier checkpoint at ``path`` intact. Saving into an existing llava-hf checkpoint folder
    replaces the files this function writes, deletes the weight shards, chat templates and processor configs of the
    earlier save that this one does not write again (stale ones would make loaders disagree), and keeps anything
    else (a user's notes, an ``adapter/`` folder).

    Args:
        model: the model to save.
        path: the checkpoint folder.
        max_shard_size: largest safetensors file (``"5GB"``, ``"100KB"``).
        sources: the folders the model was read from (CLI inputs); ``path`` must be none of them, nor inside or
            around one.

    Raises:
        CheckpointError: ``path`` overlaps a source, is a file, or holds another model's ``config.json`` (an LLM,
            a vision tower, an original-layout LLaVA checkpoint), which saving would overwrite.
    """
    path = Path(path)
    check_separate(path, sources, CheckpointError, "save_checkpoint")
    _refuse_foreign_config(path)
    return write_folder(
        path,
        lambda folder: _write_checkpoint(model, folder, max_shard_size),
        CheckpointError,
        owned=_owned_files,
    )


def _write_checkpoint(model: LlavaNextModel, path: Path, max_shard_size: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    state = _disk_state_dict(model)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, str(path / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": split.tensor_to_filename,
        }
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2))
    config = model.config.to_config_json(model.vision_encoder.backbone.has_cls_token)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    for section in (config, config["text_config"], config["vision_config"]):
        section["dtype"] = dtype
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False))
    _save_generation_config(model, path)
    if model.tokenizer is not None:
        _save_tokenizer_and_processor(model, path)


def _owned_files(path: Path) -> list[str]:
    """Files of an earlier save in ``path`` that must go when this save does not write them again: weight shards
    and their index (a stale shard or index would make loaders disagree on the weights), chat templates and
    processor configs."""
    return [
        file.name
        for file in path.iterdir()
        if file.is_file() and (file.name in _OWNED_NAMES or _WEIGHT_FILE.fullmatch(file.name))
    ]


def _refuse_foreign_config(path: Path) -> None:
    """Refuse a folder whose ``config.json`` is not a llava-hf checkpoint's: saving would overwrite another model."""
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        return
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and data.get("model_type") in _LLAVA_HF_TYPES and "text_config" in data:
        return
    model_type = data.get("model_type") if isinstance(data, dict) else "unreadable"
    raise CheckpointError(
        f"{path} holds another model's {CONFIG_NAME} (model_type {model_type!r}, not a llava-hf checkpoint); "
        "saving there would overwrite it. Choose a new or empty output folder"
    )


def _disk_state_dict(model: LlavaNextModel) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        key = to_disk_key(name)
        # safetensors refuses shared storage (tied embeddings): write an independent copy.
        pointer = tensor.data_ptr()
        state[key] = tensor.detach().cpu().clone() if pointer in seen else tensor.detach().cpu()
        seen.setdefault(pointer, key)
    return state


def _save_generation_config(model: LlavaNextModel, path: Path) -> None:
    generation_config = getattr(model.llm, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(path)


def _save_tokenizer_and_processor(model: LlavaNextModel, path: Path) -> None:
    """Save the tokenizer, and a transformers ``LlavaNextProcessor`` (or ``LlavaProcessor`` for a ``llava``
    checkpoint) when transformers can reproduce the model, both carrying the checkpoint's chat template."""
    from llavakit.data.templates import get_template
    from llavakit.data.templates.jinja import jinja_chat_template

    tokenizer = model.tokenizer
    tokenizer.padding_side = model.config.padding_side
    chat_template = jinja_chat_template(
        get_template(model.config.template, system_prompt=model.config.system_prompt), tokenizer
    )
    own_template = tokenizer.chat_template
    tokenizer.chat_template = chat_template  # only while saving: the in-memory tokenizer keeps its own
    try:
        architecture = model.config.transformers_class()
        if architecture == "LlavaNextForConditionalGeneration":
            _llava_next_processor(model, chat_template).save_pretrained(path)
        elif architecture == "LlavaForConditionalGeneration":
            _llava_processor(model, chat_template).save_pretrained(path)
        else:
            tokenizer.save_pretrained(path)
    finally:
        tokenizer.chat_template = own_template
    _rename_tokenizer_class(path / TOKENIZER_CONFIG_NAME)


def _llava_next_processor(model: LlavaNextModel, chat_template: str | None) -> Any:
    from transformers.models.llava_next import LlavaNextImageProcessorPil, LlavaNextProcessor

    spec = model.config.image_spec
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=[list(p) for p in spec.pinpoints], **_image_processor_kwargs(spec)
    )
    return LlavaNextProcessor(image_processor=image_processor, **_processor_kwargs(model, chat_template))


def _llava_processor(model: LlavaNextModel, chat_template: str | None) -> Any:
    """transformers' ``LlavaProcessor`` for a single-tile model: ``do_pad`` pads to a square with the mean colour
    ``int(m * 255)``, centred, before the resize (our ``pad``, upstream's ``expand2square``); without it the
    shortest edge is resized and the centre cropped (our ``square``)."""
    from transformers.models.llava import LlavaImageProcessorPil, LlavaProcessor

    spec = model.config.image_spec
    image_processor = LlavaImageProcessorPil(do_pad=spec.aspect_ratio == "pad", **_image_processor_kwargs(spec))
    return LlavaProcessor(image_processor=image_processor, **_processor_kwargs(model, chat_template))


def _image_processor_kwargs(spec: Any) -> dict[str, Any]:
    """What transformers' LLaVA image processors share: one tile's size, normalisation and resampling filter."""
    from transformers.image_utils import PILImageResampling

    return {
        "size": {"shortest_edge": spec.tile_size},
        "crop_size": {"height": spec.tile_size, "width": spec.tile_size},
        "image_mean": list(spec.image_mean),
        "image_std": list(spec.image_std),
        "resample": PILImageResampling[spec.resample.upper()],
    }


def _processor_kwargs(model: LlavaNextModel, chat_template: str | None) -> dict[str, Any]:
    """What transformers' LLaVA processors share: tokenizer, patch size and how many visual tokens a tile makes."""
    has_cls = model.vision_encoder.backbone.has_cls_token
    return {
        "tokenizer": model.tokenizer,
        "patch_size": model.config.image_spec.patch_size,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy(has_cls),
        "num_additional_image_tokens": 1 if has_cls else 0,
        "chat_template": chat_template,
    }


def _rename_tokenizer_class(tokenizer_config: Path) -> None:
    """Name the tokenizer class so that transformers 4.57 (and vLLM on it) loads the tokenizer and processor too."""
    data = json.loads(tokenizer_config.read_text())
    renamed = _TOKENIZER_CLASS_RENAMES.get(data.get("tokenizer_class"))
    if renamed is not None:
        data["tokenizer_class"] = renamed
        tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_chat_template(path: Path) -> str | None:
    """The chat template a checkpoint folder carries, where transformers' processor looks first:
    ``chat_template.jinja``, then ``chat_template.json``, then ``tokenizer_config.json``'s ``chat_template``
    (its ``default`` entry when it holds several named templates); None when there is none.

    Raises:
        CheckpointError: a template file that is not valid JSON or holds no template.
    """
    jinja = path / CHAT_TEMPLATE_NAME
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None
    legacy = path / LEGACY_CHAT_TEMPLATE_NAME
    if legacy.is_file():
        template = _template_entry(_read_json(legacy).get("chat_template"), legacy)
        if template is None:
            raise CheckpointError(f"{legacy} holds no 'chat_template'; fix or delete the file")
        return template
    tokenizer_config = path / TOKENIZER_CONFIG_NAME
    if tokenizer_config.is_file():
        return _template_entry(_read_json(tokenizer_config).get("chat_template"), tokenizer_config)
    return None


def _template_entry(value: Any, file: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise CheckpointError(
        f"{file}: 'chat_template' must be a string or a list of {{name, template}} entries with a 'default' one"
    )


def load_checkpoint(
    cls: type[LlavaNextModel],
    path: str | Path,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
) -> LlavaNextModel:
    """Load a llava-hf layout folder into ``cls`` (strict: every parameter must come from the files)."""
    path = Path(path)
    model, saved_dtype = build_skeleton(cls, path, attn_implementation)
    state = _read_weights(path)
    base = model.llm.base_model_prefix
    load_state_strict(model, state, path, lambda key: from_disk_key(key, base))
    cast_parameters(model, dtype or saved_dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def build_skeleton(
    cls: type[LlavaNextModel], path: Path, attn_implementation: str | None = None
) -> tuple[LlavaNextModel, torch.dtype]:
    """The model ``path/config.json`` describes, randomly initialised, with the folder's tokenizer and chat template,
    and the dtype its weights were saved in. Built under `llavakit.training.sharded_load.empty_parameters`, its
    parameters have no storage (meta), for loading them shard by shard."""
    data = _read_config_json(path)
    chat_template = read_chat_template(path)
    config = LlavaKitConfig.from_config_json(
        data,
        str(path / CONFIG_NAME),
        has_chat_template=chat_template is not None,
        image_processor=read_image_processor_config(path),
    )
    tokenizer = _load_tokenizer(path)
    _use_checkpoint_template(tokenizer, chat_template, config.template, path)
    model = cls.from_config(config, tokenizer=tokenizer, attn_implementation=attn_implementation)
    saved_dtype = getattr(
        torch, str(data.get("dtype") or data.get("torch_dtype") or "float32"), torch.float32
    )
    return model, saved_dtype


def read_config(path: Path) -> LlavaKitConfig:
    """Parse ``path/config.json`` into a `LlavaKitConfig`."""
    has_chat_template = read_chat_template(path) is not None
    return LlavaKitConfig.from_config_json(
        _read_config_json(path),
        str(path / CONFIG_NAME),
        has_chat_template=has_chat_template,
        image_processor=read_image_processor_config(path),
    )


def read_image_processor_config(path: Path) -> dict[str, Any] | None:
    """The folder's image processor config where transformers looks: ``processor_config.json``'s
    ``image_processor`` (transformers 5 saves), else ``preprocessor_config.json`` (llava-hf repositories, 4.x);
    None when there is neither."""
    processor = path / PROCESSOR_CONFIG_NAME
    if processor.is_file():
        nested = _read_json(processor).get("image_processor")
        if isinstance(nested, dict):
            return nested
    image_processor = path / IMAGE_PROCESSOR_CONFIG_NAME
    return _read_json(image_processor) if image_processor.is_file() else None


def _read_config_json(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint folder: {CONFIG_NAME} is missing")
    return _read_json(config_path)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def part_config(source: str, what: str) -> Any:
    """The transformers config of a part (vision tower or LLM) given as a folder or a Hub id.

    Why: transformers reports a missing folder as a malformed Hub repo id, with a traceback.

    Args:
        source: a local folder or a Hub model id (``owner/name``).
        what: how messages name the source, e.g. ``--vision`` or ``model.llm``.

    Raises:
        CheckpointError: a folder without ``config.json``, a path that does not exist, or a Hub id that cannot be
            fetched (offline and not cached, unknown, gated).
    """
    from transformers import AutoConfig

    path = Path(source)
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{what} {source} holds no {CONFIG_NAME}: pass the model's folder (or a Hub id)")
    if not path.exists() and (source.count("/") != 1 or source.startswith((".", "/", "~"))):
        raise CheckpointError(f"{what} {source} does not exist: pass a model folder or a Hub id (owner/name)")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{what} {source} cannot be loaded ({err}); pass a model folder, or a Hub id that is downloaded "
            "(offline) or reachable"
        ) from None


def _use_checkpoint_template(tokenizer: Any, chat_template: str | None, template: str, path: Path) -> None:
    """Give the tokenizer the folder's chat template (the one transformers' processor and vLLM use), which template
    ``processor`` renders with; it may differ from the tokenizer's own (llava-hf's multimodal processor template next
    to the LLM's text template in ``tokenizer_config.json``)."""
    if template == "processor" and (tokenizer is None or chat_template is None):
        missing = "tokenizer files" if tokenizer is None else "chat template"
        raise CheckpointError(
            f"{path}: template 'processor' needs the checkpoint's {missing}, which the folder lacks; add them or "
            "load with another template"
        )
    if tokenizer is not None and chat_template is not None:
        tokenizer.chat_template = chat_template


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return None
    return AutoTokenizer.from_pretrained(path)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one, or those its index names).

    Raises:
        CheckpointError: neither ``model.safetensors`` nor an index, or an indexed file is missing.
    """
    index = path / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / WEIGHTS_NAME).is_file():
        names = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    for name in names:
        if not (path / name).is_file():
            raise CheckpointError(f"{index} names {name}, which is missing from {path}")
    return [path / name for name in names]


def unreadable_weights(file: Path, err: Exception) -> CheckpointError:
    """The error for a safetensors file that does not open or read."""
    return CheckpointError(f"{file} is not a readable safetensors file ({err}); re-download or re-save it")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            state.update(load_file(str(file)))
        except Exception as err:  # safetensors raises a bare Exception subtype on corrupt headers
            raise unreadable_weights(file, err) from None
    return state


def load_state_strict(
    model: LlavaNextModel,
    source_state: dict[str, torch.Tensor],
    path: Path,
    to_ours: Callable[[str], str | None],
) -> None:
    """Load ``source_state`` (keys in some checkpoint layout) into ``model``, checking keys and shapes first.

    Args:
        model: the model built from the checkpoint's config.
        source_state: tensors under the checkpoint's own key names.
        path: the checkpoint, named in errors.
        to_ours: maps a checkpoint key to our parameter name (None: a key we have no place for).

    Raises:
        CheckpointError: see `match_checkpoint`.
    """
    shapes = {key: tuple(tensor.shape) for key, tensor in source_state.items()}
    sources = match_checkpoint(model, shapes, path, to_ours)
    model.load_state_dict({name: source_state[key] for name, key in sources.items()}, strict=False)
    if model.config.tie_word_embeddings:
        model.llm.tie_weights()


def match_checkpoint(
    model: LlavaNextModel,
    source_shapes: dict[str, tuple[int, ...]],
    path: Path,
    to_ours: Callable[[str], str | None],
) -> dict[str, str]:
    """Which checkpoint key fills each entry of ``model.state_dict()``, checked before anything is read.

    Args:
        model: the model built from the checkpoint's config (its parameters may be on the meta device).
        source_shapes: the checkpoint's keys and tensor shapes.
        path: the checkpoint, named in errors.
        to_ours: maps a checkpoint key to our parameter name (None: a key we have no place for).

    Returns:
        our state-dict name → checkpoint key, for every entry (a tied ``lm_head`` may have none).

    Raises:
        CheckpointError: a missing parameter (a tied ``lm_head`` excepted), an unexpected key or a shape mismatch.
    """
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    sources: dict[str, str] = {}
    unexpected: list[str] = []
    for key, shape in source_shapes.items():
        if key.endswith(".inv_freq"):  # rotary buffers are recomputed, never loaded
            continue
        name = to_ours(key)
        if name is None or name not in expected:
            unexpected.append(key)
            continue
        if tuple(shape) != expected[name]:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(shape)} but the config builds {expected[name]}"
            )
        sources[name] = key
    missing = sorted(set(expected) - set(sources))
    if model.config.tie_word_embeddings:
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    return sources
