"""Typed training configuration: one dataclass per component of a run.

Why: upstream LLaVA spreads a run over ~60 flat `HfArgumentParser` flags with align/finetune field pairs. Here a
run is a `TrainConfig` tree that mirrors the object tree (model, stages, strategy, lora, logging); a multi-stage
recipe is a *list* of `StageConfig`s, each naming the parts it trains and their learning rates. Every field is
validated in ``__post_init__`` so a bad value fails before any weight is loaded, and the resolved config is written
to ``run_dir/config.yaml`` so a run can always be reproduced. YAML files and ``key.sub=value`` overrides are read
by `llavakit.training.config_loading`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import ConfigError

TRAINABLE_PARTS = ("vision_tower", "projector", "language_model")
STAGE_KINDS = ("align", "mid", "finetune")
SCHEDULES = ("cosine", "linear", "constant")
STRATEGIES = ("single", "ddp", "fsdp2")
MIXED_PRECISION = ("no", "bf16", "fp16")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "sdpa_varlen")
# The implementations that isolate packed samples by position_ids with no T x T mask, as data.padding_free needs
# (`llavakit.data.packing.VARLEN_ATTENTION`; repeated here so that checking a config imports no torch).
VARLEN_ATTENTION = ("flash_attention_2", "sdpa_varlen")
REPORTERS = ("tensorboard", "wandb", "none")
# torch.finfo(torch.float32).max, repeated here so that checking a config imports no torch.
FLOAT32_MAX = 3.4028234663852886e38
# `llavakit.model.loss.LOSS_KERNELS`, repeated here so that checking a config imports no torch.
LOSS_KERNELS = ("logits", "chunked", "liger")


@dataclass
class ModelConfig:
    """Where the model of the first stage comes from.

    Exactly one source: ``preset`` (a `llavakit.model.presets` debug preset, built into ``run_dir``), ``path`` (a
    llavakit/llava-hf checkpoint from an earlier stage), or ``vision`` + ``llm`` (hub ids or folders composed with
    a fresh projector through ``LlavaNextModel.from_parts``).

    Attributes:
        pretrained_projector: upstream ``mm_projector.bin`` loaded into the first stage's model before training
            (upstream ``--pretrain_mm_mlp_adapter``).
        projector, template, select_layer: override the preset's/encoder's defaults when set (fresh models only).
        image_spec: `llavakit.anyres.ImageSpec` fields overriding the preset/encoder defaults.
        video_spec: `llavakit.anyres.VideoSpec` fields (``{}`` for its defaults): the fresh model takes videos
            (``<video>`` added to the tokenizer, saved in the checkpoint); None: an image-only model. A checkpoint
            (``model.path``, later stages) keeps its own.
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2`` or ``sdpa_varlen`` (PyTorch SDPA that runs
            packed and padding-free rows sample by sample, `llavakit.model.attention`).
    """

    preset: str | None = None
    path: str | None = None
    vision: str | None = None
    llm: str | None = None
    projector: str | None = None
    template: str | None = None
    select_layer: int | None = None
    image_spec: dict[str, Any] = field(default_factory=dict)
    video_spec: dict[str, Any] | None = None
    pretrained_projector: str | None = None
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        sources = [name for name in ("preset", "path", "vision") if getattr(self, name)]
        if len(sources) != 1:
            raise ConfigError(
                f"model: set exactly one of model.preset, model.path or model.vision+model.llm (got {sources or 'none'})"
            )
        if bool(self.vision) != bool(self.llm):
            raise ConfigError("model.vision and model.llm go together: set both (hub ids or local folders)")
        fresh_only = [name for name in ("projector", "template", "select_layer", "image_spec") if getattr(self, name)]
        if self.video_spec is not None:
            fresh_only.append("video_spec")
            VideoSpec.from_dict(self.video_spec)  # a bad field fails here, before anything is loaded
        if self.path and fresh_only:
            raise ConfigError(
                f"model.{fresh_only[0]} builds a fresh model (model.preset or model.vision+model.llm); with "
                f"model.path the checkpoint's own is used and model.{fresh_only[0]} would be ignored: remove it "
                "(a stage's data.template and image_spec change the template and the image spec from that stage on)"
            )
        if self.attn_implementation not in ATTENTION:
            raise ConfigError(
                f"model.attn_implementation {self.attn_implementation!r} is not one of {ATTENTION}"
            )


@dataclass
class DataSection:
    """The training data of one stage (passed to `llavakit.data`).

    Attributes:
        path: LLaVA JSON/JSONL file or YAML mixture.
        image_folder: root for relative ``image`` paths; required when the data has images.
        video_folder: root for relative ``video`` paths (files or frame folders; upstream ``--video_folder``);
            None = ``image_folder``. Videos need a model with a video spec (``model.video_spec``).
        template: chat template id for this stage (``plain`` for align); None = the model's own template.
        system_prompt: replaces the default system prompt of the stage's template; None = that template's default
            (or, on the model's own template, the system prompt recorded with it). A conversation template and its
            system prompt are saved in the checkpoint together and reused by evaluation and serving.
        max_length: token cap per sample after image expansion (upstream ``model_max_length``).
        packing: pack several samples into rows of ``max_length`` tokens (isolated, no padding in between);
            batch sizes then count rows.
        padding_free: collate each micro-batch into one row of its samples (TRL's ``padding_free``): the same
            batches, no padding; needs ``model.attn_implementation`` ``sdpa_varlen`` or ``flash_attention_2``.
        group_by_modality_length: upstream's modality-grouped length sampler.
        group_by_length: transformers' length-grouped sampler (batches of similar length, least padding). Where
            length follows the kind of sample, its batches hold one kind each: on the demo it cut padding from 26 %
            to 2 % but left shapes and words unlearnt (docs/demo-calibration.md has the numbers).
        num_workers: DataLoader worker processes, or ``auto``: none on a CPU device (the training step already
            uses every core) or with ``cache_samples``; on a GPU one fewer than the CPU cores each local rank has,
            at most 8 (`llavakit.training.trainer.loader_workers`).
        cache_samples: build each sample once and serve it from memory afterwards: for small datasets trained for
            many epochs (the demo); it holds every sample's pixels. Needs ``num_workers`` 0 (workers restart every
            epoch, so their caches would be rebuilt each time).
        upstream_quirks: reproduce upstream's training masks of the template (Qwen/Llama-3: hard-coded system
            prompt, unmasked headers); False fixes them.
        truncation_policy: a sample whose cut at ``max_length`` would go through an image is ``drop``-ped, or its
            images are ``downscale``-d to one tile (last image first) until it fits; counted either way.
        skip_policy: bad samples (unreadable image, malformed record, nothing supervised) ``error`` (raise on the
            first) or ``skip`` (count, report in ``data_stats.json``, go on).
        max_skip_fraction: with ``skip``, fail when more than this fraction of the samples is bad.
        max_tokens_per_pack: token budget of a packed row (``packing``); 0 = ``max_length``.
        index_dir: where the dataset scan is stored and shared by ranks, stages and runs (`llavakit.data.index`);
            None = ``<run_dir>/.index``.
    """

    path: str = ""
    image_folder: str | None = None
    video_folder: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    max_length: int = 2048
    packing: bool = False
    padding_free: bool = False
    group_by_modality_length: bool = False
    group_by_length: bool = False
    num_workers: int | str = "auto"
    cache_samples: bool = False
    upstream_quirks: bool = True
    truncation_policy: str = "drop"
    skip_policy: str = "error"
    max_skip_fraction: float = 0.01
    max_tokens_per_pack: int = 0
    index_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_length <= 0:
            raise ConfigError(f"data.max_length must be positive, got {self.max_length}")
        if isinstance(self.num_workers, str) and self.num_workers != "auto":
            raise ConfigError(f"data.num_workers must be 'auto' or a number >= 0, got {self.num_workers!r}")
        if isinstance(self.num_workers, int) and self.num_workers < 0:
            raise ConfigError(
                f"data.num_workers must be >= 0 (0 loads data in the training process), got {self.num_workers}"
            )
        # `llavakit.data.config.TRUNCATION_POLICIES` and `llavakit.data.issues.POLICIES`, repeated (no data imports).
        if self.truncation_policy not in ("drop", "downscale"):
            raise ConfigError(
                f"data.truncation_policy {self.truncation_policy!r} must be 'drop' or 'downscale' (images reduced "
                "to one tile until the sample fits)"
            )
        if self.skip_policy not in ("error", "skip"):
            raise ConfigError(f"data.skip_policy {self.skip_policy!r} must be 'error' or 'skip'")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"data.max_skip_fraction must be between 0 and 1, got {self.max_skip_fraction}")
        if self.max_tokens_per_pack and not self.packing:
            raise ConfigError("data.max_tokens_per_pack is the packed row budget: it needs data.packing true")
        if self.max_tokens_per_pack and self.max_tokens_per_pack < self.max_length:
            raise ConfigError(
                f"data.max_tokens_per_pack ({self.max_tokens_per_pack}) must be at least data.max_length "
                f"({self.max_length}), or 0 for max_length: a sample of max_length tokens must fit in a row"
            )
        if self.group_by_length and self.group_by_modality_length:
            raise ConfigError("choose one of data.group_by_length and data.group_by_modality_length")
        if self.packing and (self.group_by_length or self.group_by_modality_length):
            raise ConfigError(
                "data.packing excludes data.group_by_length and data.group_by_modality_length: packed rows hold "
                "no padding already, and they mix modalities"
            )
        if self.packing and self.padding_free:
            raise ConfigError(
                "choose one of data.packing and data.padding_free: packed rows hold no padding already"
            )
        if self.cache_samples and self.num_workers not in (0, "auto"):
            raise ConfigError(
                "data.cache_samples needs data.num_workers 0: DataLoader workers restart every epoch and would "
                "rebuild their caches each time"
            )

    def chat_template(
        self, model_template: str | None, model_system: str | None
    ) -> tuple[str | None, str | None]:
        """The (template id, system prompt) this stage trains with, given the model's: its own template with its own
        system prompt (None: that template's default), or else the model's template with the model's system prompt
        unless the stage sets one. A conversation template other than ``plain`` is what the model then records."""
        if self.template is None:
            return model_template, self.system_prompt if self.system_prompt is not None else model_system
        return self.template, self.system_prompt


@dataclass
class OptimConfig:
    """AdamW and its schedule. ``None`` part learning rates mean "use ``lr``" (upstream's behaviour).

    Attributes:
        lr: base learning rate (the LLM's, and every part without its own).
        vision_tower_lr: upstream ``mm_vision_tower_lr``.
        projector_lr: upstream ``mm_projector_lr`` (also applies to ``image_newline``).
        weight_decay: applied to >= 2-D weights only; biases, norms and other 1-D parameters get none.
        schedule: ``cosine`` | ``linear`` | ``constant``, after a linear warmup of ``warmup_ratio`` of the steps.
        max_grad_norm: gradient clipping (0 disables).
        fused: torch's fused AdamW kernel (one kernel for all parameters, CPU and CUDA; upstream
            ``--optim adamw_torch_fused``) instead of the loop over parameters (``adamw_torch``, the default of
            LLaVA's transformers). Same update rule, other rounding. On the demo's ~90 small tensors (2 CPU cores)
            an optimizer step took 0.8 ms instead of 3.9 ms: ~1 % of a training step there.
    """

    lr: float = 2e-5
    vision_tower_lr: float | None = None
    projector_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    fused: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule {self.schedule!r} is not one of {SCHEDULES}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("lr", "vision_tower_lr", "projector_lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"optim.{name} must be a finite number >= 0, got {value}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(
                f"optim.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {list(self.betas)}"
            )
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"optim.eps must be a small positive number (e.g. 1e-8), got {self.eps}")
        for name in ("lr", "vision_tower_lr", "projector_lr"):
            value = getattr(self, name)
            first_step = (value or 0.0) / (1.0 - self.betas[0])  # AdamW's bias-corrected step size at step 1
            if first_step >= FLOAT32_MAX:
                raise ConfigError(
                    f"optim.{name} {value} is too large: AdamW's first step moves weights by {name} / (1 - beta1) "
                    f"= {first_step:.3g}, beyond float32's range, so the update cannot even be computed; "
                    "learning rates are usually 1e-6 to 1e-3"
                )


@dataclass
class EvalSection:
    """Benchmarks evaluated while a stage trains (`llavakit.training.evaluation`); off while ``benchmarks`` is empty.

    Each evaluation answers the benchmarks greedily with the model as trained so far, through the runner of
    ``llavakit eval`` (same prompts, batching and scores), writes ``<stage>/eval/step-NNNNNN/<benchmark>/`` and logs
    the metrics with the training metrics (``eval/<benchmark>/<metric>``; one row per evaluation in ``eval.jsonl``).

    Attributes:
        benchmarks: benchmark ids (``llavakit eval --list``), e.g. ``[mme, heldout]``.
        data: benchmark id → data source (as ``llavakit eval --data``); absent: the benchmark's Hub dataset.
        limit: evaluate the first N questions of each benchmark (None: all).
        every: optimizer steps between evaluations (0: none during the stage).
        final: also evaluate after the stage's last step; False never evaluates the last step (for callers that
            evaluate the exported model afterwards).
        batch_size: questions per generation batch.
        max_new_tokens: answer length cap (None: each benchmark's own).
    """

    benchmarks: tuple[str, ...] = ()
    data: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    every: int = 0
    final: bool = True
    batch_size: int = 16
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.data) - set(self.benchmarks))
        if unknown:
            raise ConfigError(f"eval.data names benchmark(s) {unknown} that are not in eval.benchmarks")
        if not all(isinstance(source, str) for source in self.data.values()):
            raise ConfigError(f"eval.data maps benchmark ids to data sources (strings), got {self.data!r}")
        if self.every < 0 or (self.limit is not None and self.limit <= 0):
            raise ConfigError(
                f"eval: every must be >= 0 and limit positive, got every={self.every} limit={self.limit}"
            )
        if self.batch_size <= 0 or (self.max_new_tokens is not None and self.max_new_tokens <= 0):
            raise ConfigError("eval: batch_size and max_new_tokens must be positive")
        if self.benchmarks and not (self.every or self.final):
            raise ConfigError(
                "eval lists benchmarks but never runs them: set eval.every > 0 or eval.final=true"
            )

    @property
    def enabled(self) -> bool:
        """True when the stage evaluates anything."""
        return bool(self.benchmarks)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` of ``total_steps``."""
        if not self.enabled:
            return False
        if step == total_steps:
            return self.final
        return bool(self.every) and step % self.every == 0


@dataclass
class StageConfig:
    """One training stage: what it trains, on which data, with which batch and optimizer.

    Attributes:
        name: ``align`` (upstream "pretrain": projector only) | ``mid`` | ``finetune``.
        trainable: subset of ``vision_tower``, ``projector``, ``language_model``; everything else is frozen.
        global_batch_size: samples per optimizer step over all ranks (= micro × accumulation × world size).
        micro_batch_size: samples per forward pass per rank (upstream ``per_device_train_batch_size``).
        epochs: passes over the data (fractions allowed); ``max_steps`` caps the step count when set.
        image_spec: `ImageSpec` fields changed from this stage on (e.g. ``aspect_ratio: anyres_max_9`` in the last
            stage of a scaled recipe); ``pinpoints`` may use upstream's ``"(1x1),...,(6x6)"`` notation.
        save_projector_only: also write upstream's ``mm_projector.bin`` at export (default for ``align``).
        eval: benchmarks evaluated during the stage (see `EvalSection`).
    """

    name: str = "finetune"
    trainable: tuple[str, ...] = ("projector", "language_model")
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    global_batch_size: int = 128
    micro_batch_size: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    gradient_checkpointing: bool = False
    image_spec: dict[str, Any] = field(default_factory=dict)
    save_projector_only: bool | None = None
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        if self.name not in STAGE_KINDS:
            raise ConfigError(f"stage name {self.name!r} is not one of {STAGE_KINDS}")
        unknown = sorted(set(self.trainable) - set(TRAINABLE_PARTS))
        if unknown:
            raise ConfigError(
                f"stage {self.name!r}: unknown trainable part(s) {unknown}; valid parts: {', '.join(TRAINABLE_PARTS)}"
            )
        if not self.trainable:
            raise ConfigError(f"stage {self.name!r} trains nothing: list at least one of {TRAINABLE_PARTS}")
        if self.global_batch_size <= 0 or self.micro_batch_size <= 0:
            raise ConfigError(f"stage {self.name!r}: global_batch_size and micro_batch_size must be positive")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(
                f"stage {self.name!r}: max_steps must be positive, got {self.max_steps} (remove it to train "
                "for `epochs`); a stage of no steps would export an untrained model"
            )
        unbounded = self.epochs <= 0 or math.isinf(self.epochs)
        if math.isnan(self.epochs) or (unbounded and not self.max_steps):
            raise ConfigError(
                f"stage {self.name!r}: epochs must be a finite positive number (or set max_steps), got {self.epochs}"
            )

    @property
    def writes_projector(self) -> bool:
        """True when this stage exports upstream's ``mm_projector.bin`` (projector-only stages by default)."""
        if self.save_projector_only is not None:
            return self.save_projector_only
        return set(self.trainable) == {"projector"}

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step per rank; raises `ConfigError` when the batch does not divide."""
        per_step = world_size * self.micro_batch_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"stage {self.name!r}: global_batch_size {self.global_batch_size} is not divisible by "
                f"world size {world_size} x micro_batch_size {self.micro_batch_size}; change one of them"
            )
        return self.global_batch_size // per_step


@dataclass
class StrategyConfig:
    """How the model is distributed and run (applied from outside the model).

    Attributes:
        name: ``single`` | ``ddp`` | ``fsdp2``.
        mixed_precision: ``bf16`` autocast (single/DDP) or FSDP2 bf16 params with fp32 reduction; ``fp16`` the
            same in float16 with a dynamic loss scaler (GPUs before Ampere; needs float32 trainable parameters,
            overflowing steps are skipped: `llavakit.training.strategies.base`); ``no`` = fp32.
        reshard_after_forward: FSDP2 ZeRO-3 behaviour (False = ZeRO-2: params stay gathered between fwd and bwd).
        cpu_offload: FSDP2 `CPUOffloadPolicy` (DeepSpeed ``offload_param``/``offload_optimizer``).
        compile: ``torch.compile`` each shard unit.
        tf32: allow TF32 matmuls on CUDA.
        loss_kernel: how the loss of the supervised positions is computed (`llavakit.model.loss`): ``logits``
            (their ``[N, V]`` logits, then cross-entropy), ``chunked`` (our fused linear cross-entropy in PyTorch:
            no ``[N, V]`` logits held, any device) or ``liger`` (Liger-Kernel's, CUDA and ``pip install
            liger-kernel``). Same loss and gradients; the fused kernels refuse LLMs whose head post-processes the
            logits (e.g. Gemma 2 soft-capping).
        param_dtype: dtype of the parameters the optimizer updates (FSDP2: of the shards): ``auto`` (a
            checkpoint's saved dtype, fp32 for a model from parts), ``fp32`` (fp32 master weights; with
            ``mixed_precision: bf16`` FSDP2 computes in bf16 copies) or ``bf16`` (half the parameter, gradient
            and optimizer-state memory, no fp32 master copy).
    """

    name: str = "single"
    mixed_precision: str = "no"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    compile: bool = False
    tf32: bool = False
    loss_kernel: str = "logits"
    param_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.param_dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"strategy.param_dtype {self.param_dtype!r} is not one of auto, fp32, bf16")
        if self.name not in STRATEGIES:
            raise ConfigError(f"strategy.name {self.name!r} is not one of {STRATEGIES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"strategy.mixed_precision {self.mixed_precision!r} is not one of {MIXED_PRECISION}"
            )
        if self.mixed_precision == "fp16" and self.param_dtype == "bf16":
            raise ConfigError(
                "strategy.mixed_precision=fp16 trains float32 master weights (its loss scaler unscales float32 "
                "gradients): set strategy.param_dtype to fp32 (or auto), or use mixed_precision=bf16"
            )
        if self.cpu_offload and self.name != "fsdp2":
            raise ConfigError("strategy.cpu_offload needs strategy.name=fsdp2")
        if self.loss_kernel not in LOSS_KERNELS:
            raise ConfigError(f"strategy.loss_kernel {self.loss_kernel!r} is not one of {LOSS_KERNELS}")


@dataclass
class LoraConfig:
    """LoRA on the LLM's linear layers through peft (QLoRA with ``bits`` 4/8 needs bitsandbytes)."""

    enabled: bool = False
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    bits: int = 16

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"lora.bits must be 4, 8 or 16, got {self.bits}")
        if self.enabled and self.r <= 0:
            raise ConfigError(f"lora.r must be positive, got {self.r}")


@dataclass
class LoggingConfig:
    """Progress, metrics and checkpoint cadence.

    Attributes:
        log_every: optimizer steps per metrics interval (JSONL/TensorBoard row).
        save_every: optimizer steps between resumable checkpoints (0 = only at the end).
        save_total_limit: resumable checkpoints kept (oldest deleted first).
        report_to: ``tensorboard`` | ``wandb`` | ``none`` (JSONL is always written).
        peak_tflops: accelerator peak TFLOP/s per rank for the MFU estimate (None: looked up for known GPUs).
    """

    log_every: int = 1
    save_every: int = 0
    save_total_limit: int = 2
    report_to: str = "tensorboard"
    run_name: str | None = None
    progress_bar: bool = True
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        if self.report_to not in REPORTERS:
            raise ConfigError(f"logging.report_to {self.report_to!r} is not one of {REPORTERS}")
        if self.log_every <= 0 or self.save_every < 0 or self.save_total_limit <= 0:
            raise ConfigError("logging: log_every and save_total_limit must be positive, save_every >= 0")


@dataclass
class TrainConfig:
    """A whole run: a model, then stages trained one after another, each from the previous stage's output."""

    run_dir: str = "runs/llavakit"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="debug-clip-llama"))
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 42

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages is empty: a run needs at least one stage")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique (they name the run sub-folders), got {names}")
        padding_free = [stage.name for stage in self.stages if stage.data.padding_free]
        if padding_free and self.model.attn_implementation not in VARLEN_ATTENTION:
            raise ConfigError(
                f"stages {padding_free} set data.padding_free, which needs model.attn_implementation one of "
                f"{VARLEN_ATTENTION} (got {self.model.attn_implementation!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict (tuples become lists)."""
        return plain_data(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (``run_dir/config.yaml``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: a kill mid-write must not leave a truncated config for the next launch.
        partial = path.with_name(path.name + ".partial")
        partial.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        partial.replace(path)


def plain_data(value: Any) -> Any:
    """Dataclass-free, tuple-free copy of a nested value (what YAML and JSON can hold)."""
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    return value
