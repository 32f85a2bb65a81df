"""The demo pipeline: every step a 7B run takes, on a tiny model and the synthetic dataset.

    generate_synth(out/data/...)      cached between runs (one folder per size and seed)
    build_demo_parts(out/parts)       random CLIP-like encoder + Llama-like LLM, tokenizer trained on the data
    train(recipe demo-tiny)           align then finetune: the trainer, recipe file and config code of `llavakit train`
    load(out/train/finetune/final)    the exported llava-hf checkpoint, through `llavakit.load`
    evaluate(heldout) x2              ``llavakit eval``'s runner into out/eval/: with images, then the text-only
                                      baseline (``heldout_text_only``: images removed)

With ``eval_every`` the first `CURVE_QUESTIONS` held-out questions are also asked every that many finetune steps (the
finetune stage's ``eval:`` section, `llavakit.training.evaluation`, through the same runner), so the report shows
when each skill appears: the learning curve, whose last point is the final evaluation's score on the same questions.

Only the dataset is reused between runs; the parts and the training folder are rebuilt so every run measures a
full training. ``quick`` shrinks data and steps for CI: it checks the machinery (the loss falls, accuracy beats
chance), not the accuracy targets.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llavakit.data.synth import SynthConfig, SynthDataset, generate_synth, training_corpus
from llavakit.demo.parts import build_demo_parts
from llavakit.errors import ConfigError
from llavakit.evaluation.benchmark import Benchmark
from llavakit.evaluation.heldout import HELDOUT, HELDOUT_TEXT_ONLY, majority_by_type
from llavakit.evaluation.predictions import read_predictions
from llavakit.evaluation.registry import score
from llavakit.evaluation.runner import PREDICTIONS, EvalOptions, evaluate
from llavakit.evaluation.sources import load_benchmark_data
from llavakit.inference.api import Assistant, load
from llavakit.model.presets import PresetParts
from llavakit.training.config import EvalSection, TrainConfig
from llavakit.training.evaluation import Evaluation
from llavakit.training.recipes import load_recipe
from llavakit.training.trainer import TrainResult, train

RECIPE = "demo-tiny"
FULL_DATA = SynthConfig(n_train=3000, n_heldout=300)
QUICK_DATA = SynthConfig(n_train=256, n_heldout=40)
# (align steps, finetune steps) of --quick: enough to start seeing colours (about a minute on 2 cores), for CI.
QUICK_STEPS = (20, 300)
# Finetune steps between learning-curve points: 4 points during a full run (then the final one), 2 in --quick.
EVAL_EVERY, QUICK_EVAL_EVERY = 400, 100
# Note: the curve asks the first 320 of the full run's 944 held-out questions (its first ~100 images, every question
# type): each point then costs ~2.1 s instead of ~6.6 s (4 points: 8.1-8.5 s against 25.5-28 s measured in demo
# runs), and the final evaluation still asks them all.
CURVE_QUESTIONS = 320
# Questions per generation batch, for the curve and the final evaluation.
EVAL_BATCH = 32


@dataclass(frozen=True)
class DemoOptions:
    """What `run_demo` does.

    Attributes:
        out_dir: the run folder (``data/``, ``parts/``, ``train/``, ``eval/``, ``metrics.json``, ``loss.png``,
            ``final``).
        seed: seed of the data, the weights and the training order.
        quick: the shortened CI version (small data, few steps).
        overrides: extra ``key.sub=value`` recipe overrides (as for ``llavakit train``).
        progress: show progress bars.
        eval_every: finetune steps between learning-curve points; None: `EVAL_EVERY` (`QUICK_EVAL_EVERY` with
            ``quick``); 0: no curve.
    """

    out_dir: Path = Path("runs/demo")
    seed: int = 0
    quick: bool = False
    overrides: tuple[str, ...] = ()
    progress: bool = True
    eval_every: int | None = None

    def __post_init__(self) -> None:
        if self.eval_every is not None and self.eval_every < 0:
            raise ConfigError(
                f"demo: eval_every must be >= 0 (0 turns the learning curve off), got {self.eval_every}"
            )

    @property
    def curve_interval(self) -> int:
        """Finetune steps between learning-curve points (0: none)."""
        if self.eval_every is not None:
            return self.eval_every
        return QUICK_EVAL_EVERY if self.quick else EVAL_EVERY


@dataclass(frozen=True)
class CurvePoint:
    """Held-out accuracy with images, per question type, after ``step`` finetune steps."""

    step: int
    accuracy: dict[str, float]


@dataclass(frozen=True)
class HeldoutRun:
    """One run of the held-out questions through ``llavakit eval``'s runner.

    Attributes:
        metrics: ``accuracy`` and ``accuracy/<type>`` (0-1).
        rows: the records (``question``, ``answer``, ``type``, resolved ``image`` paths) with ``prediction``, in
            file order.
        out_dir: the runner's folder (``predictions.jsonl``, ``metrics.json``).
    """

    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    out_dir: Path

    @property
    def accuracy(self) -> float:
        """Exact-match accuracy over every question."""
        return self.metrics["accuracy"]

    def accuracy_by_type(self) -> dict[str, float]:
        """Accuracy per question type, types sorted by name."""
        return by_type(self.metrics)

    def count_by_type(self) -> dict[str, int]:
        """Questions per type, types sorted by name."""
        return dict(sorted(Counter(row["type"] for row in self.rows).items()))

    def majority_by_type(self) -> dict[str, float]:
        """The majority-answer baseline per type (`llavakit.evaluation.heldout.majority_by_type`)."""
        return majority_by_type(self.rows)


def by_type(metrics: dict[str, float]) -> dict[str, float]:
    """The ``accuracy/<type>`` metrics keyed by type."""
    prefix = "accuracy/"
    return {key[len(prefix) :]: value for key, value in metrics.items() if key.startswith(prefix)}


def run_heldout(
    assistant: Assistant, benchmark: Benchmark, path: Path, out_dir: Path, progress: bool
) -> HeldoutRun:
    """Ask every held-out question of ``path`` through the runner into ``out_dir/<benchmark id>`` (replaced)."""
    data = load_benchmark_data(benchmark, path)
    target = out_dir / benchmark.id
    # Note: the runner resumes from existing predictions; a previous run's would pass for this model's.
    shutil.rmtree(target, ignore_errors=True)
    result = evaluate(assistant, data, target, EvalOptions(batch_size=EVAL_BATCH, progress=progress))
    records = read_predictions(target / PREDICTIONS)
    rows = [
        {**data.row(index), "prediction": records[benchmark.row_id(data.row(index), index)]["prediction"]}
        for index in range(len(data))
    ]
    return HeldoutRun(result.metrics, rows, target)


def curve_section(path: Path, every: int) -> EvalSection:
    """The finetune stage's ``eval:`` section that measures the learning curve on the first `CURVE_QUESTIONS`.

    Its last step is left out (``final=False``): the final evaluation asks the exported model all questions, and
    its answers to the curve's give the last point (`final_curve_point`).
    """
    return EvalSection(
        benchmarks=(HELDOUT.id,),
        data={HELDOUT.id: str(path)},
        limit=CURVE_QUESTIONS,
        every=every,
        final=False,
        batch_size=EVAL_BATCH,
    )


def curve_points(evaluations: list[Evaluation]) -> list[CurvePoint]:
    """The learning curve's points measured during finetuning."""
    return [CurvePoint(item.step, by_type(item.metrics[HELDOUT.id])) for item in evaluations]


