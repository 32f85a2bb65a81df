"""LoRA and QLoRA on the LLM through peft; vision tower and projector train (or not) as the stage says.

Why: upstream applies LoRA to every ``nn.Linear`` except the projector and vision tower by filtering module names,
and forgets to save the non-LoRA trainables (the projector) in intermediate checkpoints (haotian-liu/LLaVA#844).
Here peft wraps only ``model.llm``; with LoRA on, the ``language_model`` part means the LoRA matrices only (upstream
``mm_tunable_parts`` semantics), and our checkpoints hold the whole model state, so every trainable tensor is saved
at every checkpoint. Export merges the adapters into the LLM weights.

QLoRA (``lora.bits`` 4 or 8, upstream ``finetune_qlora.sh``): only the LLM is loaded quantised by bitsandbytes
(4-bit: nf4 with double quantisation; compute dtype = the run's dtype), see `quantization_config`; the vision tower
and projector stay in full precision. `apply_lora` then runs peft's ``prepare_model_for_kbit_training`` (freezes the
LLM, casts its non-quantised weights such as norms to fp32) before adding the adapters. Export dequantises the LLM
to fp32 and merges the adapters in fp32 (`merge_lora`), so the exported checkpoint is a plain llava-hf model that
loads without bitsandbytes. Preflight (`llavakit.training.model_setup`) rejects, before any weight loads, QLoRA
without bitsandbytes installed and ``bits`` without ``lora.enabled``.

QLoRA under FSDP2 (4 bits): the quantised base weights (``Params4bit``, `quantised_params`) are left out of
sharding with ``fully_shard(..., ignored_params=...)``, so every rank keeps the whole 4-bit base, as upstream's
``finetune_qlora.sh`` does with ZeRO-2 (a replicated frozen base); the adapters, the projector, the vision tower and
the LLM's other weights (embeddings, norms, head) are sharded and their gradients reduce-scattered as usual. Memory
per rank: the whole base at about 0.5 byte per weight of the LLM's linear layers (about 3.5 GB for a 7B LLM, 37 GB
for 72B), plus 1/world of everything else. Why not shard the packed weights: FSDP2 shards each
parameter as a DTensor along dim 0 and gathers it back as a plain tensor, which drops the ``quant_state``
bitsandbytes attaches to its ``Params4bit`` (the layer's forward then fails: "quant_state is required"), and the
float storage that FSDP1-QLoRA relies on (``bnb_4bit_quant_storage``) reinterprets the packed bytes as floats,
which FSDP2's gathers and casts do not keep bit-exact (bitsandbytes#1945). The quantised
model is loaded whole on every rank through transformers (not by the meta-device load), each rank quantising the
same weights the same way, so the ranks' bases are identical. Refused by `check_qlora_fsdp2`, before any weight
loads: 8 bits (torch's distributed state dict cannot name the ``SCB`` entry of bitsandbytes' 8-bit layers, so
neither checkpoints nor the export could be written), ``strategy.cpu_offload``, and torch < 2.7 (no
``ignored_params``). The export gathers the sharded tensors into a skeleton whose quantised layers are copies of
the trained (replicated) ones (`peft_skeleton`), then dequantises and merges as above; a stage's ``eval:`` section
generates with a gathered copy built the same way (`llavakit.training.evaluation.full_copy`), not merged, so it
computes as the trained model does. Resume checkpoints hold no quantised base (`llavakit.training.checkpoint`): it is
rebuilt identically from the model source.

Adapter initial values (`initialise_adapters`) are the same in every strategy and follow the run's ``seed``: peft's
default initialisation (``init_lora_weights=True``: ``lora_A`` Kaiming-uniform with ``a=sqrt(5)``, ``lora_B``
zeros, so the adapted model starts equal to the base model; for embedding targets ``lora_embedding_A`` zeros and
``lora_embedding_B`` standard normal) drawn from a generator of its own seeded with the run's seed, as whole tensors
in the model's parameter order, each FSDP2 rank keeping its rows, so the values depend neither on the strategy, nor
on the world size, nor on what drew from the global generator before. peft's own draws (from the global generator,
overwritten) run in a forked generator state, so applying LoRA does not shift the global stream either.

LoRA under FSDP2: the adapters live inside the decoder layers, so each layer's FSDP2 group holds its frozen base
weights and its trainable adapters together (FSDP2 reduces gradients only of parameters that require them). Under
FSDP2 the model is built on the meta device (`llavakit.training.sharded_load`, from a checkpoint or from parts):
peft renames the adapted weights (``llm.base_model.model.<name>``, ``<linear>.base_layer.weight``), so
`peft_checkpoint_keys` maps the sharded source's names onto the wrapped ones, and the adapters (meta tensors until
then) get their values from `initialise_sharded_adapters` after the shards are read, with the seed
`initialise_adapters` recorded on the model.

QLoRA on CPU: bitsandbytes (0.50) repacks a ``Linear4bit``'s weight for its AVX512-BF16 inference kernel at the
first eval-mode forward without gradients (an evaluation section, a generation) and keeps it so: the block scales
are rounded to bf16 and the double-quantisation statistics dropped (its inverse only re-quantises those), later
train-mode forwards run that kernel, through which no gradient flows back to the layer's input, and the packed
bytes no longer dequantise to the weights. `apply_lora` therefore turns the repacking off on the quantised layers
it prepares, and `merge_lora` refuses a layer found repacked (`TrainingError`) rather than merge weights it cannot
recover exactly.

Export writes the merged model and, besides it, the adapters alone (`save_adapter`: peft's ``adapter_config.json``
+ ``adapter_model.safetensors`` in ``<stage>/final/adapter/``), loadable with ``PeftModel.from_pretrained`` onto
the LLM the stage started from (for QLoRA: onto that LLM quantised with the same ``BitsAndBytesConfig``).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from llavakit.errors import CheckpointError, ConfigError, TrainingError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config import LoraConfig

# Precision of the dequantised LLM weights and of the adapter merge at export.
MERGE_DTYPE = torch.float32
# The adapter-only export inside a stage's ``final`` folder (peft's adapter folder layout).
ADAPTER_DIR = "adapter"
# The prefix peft puts before the wrapped LLM's own parameter names, and the name of the wrapped linear inside a
# LoRA layer.
_PEFT_PREFIX = "llm.base_model.model."
_BASE_LAYER = ".base_layer."
# Where `initialise_adapters` leaves a meta model's adapter seed for `initialise_sharded_adapters`.
_ADAPTER_SEED_ATTRIBUTE = "_llavakit_adapter_seed"


def is_quantised(config: LoraConfig) -> bool:
    """Whether the run trains QLoRA (LLM loaded in 4 or 8 bits)."""
    return config.enabled and config.bits != 16


def require_bitsandbytes() -> None:
    """Raise a `ConfigError` saying how to install bitsandbytes when it is missing (QLoRA needs it)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            'lora.bits=4/8 (QLoRA) needs the bitsandbytes package: pip install -e ".[quant]" (or use lora.bits=16)'
        )


