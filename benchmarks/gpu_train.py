"""GPU training benchmark at real shapes: llavakit's fast paths against transformers' LlavaNextForConditionalGeneration.

Why: `train_throughput.py` compares layouts on a tiny CPU model; what a user pays for is GPU time at real widths,
where kernels, attention and the vocabulary-sized head dominate. Each model (`llavakit.model.presets` real-shape
presets, random weights, built directly on the GPU: nothing is written to disk) trains on the same LLaVA-665K-like
mix as `train_throughput.py`, but with images of realistic sizes (300-1000 px, varied aspect ratios, so AnyRes tile
counts are realistic), all parts trained (the finetune stage), AdamW (fused, fp32 master weights), bf16 autocast:

    transformers   LlavaNextForConditionalGeneration, padded batches of 1 sample, SDPA, gradient checkpointing on
                   (as upstream), ``--samples-per-step`` micro-batches accumulated per optimizer step
    llavakit       our Trainer, strategy single, ``sdpa_varlen``; one row per entry of `VARIANTS` (layout,
                   compile, loss kernel, gradient checkpointing); padding-free steps hold ``--samples-per-step``
                   samples, packed steps one row of up to ``--max-length`` tokens

Per run: warm-up steps excluded (compilation), then steps for ``--seconds`` (or ``--steps``); reported: useful
(non-padding) tokens/s over wall time (data loading included), model TFLOP/s and MFU (`llavakit.training.flops`
convention, against the card's dense bf16 peak), peak memory, and the ratio to transformers' useful tokens/s. A run
that fails (out of memory, missing package) becomes a row with its error; the others still run.

Run on one CUDA GPU (about 4 minutes on an H100 with the defaults of one model)::

    python benchmarks/gpu_train.py [--model NAME ...] [--variants NAME ...] [--seconds 20] [--json out.json]
    python benchmarks/gpu_train.py --smoke        # CPU, tiny debug presets, < 1 minute: checks the script runs

It prints, not asserts; the markdown table is the last thing printed.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import _padded_pixels, _sample  # noqa: E402  (same data mix, same pixel layout)

from llavakit.model.llava_next import LlavaNextModel  # noqa: E402
from llavakit.training.flops import FlopCounter  # noqa: E402

TRAINABLE = ("vision_tower", "projector", "language_model")
# Real-shape preset -> the tiny debug preset of the same vision/LLM families, for --smoke.
MODELS = {"qwen2.5-0.5b-siglip-shapes": "debug-siglip-qwen2", "vicuna-7b-clip-l-slice": "debug-clip-llama"}


@dataclass(frozen=True)
class Variant:
    """One llavakit run: data layout (``padding-free`` | ``packing``), compile, loss kernel, checkpointing."""

    name: str
    layout: str
    compile: bool = False
    loss_kernel: str = "chunked"
    checkpointing: bool = False


# Trim this table (or pass --variants) to fit the time on the GPU.
VARIANTS = (
    Variant("padding-free", "padding-free"),
    Variant("packing", "packing"),
    Variant("packing compile", "packing", compile=True),
    Variant("padding-free compile", "padding-free", compile=True),
    Variant("packing gc", "packing", checkpointing=True),
    Variant("packing logits-loss", "packing", loss_kernel="logits"),
    Variant("packing liger", "packing", loss_kernel="liger"),
)


@dataclass
class Row:
    """One run's numbers (None where not measured)."""

    model: str
    run: str
    steps: int = 0
    samples: int = 0
    useful_tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    vs_transformers: float | None = None
    note: str = ""


