"""Training throughput: llavakit (padded, padding-free, packed) against transformers' LlavaNextForConditionalGeneration.

Why: packing's value is *useful* tokens per second (padding excluded) on a realistic length mix; padded batches of
LLaVA-665K-like data waste a large share of every forward pass. All runs use the same tiny model (the
``debug-clip-llama`` preset with a ``--hidden``-wide LLM, saved once and loaded by both stacks), the same samples,
the same optimizer (AdamW, fp32) and the same number of samples per step, in one process:

    transformers                  LlavaNextForConditionalGeneration, plainly padded batches of ``--batch`` samples
    llavakit padded               right-padded batches of ``--batch`` samples (our Trainer and collator), sdpa
    llavakit padding-free varlen  the same batches, each collated into one row (``data.padding_free``), sdpa_varlen
    llavakit packing sdpa         rows of ``--budget`` tokens (isolated samples), a 4-D block-diagonal mask
    llavakit packing varlen       the same rows with ``sdpa_varlen`` (per-sample attention, no mask)

The data mimics LLaVA-665K's mix (features.md 8.1, performance.md 3.1): ~70 % academic VQA (several short
question/answer turns per image), ~24 % LLaVA-Instruct conversations (longer answers), ~6 % ShareGPT text-only
conversations (long). Images are synthetic scenes of varied aspect ratios (AnyRes token counts vary).

Run: ``python benchmarks/train_throughput.py [--samples 128] [--batch 8] [--budget 1024]``. It is not a test;
it prints one line per run and the ratios against transformers.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = (
    "the a red blue green shape circle square triangle left right top bottom small large picture shows near "
    "colour object scene image there is one two three what where which how many describe detail"
).split()


# (layout, attention) of the llavakit runs.
RUNS = (
    ("padded", "sdpa"),
    ("padding-free", "sdpa_varlen"),
    ("packing", "sdpa"),
    ("packing", "sdpa_varlen"),
)


@dataclass
class RunResult:
    """Throughput of one run, over all steps after the first (warm-up)."""

    name: str
    useful_tokens_per_s: float
    padding_fraction: float
    steps: int


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _sample(rng: random.Random, index: int, images: list[str]) -> dict:
    kind = rng.random()
    if kind < 0.70:  # academic VQA: 2-8 short turns about one image
        turns = [(_sentence(rng, 5, 12), _sentence(rng, 1, 3)) for _ in range(rng.randint(2, 8))]
    elif kind < 0.94:  # LLaVA-Instruct: 1-4 turns with long answers
        turns = [(_sentence(rng, 8, 20), _sentence(rng, 30, 120)) for _ in range(rng.randint(1, 4))]
    else:  # ShareGPT text-only: long turns, no image
        turns = [(_sentence(rng, 20, 60), _sentence(rng, 60, 200)) for _ in range(rng.randint(1, 3))]
    conversations = []
    for number, (question, answer) in enumerate(turns):
        if number == 0 and kind < 0.94:
            question = "<image>\n" + question
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record = {"id": f"bench-{index}", "conversations": conversations}
    if kind < 0.94:
        record["image"] = rng.choice(images)
    return record


def write_benchmark_data(root: Path, samples: int, seed: int = 0) -> Path:
    """Synthetic images plus a LLaVA JSON with a 665K-like length mix; returns the JSON path."""
    from llavakit.data.synth import SynthConfig, generate_synth

    synth = generate_synth(root, SynthConfig(n_train=64, n_heldout=1, seed=seed))
    images = sorted({record["image"] for record in json.loads(synth.align_path.read_text())})
    rng = random.Random(seed)
    path = root / "bench.json"
    path.write_text(json.dumps([_sample(rng, i, images) for i in range(samples)]))
    return path


def _stage(data: Path, root: Path, layout: str, rows_or_samples: int, budget: int) -> dict:
    return {
        "name": "finetune",
        "trainable": ["vision_tower", "projector", "language_model"],
        "data": {
            "path": str(data),
            "image_folder": str(root),
            "max_length": budget,
            "packing": layout == "packing",
            "padding_free": layout == "padding-free",
        },
        "global_batch_size": rows_or_samples,
        "micro_batch_size": rows_or_samples,
        "epochs": 1,
        "optim": {"lr": 1e-4, "warmup_ratio": 0.0, "schedule": "constant"},
    }


def run_llavakit(
    model_dir: Path, data: Path, root: Path, layout: str, attention: str, batch: int, budget: int
) -> RunResult:
    """Train one epoch with our Trainer (``layout``: padded | padding-free | packing); throughput from its metrics."""
    from llavakit.distributed import init_distributed
    from llavakit.training.config_loading import config_from_dict
    from llavakit.training.data import build_train_data
    from llavakit.training.trainer import Trainer

    # Packed rows hold ~budget tokens; size the row batch so a step covers about as many samples as padded runs.
    rows = max(1, batch // 4) if layout == "packing" else batch
    config = config_from_dict(
        {
            "run_dir": tempfile.mkdtemp(prefix="bench-run-"),
            "model": {"path": str(model_dir), "attn_implementation": attention},
            "stages": [_stage(data, root, layout, rows, budget)],
            "logging": {"report_to": "none", "progress_bar": False},
        }
    )
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    stream = trainer.micro_batches()
    metrics = [trainer.train_step([next(stream)]) for _ in range(trainer.total_steps)]
    timed = metrics[1:]
    tokens = sum(m.num_tokens for m in timed)
    padding = sum(m.num_padding for m in timed)
    name = f"llavakit {layout} {attention}"
    return RunResult(name, tokens / sum(m.seconds for m in timed), padding / (tokens + padding), len(metrics))


def _padded_pixels(batch: dict, spec) -> torch.Tensor:
    """Our concatenated tiles ``[N_tiles,3,S,S]`` as transformers' padded ``[N_images, max_tiles, 3, S, S]``."""
    from llavakit.data.prepare import count_tiles

    sizes = [tuple(size) for size in batch["image_sizes"].tolist()]
    counts = [
        count_tiles(size, spec, bool(tiled)) for size, tiled in zip(sizes, batch["image_tiled"].tolist())
    ]
    chunks = batch["pixel_values"].split(counts)
    padded = torch.zeros(len(chunks), max(counts), *chunks[0].shape[1:])
    for index, chunk in enumerate(chunks):
        padded[index, : len(chunk)] = chunk
    return padded


