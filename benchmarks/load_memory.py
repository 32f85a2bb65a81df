"""Host memory and start-up time per rank while an FSDP2 model loads: the whole-model path against shard by shard.

Why: loading must not need a full copy of the model per rank (`llavakit.training.sharded_load`). Two gloo ranks on
the CPU load the same random checkpoint of ``--layers`` Llama layers of width ``--hidden`` (about 1.06B parameters
by default, bf16 on disk) and shard it with `FSDP2Strategy.wrap`, once per path, each in fresh processes:

    whole     ``LlavaNextModel.from_pretrained`` on every rank (fp32 skeleton + whole state dict, cast to the saved
              dtype), rank 0's weights broadcast, then ``fully_shard`` (the path before sharded loading)
    sharded   `meta_model` (no parameter storage), ``fully_shard`` on meta, each rank reads its own rows

For each rank it reports the peak resident memory (``ru_maxrss``) above the resident memory before loading (the
fixed overhead of torch, transformers and the process group), as a multiple of the checkpoint's bytes, and the
start-up time (model built and sharded, before any optimizer exists). The target for the sharded path is at most
0.6 x the checkpoint's bytes per rank with 2 ranks.

The whole path's ranks load one after the other (a barrier between them), so the machine holds one full copy at a
time: that keeps the benchmark within a small machine's memory and does not change a rank's own peak; its
start-up time counts only the rank's own loading. The checkpoint is written first, so both paths read it from the
page cache.

Run: ``python benchmarks/load_memory.py [--hidden 2048] [--layers 20] [--folder DIR]``. It is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
SHARD_BYTES = 512 * 2**20


def write_checkpoint(folder: Path, hidden: int, layers: int) -> tuple[int, int]:
    """A random bf16 checkpoint: the debug-clip-llama preset's config with a ``hidden``-wide, ``layers``-deep LLM.

    Returns:
        (parameters, bytes of the safetensors files).
    """
    from safetensors.torch import save_file

    from llavakit.model.checkpoint import INDEX_NAME, WEIGHTS_NAME, build_skeleton, to_disk_key
    from llavakit.model.llava_next import LlavaNextModel
    from llavakit.model.presets import build_parts
    from llavakit.training.sharded_load import empty_parameters

    parts = build_parts("debug-clip-llama", folder / "parts")
    checkpoint = folder / "ckpt"
    LlavaNextModel.from_parts(**parts.from_parts_kwargs()).save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    text = config["text_config"]
    heads = hidden // 128
    text.update(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=128,
    )
    for section in (config, text, config["vision_config"]):
        section["dtype"] = "bfloat16"
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    with empty_parameters():
        skeleton, _ = build_skeleton(LlavaNextModel, checkpoint)
    shapes = {to_disk_key(name): tuple(t.shape) for name, t in skeleton.state_dict().items()}
    (checkpoint / WEIGHTS_NAME).unlink()
    weight_map, shard, shard_bytes, files = {}, {}, 0, 0
    generator = torch.Generator().manual_seed(0)
    keys = list(shapes)
    for index, key in enumerate(keys):
        shard[key] = (torch.randn(shapes[key], generator=generator) * 0.02).to(torch.bfloat16)
        shard_bytes += shard[key].numel() * 2
        if shard_bytes >= SHARD_BYTES or index == len(keys) - 1:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(checkpoint / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0
    total = sum(torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (checkpoint / INDEX_NAME).write_text(json.dumps(index))
    return total, sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _worker(rank: int, path: str, folder: str, init_file: str, results: str) -> None:
    from llavakit.distributed import DistContext
    from llavakit.model.llava_next import LlavaNextModel
    from llavakit.training.config import StrategyConfig
    from llavakit.training.sharded_load import meta_model
    from llavakit.training.strategies.fsdp import FSDP2Strategy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    context = DistContext(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"))
    strategy = FSDP2Strategy(StrategyConfig(name="fsdp2", mixed_precision="bf16"), context)
    dist.barrier()
    before = _rss_bytes()
    seconds = 0.0
    for turn in range(WORLD if path == "whole" else 1):
        if path == "whole" and turn != rank:
            dist.barrier()
            continue
        start = time.perf_counter()
        model = (
            LlavaNextModel.from_pretrained(folder)
            if path == "whole"
            else meta_model(Path(folder), None, None)
        )
        seconds += time.perf_counter() - start
        if path == "whole":
            dist.barrier()
    start = time.perf_counter()
    model = strategy.wrap(model)
    seconds += time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    record = {"rank": rank, "before": before, "peak": peak, "seconds": seconds, "shard": shard}
    Path(results, f"{path}-{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def measure(path: str, folder: Path, scratch: Path) -> list[dict[str, float]]:
    """Each rank's record for one loading path, from fresh processes."""
    init_file = scratch / f"init-{path}"
    mp.spawn(_worker, args=(path, str(folder), str(init_file), str(scratch)), nprocs=WORLD, join=True)
    return [json.loads((scratch / f"{path}-{rank}.json").read_text()) for rank in range(WORLD)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument(
        "--folder", type=Path, default=None, help="where to write the checkpoint (default: temp)"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as temp:
        folder = args.folder or Path(temp)
        start = time.perf_counter()
        params, ckpt_bytes = write_checkpoint(folder, args.hidden, args.layers)
        gib = 2**30
        print(
            f"checkpoint: {params / 1e9:.3f}B parameters, {ckpt_bytes / gib:.2f} GiB bf16 on disk "
            f"(written in {time.perf_counter() - start:.0f} s); {WORLD} gloo ranks"
        )
        results = {path: measure(path, folder / "ckpt", Path(temp)) for path in ("whole", "sharded")}
        for path, records in results.items():
            for r in records:
                extra = _extra(r)
                print(
                    f"{path:8s} rank {r['rank']}: peak RSS {r['peak'] / gib:5.2f} GiB, above the "
                    f"{r['before'] / gib:.2f} GiB before loading {extra / gib:5.2f} GiB = {extra / ckpt_bytes:4.2f} x "
                    f"checkpoint; shard {r['shard'] / gib:.2f} GiB; start-up {r['seconds']:6.1f} s"
                )
        for label, value in (("peak above overhead", _extra), ("start-up time", _seconds)):
            whole = max(value(r) for r in results["whole"])
            sharded = max(value(r) for r in results["sharded"])
            print(f"{label}: sharded / whole = {sharded / whole:.3f} (worst rank)")


def _extra(record: dict[str, float]) -> float:
    return record["peak"] - record["before"]


def _seconds(record: dict[str, float]) -> float:
    return record["seconds"]


if __name__ == "__main__":
    main()
