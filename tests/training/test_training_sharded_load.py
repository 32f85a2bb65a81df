"""FSDP2 models read shard by shard from a checkpoint (`llavakit.training.sharded_load`) equal today's whole-model
path: 2 gloo processes, each comparing its shards, buffers, logits and 2 training steps against the model loaded
whole (``from_pretrained``) and sharded after rank 0's broadcast, and against the unsharded eager model's logits.

The workers run in processes started by ``torch.multiprocessing.spawn``; a failed assertion there fails the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from training_helpers import adamw_losses, anyres_batch, local_shard

from llavakit.distributed import DistContext
from llavakit.errors import CheckpointError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config import StrategyConfig
from llavakit.training.sharded_load import meta_model
from llavakit.training.strategies.fsdp import FSDP2Strategy

WORLD = 2
STEPS = 2


def _worker(rank: int, init_file: str, folder: str, dtype: torch.dtype | None, mixed_precision: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _compare(rank, Path(folder), dtype, mixed_precision)
    finally:
        dist.destroy_process_group()


def _compare(rank: int, folder: Path, dtype: torch.dtype | None, mixed_precision: str) -> None:
    context = DistContext(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"))
    config = StrategyConfig(name="fsdp2", mixed_precision=mixed_precision)
    eager = LlavaNextModel.from_pretrained(folder, dtype=dtype)
    batch = anyres_batch(eager)
    with torch.no_grad():
        eager_logits = eager(**batch).logits
    old = FSDP2Strategy(config, context).wrap(LlavaNextModel.from_pretrained(folder, dtype=dtype))
    strategy = FSDP2Strategy(config, context)
    new = strategy.wrap(meta_model(folder, None, dtype))

    old_params, new_params = dict(old.named_parameters()), dict(new.named_parameters())
    assert old_params.keys() == new_params.keys()
    for name, param in new_params.items():
        assert param.dtype == old_params[name].dtype, name
        assert torch.equal(local_shard(param), local_shard(old_params[name])), name
    old_buffers = dict(old.named_buffers())
    for name, buffer in new.named_buffers():
        assert torch.equal(buffer, old_buffers[name]), name
    if new.config.tie_word_embeddings:
        assert new.llm.lm_head.weight is new.llm.get_input_embeddings().weight

    total = sum(p.numel() * p.element_size() for p in eager.parameters())
    local = sum(local_shard(p).numel() * local_shard(p).element_size() for p in new.parameters())
    # Shards are dim-0 chunks: this rank's bytes are 1/W of the model up to one row per tensor.
    assert abs(local - total / WORLD) < 0.02 * total, (local, total)
    assert strategy.load_stats is not None
    assert strategy.load_stats.bytes_read < 0.55 * sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    with torch.no_grad():
        new_logits = new(**batch).logits
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if mixed_precision == "bf16" else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(new_logits.float(), eager_logits.float(), **tolerance)
    assert adamw_losses(new, batch, STEPS) == adamw_losses(old, batch, STEPS)


def _spawn(
    folder: Path, tmp_path: Path, dtype: torch.dtype | None = None, mixed_precision: str = "no"
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_file = tmp_path / "init"
    mp.spawn(_worker, args=(str(init_file), str(folder), dtype, mixed_precision), nprocs=WORLD, join=True)


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    """A saved ``debug-siglip-qwen2`` checkpoint (tied embeddings) with odd-sized tensors in the vocabulary."""
    from llavakit.model.presets import build_parts

    root = tmp_path_factory.mktemp("tied")
    parts = build_parts("debug-siglip-qwen2", root / "parts")
    torch.manual_seed(0)
    return LlavaNextModel.from_parts(**parts.from_parts_kwargs()).save_pretrained(root / "ckpt")


@pytest.mark.slow
def test_sharded_load_equals_whole_model_load(checkpoint, tmp_path):
    _spawn(checkpoint, tmp_path)


@pytest.mark.slow
def test_sharded_load_keeps_tied_embeddings_in_bf16_params(tied_checkpoint, tmp_path):
    _spawn(tied_checkpoint, tmp_path, dtype=torch.bfloat16, mixed_precision="bf16")


def test_meta_model_has_no_parameter_storage_and_real_buffers(checkpoint):
    eager = LlavaNextModel.from_pretrained(checkpoint)
    model = meta_model(checkpoint, None, torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    eager_buffers = dict(eager.named_buffers())
    buffers = dict(model.named_buffers())
    assert buffers.keys() == eager_buffers.keys() and buffers
    for name, buffer in buffers.items():
        assert torch.equal(buffer, eager_buffers[name]), name


def test_meta_model_checks_shapes_before_reading(checkpoint, tmp_path):
    import json
    import shutil

    folder = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        meta_model(folder, None, None)


def test_meta_model_refuses_a_corrupt_header(checkpoint, tmp_path):
    import shutil

    folder = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    (folder / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b"not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        meta_model(folder, None, None)


@pytest.mark.slow
def test_fsdp2_run_from_a_checkpoint_matches_single_process(checkpoint, synth, tmp_path):
    # A world of one: stage 1 reads model.path shard by shard, stage 2 the export of stage 1.
    from training_helpers import debug_config, debug_stage

    from llavakit.training.config_loading import config_from_dict
    from llavakit.training.trainer import train

    stages = [debug_stage(synth, "align"), debug_stage(synth)]

    def losses(strategy: str) -> list[float]:
        config = debug_config(tmp_path / strategy, stages, strategy={"name": strategy})
        config["model"] = {"path": str(checkpoint)}
        return train(config_from_dict(config)).losses

    single = losses("single")
    assert losses("fsdp2") == pytest.approx(single, rel=1e-4)