def check_qlora_fsdp2(config: LoraConfig, cpu_offload: bool) -> None:
    """Refuse, before any weight loads, a QLoRA setup that FSDP2 cannot train (see module docstring).

    Raises:
        ConfigError: 8 bits (torch's distributed state dict, which checkpoints and the export use, cannot name
            bitsandbytes' 8-bit ``SCB`` entry), this torch's ``fully_shard`` has no ``ignored_params``
            (torch < 2.7), or ``strategy.cpu_offload`` is on (the replicated quantised base would stay on the
            accelerator while FSDP2 offloads the rest; not supported).
    """
    if config.bits == 8:
        raise ConfigError(
            "lora (QLoRA, lora.bits=8) with strategy fsdp2 is not supported: torch's distributed state dict "
            "(checkpoints, export) cannot name bitsandbytes' 8-bit SCB entries; use lora.bits=4 (nf4, as upstream's "
            "finetune_qlora.sh) with fsdp2, or strategy.name=ddp or single for 8 bits"
        )
    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise ConfigError(
            f"lora.bits={config.bits} (QLoRA) with strategy fsdp2 needs torch >= 2.7 (fully_shard's ignored_params "
            f"keeps bitsandbytes' quantised weights out of sharding); this is torch {torch.__version__}: upgrade "
            "torch, or use strategy.name=ddp or single for QLoRA"
        )
    if cpu_offload:
        raise ConfigError(
            f"lora.bits={config.bits} (QLoRA) with strategy.cpu_offload=true is not supported: the quantised base "
            "stays whole on every GPU and only the other parameters would be offloaded; set "
            "strategy.cpu_offload=false (the 4-bit base is already small), or use lora.bits=16"
        )


