"""Upstream ``llava/train/train_mem.py`` command lines → a typed `TrainConfig`.

Why: published recipes are shell scripts with ~45 HF-style flags; users must be able to run them with only paths
and model ids changed. Every flag the seed scripts use is mapped onto one config field, flags that are no-ops
upstream too (``--lazy_preprocess``) or that only concern evaluation are accepted when their value is harmless,
and anything else — an unknown flag, or a value we would silently ignore — is a `ConfigError` naming it.

Mapping rules that are not one-to-one:

- global batch = ``per_device_train_batch_size × gradient_accumulation_steps × WORLD_SIZE`` (torchrun's variable).
- trainable parts: ``--mm_tunable_parts`` (LLaVA-NeXT) wins; else the legacy flags (``--tune_mm_mlp_adapter``
  → projector only; ``--freeze_mm_mlp_adapter``, ``--unfreeze_mm_vision_tower``) on top of projector + LLM.
- a projector-only stage is named ``align`` (and writes ``mm_projector.bin``); others ``finetune``.
- ``--model_name_or_path`` is either a previous llavakit/llava-hf export (``config.json`` of type ``llava_next``)
  or a base LLM combined with ``--vision_tower``.
- ``--deepspeed X.json``: ZeRO stage 3 → FSDP2 resharding after forward, stage 2 (and 1) → FSDP2 keeping
  parameters gathered; ``offload_param``/``offload_optimizer`` to cpu → FSDP2 CPU offload. Upstream's shipped
  ``scripts/zero{2,3}[_offload].json`` are recognised by file name when the path does not exist.
- ``--version`` ``v1`` is upstream's alias of ``vicuna_v1``.
- ``--fp16 True`` → ``strategy.mixed_precision=fp16`` with ``param_dtype=fp32`` (HF Trainer's AMP: float32
  weights, float16 autocast, a dynamic loss scaler; upstream loads the model in float32 unless ``--bf16``).
  ``--bf16 True --fp16 True`` is refused, as HF Trainer refuses it.
- ``--use_liger_kernel True`` (transformers' flag) → ``strategy.loss_kernel=liger``: Liger-Kernel's fused linear
  cross-entropy for the loss; its other kernels (RMSNorm, RoPE, SwiGLU) are speed-only and not applied.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llavakit.errors import ConfigError
from llavakit.training.config import TrainConfig
from llavakit.training.config_loading import config_from_dict

_TUNABLE_PARTS = {
    "mm_vision_tower": "vision_tower",
    "mm_mlp_adapter": "projector",
    "mm_language_model": "language_model",
}
_UPSTREAM_ZERO = re.compile(r"^zero(?P<stage>[23])(?P<offload>_offload)?\.json$")

# Flags accepted without effect, with the values that keep them harmless (None = any value).
_NO_OP_FLAGS: dict[str, tuple[str, ...] | None] = {
    "lazy_preprocess": None,  # a no-op upstream too: samples are always tokenised lazily
    "is_multimodal": None,
    "per_device_eval_batch_size": None,  # no evaluation during training here
    "evaluation_strategy": ("no",),
    "eval_strategy": ("no",),
    "dataloader_drop_last": ("True", "true"),  # the last partial global batch is always dropped
    "remove_unused_columns": ("False", "false"),
    "torch_compile_backend": ("inductor",),
    "mm_use_im_start_end": ("False", "false"),  # <im_start>/<im_end> wrapping is not implemented
    "mm_use_im_patch_token": ("False", "false"),
    "mm_vision_select_feature": ("patch",),
    "save_strategy": ("steps", "no"),
}


def parse_flag_tokens(argv: list[str]) -> dict[str, str]:
    """``["--a", "1", "--b=2", "--c"]`` → ``{"a": "1", "b": "2", "c": "True"}`` (a bare flag means True)."""
    flags: dict[str, str] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--"):
            raise ConfigError(
                f"unexpected argument {token!r}: upstream flags look like --name value or --name=value"
            )
        name, sep, value = token[2:].partition("=")
        if not sep:
            has_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
            value = argv[index + 1] if has_value else "True"
            index += 1 if has_value else 0
        flags[name] = value
        index += 1
    return flags


def _bool(value: str, flag: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"--{flag} expects True or False, got {value!r}")


def _number(kind: Callable[[str], Any], value: str, flag: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"--{flag} expects a {kind.__name__}, got {value!r}") from None


class _Flags:
    """Typed, consumed-once access to the parsed flags; leftovers are unknown flags."""

    def __init__(self, flags: dict[str, str]) -> None:
        self.flags = dict(flags)

    def text(self, name: str, default: str | None = None) -> str | None:
        return self.flags.pop(name, default)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.flags.pop(name, None)
        return default if value is None else _bool(value, name)

    def number(self, name: str, kind: Callable[[str], Any], default: Any = None) -> Any:
        value = self.flags.pop(name, None)
        return default if value is None else _number(kind, value, name)

    def check_no_ops(self) -> None:
        for name, allowed in _NO_OP_FLAGS.items():
            value = self.flags.pop(name, None)
            if value is not None and allowed is not None and value not in allowed:
                raise ConfigError(
                    f"--{name} {value} is not supported by llavakit train (accepted values: {', '.join(allowed)})"
                )

    def reject_leftovers(self) -> None:
        if self.flags:
            names = ", ".join(f"--{name}" for name in sorted(self.flags))
            raise ConfigError(f"unknown or unsupported upstream flag(s): {names}")


def config_from_upstream_flags(argv: list[str]) -> TrainConfig:
    """Translate an upstream ``train_mem.py`` argument list into a validated `TrainConfig`.

    Raises:
        ConfigError: an unknown flag (named), an unsupported value, or a missing required flag.
    """
    flags = _Flags(parse_flag_tokens(argv))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    stage = _stage(flags, world_size)
    spec = _image_spec_flags(flags)
    model = _model(flags)
    if "path" in model:
        stage["image_spec"] = spec  # a previous stage's export: only the flags given change its spec
    else:
        # upstream's defaults, and its unpad arithmetic (`llavakit.anyres.spec`): its scripts reproduce its models
        model["image_spec"] = {"aspect_ratio": "square", "merge_type": "flat", "unpad_rounding": "floor", **spec}
    config = {
        "run_dir": flags.text("output_dir") or _missing("output_dir"),
        "model": model,
        "stages": [stage],
        "strategy": _strategy(flags),
        "lora": _lora(flags),
        "logging": _logging(flags),
        "seed": flags.number("seed", int, 42),
    }
    flags.check_no_ops()
    flags.reject_leftovers()
    return config_from_dict(config, source="upstream flags")


def _missing(flag: str) -> str:
    raise ConfigError(f"--{flag} is required")


def _trainable(flags: _Flags) -> list[str]:
    tunable = flags.text("mm_tunable_parts")
    legacy = {
        "tune": flags.boolean("tune_mm_mlp_adapter"),
        "freeze_projector": flags.boolean("freeze_mm_mlp_adapter"),
        "vision": flags.boolean("unfreeze_mm_vision_tower"),
        "freeze_backbone": flags.boolean("freeze_backbone"),
    }
    if tunable:
        parts = [part.strip() for part in tunable.split(",") if part.strip()]
        unknown = [part for part in parts if part not in _TUNABLE_PARTS]
        if unknown:
            raise ConfigError(
                f"--mm_tunable_parts: unknown part(s) {unknown}; valid: {', '.join(_TUNABLE_PARTS)}"
            )
        return [_TUNABLE_PARTS[part] for part in parts]
    if legacy["tune"]:
        return ["projector"]
    parts = ["projector", "language_model"]
    if legacy["freeze_projector"]:
        parts.remove("projector")
    if legacy["freeze_backbone"]:
        parts.remove("language_model")
    return ["vision_tower", *parts] if legacy["vision"] else parts


def _stage(flags: _Flags, world_size: int) -> dict[str, Any]:
    trainable = _trainable(flags)
    micro = flags.number("per_device_train_batch_size", int, 8)
    accumulation = flags.number("gradient_accumulation_steps", int, 1)
    version = flags.text("version", "v0")
    max_steps = flags.number("max_steps", int, -1)
    return {
        "name": "align" if trainable == ["projector"] else "finetune",
        "trainable": trainable,
        "data": {
            "path": flags.text("data_path") or _missing("data_path"),
            "image_folder": flags.text("image_folder"),
            "template": version,
            "max_length": flags.number("model_max_length", int, 512),
            "group_by_modality_length": flags.boolean("group_by_modality_length"),
            "group_by_length": flags.boolean("group_by_length"),
            "num_workers": flags.number("dataloader_num_workers", int, "auto"),
        },
        "optim": {
            "lr": flags.number("learning_rate", float, 5e-5),
            "vision_tower_lr": flags.number("mm_vision_tower_lr", float),
            "projector_lr": flags.number("mm_projector_lr", float),
            "weight_decay": flags.number("weight_decay", float, 0.0),
            "warmup_ratio": flags.number("warmup_ratio", float, 0.0),
            "schedule": flags.text("lr_scheduler_type", "linear"),
            "max_grad_norm": flags.number("max_grad_norm", float, 1.0),
            "betas": [flags.number("adam_beta1", float, 0.9), flags.number("adam_beta2", float, 0.999)],
            "eps": flags.number("adam_epsilon", float, 1e-8),
            "fused": _fused_adamw(flags.text("optim", "adamw_torch")),
        },
        "global_batch_size": micro * accumulation * world_size,
        "micro_batch_size": micro,
        "epochs": flags.number("num_train_epochs", float, 3.0),
        "max_steps": max_steps if max_steps > 0 else None,
        "gradient_checkpointing": flags.boolean("gradient_checkpointing"),
    }


def _fused_adamw(optim: str) -> bool:
    """``--optim``: the two torch AdamW implementations HF's Trainer offers (same update rule)."""
    choices = {"adamw_torch": False, "adamw_torch_fused": True}
    if optim not in choices:
        raise ConfigError(f"--optim {optim} is not supported by llavakit train (accepted values: {', '.join(choices)})")
    return choices[optim]


