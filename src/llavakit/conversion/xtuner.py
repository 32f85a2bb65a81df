"""XTuner LLaVA checkpoints ("xtuner format", e.g. ``xtuner/llava-llama-3-8b-v1_1``) → a llavakit model.

``xtuner convert pth_to_hf`` writes what was trained, each part with ``save_pretrained``, into one folder::

    config.json, model*.safetensors, tokenizer*   the LLM, when it was fully tuned (a plain transformers causal LM)
    llm_adapter/                                  a peft LoRA of the LLM, when it was LoRA-tuned (no tokenizer)
    visual_encoder_adapter/                       a peft LoRA of the CLIP tower, when it was LoRA-tuned
    visual_encoder/                               the whole CLIP tower (+ image processor), when it was fully tuned
    projector/                                    config.json (visual_hidden_size, llm_hidden_size, depth,
                                                  hidden_act, bias) + model.safetensors: ``model.{0,2,..}.*``

A frozen part is not saved: the LLM then comes from the base the user names (``llm``, default: the LLM adapter's
``base_model_name_or_path``) and the tower from ``vision`` (default: the tower adapter's
``base_model_name_or_path``). The projector is a ``Linear (GELU Linear)*`` stack, so ``depth`` N is llavakit's
``mlp{N}x_gelu`` with ``model.{2(k-1)}`` → ``linear_k``.

XTuner's LLaVAModel is LLaVA-1.5-style: one tile per image, padded to a square with the processor's mean colour
(``pad``), features of hidden state ``visual_select_layer`` (-2 in every shipped config; the folder does not record
it) with the first (CLS) token dropped (``patch``), no ``image_newline``. Like upstream, it marks images with the
out-of-vocabulary id -200, so import adds ``<image>`` to the tokenizer (`llavakit.conversion.original`).

The prompt template is not saved either. ``template`` takes a llavakit template id, or the name of XTuner's
``PROMPT_TEMPLATE`` the model was trained with (`XTUNER_PROMPTS`); XTuner's LLaVA data has no system message, and
for such a name the tokenizer's own chat template is used after checking that it renders a probe conversation
exactly as XTuner's template does, so a mismatch is an error rather than a silently different prompt.

We read the folder ourselves rather than through XTuner (which needs mmengine and its registry) to check every key
and shape (a missing or misshapen tensor names the file it came from) and to read ``.bin`` files as tensors only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llavakit.anyres.spec import ImageSpec
from llavakit.conversion.original import _add_image_token, _read_json
from llavakit.conversion.upstream_lora import (
    _read_adapter_config,
    _read_base_weights,
    _some,
    _strip_peft_prefix,
    merge_lora,
    resolve_base,
)
from llavakit.errors import CheckpointError, ConfigError, DataError
from llavakit.io_safety import check_separate
from llavakit.model.checkpoint import save_checkpoint
from llavakit.model.config import LlavaKitConfig
from llavakit.model.family import family_for
from llavakit.model.llava_next import LlavaNextModel, _config_dict, cast_parameters
from llavakit.model.tensor_files import read_tensor_file
from llavakit.model.vision import VISION_BACKBONES, backbone_for_model_type

LLM_ADAPTER = "llm_adapter"
TOWER_ADAPTER = "visual_encoder_adapter"
TOWER = "visual_encoder"
PROJECTOR = "projector"
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PROJECTOR_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class XtunerPrompt:
    """One of XTuner's ``PROMPT_TEMPLATE`` entries, as its ``template_map_fn`` + ``encode_fn`` render a round.

    A round is ``INSTRUCTION.format(input=...)`` + reply + ``SUFFIX`` (+ the EOS unless the suffix acts as one) +
    ``SEP``; the conversation, and every round after an EOS, opens with the BOS. (``SYSTEM`` is never used: XTuner's
    LLaVA data has no system message.)
    """

    instruction: str
    suffix: str
    suffix_as_eos: bool
    sep: str

    def render(self, turns: tuple[str, ...], bos: str, eos: str) -> str:
        """``turns`` (user, assistant, ..., user) as XTuner's training text, ending with the generation prompt."""
        text = bos
        for index in range(0, len(turns) - 1, 2):
            text += self.instruction.format(input=turns[index]) + turns[index + 1] + self.suffix
            ends_with_eos = not self.suffix_as_eos  # then the next round opens with a BOS again
            text += (eos if ends_with_eos else "") + self.sep + (bos if ends_with_eos else "")
        return text + self.instruction.format(input=turns[-1])


