"""Training metrics: progress bar, JSONL, TensorBoard (or W&B), throughput, padding, MFU, and a loss-curve PNG.

Why: throughput numbers that count padding flatter padded batches; we report *useful* tokens/s (non-padding tokens,
image tokens included, summed over ranks) and the padding fraction of every interval, so packing's gain is visible.
Each row also has the achieved model TFLOP/s per rank (`llavakit.training.flops`: 6·N per token plus attention,
vision tower included, frozen parts at their lower cost), and MFU, those FLOP/s over the accelerator's peak (known
GPUs or ``logging.peak_tflops``; omitted when the peak is unknown, e.g. on CPU).

Only rank 0 writes. Per step the cost is a few float additions; files are written once per ``log_every`` steps.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llavakit.distributed import DistContext
from llavakit.errors import ConfigError
from llavakit.training.config import LoggingConfig

# Dense bf16 peak TFLOP/s per GPU (vendor datasheets), matched by substring of the CUDA device name.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}


@dataclass
class StepMetrics:
    """What one optimizer step reports (token counts are summed over ranks)."""

    step: int
    loss: float
    lr: dict[str, float]
    grad_norm: float
    num_tokens: int
    num_padding: int
    seconds: float
    flops: float = 0.0


def peak_flops(context: DistContext, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of one rank's device: the configured value, a known GPU's datasheet value, or None."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if context.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(context.device)
    return next((tflops * 1e12 for key, tflops in _PEAK_TFLOPS.items() if key in name), None)


class MetricsLogger:
    """Accumulates `StepMetrics` and flushes one row per interval.

    Args:
        stage_dir: where ``metrics.jsonl``, ``tensorboard/`` and ``loss.png`` go.
        config: the logging section.
        context: rank and world (only rank 0 writes).
        total_steps: optimizer steps of the stage (progress bar and ETA).
        start_step: first step (when resuming).
    """

    def __init__(
        self,
        stage_dir: Path,
        config: LoggingConfig,
        context: DistContext,
        total_steps: int,
        start_step: int = 0,
    ) -> None:
        self.config = config
        self.context = context
        self.stage_dir = stage_dir
        self.peak = peak_flops(context, config.peak_tflops)
        self.losses: list[tuple[int, float]] = []
        self._interval: list[StepMetrics] = []
        self._writer = self._open_writer() if context.is_main else None
        self._jsonl = _open_jsonl(stage_dir / "metrics.jsonl", start_step) if context.is_main else None
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=stage_dir.name,
            dynamic_ncols=True,
            disable=not (context.is_main and config.progress_bar),
        )

    def _open_writer(self) -> Any:
        if self.config.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(self.stage_dir / "tensorboard"))
        if self.config.report_to == "wandb":
            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("logging.report_to=wandb needs the wandb package: pip install wandb")
            import wandb

            return wandb.init(name=self.config.run_name or self.stage_dir.name, dir=str(self.stage_dir))
        return None

    def update(self, metrics: StepMetrics) -> dict[str, float] | None:
        """Record one step; returns the interval row when one was flushed."""
        self.losses.append((metrics.step, metrics.loss))
        self._interval.append(metrics)
        self._bar.update(1)
        if metrics.step % self.config.log_every:
            return None
        row = self._summarise(self._interval)
        self._interval = []
        self._emit(row)
        return row

    def _summarise(self, window: list[StepMetrics]) -> dict[str, float]:
        seconds = sum(m.seconds for m in window)
        useful = sum(m.num_tokens for m in window)
        padding = sum(m.num_padding for m in window)
        row = {
            "step": window[-1].step,
            "loss": sum(m.loss for m in window) / len(window),
            "grad_norm": window[-1].grad_norm,
            "tokens_per_s": useful / seconds if seconds else 0.0,
            "padding_fraction": padding / (useful + padding) if useful + padding else 0.0,
            "time": time.time(),
        }
        row.update({f"lr/{name}": lr for name, lr in window[-1].lr.items()})
        flops_per_rank = sum(m.flops for m in window) / seconds / self.context.world_size if seconds else 0.0
        row["model_tflops"] = flops_per_rank / 1e12
        if self.peak:
            row["mfu"] = flops_per_rank / self.peak
        return row

    def _emit(self, row: dict[str, float]) -> None:
        if not self.context.is_main:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        scalars = {key: value for key, value in row.items() if key not in ("step", "time")}
        if self.config.report_to == "tensorboard":
            for key, value in scalars.items():
                self._writer.add_scalar(f"train/{key}", value, row["step"])
        elif self.config.report_to == "wandb":
            self._writer.log(scalars, step=int(row["step"]))
        lr = next((value for key, value in row.items() if key.startswith("lr/")), 0.0)
        self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")

    def log_evaluation(self, step: int, metrics: dict[str, dict[str, float]], seconds: float) -> None:
        """Record a training-time evaluation (rank 0): a row of ``eval.jsonl`` and ``eval/<benchmark>/<metric>``
        scalars next to the training ones (its own file: every ``metrics.jsonl`` row stays a training interval)."""
        if not self.context.is_main:
            return
        with (self.stage_dir / "eval.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": step, "seconds": seconds, "metrics": metrics}) + "\n")
        scalars = {
            f"eval/{name}/{key}": value for name, values in metrics.items() for key, value in values.items()
        }
        if self.config.report_to == "tensorboard":
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, step)
        elif self.config.report_to == "wandb":
            self._writer.log(scalars, step=step)

    def close(self) -> None:
        """Write the last partial interval's row, flush files and write ``loss.png`` (rank 0)."""
        if self._interval:
            self._emit(self._summarise(self._interval))
            self._interval = []
        self._bar.close()
        if not self.context.is_main:
            return
        self._jsonl.close()
        if self._writer is not None:
            (self._writer.close if self.config.report_to == "tensorboard" else self._writer.finish)()
        if self.losses:
            plot_losses(self.losses, self.stage_dir / "loss.png")


def _open_jsonl(path: Path, start_step: int) -> Any:
    """``metrics.jsonl`` opened for appending, without the rows of steps after ``start_step``.

    A resumed stage redoes the steps after its checkpoint; their rows from the interrupted run (and a last line cut
    by the kill) would otherwise appear twice. The file is rewritten atomically (temporary file, then rename).
    """
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= start_step:
                kept.append(line + "\n")
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(kept))
        partial.replace(path)
    return path.open("a")


def plot_losses(
    losses: list[tuple[int, float]], path: Path, stage_starts: list[tuple[int, str]] | None = None
) -> None:
    """Save a loss-vs-step PNG with matplotlib's non-interactive Agg backend.

    Args:
        losses: ``(step, loss)`` pairs.
        path: the PNG to write.
        stage_starts: ``(first step, stage name)`` of each stage when several share the axis: a dashed line and
            the name mark where each begins.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps, values = zip(*losses)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(steps, values)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.set_title(path.parent.name)
    for step, name in stage_starts or []:
        axis.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        axis.annotate(
            name,
            (step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="grey",
        )
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