def _model(flags: _Flags) -> dict[str, Any]:
    source = flags.text("model_name_or_path") or _missing("model_name_or_path")
    vision = flags.text("vision_tower")
    model: dict[str, Any] = {"attn_implementation": flags.text("attn_implementation", "flash_attention_2")}
    projector_type = flags.text("mm_projector_type", "linear")
    select_layer = flags.number("mm_vision_select_layer", int, -1)
    adapter = flags.text("pretrain_mm_mlp_adapter")
    if _is_llava_checkpoint(source):
        return {**model, "path": source, **({"pretrained_projector": adapter} if adapter else {})}
    if vision is None:
        raise ConfigError("--vision_tower is required when --model_name_or_path is a base LLM")
    model.update(vision=vision, llm=source, projector=projector_type, select_layer=select_layer)
    if adapter:
        model["pretrained_projector"] = adapter
    return model


def _is_llava_checkpoint(source: str) -> bool:
    from llavakit.conversion.original import is_original_checkpoint

    if is_original_checkpoint(source):
        return True
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        return False
    data = json.loads(config_file.read_text())
    return data.get("model_type") == "llava_next" or "llavakit" in data


def _image_spec_flags(flags: _Flags) -> dict[str, Any]:
    """The image-spec fields the flags set explicitly (pinpoints stay in upstream's string notation)."""
    names = {
        "image_aspect_ratio": "aspect_ratio",
        "mm_patch_merge_type": "merge_type",
        "image_grid_pinpoints": "pinpoints",
    }
    return {field: flags.text(flag) for flag, field in names.items() if flag in flags.flags}


