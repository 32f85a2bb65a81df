"""FSDP2 models built from parts without weights (`llavakit.training.sharded_load.meta_model_from_parts`) equal the
plain path: ``LlavaNextModel.from_parts`` on every rank, seeded alike, then sharded after rank 0's broadcast.

2 gloo processes compare their shards, buffers, config and 2 training steps for: a fresh model (projector and
``image_newline`` initialised from the seed), the same with upstream's projector file applied, and an LLM whose
vocabulary is grown for ``<image>`` (transformers' mean-resizing draws the new rows from the old ones). Single-process
tests check the initial values and the errors raised before any weight is read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from training_helpers import adamw_losses, anyres_batch, local_shard

from llavakit.distributed import DistContext
from llavakit.errors import CheckpointError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.model.projector import Projector, load_upstream_projector_state, upstream_projector_state
from llavakit.training import sharded_load
from llavakit.training.config import StrategyConfig
from llavakit.training.sharded_load import load_projector_file, meta_model_from_parts, take_source
from llavakit.training.strategies.fsdp import FSDP2Strategy

WORLD = 2
STEPS = 2
SEED = 7


def _plain(parts: dict, dtype: torch.dtype | None, projector_file: str | None) -> LlavaNextModel:
    torch.manual_seed(SEED)
    model = LlavaNextModel.from_parts(**parts, dtype=dtype)
    if projector_file:
        load_upstream_projector_state(model.projector, projector_file)
    return model


def _meta(parts: dict, dtype: torch.dtype | None, projector_file: str | None) -> LlavaNextModel:
    torch.manual_seed(SEED)
    model = meta_model_from_parts(parts, dtype)
    if projector_file:
        load_projector_file(model, projector_file)
    return model


def _worker(
    rank: int, init_file: str, parts: dict, dtype: torch.dtype | None, projector_file: str | None, mixed: str
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _compare(rank, parts, dtype, projector_file, mixed)
    finally:
        dist.destroy_process_group()


def _compare(
    rank: int, parts: dict, dtype: torch.dtype | None, projector_file: str | None, mixed: str
) -> None:
    context = DistContext(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"))
    config = StrategyConfig(name="fsdp2", mixed_precision=mixed)
    plain = _plain(parts, dtype, projector_file)
    with torch.no_grad():
        batch = anyres_batch(plain)  # before sharding: encode_images outside forward needs whole parameters
    old = FSDP2Strategy(config, context).wrap(plain)
    strategy = FSDP2Strategy(config, context)
    new = strategy.wrap(_meta(parts, dtype, projector_file))
    assert new.config == old.config

    old_params, new_params = dict(old.named_parameters()), dict(new.named_parameters())
    assert old_params.keys() == new_params.keys()
    for name, param in new_params.items():
        assert param.dtype == old_params[name].dtype, name
        assert param.requires_grad == old_params[name].requires_grad, name
        assert torch.equal(local_shard(param), local_shard(old_params[name])), name
    old_buffers = dict(old.named_buffers())
    for name, buffer in new.named_buffers():
        assert torch.equal(buffer, old_buffers[name]), name
    if new.config.tie_word_embeddings:
        assert new.llm.lm_head.weight is new.llm.get_input_embeddings().weight

    assert strategy.load_stats is not None
    part_bytes = sum(
        f.stat().st_size for part in ("vision", "llm") for f in Path(parts[part]).glob("*.safetensors")
    )
    assert 0 < strategy.load_stats.bytes_read < 0.6 * part_bytes
    assert adamw_losses(new, batch, STEPS) == adamw_losses(old, batch, STEPS)


def _spawn(
    parts: dict,
    tmp_path: Path,
    dtype: torch.dtype | None = None,
    projector_file: str | None = None,
    mixed="no",
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_file = tmp_path / "init"
    mp.spawn(_worker, args=(str(init_file), parts, dtype, projector_file, mixed), nprocs=WORLD, join=True)


@pytest.fixture(scope="module")
def grown_parts(tmp_path_factory):
    """``debug-clip-llama`` parts whose LLM (untied head) has 8 embedding rows fewer than its tokenizer has tokens,
    so ``from_parts`` resizes both the embeddings and the head."""
    from transformers import AutoModelForCausalLM

    from llavakit.model.presets import build_parts

    root = tmp_path_factory.mktemp("grown")
    parts = build_parts("debug-clip-llama", root / "parts").from_parts_kwargs()
    llm = AutoModelForCausalLM.from_pretrained(parts["llm"])
    rows = llm.get_input_embeddings().weight.shape[0]
    llm.resize_token_embeddings(rows - 8)
    small = root / "small-llm"
    llm.save_pretrained(small)
    for file in Path(parts["llm"]).iterdir():
        if file.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(file, small / file.name)
    return {**parts, "llm": str(small)}


@pytest.fixture(scope="module")
def projector_file(preset_parts, tmp_path_factory):
    """An upstream ``mm_projector.bin`` for ``debug-clip-llama`` (random values, upstream keys)."""
    from transformers import AutoConfig

    parts = preset_parts("debug-clip-llama").from_parts_kwargs()
    sizes = [AutoConfig.from_pretrained(parts[part]).hidden_size for part in ("vision", "llm")]
    projector = Projector("mlp2x_gelu", *sizes)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in projector.parameters():
            param.normal_(generator=generator)
    file = tmp_path_factory.mktemp("projector") / "mm_projector.bin"
    torch.save(upstream_projector_state(projector), file)
    return str(file)


@pytest.mark.slow
def test_sharded_parts_equal_plain_parts_with_tied_embeddings_in_bf16(preset_parts, tmp_path):
    _spawn(preset_parts("debug-siglip-qwen2").from_parts_kwargs(), tmp_path, torch.bfloat16, mixed="bf16")


@pytest.mark.slow
def test_sharded_parts_apply_the_projector_file(preset_parts, projector_file, tmp_path):
    _spawn(preset_parts("debug-clip-llama").from_parts_kwargs(), tmp_path, projector_file=projector_file)


@pytest.mark.slow
def test_sharded_parts_grow_the_vocabulary_as_the_plain_path(grown_parts, tmp_path):
    _spawn(grown_parts, tmp_path)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_initialised_values_equal_the_plain_paths(grown_parts, projector_file, dtype):
    # Projector, image_newline and the grown embedding/head rows: the only tensors held whole in memory.
    plain = _plain(grown_parts, dtype, None).state_dict()
    source = take_source(_meta(grown_parts, dtype, None))
    held = {name: source.values[key] for name, key in source.keys.items() if key in source.values}
    assert set(held) == {
        "image_newline",
        *(f"projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")),
        "llm.model.embed_tokens.weight",
        "llm.lm_head.weight",
    }
    for name, value in held.items():
        assert value.dtype == plain[name].dtype and torch.equal(value, plain[name]), name
    projected = take_source(_meta(grown_parts, dtype, projector_file))
    expected = _plain(grown_parts, dtype, projector_file).state_dict()
    for name in ("projector.linear_1.weight", "projector.linear_2.bias"):
        assert torch.equal(projected.values[projected.keys[name]], expected[name]), name


def test_meta_parts_are_on_meta_and_read_nothing(preset_parts, monkeypatch):
    monkeypatch.setattr(sharded_load, "_read_rows", _no_reading)
    model = _meta(preset_parts("debug-siglip-qwen2").from_parts_kwargs(), None, None)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("part", ["vision", "llm"])
def test_a_part_of_another_shape_fails_before_any_weight_is_read(preset_parts, tmp_path, monkeypatch, part):
    parts = preset_parts("debug-clip-llama").from_parts_kwargs()
    folder = Path(shutil.copytree(parts[part], tmp_path / part))
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sharded_load, "_read_rows", _no_reading)
    with pytest.raises(CheckpointError, match=re.escape(str(folder)) + r": \S*mlp\S* has shape"):
        meta_model_from_parts({**parts, part: str(folder)}, None)


def test_a_part_missing_a_parameter_fails(preset_parts, tmp_path):
    parts = preset_parts("debug-clip-llama").from_parts_kwargs()
    folder = Path(shutil.copytree(parts["llm"], tmp_path / "llm"))
    state = load_file(folder / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 parameters.*model\.norm\.weight"):
        meta_model_from_parts({**parts, "llm": str(folder)}, None)


def test_a_projector_file_of_another_shape_is_refused(preset_parts, tmp_path):
    parts = preset_parts("debug-siglip-qwen2").from_parts_kwargs()
    file = tmp_path / "mm_projector.bin"
    torch.save(upstream_projector_state(Projector("mlp2x_gelu", 16, 64)), file)
    with pytest.raises(CheckpointError, match="different vision encoder or LLM size"):
        load_projector_file(_meta(parts, None, None), file)


def _no_reading(*args, **kwargs):
    raise AssertionError("a weight was read")


@pytest.mark.slow
def test_fsdp2_run_from_parts_with_a_projector_file_matches_single_process(projector_file, synth, tmp_path):
    # A world of one through the trainer: the first stage builds the preset's parts on the meta device and applies
    # the projector file; the second reads the first's export shard by shard.
    from training_helpers import debug_config, debug_stage

    from llavakit.training.config_loading import config_from_dict
    from llavakit.training.trainer import train

    stages = [debug_stage(synth, "align"), debug_stage(synth)]

    def losses(strategy: str) -> list[float]:
        config = debug_config(tmp_path / strategy, stages, strategy={"name": strategy})
        config["model"]["pretrained_projector"] = projector_file
        return train(config_from_dict(config)).losses

    single = losses("single")
    assert losses("fsdp2") == pytest.approx(single, rel=1e-4)