# XTuner's templates for the LLMs its LLaVA configs train (xtuner/utils/templates.py).
XTUNER_PROMPTS = {
    "llama3_chat": XtunerPrompt(
        "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
        True,
        "",
    ),
    "phi3_chat": XtunerPrompt("<|user|>\n{input}<|end|>\n<|assistant|>\n", "<|end|>", True, "\n"),
    "internlm2_chat": XtunerPrompt(
        "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", True, "\n"
    ),
    "qwen_chat": XtunerPrompt(
        "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", True, "\n"
    ),
    "vicuna": XtunerPrompt("USER: {input} ASSISTANT:", "", False, "\n"),
}
_PROBE = ("<image>\nWhat is shown?", "A cat.", "And its colour?")


def import_xtuner(
    xtuner_dir: str | Path,
    out_dir: str | Path,
    *,
    template: str,
    vision: str | None = None,
    llm: str | None = None,
    select_layer: int = -2,
    dtype: torch.dtype | None = None,
) -> Path:
    """Convert an XTuner LLaVA folder into a llavakit checkpoint at ``out_dir`` (see `load_xtuner` for the options).

    Returns:
        ``out_dir``, written atomically by `save_checkpoint`.

    Raises:
        CheckpointError: ``out_dir`` is, lies inside or contains an input (checked before anything is read), or
            see `load_xtuner`.
    """
    sources = [str(xtuner_dir)] + [source for source in (vision, llm) if source]
    check_separate(out_dir, sources, CheckpointError, "convert from-xtuner")
    model = load_xtuner(
        xtuner_dir, template=template, vision=vision, llm=llm, select_layer=select_layer, dtype=dtype
    )
    return save_checkpoint(model, out_dir, sources=sources)