def _strategy(flags: _Flags) -> dict[str, Any]:
    strategy: dict[str, Any] = {
        "name": "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single",
        **_precision(flags.boolean("bf16"), flags.boolean("fp16")),
        "tf32": flags.boolean("tf32"),
        "compile": flags.boolean("torch_compile"),
        "loss_kernel": "liger" if flags.boolean("use_liger_kernel") else "logits",
    }
    deepspeed = flags.text("deepspeed")
    if deepspeed:
        strategy.update(deepspeed_to_fsdp(deepspeed))
    return strategy


def _precision(bf16: bool, fp16: bool) -> dict[str, Any]:
    """``--bf16``/``--fp16`` → the strategy's mixed precision (fp16: float32 master weights, as upstream loads)."""
    if bf16 and fp16:
        raise ConfigError("--bf16 True and --fp16 True exclude each other: pick one (bf16 needs an Ampere or newer GPU)")
    if fp16:
        return {"mixed_precision": "fp16", "param_dtype": "fp32"}
    return {"mixed_precision": "bf16" if bf16 else "no"}


def deepspeed_to_fsdp(path: str) -> dict[str, Any]:
    """The FSDP2 settings equivalent to a DeepSpeed json (``name``, ``reshard_after_forward``, ``cpu_offload``).

    Raises:
        ConfigError: the file is missing (and not an upstream-shipped name) or has no ZeRO stage 1-3.
    """
    file = Path(path)
    if file.is_file():
        zero = json.loads(file.read_text()).get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        offload = any(
            (zero.get(key) or {}).get("device") in ("cpu", "nvme")
            for key in ("offload_param", "offload_optimizer")
        )
    elif _UPSTREAM_ZERO.match(file.name):
        match = _UPSTREAM_ZERO.match(file.name)
        stage, offload = int(match.group("stage")), bool(match.group("offload"))
    else:
        raise ConfigError(
            f"--deepspeed {path}: file not found (upstream's scripts/zero2.json, zero3.json, "
            "zero3_offload.json are recognised by name)"
        )
    if stage not in (1, 2, 3):
        raise ConfigError(
            f"--deepspeed {path}: zero_optimization.stage {stage} has no FSDP2 equivalent (use 1-3)"
        )
    return {"name": "fsdp2", "reshard_after_forward": stage == 3, "cpu_offload": offload}


def _lora(flags: _Flags) -> dict[str, Any]:
    return {
        "enabled": flags.boolean("lora_enable"),
        "r": flags.number("lora_r", int, 64),
        "alpha": flags.number("lora_alpha", int, 16),
        "dropout": flags.number("lora_dropout", float, 0.05),
        "bits": flags.number("bits", int, 16),
    }


def _logging(flags: _Flags) -> dict[str, Any]:
    report = flags.text("report_to", "none")
    save_strategy = flags.flags.get("save_strategy", "steps")
    save_steps = flags.number("save_steps", int, 500)
    return {
        "log_every": flags.number("logging_steps", int, 1),
        "save_every": save_steps if save_strategy == "steps" else 0,
        "save_total_limit": flags.number("save_total_limit", int, 2),
        "report_to": "none" if report in ("none", "None") else report,
        "run_name": flags.text("run_name"),
    }