def quantised_params(model: nn.Module) -> set[nn.Parameter]:
    """bitsandbytes' quantised weights in ``model`` (``Params4bit``/``Int8Params``); empty without bitsandbytes."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return set()
    import bitsandbytes as bnb

    return {p for p in model.parameters() if isinstance(p, (bnb.nn.Params4bit, bnb.nn.Int8Params))}


def quantization_config(config: LoraConfig, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for the LLM of a QLoRA run (nf4 + double quantisation for 4 bits)."""
    from transformers import BitsAndBytesConfig

    if config.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def apply_lora(model: LlavaNextModel, config: LoraConfig) -> None:
    """Replace ``model.llm`` by a peft LoRA model (in place); base LLM weights become frozen.

    With QLoRA the LLM must already be loaded quantised (`llavakit.training.model_setup.build_model`); it is first
    prepared for k-bit training, and bitsandbytes' CPU inference repacking is turned off (module docstring).
    Gradient checkpointing stays as the stage set it. The adapters get peft's values, drawn without touching the
    global generator: a training run then gives them theirs with `initialise_adapters`.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_quantised(config):
        model.llm = prepare_model_for_kbit_training(model.llm, use_gradient_checkpointing=False)
        import bitsandbytes as bnb

        for layer in model.llm.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                # Read by Linear4bit.forward: False keeps the training layout in eval mode too.
                layer.support_avx512bf16_for_cpu = False
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        model.llm = get_peft_model(model.llm, peft_config)


@torch.no_grad()
def initialise_adapters(model: nn.Module, seed: int) -> None:
    """Give the adapters of ``model`` (after `apply_lora`) their initial values from the run's ``seed``.

    peft's default initialisation (module docstring) drawn from ``torch.Generator().manual_seed(seed)``: whole
    tensors in ``model.named_parameters()`` order, each rank keeping its rows of a sharded (DTensor) adapter.
    Adapters still on the meta device (a model FSDP2 will fill, `llavakit.training.sharded_load`) get theirs from
    `initialise_sharded_adapters` after the shards are read: the seed is recorded on ``model`` for it.

    Raises:
        TrainingError: an adapter parameter whose initialisation this does not know (a peft variant such as DoRA).
    """
    adapters = [(name, param) for name, param in model.named_parameters() if _is_adapter(name)]
    if any(param.is_meta for _, param in adapters):
        setattr(model, _ADAPTER_SEED_ATTRIBUTE, seed)
        return
    generator = torch.Generator().manual_seed(seed)
    for name, param in adapters:
        full = _initial_adapter(name, tuple(param.shape), generator)
        if isinstance(param, DTensor):
            # Every rank computed the same whole tensor: keep this rank's rows (no scatter from rank 0).
            rows = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(rows.to_local())
        else:
            param.copy_(full)


def _initial_adapter(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """One adapter's whole initial tensor (fp32, CPU), as peft's ``reset_lora_parameters`` draws it."""
    full = torch.zeros(shape, dtype=MERGE_DTYPE)
    if ".lora_A." in name:
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
    elif ".lora_embedding_B." in name:
        nn.init.normal_(full, generator=generator)
    elif not any(kind in name for kind in (".lora_B.", ".lora_embedding_A.")):
        raise TrainingError(
            f"adapter parameter {name}: llavakit initialises only peft's lora_A/lora_B/lora_embedding_A/"
            "lora_embedding_B; this peft configuration adds others (use peft's plain LoRA: lora.r, lora.alpha, "
            "lora.dropout, lora.target_modules)"
        )
    return full


def restrict_llm_to_lora(model: nn.Module, train_language_model: bool) -> None:
    """Within ``llm``, only LoRA matrices train, and only when the stage trains the language model."""
    for name, param in model.named_parameters():
        if name.startswith("llm."):
            param.requires_grad_(train_language_model and "lora_" in name)


def merge_lora(model: LlavaNextModel) -> LlavaNextModel:
    """Fold LoRA adapters into the LLM weights (in place) so the export is a plain llava-hf model.

    A quantised (QLoRA) LLM is dequantised first: each adapted weight becomes ``dequantised base + scaling * B @ A``
    computed and stored in fp32 (`MERGE_DTYPE`), and the remaining quantised layers are dequantised to fp32 too.
    The result is the trained QLoRA model (its base weights carry the 4/8-bit rounding), not the original
    full-precision weights plus the adapters. Merging into the quantised weights (peft's ``merge_and_unload``)
    would round the adapters away and keep a bitsandbytes model.
    """
    if not hasattr(model.llm, "merge_and_unload"):
        return model
    if quantised_params(model.llm):
        model.llm = _merge_dequantised(model.llm)
        model.config.text_config.pop("quantization_config", None)
    else:
        model.llm = model.llm.merge_and_unload()
    return model


def _merge_dequantised(peft_model: nn.Module) -> nn.Module:
    """A peft model over a bitsandbytes LLM → the plain fp32 LLM with the adapters merged."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = _dequantised_weight(base, name)
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).to(MERGE_DTYPE)
            module.base_layer = _plain_linear(weight, base.bias)
    llm = peft_model.unload()
    # Layers without adapters (lora.target_modules not covering every quantised linear). transformers' own
    # ``dequantize()`` is not used: it raises when no quantised layer is left.
    for name, module in _quantised_layers(llm):
        llm.set_submodule(name, _plain_linear(_dequantised_weight(module, name), module.bias))
    quantizer = getattr(llm, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(llm)
    elif hasattr(llm.config, "quantization_config"):
        # A skeleton built from the config (`peft_skeleton`) has no quantizer, only the config entry.
        del llm.config.quantization_config
    return llm


def _quantised_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """bitsandbytes' quantised linear layers in ``module``, by name."""
    import bitsandbytes as bnb

    return [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    ]


def _dequantised_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """The fp32 weight of bitsandbytes layer ``name``, shape (out_features, in_features).

    Raises:
        TrainingError: bitsandbytes repacked the layer for its CPU inference kernel (module docstring): its trained
            weights cannot be recovered exactly.
    """
    from peft.utils.integrations import dequantize_bnb_weight

    if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
        raise TrainingError(
            f"QLoRA layer {name}: bitsandbytes repacked its 4-bit weight for its CPU inference kernel (an eval-mode "
            "forward on a CPU with AVX512-BF16), rounding its block scales to bf16, so the trained weights cannot be "
            "recovered and the adapters are not merged; llavakit's apply_lora turns this off: set "
            "support_avx512bf16_for_cpu=False on every bitsandbytes Linear4bit before any eval-mode forward"
        )
    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).to(MERGE_DTYPE)


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=MERGE_DTYPE)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(MERGE_DTYPE), requires_grad=False)
    return linear