def load_xtuner(
    xtuner_dir: str | Path,
    *,
    template: str,
    vision: str | None = None,
    llm: str | None = None,
    select_layer: int = -2,
    dtype: torch.dtype | None = None,
) -> LlavaNextModel:
    """Assemble an XTuner LLaVA folder (layout in the module docstring) as a `LlavaNextModel`.

    Args:
        xtuner_dir: the folder ``xtuner convert pth_to_hf`` wrote.
        template: a llavakit template id, or the XTuner prompt template name it was trained with (`XTUNER_PROMPTS`).
        vision: CLIP tower hub id or folder (e.g. ``openai/clip-vit-large-patch14-336``); default: the tower
            adapter's base. Must be left out when the folder holds a fully tuned ``visual_encoder/``.
        llm: base LLM hub id or folder, for a LoRA-tuned or frozen LLM; default: the LLM adapter's base. Must be
            left out when the folder holds the fully tuned LLM.
        select_layer: vision hidden state the features come from (XTuner's ``visual_select_layer``).
        dtype: parameter dtype of the result (default float32; the merges run in float32).

    Raises:
        CheckpointError: a missing part or file, a ``.bin`` holding anything but named tensors, a projector XTuner's
            config cannot map to llavakit's, keys or shapes that do not match the model (named with their file),
            or an XTuner template name the tokenizer's chat template does not reproduce.
        ConfigError: an unknown template name.
    """
    from transformers import AutoConfig, AutoTokenizer

    xtuner_dir = Path(xtuner_dir)
    if not xtuner_dir.is_dir():
        raise CheckpointError(
            f"{xtuner_dir} is not a folder: pass the folder `xtuner convert pth_to_hf` wrote"
        )
    projector_config = _read_projector_config(xtuner_dir / PROJECTOR)
    llm_dir, llm_adapter = _llm_source(xtuner_dir, llm)
    tower_source, tower_adapter, tower_dir = _tower_source(xtuner_dir, vision)

    tower_config = AutoConfig.from_pretrained(tower_source)
    backbone = backbone_for_model_type(tower_config.model_type)
    if backbone.id != "clip":
        raise CheckpointError(
            f"vision tower {tower_source} is {backbone.id!r}: XTuner's LLaVAModel drops the first token of every "
            "feature map as CLIP's CLS token, which only a CLIP tower has; pass the CLIP tower it was trained with"
        )
    tower_config = getattr(tower_config, "vision_config", tower_config)
    text_config = _config_dict(AutoConfig.from_pretrained(llm_dir))
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    config = LlavaKitConfig(
        vision_encoder=backbone.id,
        vision_config=_config_dict(tower_config),
        text_config=text_config,
        projector=_projector_id(projector_config, xtuner_dir / PROJECTOR, int(tower_config.hidden_size)),
        select_layer=select_layer,
        image_spec=_llava15_spec(tower_config, backbone.id),
        template=resolve_template(template, tokenizer, llm_dir),
        image_token_id=-1,  # XTuner marks images with the sentinel -200; `_add_image_token` assigns a real id
        pad_token_id=text_config.get("pad_token_id"),
        padding_side=family_for(text_config["model_type"]).padding_side,
    )
    model = LlavaNextModel.from_config(config, tokenizer=tokenizer)

    _load_part(model.llm, _read_base_weights(llm_dir), f"LLM weights in {llm_dir}")
    tower = model.vision_encoder.model
    if tower_dir is not None:
        _load_part(tower, _read_base_weights(tower_dir), f"vision tower weights in {tower_dir}")
    else:
        pretrained = VISION_BACKBONES.get(backbone.id).model_class.from_pretrained(tower_source)
        _load_part(tower, pretrained.state_dict(), f"vision tower {tower_source}")
    projector_file = _weight_file(xtuner_dir / PROJECTOR, _PROJECTOR_FILES)
    _load_part(model.projector, read_tensor_file(projector_file), str(projector_file), _projector_name)
    if tower_adapter is not None:
        model.vision_encoder.model = _merge_adapter(tower, tower_adapter)
    if llm_adapter is not None:
        model.llm = _merge_adapter(model.llm, llm_adapter)
    _add_image_token(model, tokenizer)
    return cast_parameters(model, dtype or torch.float32).eval()


def resolve_template(template: str, tokenizer: Any, where: Path) -> str:
    """The llavakit template id for ``template``: itself (or what an alias names) if llavakit knows it, else
    ``tokenizer`` for an XTuner name whose rendering the tokenizer's chat template reproduces.

    Raises:
        ConfigError: neither a llavakit id nor an XTuner name.
        CheckpointError: an XTuner name the tokenizer (read from ``where``) renders differently or cannot render.
    """
    from llavakit.data.schema import ASSISTANT, USER, Conversation, Turn
    from llavakit.data.templates import TEMPLATES

    if template in TEMPLATES:
        return TEMPLATES.get(template).id
    prompt = XTUNER_PROMPTS.get(template)
    if prompt is None:
        raise ConfigError(
            f"template {template!r} is neither a llavakit template id ({', '.join(TEMPLATES.names())}) nor an "
            f"XTuner prompt template llavakit maps ({', '.join(XTUNER_PROMPTS)}); pass the llavakit id that renders "
            "the prompt the model was trained with"
        )
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    expected = prompt.render(_PROBE, bos, eos)
    ours = TEMPLATES.get("tokenizer")
    roles = [USER if index % 2 == 0 else ASSISTANT for index in range(len(_PROBE))]
    conversation = Conversation(tuple(Turn(role, text) for role, text in zip(roles, _PROBE)))
    try:
        segments = ours.render(conversation, for_generation=True, tokenizer=tokenizer)
    except (ConfigError, DataError) as err:
        raise CheckpointError(
            f"XTuner template {template!r} maps to the tokenizer's chat template, which the tokenizer in {where} "
            f"cannot provide ({err}); pass the llavakit template id that renders XTuner's {template!r}"
        ) from None
    rendered = (bos if ours.add_bos else "") + "".join(segment.text for segment in segments)
    if rendered != expected:
        raise CheckpointError(
            f"XTuner template {template!r} renders {expected!r}, but the chat template of the tokenizer in {where} "
            f"renders {rendered!r}; pass the llavakit template id that renders XTuner's {template!r}"
        )
    return ours.id


