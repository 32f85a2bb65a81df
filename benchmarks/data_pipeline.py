"""Data-pipeline benchmark: throughput of dataset + collator, and padding with plain batching, length grouping
and packing, on a synthetic mix shaped like LLaVA-665K under the LLaVA-1.6 AnyRes spec.

Not a test: it prints numbers. The mix (no real data can be downloaded here) follows the published statistics in
``shared/reference/performance.md``: ~6% text-only samples (ShareGPT-like, long), the rest one photo each (COCO /
VG / GQA / TextVQA / OCR-VQA sizes, mostly 4:3) with 1-8 question/answer rounds of ~250 text tokens in total.
Images come from a small pool of JPEG files of those sizes, so decoding and AnyRes tiling are real.

It also times AnyRes preprocessing alone (decode, resize, pad, tile, normalise) on one thread against
transformers' ``LlavaNextImageProcessorPil`` for the CLIP-336 and SigLIP-384 ``anyres_max_9`` grids
(``(1x1),...,(6x6)`` pinpoints), after checking that both give equal float32 tiles for every pool image. The runs
alternate, best of ``--rounds``. "PIL floor" is the ratio for decoding and the two PIL resizes alone: both
pipelines need exactly those resizes for identical pixels, so it bounds what any faster tiling can reach.

    python benchmarks/data_pipeline.py [--samples 4000] [--batch-size 8] [--budget 16384] [--rows 2] [--timed 200]
        [--rounds 7]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from llavakit.anyres.geometry import letterbox_size, parse_pinpoints, select_best_resolution  # noqa: E402
from llavakit.anyres.pixels import load_image, process_image  # noqa: E402
from llavakit.anyres.spec import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, ImageSpec  # noqa: E402
from llavakit.data.collate import build_collator  # noqa: E402
from llavakit.data.config import DataConfig  # noqa: E402
from llavakit.data.dataset import build_dataset  # noqa: E402
from llavakit.data.packing import padding_fraction, plan_packs  # noqa: E402
from llavakit.data.sampling import grouped_global_batches  # noqa: E402
from llavakit.model.tokenizer import DEFAULT_CORPUS, build_bpe_tokenizer  # noqa: E402

# (height, width) of typical LLaVA-665K sources: COCO, VG, GQA, TextVQA, OCR-VQA book covers.
IMAGE_SIZES = [
    (480, 640),
    (640, 480),
    (427, 640),
    (375, 500),
    (500, 375),
    (600, 800),
    (768, 1024),
    (500, 333),
    (683, 1024),
    (360, 640),
    (1024, 768),
    (512, 512),
]
TEXT_ONLY_FRACTION = 0.06
WORDS = DEFAULT_CORPUS.replace(".", " ").replace(",", " ").split()


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, count)))


def synthetic_sample(rng: random.Random, index: int) -> dict:
    """One LLaVA-format sample; lengths in words are drawn so token lengths land near 665K's."""
    if rng.random() < TEXT_ONLY_FRACTION:
        total = int(np.clip(rng.lognormvariate(np.log(450), 0.7), 40, 1400))
        rounds, image = rng.randint(1, 4), None
    else:
        total = int(np.clip(rng.lognormvariate(np.log(90), 0.8), 10, 700))
        rounds, image = rng.randint(1, 8), "{}x{}.jpg".format(*rng.choice(IMAGE_SIZES))
    turns = []
    for number in range(rounds):
        question = words(rng, max(3, total // (4 * rounds)))
        if number == 0 and image:
            question = "<image>\n" + question
        turns += [
            {"from": "human", "value": question},
            {"from": "gpt", "value": words(rng, total * 3 // (4 * rounds))},
        ]
    sample = {"id": f"bench-{index}", "conversations": turns}
    if image:
        sample["image"] = image
    return sample


def write_fixture(root: Path, num_samples: int, seed: int) -> Path:
    """Write the image pool and the JSON file; returns the JSON path."""
    for height, width in IMAGE_SIZES:
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) % 256)], axis=-1).astype(
            np.uint8
        )
        Image.fromarray(pixels).save(root / f"{height}x{width}.jpg", quality=90)
    rng = random.Random(seed)
    path = root / "mix.json"
    path.write_text(json.dumps([synthetic_sample(rng, i) for i in range(num_samples)]))
    return path


def batch_padding(batches: list[list[int]], lengths: list[int]) -> float:
    """Padding fraction when each batch is padded to its longest sample."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1.0 - real / padded


def packed_padding(packs: list[list[int]], lengths: list[int], rows: int) -> float:
    """Padding fraction when ``rows`` packs form a batch padded to its longest row."""
    fills = [sum(lengths[i] for i in pack) for pack in packs]
    real = sum(fills)
    padded = sum(len(fills[s : s + rows]) * max(fills[s : s + rows]) for s in range(0, len(fills), rows))
    return 1.0 - real / padded


def anyres_max_9(tile: int, mean: tuple[float, ...], std: tuple[float, ...]) -> ImageSpec:
    """The OneVision-style grid: ``anyres_max_9`` over the ``(1x1),...,(6x6)`` pinpoints."""
    return ImageSpec(
        tile_size=tile,
        patch_size=14,
        aspect_ratio="anyres_max_9",
        pinpoints=parse_pinpoints("(1x1),...,(6x6)", tile),
        image_mean=mean,
        image_std=std,
    )


def transformers_processor(spec: ImageSpec):
    """transformers' PIL-backend LLaVA-NeXT image processor configured like ``spec``."""
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.tile_size},
        crop_size={"height": spec.tile_size, "width": spec.tile_size},
        image_grid_pinpoints=[list(p) for p in spec.pinpoints],
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )


def preprocessing_ratios(files: list[bytes], spec: ImageSpec, rounds: int) -> dict[str, float]:
    """Seconds per image of llavakit, transformers and the PIL floor (best of ``rounds``, alternating)."""
    processor = transformers_processor(spec)

    def reference(data: bytes) -> torch.Tensor:
        return processor(images=[Image.open(io.BytesIO(data))], return_tensors="pt")["pixel_values"][0]

    def floor(data: bytes) -> None:
        image = load_image(data)
        image.resize((spec.tile_size, spec.tile_size), Image.Resampling.BICUBIC)
        target = select_best_resolution((image.height, image.width), spec.pinpoints)
        height, width = letterbox_size((image.height, image.width), target)
        image.resize((width, height), Image.Resampling.BICUBIC)

    runs = {"llavakit": lambda data: process_image(load_image(data), spec), "transformers": reference}
    runs["PIL floor"] = floor
    for data in files:
        if not torch.equal(runs["llavakit"](data), reference(data)):
            raise SystemExit(
                f"tiles differ from transformers for a {spec.tile_size}px image: fix before timing"
            )
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for data in files:
                run(data)
            best[name] = min(best[name], (time.perf_counter() - start) / len(files))
    return best


def report_preprocessing(folder: Path, rounds: int) -> None:
    """Print images/s per core and the ratio to transformers for both ``anyres_max_9`` grids."""
    files = [(folder / "{}x{}.jpg".format(*size)).read_bytes() for size in IMAGE_SIZES]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, spec in (
            ("CLIP-336", anyres_max_9(336, CLIP_MEAN, CLIP_STD)),
            ("SigLIP-384", anyres_max_9(384, SIGLIP_MEAN, SIGLIP_STD)),
        ):
            best = preprocessing_ratios(files, spec, rounds)
            reference = best["transformers"]
            print(
                f"AnyRes preprocessing {name} anyres_max_9, 1 thread: llavakit {1 / best['llavakit']:.0f} images/s, "
                f"transformers {1 / reference:.0f} images/s, ratio {reference / best['llavakit']:.2f}x "
                f"(PIL floor {reference / best['PIL floor']:.2f}x)"
            )
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4000, help="synthetic samples to scan")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch (plain and grouped)")
    parser.add_argument("--budget", type=int, default=16384, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per batch")
    parser.add_argument(
        "--timed", type=int, default=200, help="samples decoded + collated for the throughput figure"
    )
    parser.add_argument("--max-length", type=int, default=4096, help="model_max_length")
    parser.add_argument(
        "--rounds", type=int, default=7, help="alternating rounds of the preprocessing timing"
    )
    args = parser.parse_args()

    spec = ImageSpec()  # LLaVA-1.6 CLIP-336 AnyRes: 1x2 ... 3x1 grids, spatial_unpad
    tokenizer = build_bpe_tokenizer("llama", vocab_size=4096)
    with tempfile.TemporaryDirectory() as folder:
        data_path = write_fixture(Path(folder), args.samples, seed=0)
        config = DataConfig(
            data_path=str(data_path),
            image_folder=folder,
            model_max_length=args.max_length,
            truncation_policy="downscale",
        )
        start = time.perf_counter()
        dataset = build_dataset(config, tokenizer, spec)
        scan_seconds = time.perf_counter() - start
        lengths = dataset.lengths

        collate = build_collator(tokenizer)
        start = time.perf_counter()
        timed = min(args.timed, len(dataset))
        for first in range(0, timed, args.batch_size):
            collate([dataset[i] for i in range(first, min(first + args.batch_size, timed))])
        load_seconds = time.perf_counter() - start
        report_preprocessing(Path(folder), args.rounds)

    order = np.random.default_rng(0).permutation(len(lengths)).tolist()
    plain = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    grouped = [
        chunk for batch in grouped_global_batches(lengths, args.batch_size, 1, 0, 0, False) for chunk in batch
    ]
    modality = [
        chunk
        for batch in grouped_global_batches(dataset.modality_lengths, args.batch_size, 1, 0, 0, True)
        for chunk in batch
    ]
    packs = plan_packs(lengths, args.budget, seed=0, epoch=0)

    print(f"samples: {len(dataset)} kept of {args.samples}  ({dataset.stats.summary().splitlines()[0]})")
    print(f"tokens/sample: mean {np.mean(lengths):.0f}, median {np.median(lengths):.0f}, max {max(lengths)}")
    print(f"scan (parse + header sizes + tokenise, no pixels): {len(dataset) / scan_seconds:,.0f} samples/s")
    print(
        f"dataset + collator (decode, AnyRes tiles, tokenise, pad; 1 process): {timed / load_seconds:.1f} samples/s"
    )
    print(f"padding, plain batches of {args.batch_size}: {batch_padding(plain, lengths):.1%}")
    print(f"padding, group_by_length batches of {args.batch_size}: {batch_padding(grouped, lengths):.1%}")
    print(
        f"padding, group_by_modality_length batches of {args.batch_size}: {batch_padding(modality, lengths):.1%}"
    )
    print(
        f"padding, packing into {args.budget}-token rows ({args.rows} per batch): "
        f"{packed_padding(packs, lengths, args.rows):.2%}  (rows {len(packs)}, fill vs budget "
        f"{1 - padding_fraction([sum(lengths[i] for i in p) for p in packs], args.budget):.2%})"
    )


if __name__ == "__main__":
    main()
