"""The demo pipeline: every step a 7B run takes, on a tiny model and the synthetic dataset.

    generate_synth(out/data/...)      cached between runs (one folder per size and seed)
    build_demo_parts(out/parts)       random CLIP-like encoder + Llama-like LLM, tokenizer trained on the data
    train(recipe demo-tiny)           align then finetune: the trainer, recipe file and config code of `llavakit train`
    load(out/train/finetune/final)    the exported llava-hf checkpoint, through `llavakit.load`
    run_benchmark(HeldoutQA) x2       with images, then the text-only baseline (images removed)

Only the dataset is reused between runs; the parts and the training folder are rebuilt so every run measures a
full training. ``quick`` shrinks data and steps for CI: it checks the machinery (the loss falls, accuracy beats
chance), not the accuracy targets.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from llavakit.data.synth import SynthConfig, SynthDataset, generate_synth, training_corpus
from llavakit.demo.parts import build_demo_parts
from llavakit.evaluation.base import BenchmarkReport, run_benchmark
from llavakit.evaluation.heldout import HeldoutQA
from llavakit.inference.api import Assistant, load
from llavakit.model.presets import PresetParts
from llavakit.training.config import TrainConfig
from llavakit.training.recipes import load_recipe
from llavakit.training.trainer import TrainResult, train

RECIPE = "demo-tiny"
FULL_DATA = SynthConfig(n_train=3000, n_heldout=300)
QUICK_DATA = SynthConfig(n_train=256, n_heldout=40)
# (align steps, finetune steps) of --quick: enough to start seeing colours (about a minute on 2 cores), for CI.
QUICK_STEPS = (20, 300)


@dataclass(frozen=True)
class DemoOptions:
    """What `run_demo` does.

    Attributes:
        out_dir: the run folder (``data/``, ``parts/``, ``train/``, ``metrics.json``, ``loss.png``, ``final``).
        seed: seed of the data, the weights and the training order.
        quick: the shortened CI version (small data, few steps).
        overrides: extra ``key.sub=value`` recipe overrides (as for ``llavakit train``).
        progress: show progress bars.
    """

    out_dir: Path = Path("runs/demo")
    seed: int = 0
    quick: bool = False
    overrides: tuple[str, ...] = ()
    progress: bool = True


@dataclass
class DemoResult:
    """Everything the demo measured.

    Attributes:
        dataset: the synthetic dataset used.
        train_result: per-stage losses, tokens/s and the final checkpoint.
        with_images, text_only: held-out reports (the second is the text-only baseline).
        seconds: wall-clock seconds per phase (``data``, ``parts``, ``train``, ``eval``, ``total``).
        config: the resolved training config.
        assistant: the trained model, loaded through `llavakit.load` (for the chat).
    """

    dataset: SynthDataset
    train_result: TrainResult
    with_images: BenchmarkReport
    text_only: BenchmarkReport
    config: TrainConfig
    seconds: dict[str, float] = field(default_factory=dict)
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
    for stale in (out_dir / "parts", out_dir / "train"):
        shutil.rmtree(stale, ignore_errors=True)
    mark = time.perf_counter()
    parts = build_demo_parts(out_dir / "parts", training_corpus(dataset), seed=options.seed)
    seconds["parts"] = time.perf_counter() - mark

    config = demo_config(options, dataset, parts)
    mark = time.perf_counter()
    train_result = train(config)
    seconds["train"] = time.perf_counter() - mark

    mark = time.perf_counter()
    assistant = load(train_result.final_checkpoint, device="cpu")
    benchmark = HeldoutQA(dataset.heldout_path, image_root=dataset.root)
    with_images = run_benchmark(assistant, benchmark, with_images=True, progress=options.progress)
    text_only = run_benchmark(assistant, benchmark, with_images=False, progress=options.progress)
    seconds["eval"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    return DemoResult(dataset, train_result, with_images, text_only, config, seconds, assistant)