def run_transformers(model_dir: Path, data: Path, root: Path, batch: int, budget: int) -> RunResult:
    """The same epoch with transformers' model, a plain padded DataLoader and a hand-written AdamW loop."""
    from transformers import LlavaNextForConditionalGeneration

    from llavakit.data.collate import build_collator
    from llavakit.data.config import DataConfig
    from llavakit.data.dataset import build_dataset
    from llavakit.model.llava_next import LlavaNextModel

    ours = LlavaNextModel.from_pretrained(model_dir)
    dataset = build_dataset(
        DataConfig(
            data_path=str(data),
            image_folder=str(root),
            template=ours.config.template,
            model_max_length=budget,
        ),
        ours.tokenizer,
        ours.config.image_spec,
    )
    collate = build_collator(ours.tokenizer)
    model = LlavaNextForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    steps = len(order) // batch
    seconds, tokens, padding = 0.0, 0, 0
    for step in range(steps):
        started = time.perf_counter()
        samples = collate([dataset[i] for i in order[step * batch : (step + 1) * batch]])
        inputs = {key: samples[key] for key in ("input_ids", "attention_mask", "labels")}
        if "pixel_values" in samples:
            inputs.update(
                pixel_values=_padded_pixels(samples, ours.config.image_spec),
                image_sizes=samples["image_sizes"],
            )
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step is warm-up, as in the llavakit runs
            seconds += time.perf_counter() - started
            tokens += int(samples["attention_mask"].sum())
            padding += int(samples["attention_mask"].numel() - samples["attention_mask"].sum())
    return RunResult("transformers padded", tokens / seconds, padding / (tokens + padding), steps)


def main() -> None:
    """Build model and data once, run the three trainings, print throughput and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--samples", type=int, default=128, help="samples in the benchmark set (one epoch each run)"
    )
    parser.add_argument(
        "--batch", type=int, default=8, help="samples per padded batch (packed: batch/4 rows)"
    )
    parser.add_argument("--budget", type=int, default=1024, help="max tokens per sample and per packed row")
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size (MLP 4x); 2 layers, 4 heads")
    args = parser.parse_args()
    torch.manual_seed(0)
    from llavakit.model.presets import build_preset_model

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = write_benchmark_data(root / "data", args.samples)
    llm_dims = {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden}
    model = build_preset_model("debug-clip-llama", root / "parts", llm_dims=llm_dims)
    model_dir = model.save_pretrained(root / "model")
    results = [
        run_transformers(model_dir, data, root / "data", args.batch, args.budget),
        *(
            run_llavakit(model_dir, data, root / "data", layout, attention, args.batch, args.budget)
            for layout, attention in RUNS
        ),
    ]
    baseline = results[0].useful_tokens_per_s
    print(f"{'run':32s} {'useful tok/s':>13s} {'padding':>8s} {'steps':>6s} {'vs transformers':>16s}")
    for result in results:
        print(
            f"{result.name:32s} {result.useful_tokens_per_s:13.0f} {result.padding_fraction:8.1%} "
            f"{result.steps:6d} {result.useful_tokens_per_s / baseline:15.2f}x"
        )


if __name__ == "__main__":
    main()