@dataclass
class Timing:
    """Steps timed after warm-up: wall seconds, useful tokens, samples and model FLOPs."""

    seconds: float = 0.0
    tokens: int = 0
    samples: int = 0
    flops: float = 0.0
    steps: int = 0
    records: list[tuple[int, int, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- data


def write_data(root: Path, samples: int, images: int, seed: int = 0) -> Path:
    """JPEG scenes of 300-1000 px (aspect ratios 1:3 to 3:1) plus a 665K-like LLaVA JSON; returns the JSON path."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    names = []
    for index in range(images):
        long_side = rng.randint(300, 1000)
        ratio = rng.choice((1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 0.5, 3.0, 1 / 3))
        width, height = (
            (long_side, round(long_side / ratio)) if ratio >= 1 else (round(long_side * ratio), long_side)
        )
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(width), rng.randrange(height)
            box = (x, y, x + rng.randint(10, width // 2 + 10), y + rng.randint(10, height // 2 + 10))
            draw.rectangle(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        name = f"scene-{index}.jpg"
        image.save(root / name, quality=90)
        names.append(name)
    path = root / "bench.json"
    path.write_text(json.dumps([_sample(rng, i, names) for i in range(samples)]))
    return path


# ---------------------------------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build_model(name: str, device: torch.device, attention: str | None = None) -> LlavaNextModel:
    """A fresh random-weight model of preset ``name`` (fp32), built directly on ``device``."""
    from llavakit.model.presets import build_preset_in_memory

    with torch.device(device):
        return build_preset_in_memory(name, attn_implementation=attention)


def time_steps(
    step: Callable[[], tuple[int, int, float]],
    warmup: int,
    seconds: float,
    max_steps: int,
    device: torch.device,
) -> Timing:
    """Run ``warmup`` untimed steps, then steps until ``seconds`` or ``max_steps``; ``step`` returns (useful tokens,
    samples, model FLOPs) and must finish its device work before returning (both loops read the loss)."""
    for _ in range(warmup):
        step()
    _sync(device)
    timing = Timing()
    started = time.perf_counter()
    while timing.steps < max_steps and time.perf_counter() - started < seconds:
        tokens, samples, flops = step()
        timing.records.append((tokens, samples, flops))
        timing.steps += 1
    _sync(device)
    timing.seconds = time.perf_counter() - started
    timing.tokens = sum(r[0] for r in timing.records)
    timing.samples = sum(r[1] for r in timing.records)
    timing.flops = sum(r[2] for r in timing.records)
    return timing


def _fill(row: Row, timing: Timing, peak: float | None, device: torch.device) -> Row:
    row.steps, row.samples = timing.steps, timing.samples
    row.useful_tokens_per_s = timing.tokens / timing.seconds
    row.tflops = timing.flops / timing.seconds / 1e12
    row.mfu = timing.flops / timing.seconds / peak if peak else None
    row.peak_memory_gib = _peak_gib(device)
    return row


# ---------------------------------------------------------------------------------------------------- transformers


def _transformers_model(ours: LlavaNextModel, device: torch.device) -> torch.nn.Module:
    """transformers' LlavaNextForConditionalGeneration of the same config (random weights, fp32, SDPA, on device)."""
    from transformers import AutoModelForImageTextToText, LlavaNextConfig, LlavaNextForConditionalGeneration

    data = ours.config.to_config_json(ours.vision_encoder.backbone.has_cls_token)
    if data["model_type"] != "llava_next":
        raise RuntimeError(
            f"the preset maps to transformers model_type {data['model_type']!r}, not llava_next"
        )
    data.pop("llavakit")
    data.pop("architectures")
    data.pop("model_type")
    config = LlavaNextConfig(**data)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    if not isinstance(model, LlavaNextForConditionalGeneration):
        raise RuntimeError(
            f"expected LlavaNextForConditionalGeneration, transformers built {type(model).__name__}"
        )
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    return model.train()


def run_transformers(
    model_name: str, data: Path, root: Path, args: argparse.Namespace, peak: float | None
) -> Row:
    """Padded batches of one sample, ``--samples-per-step`` accumulated per AdamW step, bf16 autocast."""
    from torch.utils.data import DataLoader

    from llavakit.data.collate import build_collator
    from llavakit.data.config import DataConfig
    from llavakit.data.dataset import build_dataset

    device = args.device
    row = Row(model_name, "transformers padded bs1 gc")
    shapes = build_model(model_name, torch.device("meta"))  # shapes, tokenizer and spec; no memory
    counter = FlopCounter.from_model(shapes, TRAINABLE)
    spec = shapes.config.image_spec
    dataset = build_dataset(
        DataConfig(
            data_path=str(data),
            image_folder=str(root),
            template=shapes.config.template,
            model_max_length=args.max_length,
        ),
        shapes.tokenizer,
        spec,
    )
    collate = build_collator(shapes.tokenizer)
    model = _transformers_model(shapes, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batches = _forever(
        lambda epoch: DataLoader(
            dataset,
            batch_size=1,
            shuffle=True,
            generator=torch.Generator().manual_seed(epoch),
            collate_fn=collate,
            num_workers=args.num_workers,
        )
    )

    def step() -> tuple[int, int, float]:
        tokens, flops = 0, 0.0
        for _ in range(args.samples_per_step):
            batch = next(batches)
            inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "labels")}
            if "pixel_values" in batch:
                inputs["pixel_values"] = _padded_pixels(batch, spec).to(device)
                inputs["image_sizes"] = batch["image_sizes"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**inputs).loss / args.samples_per_step
            loss.backward()
            tokens += batch["num_tokens"]
            flops += counter.batch_flops(batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the step's device work
        return tokens, args.samples_per_step, flops

    timing = time_steps(step, args.warmup, args.seconds, args.steps, device)
    return _fill(row, timing, peak, device)


def _forever(loader_for_epoch: Callable[[int], Any]) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        yield from loader_for_epoch(epoch)
        epoch += 1


# ---------------------------------------------------------------------------------------------------- llavakit


def _stage(variant: Variant, data: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    per_step = 1 if variant.layout == "packing" else args.samples_per_step
    return {
        "name": "finetune",
        "trainable": list(TRAINABLE),
        "data": {
            "path": str(data),
            "image_folder": str(root),
            "max_length": args.max_length,
            "packing": variant.layout == "packing",
            "padding_free": variant.layout == "padding-free",
            "num_workers": args.num_workers,
        },
        "global_batch_size": per_step,
        "micro_batch_size": per_step,
        "max_steps": 1_000_000,
        "gradient_checkpointing": variant.checkpointing,
        "optim": {"lr": 1e-5, "warmup_ratio": 0.0, "schedule": "constant", "fused": True},
    }


@contextmanager
def _prebuilt(model_name: str, device: torch.device) -> Iterator[None]:
    """Make the Trainer build a fresh in-memory model on ``device`` instead of writing the preset's parts to disk
    (GBs for real shapes) and loading them on the CPU; the rest of `model_setup.build_model` is applied as is."""
    from llavakit.training import trainer as trainer_module
    from llavakit.training.model_setup import apply_stage_settings, resolve_attention

    def build(config, stage, previous, context) -> LlavaNextModel:
        model = build_model(model_name, device, resolve_attention(config.model.attn_implementation))
        apply_stage_settings(model, stage)
        if stage.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    with mock.patch.object(trainer_module, "build_model", build):
        yield


def run_llavakit(
    model_name: str, variant: Variant, data: Path, root: Path, args: argparse.Namespace, peak: float | None
) -> Row:
    """One `Variant` with our Trainer; ``--profile`` prints the top kernels of one step after the timed steps."""
    from llavakit.distributed import init_distributed
    from llavakit.training.config_loading import config_from_dict
    from llavakit.training.data import build_train_data
    from llavakit.training.trainer import Trainer

    device = args.device
    row = Row(model_name, f"llavakit {variant.name}")
    if variant.loss_kernel == "liger" and importlib.util.find_spec("liger_kernel") is None:
        row.note = "skipped: liger-kernel is not installed"
        return row
    if variant.compile and args.smoke and not args.smoke_compile:
        row.note = "skipped: --smoke compiles only with --smoke-compile (minutes on CPU)"
        return row
    config = config_from_dict(
        {
            "run_dir": tempfile.mkdtemp(prefix="gpu-train-"),
            "model": {"preset": model_name, "attn_implementation": "sdpa_varlen"},
            "stages": [_stage(variant, data, root, args)],
            "strategy": {
                "name": "single",
                "mixed_precision": "bf16",
                "compile": variant.compile,
                "loss_kernel": variant.loss_kernel,
            },
            "logging": {"report_to": "none", "progress_bar": False},
        }
    )
    with _prebuilt(model_name, device):
        trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
        trainer.build()
    counter = FlopCounter.from_model(trainer.unwrapped, TRAINABLE)
    stream = trainer.micro_batches()

    def step() -> tuple[int, int, float]:
        batch = next(stream)
        metrics = trainer.train_step([batch])  # reads the loss: the step's device work is done
        return metrics.num_tokens, len(batch["sample_ids"]), counter.batch_flops(batch)

    warmup = args.warmup + (args.compile_warmup if variant.compile else 0)
    timing = time_steps(step, warmup, args.seconds, args.steps, device)
    _fill(row, timing, peak, device)
    if args.profile and variant.name == (args.profile_variant or args.variants[0]):
        profile_step(step, device, args.profile_top)
    if variant.compile:
        torch._dynamo.reset()
    return row


def profile_step(step: Callable[[], Any], device: torch.device, top: int) -> None:
    """Profile one step and print the ``top`` CUDA kernels by total time and their share (CPU ops without CUDA)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == wanted and getattr(e, attribute) > 0]
    if cuda and not events:
        raise RuntimeError("the profiler recorded no CUDA kernels (is CUPTI available?)")
    total = sum(getattr(e, attribute) for e in events)
    print(f"\nprofile of one step: top {top} {'CUDA kernels' if cuda else 'CPU ops'} by total time")
    for event in sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:top]:
        share = getattr(event, attribute) / total
        print(
            f"  {share:6.1%} {getattr(event, attribute) / 1e3:9.2f} ms x{event.count:<5d} {event.key[:100]}"
        )


# ---------------------------------------------------------------------------------------------------- main


def isolated(run: Callable[[], Row], model: str, name: str, device: torch.device) -> Row:
    """``run()``, with an out-of-memory or other failure turned into a row; memory freed before and after."""
    _free(device)
    error = None
    try:
        row = run()
    except torch.OutOfMemoryError as oom:
        error = f"OOM: {str(oom).splitlines()[0][:120]}"
    except Exception as failure:  # a benchmark row, not a crash: the remaining runs still measure
        traceback.print_exc()
        error = (
            f"error: {type(failure).__name__}: {str(failure).splitlines()[0][:160] if str(failure) else ''}"
        )
    if error is not None:
        row = Row(model, name, peak_memory_gib=_peak_gib(device), note=error)
    _free(device)
    return row


def markdown(rows: list[Row]) -> str:
    """The rows as a markdown table."""

    def fmt(value: float | None, pattern: str) -> str:
        return "-" if value is None else format(value, pattern)

    lines = [
        "| model | run | steps | samples | useful tok/s | TFLOP/s | MFU | peak GiB | vs transformers | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.run} | {r.steps} | {r.samples} | {fmt(r.useful_tokens_per_s, ',.0f')} | "
            f"{fmt(r.tflops, '.1f')} | {fmt(r.mfu, '.1%')} | {fmt(r.peak_memory_gib, '.1f')} | "
            f"{fmt(r.vs_transformers, '.2f')} | {r.note} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", nargs="+", choices=sorted(MODELS), default=sorted(MODELS), help="models to run"
    )
    names = [v.name for v in VARIANTS]
    parser.add_argument(
        "--variants", nargs="+", choices=names, default=names, help="llavakit variants to run"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the transformers run")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per run (after warm-up)")
    parser.add_argument("--steps", type=int, default=10_000, help="at most this many timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--compile-warmup", type=int, default=5, help="extra untimed steps for compiled runs")
    parser.add_argument(
        "--samples", type=int, default=512, help="samples in the benchmark set (--max-samples)"
    )
    parser.add_argument("--max-samples", dest="samples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=64, help="distinct images in the benchmark set")
    parser.add_argument(
        "--samples-per-step", type=int, default=4, help="samples per step (padded, padding-free)"
    )
    parser.add_argument(
        "--max-length", type=int, default=8192, help="token cap per sample and per packed row"
    )
    parser.add_argument("--num-workers", type=int, default=8, help="DataLoader workers (image preprocessing)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense bf16 peak")
    parser.add_argument("--profile", action="store_true", help="profile one step of one llavakit variant")
    parser.add_argument(
        "--profile-variant", choices=names, default=None, help="default: the first variant run"
    )
    parser.add_argument("--profile-top", type=int, default=15, help="kernels listed by --profile")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers to this file")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU check with the tiny debug presets (< 1 min)"
    )
    parser.add_argument(
        "--smoke-compile", action="store_true", help="with --smoke, run the compiled variants too"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.compile_warmup = min(args.seconds, 1.0), 1, 1
        args.samples, args.images, args.num_workers = min(args.samples, 32), min(args.images, 6), 0
        args.max_length = min(args.max_length, 2048)
        args.steps = min(args.steps, 2)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    """Write the data once, run every model's baseline and variants in this process, print the table."""
    from llavakit.distributed import init_distributed
    from llavakit.training.metrics import peak_flops

    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke for a CPU check with tiny presets)")
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    context = init_distributed(needs_process_group=False)
    peak = peak_flops(context, args.peak_tflops) if args.device.type == "cuda" or args.peak_tflops else None
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(
        f"device: {device_name}, peak bf16: {peak / 1e12 if peak else '-'} TFLOP/s, torch {torch.__version__}"
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    root = Path(tempfile.mkdtemp(prefix="gpu-train-data-"))
    data = write_data(root, args.samples, args.images)
    rows: list[Row] = []
    for real_name in args.model:
        name = MODELS[real_name] if args.smoke else real_name
        baseline = None
        if not args.no_baseline:
            run = functools.partial(run_transformers, name, data, root, args, peak)
            row = isolated(run, name, "transformers", args.device)
            rows.append(row)
            print(row)
            baseline = row.useful_tokens_per_s
        for variant in (v for v in VARIANTS if v.name in args.variants):
            run = functools.partial(run_llavakit, name, variant, data, root, args, peak)
            row = isolated(run, name, variant.name, args.device)
            if baseline and row.useful_tokens_per_s:
                row.vs_transformers = row.useful_tokens_per_s / baseline
            rows.append(row)
            print(row)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": device_name,
                    "peak_tflops": peak / 1e12 if peak else None,
                    "torch": torch.__version__,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": [asdict(r) for r in rows],
                },
                indent=2,
            )
        )
    print()
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
