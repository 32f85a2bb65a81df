"""Host memory and start-up time per rank while an FSDP2 model loads: the whole-model path against shard by shard.

Why: loading must not need a full copy of the model per rank (`llavakit.training.sharded_load`). Two gloo ranks on
the CPU load the same random checkpoint of ``--layers`` Llama layers of width ``--hidden`` (about 1.06B parameters
by default, bf16 on disk) and shard it with `FSDP2Strategy.wrap`, once per path, each in fresh processes:

    whole     ``LlavaNextModel.from_pretrained`` on every rank (fp32 skeleton + whole state dict, cast to the saved
              dtype), rank 0's weights broadcast, then ``fully_shard`` (the path before sharded loading)
    sharded   `meta_model` (no parameter storage), ``fully_shard`` on meta, each rank reads its own rows

The same twice more for a model built from parts, as a first stage builds it (``model.vision`` + ``model.llm``, in
bf16: ``strategy.param_dtype=bf16``): a tiny CLIP folder and a transformers Llama folder of the same width and
depth (bf16, sharded safetensors with an index, written as ``save_pretrained`` writes them):

    parts-whole    ``LlavaNextModel.from_parts`` on every rank (transformers' ``from_pretrained`` of both parts,
                   a fresh projector), rank 0's weights broadcast, then ``fully_shard``
    parts-sharded  `meta_model_from_parts` (no parameter storage; projector and ``image_newline`` initialised
                   whole), ``fully_shard`` on meta, each rank reads its own rows of both parts' files

For each rank it reports the peak resident memory (``ru_maxrss``) above the resident memory before loading (the
fixed overhead of torch, transformers and the process group), as a multiple of the checkpoint's bytes, and the
start-up time (model built and sharded, before any optimizer exists). The target for the sharded paths is at most
0.6 x the checkpoint's bytes per rank with 2 ranks.

The whole paths' ranks load one after the other (a barrier between them), so the machine holds one full copy at a
time: that keeps the benchmark within a small machine's memory and does not change a rank's own peak; its
start-up time counts only the rank's own loading. The checkpoints are written first, so every path reads them
from the page cache.

Run: ``python benchmarks/load_memory.py [--hidden 2048] [--layers 20] [--folder DIR] [--paths whole,...]``. It is
not a test.
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
PATHS = ("whole", "sharded", "parts-whole", "parts-sharded")


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


def write_parts(folder: Path, hidden: int, layers: int) -> tuple[dict[str, object], int]:
    """Vision and LLM folders for `LlavaNextModel.from_parts`: the debug-clip-llama preset's CLIP, and its Llama
    (config and tokenizer) grown to ``hidden`` x ``layers``, random bf16 weights in sharded safetensors + index.

    Returns:
        (the ``from_parts`` keywords, bytes of both parts' safetensors files).
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    from llavakit.model.presets import build_parts

    parts = build_parts("debug-clip-llama", folder / "big-parts").from_parts_kwargs()
    llm = Path(parts["llm"])
    config = AutoConfig.from_pretrained(llm)
    heads = hidden // 128
    config.update(
        {
            "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": 128,
            "dtype": "bfloat16",
        }
    )
    config.save_pretrained(llm)
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    (llm / SAFE_WEIGHTS_NAME).unlink()
    weight_map, shard, shard_bytes, files = {}, {}, 0, 0
    generator = torch.Generator().manual_seed(0)
    for index, key in enumerate(shapes):
        shard[key] = (torch.randn(shapes[key], generator=generator) * 0.02).to(torch.bfloat16)
        shard_bytes += shard[key].numel() * 2
        if shard_bytes >= SHARD_BYTES or index == len(shapes) - 1:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(llm / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0
    total = sum(torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (llm / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    files = [*Path(parts["vision"]).glob("*.safetensors"), *llm.glob("*.safetensors")]
    return parts, sum(f.stat().st_size for f in files)


def _load(path: str, source: str | dict[str, object]) -> torch.nn.Module:
    """The model of one loading path (see module docstring), not yet sharded."""
    from llavakit.model.llava_next import LlavaNextModel
    from llavakit.training.sharded_load import meta_model, meta_model_from_parts

    if path == "whole":
        return LlavaNextModel.from_pretrained(source)
    if path == "sharded":
        return meta_model(Path(source), None, None)
    torch.manual_seed(0)
    if path == "parts-whole":
        return LlavaNextModel.from_parts(**source, dtype=torch.bfloat16)
    return meta_model_from_parts(source, torch.bfloat16)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _worker(rank: int, path: str, source: str | dict[str, object], init_file: str, results: str) -> None:
    from llavakit.distributed import DistContext
    from llavakit.training.config import StrategyConfig
    from llavakit.training.strategies.fsdp import FSDP2Strategy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    context = DistContext(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"))
    strategy = FSDP2Strategy(StrategyConfig(name="fsdp2", mixed_precision="bf16"), context)
    dist.barrier()
    before = _rss_bytes()
    seconds = 0.0
    whole = path.endswith("whole")
    for turn in range(WORLD if whole else 1):
        if whole and turn != rank:
            dist.barrier()
            continue
        start = time.perf_counter()
        model = _load(path, source)
        seconds += time.perf_counter() - start
        if whole:
            dist.barrier()
    start = time.perf_counter()
    model = strategy.wrap(model)
    seconds += time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    record = {"rank": rank, "before": before, "peak": peak, "seconds": seconds, "shard": shard}
    Path(results, f"{path}-{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def measure(path: str, source: str | dict[str, object], scratch: Path) -> list[dict[str, float]]:
    """Each rank's record for one loading path, from fresh processes."""
    init_file = scratch / f"init-{path}"
    mp.spawn(_worker, args=(path, source, str(init_file), str(scratch)), nprocs=WORLD, join=True)
    return [json.loads((scratch / f"{path}-{rank}.json").read_text()) for rank in range(WORLD)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument(
        "--folder", type=Path, default=None, help="where to write the checkpoint (default: temp)"
    )
    parser.add_argument("--paths", default=",".join(PATHS), help=f"loading paths to measure (of {PATHS})")
    args = parser.parse_args()
    paths = args.paths.split(",")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as temp:
        folder = args.folder or Path(temp)
        start = time.perf_counter()
        params, ckpt_bytes, parts, parts_bytes = 0, 0, {}, 0
        if {"whole", "sharded"} & set(paths):
            params, ckpt_bytes = write_checkpoint(folder, args.hidden, args.layers)
        if {"parts-whole", "parts-sharded"} & set(paths):
            parts, parts_bytes = write_parts(folder, args.hidden, args.layers)
        gib = 2**30
        print(
            f"checkpoint: {params / 1e9:.3f}B parameters, {ckpt_bytes / gib:.2f} GiB bf16 on disk; parts "
            f"{parts_bytes / gib:.2f} GiB (written in {time.perf_counter() - start:.0f} s); {WORLD} gloo ranks"
        )
        sources = {"whole": str(folder / "ckpt"), "sharded": str(folder / "ckpt")}
        sources.update({"parts-whole": parts, "parts-sharded": parts})
        results = {path: measure(path, sources[path], Path(temp)) for path in paths}
        for path, records in results.items():
            size = parts_bytes if path.startswith("parts") else ckpt_bytes
            for r in records:
                extra = _extra(r)
                print(
                    f"{path:13s} rank {r['rank']}: peak RSS {r['peak'] / gib:5.2f} GiB, above the "
                    f"{r['before'] / gib:.2f} GiB before loading {extra / gib:5.2f} GiB = {extra / size:4.2f} x "
                    f"checkpoint; shard {r['shard'] / gib:.2f} GiB; start-up {r['seconds']:6.1f} s"
                )
        for whole_path, sharded_path in (("whole", "sharded"), ("parts-whole", "parts-sharded")):
            if whole_path not in results or sharded_path not in results:
                continue
            for label, value in (("peak above overhead", _extra), ("start-up time", _seconds)):
                whole = max(value(r) for r in results[whole_path])
                sharded = max(value(r) for r in results[sharded_path])
                print(f"{sharded_path} / {whole_path} {label}: {sharded / whole:.3f} (worst rank)")


def _extra(record: dict[str, float]) -> float:
    return record["peak"] - record["before"]


def _seconds(record: dict[str, float]) -> float:
    return record["seconds"]


if __name__ == "__main__":
    main()
