"""The training loop: ``Trainer`` (one stage, in small named steps) and ``train`` (all stages of a run).

Why our own loop and not HF Trainer: upstream LLaVA-NeXT copies and overrides HF Trainer's private methods (a
552-line ``_inner_training_loop``), which breaks on every transformers release. Here the loop is explicit:

    train()  preflight (paths, batch sizes, projector shapes, eval benchmarks: no weights loaded) → a Trainer per stage
    build()  model → trainable parts (→ LoRA) → strategy.wrap → AdamW groups → data plan → schedule
    resume() newest complete checkpoint, if any (model, optimizer, scheduler, sampler position, RNG)
    fit()    each global step: train_step(micro-batches) → metrics → hooks → eval when due → save() → export()

Loss normalisation (why 1 and W processes give the same step): each micro-batch's summed token loss is divided by
the number of supervised tokens in the *whole global batch* (all micro-batches, all ranks), counted before the first
forward, and multiplied by the world size to undo the gradient averaging of DDP/FSDP. The step's gradient is then the
gradient of the global token-mean loss, independent of how samples are split over ranks and micro-batches. The
division is done in the loss (``num_items_in_batch``, transformers semantics), and the model computes logits for the
supervised positions only (`llavakit.model.loss`): the answers are a small share of a LLaVA sequence.

`train` runs every stage of a `TrainConfig` in order, each starting from the previous stage's export, and skips
stages already exported (so re-running a run folder resumes it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from llavakit.distributed import DistContext, all_reduce_sum, all_reduce_sums, init_distributed
from llavakit.errors import ConfigError, TrainingError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.loss import supervised_mask
from llavakit.training.batches import BatchPlan, length_grouped_order, modality_grouped_order, random_order
from llavakit.training.checkpoint import (
    CheckpointManager,
    TrainerState,
    check_world_size,
    complete_checkpoints,
)
from llavakit.training.config import StageConfig, TrainConfig
from llavakit.training.evaluation import Evaluation, StageEvaluator, check_evaluations
from llavakit.training.export import export_model
from llavakit.training.flops import FlopCounter
from llavakit.training.lora import apply_lora, initialise_adapters, restrict_llm_to_lora
from llavakit.training.metrics import MetricsLogger, StepMetrics
from llavakit.training.model_setup import build_model, preflight
from llavakit.training.optim import build_optimizer, build_scheduler
from llavakit.training.stages import apply_trainable_parts, model_frozen_names
from llavakit.training.strategies import STRATEGIES, build_strategy
from llavakit.training.strategies.base import MIN_LOSS_SCALE

# Keys of a collated batch that the model's forward takes; the rest is bookkeeping (token counts, ids).
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "pixel_values",
    "image_sizes",
    "image_tiled",
    "pixel_values_videos",
    "video_frames",
)


@dataclass
class TrainData:
    """A stage's training data as the trainer consumes it.

    Attributes:
        dataset: map-style samples (``len`` and ``[index]``).
        collate: list of samples → batch dict (`docs/architecture.md` "data/ → Batch").
        modality_lengths: upstream-style signed lengths (> 0 has an image) for ``group_by_modality_length`` and
            ``group_by_length``.
    """

    dataset: Sequence[Any]
    collate: Callable[[list[Any]], dict[str, Any]]
    modality_lengths: Sequence[int] | None = None


DataFactory = Callable[[StageConfig, LlavaNextModel], TrainData]


@dataclass(frozen=True)
class StepEvent:
    """What a step hook is given after each optimizer step.

    Attributes:
        stage: the stage's name (``align``, ``finetune``, ...).
        step: optimizer steps done in this stage (1 after the first).
        total_steps: the stage's step count.
        model: the unwrapped model, as trained so far (with FSDP2 its parameters are this rank's shards).
    """

    stage: str
    step: int
    total_steps: int
    model: LlavaNextModel


# Called on every rank after each optimizer step, e.g. to evaluate (the trainer puts the model back in train mode).
StepHook = Callable[[StepEvent], None]


@dataclass
class StageResult:
    """What one stage produced."""

    name: str
    export_dir: Path
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    steps: int = 0
    evaluations: list[Evaluation] = field(default_factory=list)

    @property
    def projector_file(self) -> Path | None:
        """Upstream ``mm_projector.bin`` written by projector-only stages, else None."""
        path = self.export_dir / "mm_projector.bin"
        return path if path.is_file() else None


@dataclass
class TrainResult:
    """What a whole run produced: one `StageResult` per stage, in order."""

    run_dir: Path
    stages: list[StageResult]

    @property
    def final_checkpoint(self) -> Path:
        """The last stage's exported model folder."""
        return self.stages[-1].export_dir

    @property
    def losses(self) -> list[float]:
        """Step losses of all stages, concatenated."""
        return [loss for stage in self.stages for loss in stage.losses]


class Trainer:
    """Trains one stage of a run.

    Args:
        config: the run config.
        stage_index: which of ``config.stages`` to train.
        context: this process's rank/world/device (`init_distributed`).
        data_factory: builds the stage's `TrainData` from the stage config and the model (tokenizer, spec).
        previous: the previous stage's export folder (None: the model comes from ``config.model``).
        hooks: called after every optimizer step (see `StepHook`).
        evaluator: the stage's ``eval:`` benchmarks (`check_evaluations`), run when due and logged; None: none.
    """

    def __init__(
        self,
        config: TrainConfig,
        stage_index: int,
        context: DistContext,
        data_factory: DataFactory,
        previous: Path | None = None,
        hooks: Sequence[StepHook] = (),
        evaluator: StageEvaluator | None = None,
    ) -> None:
        self.config = config
        self.stage = config.stages[stage_index]
        self.context = context
        self.data_factory = data_factory
        self.previous = previous
        self.hooks = tuple(hooks)
        self.evaluator = evaluator
        self.evaluations: list[Evaluation] = []
        self.stage_dir = Path(config.run_dir) / self.stage.name
        self.strategy = build_strategy(config.strategy, context)
        self.state = TrainerState()

    # ------------------------------------------------------------------ build

    def build(self) -> None:
        """Load and prepare the model, optimizer, schedule, data plan and checkpoint manager."""
        self.unwrapped = build_model(self.config, self.stage, self.previous, self.context)
        self.trainable = self._set_trainable(self.unwrapped)
        self.flop_counter = FlopCounter.from_model(self.unwrapped, self._flop_parts())
        self.model = self.strategy.prepare(self.unwrapped)
        self.optimizer = build_optimizer(self.model, self.stage.optim)
        self.data = self.data_factory(self.stage, self.unwrapped)
        self.plan = BatchPlan(
            num_samples=len(self.data.dataset),
            global_batch_size=self.stage.global_batch_size,
            micro_batch_size=self.stage.micro_batch_size,
            world_size=self.context.world_size,
            rank=self.context.rank,
            seed=self.config.seed,
        )
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, self.stage.optim, self.total_steps)
        self.checkpoints = CheckpointManager(
            self.stage_dir / "checkpoints", self.context, self.config.logging.save_total_limit
        )

    def _set_trainable(self, model: LlavaNextModel) -> list[str]:
        frozen = model_frozen_names(model)
        if self.config.lora.enabled:
            apply_lora(model, self.config.lora)
            initialise_adapters(model, self.config.seed)
        apply_trainable_parts(model, self.stage.trainable, frozen)
        if self.config.lora.enabled:
            # With LoRA, "language_model" means its adapters only (upstream mm_tunable_parts semantics).
            restrict_llm_to_lora(model, "language_model" in self.stage.trainable)
        return [name for name, param in model.named_parameters() if param.requires_grad]

    def _flop_parts(self) -> list[str]:
        """The parts whose weights get gradients, for the FLOP count: with LoRA the LLM's weights are frozen (its
        adapters' FLOPs are not counted; gradients still flow through it when anything before it trains)."""
        if self.config.lora.enabled:
            return [part for part in self.stage.trainable if part != "language_model"]
        return list(self.stage.trainable)

    def _total_steps(self) -> int:
        if self.stage.max_steps:
            return self.stage.max_steps
        return max(1, math.ceil(self.stage.epochs * self.plan.steps_per_epoch))

    # ------------------------------------------------------------------ resume / save

    def resume(self) -> bool:
        """Load the newest complete checkpoint of this stage, if any; returns whether one was loaded."""
        self.checkpoints.remove_partial()
        latest = self.checkpoints.latest()
        if latest is None:
            return False
        self.state = self.checkpoints.load(
            latest, self.model, self.optimizer, self.scheduler, self.strategy.grad_scaler
        )
        return True

    def save(self) -> Path:
        """Write a resumable checkpoint of the current step (collective)."""
        return self.checkpoints.save(
            self.model, self.optimizer, self.scheduler, self.state, self.strategy.grad_scaler
        )

    def export(self) -> Path:
        """Write the stage's final model folder (and ``mm_projector.bin`` for projector-only stages)."""
        return export_model(
            self.model,
            self.strategy.unwrap(self.model),
            self.stage_dir / "final",
            self.context,
            write_projector=self.stage.writes_projector,
        )

    # ------------------------------------------------------------------ steps

    def micro_batches(self) -> Iterator[dict[str, Any]]:
        """This rank's collated micro-batches from the saved position onwards, epoch after epoch."""
        order_fn = self._order_fn()
        while True:
            batches = self.plan.epoch_batches(self.state.epoch, order_fn)[self.state.batches_in_epoch :]
            loader = DataLoader(
                self.data.dataset,
                batch_sampler=batches,
                collate_fn=self.data.collate,
                num_workers=loader_workers(self.stage.data, self.context.device),
                # Page-locked batches let the host-to-GPU copies run asynchronously (`_model_inputs`).
                pin_memory=self.context.device.type == "cuda",
                # Its own generator: drawn from the global one, the loader's seed would shift every later dropout
                # mask of a resumed run (the loader is made anew after the RNG state is restored).
                generator=torch.Generator().manual_seed(self.config.seed + self.state.epoch),
            )
            for batch in loader:
                self.state.batches_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    def _order_fn(self) -> Callable[[int, torch.Generator], list[int]]:
        section = self.stage.data
        if not (section.group_by_modality_length or section.group_by_length):
            return random_order
        if self.data.modality_lengths is None:
            raise ConfigError(
                "data.group_by_(modality_)length needs sample lengths from the dataset; none given"
            )
        if section.group_by_length:
            return length_grouped_order(self.data.modality_lengths, self.stage.global_batch_size)
        return modality_grouped_order(self.data.modality_lengths, self.stage.global_batch_size)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> StepMetrics:
        """One optimizer step over this rank's micro-batches of a global batch (see module docstring).

        With ``mixed_precision: fp16`` the loss is scaled for backward and the gradients unscaled before clipping
        (the norm reported is the true one). A step whose gradients overflowed (non-finite norm) is skipped as HF
        Trainer and DeepSpeed skip it: the weights and optimizer state stay, the loss scale halves, the LR schedule
        does not advance, but the step is counted (its batch consumed, its loss logged; ``state.skipped_steps``
        counts them), so a run still ends after ``total_steps``. Only a scale falling below
        `MIN_LOSS_SCALE` stops training (`_diverged`); without fp16 any non-finite norm does.
        """
        started = time.perf_counter()
        self.model.train()
        local_items = sum(_supervised_tokens(batch) for batch in micro_batches)
        global_items = max(all_reduce_sum(local_items, self.context), 1.0)
        items_per_rank = torch.tensor(global_items / self.context.world_size, device=self.context.device)
        loss_sum = torch.zeros((), device=self.context.device)
        for index, batch in enumerate(micro_batches):
            self.strategy.set_gradient_sync(self.model, index == len(micro_batches) - 1)
            with self.strategy.autocast():
                output = self.model(
                    **_model_inputs(batch, self.context.device, self.config.strategy.loss_kernel),
                    num_items_in_batch=items_per_rank,
                )
            self.strategy.scale_loss(output.loss).backward()
            loss_sum += (
                output.loss.detach()
            )  # stays on the device: one host sync per step, not per micro-batch
        self.strategy.unscale_gradients(self.optimizer)
        grad_norm = self.strategy.clip_grad_norm(self.model, self.stage.optim.max_grad_norm)
        if not math.isfinite(grad_norm) and self.strategy.grad_scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(grad_norm, float(loss_sum), micro_batches)
        scale = self.strategy.loss_scale()
        applied = self.strategy.optimizer_step(self.optimizer, grad_norm)
        lrs = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
        if applied:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not applied:
            # An overflow lowers the scale; a non-finite norm that did not (finite float32 gradients whose norm
            # overflows) or a scale below the minimum is a diverged run.
            lowered = self.strategy.loss_scale()
            if not lowered < scale or lowered < MIN_LOSS_SCALE:
                raise self._diverged(grad_norm, float(loss_sum), micro_batches, loss_scale=lowered)
            self.state.skipped_steps += 1
        flops = sum(self.flop_counter.batch_flops(batch) for batch in micro_batches)
        loss, tokens, padding, flops = all_reduce_sums(
            [float(loss_sum), *_token_counts(micro_batches), flops], self.context
        )
        self.state.step += 1
        self.state.tokens_seen += int(global_items)
        self.state.losses.append(loss / self.context.world_size)
        return StepMetrics(
            step=self.state.step,
            loss=self.state.losses[-1],
            lr=lrs,
            grad_norm=grad_norm,
            num_tokens=int(tokens),
            num_padding=int(padding),
            seconds=time.perf_counter() - started,
            flops=flops,
        )

    def _check_finite_weights(self) -> None:
        """Refuse to export trained weights that are not finite (collective: the count is summed over ranks)."""
        bad = [
            name
            for name, param in self.unwrapped.named_parameters()
            if param.requires_grad and not bool(torch.isfinite(_local(param)).all())
        ]
        if all_reduce_sum(len(bad), self.context):
            shown = ", ".join(bad[:3]) or "on another rank"
            raise TrainingError(
                f"stage {self.stage.name!r}: after step {self.state.step} trained weights are not finite ({shown}); "
                "the stage was not exported. Lower optim.lr or raise optim.warmup_ratio and train the stage again"
            )

    def _diverged(
        self,
        grad_norm: float,
        loss: float,
        micro_batches: list[dict[str, Any]],
        loss_scale: float | None = None,
    ) -> TrainingError:
        """The error that stops training at a non-finite gradient, before the optimizer applies it.

        The norm is the global one (all ranks stop together); the loss and sample ids are this rank's. With fp16,
        ``loss_scale`` is the scale after this step's overflow (the stop is for a collapsed scale, see `train_step`).
        """
        step = self.state.step + 1
        ids = [sample for batch in micro_batches for sample in batch.get("sample_ids", [])]
        shown = ", ".join(map(str, ids[:8])) + (f" (+{len(ids) - 8} more)" if len(ids) > 8 else "")
        latest = self.checkpoints.latest()
        fp16 = (
            ""
            if loss_scale is None
            else f" and the fp16 loss scale {loss_scale} after {self.state.skipped_steps} earlier skipped step(s): "
            f"an overflow below scale {MIN_LOSS_SCALE}, or a norm overflowing float32, is not one a smaller scale "
            "fixes (bf16 on Ampere or newer GPUs, or mixed_precision=no, has float32's range)"
        )
        return TrainingError(
            f"stage {self.stage.name!r}, step {step}: the gradient norm is {grad_norm}{fp16} (loss on rank "
            f"{self.context.rank}: {loss}); the update was not applied and training stopped. The newest checkpoint "
            f"({latest or 'none: set logging.save_every'}) holds the weights from before. This rank's samples of the "
            f"step: {shown or 'unknown'}. Lower optim.lr or raise optim.warmup_ratio, check those samples "
            "(llavakit data inspect), and resume"
        )

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]]) -> float:
        """Token-mean loss of the model over ``batches`` (this rank's), averaged over ranks."""
        self.model.eval()
        total, items = 0.0, 0.0
        for batch in batches:
            count = _supervised_tokens(batch)
            with self.strategy.autocast():
                output = self.model(
                    **_model_inputs(batch, self.context.device, self.config.strategy.loss_kernel)
                )
            total += float(output.loss) * count
            items += count
        self.model.train()
        return all_reduce_sum(total, self.context) / max(all_reduce_sum(items, self.context), 1.0)

    # ------------------------------------------------------------------ loop

    def fit(self) -> StageResult:
        """Build, resume, train to ``total_steps``, save and export; returns the stage result."""
        self.build()
        self.resume()
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(
            self.stage_dir,
            self.config.logging,
            self.context,
            self.total_steps,
            start_step=self.state.step,
        )
        stream = self.micro_batches()
        accumulation = self.plan.accumulation_steps
        tokens_per_s = []
        while self.state.step < self.total_steps:
            metrics = self.train_step([next(stream) for _ in range(accumulation)])
            row = logger.update(metrics)
            if row:
                tokens_per_s.append(row["tokens_per_s"])
            self._run_hooks()
            if self.evaluator is not None and self.evaluator.due(self.state.step, self.total_steps):
                self._evaluate(logger)
            save_every = self.config.logging.save_every
            if save_every and self.state.step % save_every == 0 and self.state.step < self.total_steps:
                self.save()
        logger.close()
        self._check_finite_weights()
        export_dir = self.export()
        return StageResult(
            name=self.stage.name,
            export_dir=export_dir,
            losses=list(self.state.losses),
            tokens_per_s=sum(tokens_per_s) / len(tokens_per_s) if tokens_per_s else 0.0,
            steps=self.state.step,
            evaluations=list(self.evaluations),
        )

    def _evaluate(self, logger: MetricsLogger) -> None:
        """Run the stage's benchmarks on the model as trained so far (every rank) and log their metrics."""
        evaluation = self.evaluator.run(
            self.unwrapped, self.strategy, self.context, self.stage_dir / "eval", self.state.step
        )
        logger.log_evaluation(evaluation.step, evaluation.metrics, evaluation.seconds)
        self.evaluations.append(evaluation)
        self.model.train()

    def _run_hooks(self) -> None:
        if not self.hooks:
            return
        event = StepEvent(self.stage.name, self.state.step, self.total_steps, self.unwrapped)
        for hook in self.hooks:
            hook(event)
        self.model.train()