def _llm_source(xtuner_dir: Path, llm: str | None) -> tuple[Path, Path | None]:
    """(the folder holding the LLM's weights and tokenizer, the LLM adapter folder or None)."""
    adapter = xtuner_dir / LLM_ADAPTER
    if (xtuner_dir / "config.json").is_file():
        if adapter.is_dir():
            raise CheckpointError(
                f"{xtuner_dir} holds both a full LLM (config.json) and {LLM_ADAPTER}/: XTuner writes one or the "
                "other; remove the one that was not trained"
            )
        if llm is not None:
            raise CheckpointError(
                f"{xtuner_dir} holds the fully tuned LLM (config.json); llm={llm!r} would replace it: leave it out"
            )
        return xtuner_dir, None
    base = llm
    if base is None and adapter.is_dir():
        base = _read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        what = (
            f"{LLM_ADAPTER}/adapter_config.json names no base_model_name_or_path"
            if adapter.is_dir()
            else (f"it has no config.json and no {LLM_ADAPTER}/ (the LLM was frozen)")
        )
        raise CheckpointError(f"{xtuner_dir} holds no LLM ({what}); pass llm=<the base LLM folder or hub id>")
    return resolve_base(str(base)), adapter if adapter.is_dir() else None


def _tower_source(xtuner_dir: Path, vision: str | None) -> tuple[str, Path | None, Path | None]:
    """(vision config source, tower adapter folder or None, fully tuned tower folder or None)."""
    adapter, full = xtuner_dir / TOWER_ADAPTER, xtuner_dir / TOWER
    if full.is_dir():
        if adapter.is_dir():
            raise CheckpointError(
                f"{xtuner_dir} holds both {TOWER}/ and {TOWER_ADAPTER}/: XTuner writes one or the other; remove "
                "the one that was not trained"
            )
        if vision is not None:
            raise CheckpointError(
                f"{xtuner_dir} holds the fully tuned tower {TOWER}/; vision={vision!r} would replace it: leave it out"
            )
        return str(full), None, full
    source = vision
    if source is None and adapter.is_dir():
        source = _read_adapter_config(adapter).get("base_model_name_or_path")
    if not source:
        raise CheckpointError(
            f"{xtuner_dir} does not name its vision tower (no {TOWER}/, and no base_model_name_or_path in "
            f"{TOWER_ADAPTER}/adapter_config.json); pass vision=<the CLIP tower it was trained with, e.g. "
            "openai/clip-vit-large-patch14-336>"
        )
    return str(source), adapter if adapter.is_dir() else None, None


def _read_projector_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is missing: an XTuner LLaVA folder always holds the trained projector (config.json + "
            "model.safetensors); pass the folder `xtuner convert pth_to_hf` wrote"
        )
    return _read_json(folder / "config.json")