def final_curve_point(run: HeldoutRun, questions: int, step: int) -> CurvePoint:
    """The curve's last point: ``run``'s accuracy on its first ``questions`` rows (the curve's questions)."""
    return CurvePoint(step, by_type(score(HELDOUT, run.rows[:questions])))


@dataclass
class DemoResult:
    """Everything the demo measured.

    Attributes:
        dataset: the synthetic dataset used.
        train_result: per-stage losses, tokens/s and the final checkpoint.
        with_images, text_only: held-out runs (the second is the text-only baseline).
        seconds: wall-clock seconds per phase (``data``, ``parts``, ``train``, ``curve``, ``eval``, ``total``).
        config: the resolved training config.
        curve: held-out accuracy during finetuning on the first ``curve_questions`` questions, ending with the final
            evaluation's score on them (empty without ``eval_every``).
        curve_questions: how many held-out questions the curve asks (0 without a curve).
        assistant: the trained model, loaded through `llavakit.load` (for the chat).
    """

    dataset: SynthDataset
    train_result: TrainResult
    with_images: HeldoutRun
    text_only: HeldoutRun
    config: TrainConfig
    seconds: dict[str, float] = field(default_factory=dict)
    curve: list[CurvePoint] = field(default_factory=list)
    curve_questions: int = 0
    assistant: Assistant | None = None

    @property
    def final_checkpoint(self) -> Path:
        """The trained model's folder (llava-hf layout)."""
        return self.train_result.final_checkpoint