def loader_workers(section: Any, device: torch.device) -> int:
    """DataLoader worker processes for a stage's data section (``data.num_workers``; ``auto`` resolved).

    ``auto``: 0 on a CPU device, where the training step already keeps every core busy and workers would only
    take cores from it, and with ``cache_samples`` (workers restart every epoch and would lose the cache). On a GPU,
    decoding and tiling AnyRes images must keep up with the step: one fewer than the CPU cores this local rank has
    (the training process keeps one), at most 8, as upstream's scripts use 4-16.
    """
    if section.num_workers != "auto":
        return section.num_workers
    if device.type == "cpu" or section.cache_samples:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_rank - 1))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP2-sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _supervised_tokens(batch: dict[str, Any]) -> int:
    # The loss predicts token t+1 from t: the first label of each row is never a target.
    return int(supervised_mask(batch["labels"]).sum())


def _token_counts(batches: list[dict[str, Any]]) -> tuple[int, int]:
    """(useful, padding) tokens: the collator's counts when given (packing), else from the 2-D attention mask."""
    tokens = padding = 0
    for batch in batches:
        if "num_tokens" in batch:
            tokens += int(batch["num_tokens"])
            padding += int(batch.get("num_padding", 0))
        else:
            mask = batch["attention_mask"]
            tokens += int(mask.sum())
            padding += int(mask.numel() - mask.sum())
    return tokens, padding