def has_lora(model: LlavaNextModel) -> bool:
    """Whether ``model.llm`` is wrapped by peft (`apply_lora`); peft is not imported when it is not."""
    llm = getattr(model, "llm", None)
    return llm is not None and hasattr(llm, "peft_config")


def save_adapter(model: LlavaNextModel, folder: Path) -> None:
    """Write the adapters of ``model.llm`` as peft's adapter folder (nothing without LoRA; call before merging)."""
    if has_lora(model):
        model.llm.save_pretrained(folder, safe_serialization=True)


def peft_skeleton(skeleton: LlavaNextModel, trained: LlavaNextModel) -> None:
    """Wrap ``skeleton.llm`` with the peft config of ``trained.llm`` (nothing when ``trained`` has no LoRA), so
    ``trained``'s state dict loads into it. The global RNG is left as it was (peft initialises the adapters).

    QLoRA: the skeleton's quantised linear layers become copies of ``trained``'s bitsandbytes layers (whole on
    every rank under FSDP2, see module docstring) with their quantisation state; the state dict's quantisation
    constants for them are skipped (`_skip_quantised_entries`): bitsandbytes' 4-bit layers cannot load them back.
    """
    from peft import get_peft_model

    if not has_lora(trained):
        return
    with torch.random.fork_rng(devices=[]):
        skeleton.llm = get_peft_model(skeleton.llm, copy.deepcopy(trained.llm.peft_config["default"]))
    if not quantised_params(trained.llm):
        return
    for name, layer in _quantised_layers(trained.llm):
        copied = copy.deepcopy(layer)
        copied.register_load_state_dict_pre_hook(_skip_quantised_entries)
        skeleton.llm.set_submodule(name, copied)


