"""What the demo leaves behind: the printed report, ``metrics.json``, the loss and learning-curve PNGs, the final
checkpoint.

Every number printed is read from the `DemoResult` the run measured; nothing is estimated. The report shows, per
question type, the held-out accuracy with images next to two baselines: the text-only one (the same model, images
removed) and the majority answer (always the type's most common answer). "The model looks at the image" is then a
visible margin over both rather than a claim; the majority column keeps a type at chance from looking good next to
a text-only score that fell below chance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llavakit.data.synth import QUESTION_TYPES
from llavakit.demo.run import DemoResult
from llavakit.training.metrics import plot_losses

SHOWN_EXAMPLES = 3


def showcase(result: DemoResult, count: int = SHOWN_EXAMPLES) -> list[dict[str, Any]]:
    """The first ``count`` held-out rows (with their ``prediction``) of distinct question types (in `QUESTION_TYPES`
    order)."""
    by_type: dict[str, dict[str, Any]] = {}
    for row in result.with_images.rows:
        by_type.setdefault(row["type"], row)
    ordered = [by_type[kind] for kind in QUESTION_TYPES if kind in by_type]
    return ordered[:count]


def tokens_per_second(result: DemoResult) -> dict[str, float]:
    """Training throughput per stage (useful tokens, image tokens included), as the trainer measured it."""
    return {stage.name: stage.tokens_per_s for stage in result.train_result.stages}


def format_report(result: DemoResult) -> str:
    """The text printed at the end of ``llavakit demo``."""
    with_images = result.with_images.accuracy_by_type()
    text_only = result.text_only.accuracy_by_type()
    majority = result.with_images.majority_by_type()
    counts = result.with_images.count_by_type()
    header = f"  {'type':<10}{'n':>5}{'with image':>12}{'text only':>11}{'majority':>10}"
    lines = ["", "Held-out accuracy (exact match)", header]
    for kind in with_images:
        lines.append(
            f"  {kind:<10}{counts[kind]:>5}{with_images[kind]:>12.3f}{text_only[kind]:>11.3f}{majority[kind]:>10.3f}"
        )
    lines.append(
        f"  {'all':<10}{len(result.with_images.rows):>5}"
        f"{result.with_images.accuracy:>12.3f}{result.text_only.accuracy:>11.3f}"
    )
    lines += _curve_lines(result)
    seconds = result.seconds
    throughput = ", ".join(f"{name} {value:,.0f}" for name, value in tokens_per_second(result).items())
    lines += [
        "",
        f"Training time: {seconds['train']:.1f} s ({throughput} tokens/s)",
        f"Wall time: {seconds['total']:.1f} s (data {seconds['data']:.1f} s, learning curve {seconds['curve']:.1f} s, "
        f"evaluation {seconds['eval']:.1f} s)",
        "",
        "Held-out examples",
    ]
    for row in showcase(result):
        lines += [
            f"  image:    {row['image'][0] if row['image'] else '(none)'}",
            f"  question: {row['question']}",
            f"  answer:   {row['prediction']!r}   truth: {row['answer']!r}",
            "",
        ]
    return "\n".join(lines)


def _curve_lines(result: DemoResult) -> list[str]:
    """The learning curve as a table: one row per evaluated finetune step, one column per question type."""
    if not result.curve:
        return []
    kinds = list(result.curve[-1].accuracy)
    header = f"  {'step':>6}" + "".join(f"{kind:>10}" for kind in kinds)
    title = f"Learning curve (accuracy with image on {_curve_questions(result)}, by finetune step)"
    lines = ["", title, header]
    for point in result.curve:
        lines.append(
            f"  {point.step:>6}" + "".join(f"{point.accuracy.get(kind, 0.0):>10.3f}" for kind in kinds)
        )
    return lines


def _curve_questions(result: DemoResult) -> str:
    """Which held-out questions the curve asks, in words."""
    total = len(result.with_images.rows)
    if result.curve_questions >= total:
        return f"all {total} held-out questions"
    return f"the first {result.curve_questions} of {total} held-out questions"


def plot_curve(result: DemoResult, path: Path) -> None:
    """Save the learning curve (accuracy per question type vs finetune step) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [point.step for point in result.curve]
    figure, axis = plt.subplots(figsize=(6, 4))
    for kind in result.curve[-1].accuracy:
        axis.plot(steps, [point.accuracy.get(kind, 0.0) for point in result.curve], marker="o", label=kind)
    axis.set_xlabel("finetune step")
    axis.set_ylabel("accuracy with image")
    axis.set_title(_curve_questions(result), fontsize=10)
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def metrics_dict(result: DemoResult) -> dict[str, Any]:
    """The JSON-ready measurements of a run (what ``metrics.json`` holds)."""
    return {
        "accuracy": result.with_images.accuracy_by_type(),
        "accuracy_text_only": result.text_only.accuracy_by_type(),
        "accuracy_majority_answer": result.with_images.majority_by_type(),
        "accuracy_all": result.with_images.accuracy,
        "accuracy_all_text_only": result.text_only.accuracy,
        "questions_per_type": result.with_images.count_by_type(),
        "seconds": result.seconds,
        "tokens_per_s": tokens_per_second(result),
        "losses": {stage.name: stage.losses for stage in result.train_result.stages},
        "learning_curve": [{"step": point.step, "accuracy": point.accuracy} for point in result.curve],
        "learning_curve_questions": result.curve_questions,
        "dataset": result.dataset.manifest,
        "final_checkpoint": str(result.final_checkpoint),
        "evaluation": {run.out_dir.name: str(run.out_dir) for run in (result.with_images, result.text_only)},
        "config": result.config.to_dict(),
        "environment": environment(),
    }


# Packages whose releases change the demo's numbers (Pillow's resampling moved the words skill once; see
# docs/demo-calibration.md), recorded so that two runs' results can be told apart from their setups.
_RECORDED_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "pillow", "safetensors")


def environment() -> dict[str, Any]:
    """Package versions, torch's CPU kernel level and thread count, and the CPU model of this process."""
    import importlib.metadata
    import platform

    import torch

    versions = {}
    for name in _RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "packages": versions,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module says."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_outputs(result: DemoResult, out_dir: Path) -> dict[str, Path]:
    """Write ``metrics.json``, ``loss.png``, ``accuracy.png`` (with a learning curve) and a copy of the final
    checkpoint (``final/``) into ``out_dir``.

    Returns:
        The written paths by name (``metrics``, ``loss_curve``, ``learning_curve`` when there is one,
        ``checkpoint``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics_dict(result), indent=1))
    loss_path = out_dir / "loss.png"
    # Steps continue across stages so the curve shows align, then finetune, on one axis, each start marked.
    steps = [(step + 1, loss) for step, loss in enumerate(result.train_result.losses)]
    starts, first = [], 1
    for stage in result.train_result.stages:
        starts.append((first, stage.name))
        first += len(stage.losses)
    plot_losses(steps, loss_path, stage_starts=starts)
    paths = {"metrics": metrics_path, "loss_curve": loss_path}
    curve_path = out_dir / "accuracy.png"
    # Note: a previous run's curve must not pass for this run's.
    curve_path.unlink(missing_ok=True)
    if result.curve:
        plot_curve(result, curve_path)
        paths["learning_curve"] = curve_path
    checkpoint = out_dir / "final"
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.copytree(result.final_checkpoint, checkpoint)
    return {**paths, "checkpoint": checkpoint}