def demo_config(options: DemoOptions, dataset: SynthDataset, parts: PresetParts) -> TrainConfig:
    """The ``demo-tiny`` recipe pointed at this run's folders (and shortened with ``quick``)."""
    root = dataset.root
    overrides = [
        f"run_dir={options.out_dir / 'train'}",
        f"model.vision={parts.vision_dir}",
        f"model.llm={parts.llm_dir}",
        f"stages.0.data.path={dataset.align_path}",
        f"stages.1.data.path={dataset.finetune_path}",
        f"stages.*.data.image_folder={root}",
        f"seed={options.seed}",
        f"logging.progress_bar={str(options.progress).lower()}",
    ]
    if options.quick:
        overrides += [f"stages.0.max_steps={QUICK_STEPS[0]}", f"stages.1.max_steps={QUICK_STEPS[1]}"]
    return load_recipe(RECIPE, [*overrides, *options.overrides])


def run_demo(options: DemoOptions) -> DemoResult:
    """Run the demo end to end (see module docstring) and return its measurements."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    out_dir = Path(options.out_dir)
    data_config = QUICK_DATA if options.quick else FULL_DATA
    # One folder per data size and seed, so --quick and full runs each keep their cached dataset.
    data_dir = out_dir / "data" / f"{'quick' if options.quick else 'full'}-seed{options.seed}"
    dataset = generate_synth(data_dir, replace(data_config, seed=options.seed))
    seconds["data"] = time.perf_counter() - started

    # Note: only the data is cached; a previous run's parts and training folder would make `train` skip stages.
    for stale in (out_dir / "parts", out_dir / "train", out_dir / "eval"):
        shutil.rmtree(stale, ignore_errors=True)
    mark = time.perf_counter()
    parts = build_demo_parts(out_dir / "parts", training_corpus(dataset), seed=options.seed)
    seconds["parts"] = time.perf_counter() - mark

    config = demo_config(options, dataset, parts)
    interval = options.curve_interval
    if interval:
        config.stages[-1].eval = curve_section(dataset.heldout_path, interval)
    mark = time.perf_counter()
    train_result = train(config)
    # The curve's evaluations run inside the training loop; their time is reported apart from training's.
    evaluations = train_result.stages[-1].evaluations
    seconds["curve"] = sum(item.seconds for item in evaluations)
    seconds["train"] = time.perf_counter() - mark - seconds["curve"]

    mark = time.perf_counter()
    assistant = load(train_result.final_checkpoint, device="cpu")
    eval_dir = out_dir / "eval"
    with_images = run_heldout(assistant, HELDOUT, dataset.heldout_path, eval_dir, options.progress)
    text_only = run_heldout(assistant, HELDOUT_TEXT_ONLY, dataset.heldout_path, eval_dir, options.progress)
    seconds["eval"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    points, asked = [], 0
    if interval:
        asked = min(CURVE_QUESTIONS, len(with_images.rows))
        last = final_curve_point(with_images, asked, train_result.stages[-1].steps)
        points = [*curve_points(evaluations), last]
    return DemoResult(
        dataset, train_result, with_images, text_only, config, seconds, points, asked, assistant
    )