def _skip_quantised_entries(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Load-state-dict pre-hook of a copied 4-bit layer: drop its quantisation constants (``weight.absmax``,
    ``weight.quant_map``, ...), which the copy holds already; the packed weight itself still loads (same bytes).
    8-bit layers load their ``SCB`` themselves."""
    for key in [key for key in state_dict if key.startswith(prefix + "weight.")]:
        del state_dict[key]


def unwrapped_name(name: str) -> str:
    """The name a parameter of the peft-wrapped model had before `apply_lora` (adapters keep theirs)."""
    if name.startswith(_PEFT_PREFIX):
        name = "llm." + name[len(_PEFT_PREFIX) :]
    return name.replace(_BASE_LAYER, ".")


def peft_checkpoint_keys(model: nn.Module, keys: dict[str, str]) -> dict[str, str]:
    """``keys`` (our pre-LoRA name → checkpoint key) re-keyed by the names of the LoRA-wrapped ``model``.

    Raises:
        CheckpointError: a parameter other than an adapter has no checkpoint key (a wrapping this mapping does not
            know), instead of being left uninitialised.
    """
    mapped = {}
    for name, _ in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        key = keys.get(unwrapped_name(name))
        if key is not None:
            mapped[name] = key
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    missing = [
        names[0]
        for names in names_of.values()
        if not any(name in mapped or _is_adapter(name) for name in names)
    ]
    if missing:
        raise CheckpointError(
            f"{len(missing)} parameters of the LoRA-wrapped model have no checkpoint key (first: {missing[0]}); "
            "this peft release names wrapped weights differently: use strategy.name=ddp or single for LoRA"
        )
    return mapped


def _is_adapter(name: str) -> bool:
    return ".lora_" in name


def initialise_sharded_adapters(model: nn.Module) -> None:
    """Fill the adapters of an FSDP2-sharded model built on the meta device, once its shards are read, with the
    seed `initialise_adapters` recorded (same values as on one process: module docstring).

    Raises:
        TrainingError: `initialise_adapters` was not called on ``model`` after `apply_lora`.
    """
    seed = getattr(model, _ADAPTER_SEED_ATTRIBUTE, None)
    if seed is None:
        raise TrainingError(
            "the LoRA adapters of this meta-device model have no seed: call "
            "llavakit.training.lora.initialise_adapters(model, seed) after apply_lora, before sharding"
        )
    delattr(model, _ADAPTER_SEED_ATTRIBUTE)
    initialise_adapters(model, seed)
