"""Dataset start-up: the shared on-disk index (`llavakit.data.index`), cold vs warm, 1 vs 2 ranks.

Why: without the index every rank scanned the whole dataset at every stage start (parse, tokenise, image headers,
token counts; ~1 ms per sample, ~11 minutes for LLaVA-665K). With it a cold start splits the scan over the ranks
and a warm start (the same data, tokenizer, template, spec and length cap) only verifies and maps the stored arrays.

The data mimics LLaVA-665K (`benchmarks/train_throughput.py`'s ``_sample``: VQA, conversations, text-only, with
references to 64 real small PNG scenes); the tokenizer is the debug BPE of the presets and the image spec CLIP-336
AnyRes. Each start runs in fresh processes (``torch.multiprocessing``, gloo for 2 ranks) and is timed inside
``build_dataset`` (process start and imports excluded), the slowest rank counting. Runs alternate cold/warm and 1/2
ranks per repeat.

Run: ``python benchmarks/data_index.py [--samples 200000] [--repeats 1]``. It is not a test; it prints one line per
start and the ratios (targets: warm ≥ 20× faster than cold, 2 ranks' cold start no slower than 1 rank's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch


def _start(
    rank: int, world: int, port: int, data: str, images: str, tokenizer_dir: str, index: str, out: str
) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from llavakit.anyres.spec import ImageSpec
    from llavakit.data.config import DataConfig
    from llavakit.data.dataset import build_dataset
    from llavakit.distributed import DistContext

    context = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        context = DistContext(rank, world, rank, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = DataConfig(data_path=data, image_folder=images, model_max_length=4096)
    started, cpu = time.perf_counter(), time.process_time()
    dataset = build_dataset(config, tokenizer, ImageSpec(), index_dir=index, context=context)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    Path(out, f"{rank}.json").write_text(
        json.dumps({"seconds": seconds, "cpu": cpu, "samples": len(dataset)})
    )
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_start(
    world: int, data: Path, images: Path, tokenizer_dir: Path, index: Path
) -> tuple[float, float]:
    """Wall and CPU seconds of the slowest rank's `build_dataset` in ``world`` fresh processes."""
    with tempfile.TemporaryDirectory(prefix="bench-index-out-") as out:
        args = (world, _free_port(), str(data), str(images), str(tokenizer_dir), str(index), out)
        torch.multiprocessing.spawn(_start, args=args, nprocs=world)
        results = [json.loads(Path(out, f"{rank}.json").read_text()) for rank in range(world)]
    return max(result["seconds"] for result in results), max(result["cpu"] for result in results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import write_benchmark_data

    from llavakit.model.tokenizer import build_bpe_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        data = write_benchmark_data(root, args.samples)
        build_bpe_tokenizer("llama").save_pretrained(root / "tokenizer")
        print(f"{args.samples} samples ({data.stat().st_size / 1e6:.0f} MB JSON), {os.cpu_count()} CPU cores")
        times: dict[str, list[tuple[float, float]]] = {}
        for repeat in range(args.repeats):
            for world in (1, 2) if repeat % 2 == 0 else (2, 1):
                index = root / f"index-{world}-{repeat}"
                for phase in ("cold", "warm"):
                    seconds, cpu = timed_start(world, data, root, root / "tokenizer", index)
                    times.setdefault(f"{phase} {world}", []).append((seconds, cpu))
                    print(
                        f"  {phase} start, {world} rank(s): {seconds:8.2f} s wall, {cpu:8.2f} s CPU",
                        flush=True,
                    )
        # Wall time is what a run waits; the slowest rank's CPU time is what it would wait on idle cores (other
        # load on a shared machine inflates wall time, not CPU time).
        for column, name in ((0, "wall"), (1, "CPU")):
            best = {key: min(value[column] for value in values) for key, values in times.items()}
            for world in (1, 2):
                ratio = best[f"cold {world}"] / best[f"warm {world}"]
                print(f"{name}: warm vs cold, {world} rank(s): {ratio:.1f}x faster")
            print(f"{name}: cold start, 2 ranks vs 1: {best['cold 1'] / best['cold 2']:.2f}x faster")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