def _model_inputs(batch: dict[str, Any], device: torch.device, loss_kernel: str = "logits") -> dict[str, Any]:
    inputs = {key: batch[key] for key in (*MODEL_INPUTS, "labels") if batch.get(key) is not None}
    inputs = {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for key, value in inputs.items()
    }
    return {**inputs, "supervised_logits_only": True, "loss_kernel": loss_kernel}


# Sections a re-run may change without becoming another run: where and how often it reports.
_FREE_SECTIONS = ("logging",)


def _check_run_dir(run_dir: Path) -> None:
    """The run folder can hold the run: a folder (made here if missing) that this process may write into."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a folder: choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"run_dir {run_dir} cannot be written ({err.strerror}): choose a folder you can write to"
        ) from None


def _check_same_run(config: TrainConfig) -> None:
    """Refuse to continue a run folder that holds progress of another config (a stage's checkpoints or export).

    Re-running a run folder resumes it, skipping exported stages; with a changed config that would silently mix
    two runs (the finished stages trained with the old values). Only `_FREE_SECTIONS` may change.

    Raises:
        ConfigError: the differing keys with their saved and new values, and the two ways out.
    """
    run_dir = Path(config.run_dir)
    saved_file = run_dir / "config.yaml"
    progress = any(
        (run_dir / stage.name / "final").is_dir() or complete_checkpoints(run_dir / stage.name / "checkpoints")
        for stage in config.stages
    )
    if not (progress and saved_file.is_file()):
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    changed = [
        f"{key}: {old!r} -> {new!r}"
        for key, (old, new) in _differences(saved, config.to_dict()).items()
        if key.split(".")[0] not in _FREE_SECTIONS
    ]
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(
            f"{run_dir} holds a run trained with another config ({saved_file}): {shown}. Use a new run_dir for the "
            "new config, or delete the stage folders to retrain them (only logging.* may change on a re-run)"
        )


def _differences(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys of ``old`` whose values differ in ``new`` (lists indexed by position). Keys only ``new`` has are
    not compared: a config saved by an older llavakit lacks the fields added since, which hold their defaults."""
    if isinstance(old, dict) and isinstance(new, dict):
        pairs = [(f"{prefix}{key}", value, new.get(key)) for key, value in old.items()]
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = [(f"{prefix}{index}", a, b) for index, (a, b) in enumerate(zip(old, new, strict=True))]
    else:
        return {} if old == new else {prefix.rstrip("."): (old, new)}
    found: dict[str, tuple[Any, Any]] = {}
    for key, a, b in pairs:
        found.update(_differences(a, b, f"{key}."))
    return found


def _check_resumes(config: TrainConfig, world_size: int) -> None:
    """Before anything loads: every stage that will resume from a checkpoint was saved by ``world_size`` ranks."""
    for stage in config.stages:
        stage_dir = Path(config.run_dir) / stage.name
        checkpoints = complete_checkpoints(stage_dir / "checkpoints")
        if checkpoints and not (stage_dir / "final" / "config.json").is_file():
            check_world_size(checkpoints[-1], world_size)


def train(
    config: TrainConfig, data_factory: DataFactory | None = None, hooks: Sequence[StepHook] = ()
) -> TrainResult:
    """Run every stage of ``config`` in order; the library entry point behind ``llavakit train``.

    Each stage starts from the previous stage's export; a stage whose export already exists is skipped (re-running
    a run folder resumes it), and an interrupted stage resumes from its newest checkpoint.

    Args:
        config: the resolved run config (saved to ``run_dir/config.yaml``).
        data_factory: builds each stage's data; default `llavakit.training.data.build_train_data`.
        hooks: called after every optimizer step of every stage (see `StepHook`), e.g. for a learning curve.

    Returns:
        A `TrainResult` with the final checkpoint path, per-stage losses and tokens/s.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _check_run_dir(Path(config.run_dir))
    preflight(config, world_size=world_size)
    _check_same_run(config)
    _check_resumes(config, world_size)
    evaluators = check_evaluations(config)
    context = init_distributed(STRATEGIES.get(config.strategy.name).needs_process_group)
    if data_factory is None:
        from llavakit.training.data import train_data_factory

        data_factory = train_data_factory(config, context)
    if config.strategy.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if context.is_main:
        config.save(Path(config.run_dir) / "config.yaml")
    results: list[StageResult] = []
    previous: Path | None = None
    for index, stage in enumerate(config.stages):
        export_dir = Path(config.run_dir) / stage.name / "final"
        if (export_dir / "config.json").is_file():
            results.append(StageResult(name=stage.name, export_dir=export_dir))
        else:
            trainer = Trainer(config, index, context, data_factory, previous, hooks, evaluators[index])
            results.append(trainer.fit())
        previous = results[-1].export_dir
    return TrainResult(run_dir=Path(config.run_dir), stages=results)