def _projector_id(config: dict[str, Any], folder: Path, vision_hidden: int) -> str:
    """llavakit's projector id for XTuner's ProjectorConfig (GELU between biased linears only)."""
    where = folder / "config.json"
    if config.get("hidden_act", "gelu") != "gelu" or not config.get("bias", True):
        raise CheckpointError(
            f"{where}: hidden_act={config.get('hidden_act')!r}, bias={config.get('bias')!r}; llavakit's projectors "
            "are biased linears with exact GELU between them (XTuner's default)"
        )
    depth = config.get("depth", 2)
    if not isinstance(depth, int) or depth < 1:
        raise CheckpointError(f"{where}: depth {depth!r} is not a positive number of linear layers")
    if config.get("visual_hidden_size", vision_hidden) != vision_hidden:
        raise CheckpointError(
            f"{where}: visual_hidden_size {config['visual_hidden_size']} but the vision tower's hidden_size is "
            f"{vision_hidden}: pass the tower it was trained with (token_merge_ratio forks of XTuner do not import)"
        )
    return "linear" if depth == 1 else f"mlp{depth}x_gelu"


def _projector_name(key: str) -> str:
    """XTuner's ``model.{2(k-1)}.{weight,bias}`` → llavakit's ``linear_k.*`` (other keys kept, to be reported)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "model" and parts[1].isdigit() and int(parts[1]) % 2 == 0:
        return f"linear_{int(parts[1]) // 2 + 1}.{parts[2]}"
    return key


def _load_part(
    module: nn.Module, state: dict[str, torch.Tensor], label: str, rename: Callable[[str], str] = str
) -> None:
    """Load ``state`` into ``module`` after checking that it fills every entry with the right shape.

    Args:
        module: the part of the model to fill.
        state: tensors under the file's own keys.
        label: the file or folder they came from, named in errors.
        rename: file key → ``module``'s parameter name.

    Raises:
        CheckpointError: a key ``module`` has no place for, a shape it does not build, or an entry no key fills;
            keys as the file spells them, with ``label``.
    """
    expected = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    names = {key: rename(key) for key in state if not key.endswith(".inv_freq")}  # rotary buffers: recomputed
    for key, name in names.items():
        if name in expected and tuple(state[key].shape) != expected[name]:
            raise CheckpointError(
                f"{label}: {key} has shape {tuple(state[key].shape)} but the model built from the configs has "
                f"{expected[name]}"
            )
    unexpected = sorted(key for key, name in names.items() if name not in expected)
    missing = sorted(set(expected) - set(names.values()))
    tied = bool(getattr(getattr(module, "config", None), "tie_word_embeddings", False))
    if tied:
        missing = [name for name in missing if name != "lm_head.weight"]
    if unexpected or missing:
        raise CheckpointError(
            f"{label} do not match the model built from the configs: unexpected {_some(unexpected)}, "
            f"missing {_some(missing)}"
        )
    module.load_state_dict({name: state[key] for key, name in names.items()}, strict=False)
    if tied:
        module.tie_weights()


def _merge_adapter(module: nn.Module, folder: Path) -> nn.Module:
    """``module`` with the peft LoRA saved in ``folder`` merged into its weights."""
    adapter_file = _weight_file(folder, _ADAPTER_FILES)
    adapter = _strip_peft_prefix(read_tensor_file(adapter_file))
    return merge_lora(module, _read_adapter_config(folder), adapter, adapter_file)


def _weight_file(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} has no {' or '.join(names)}")


def _llava15_spec(tower_config: Any, backbone_id: str) -> ImageSpec:
    """One ``pad`` tile at the tower's resolution, flat features without CLS (XTuner's LLaVADataset + LLaVAModel)."""
    backbone = VISION_BACKBONES.get(backbone_id)
    tile = int(tower_config.image_size)
    return ImageSpec(
        tile_size=tile,
        patch_size=int(tower_config.patch_size),
        aspect_ratio="pad",
        pinpoints=((tile, tile),),
        merge_type="flat",
        image_mean=backbone.image_mean,
        image_std=backbone.image_std,
        select_feature="patch",
    )
