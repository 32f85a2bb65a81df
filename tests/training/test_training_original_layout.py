"""Training starts from an original-layout LLaVA folder (upstream's ``train.py`` output) named as ``model.path``.

The oracle is the llava-hf folder `llavakit.conversion.original.import_original` converts the same folder to: one
process trains to the same losses from either; under FSDP2 (2 gloo processes) every rank's shards, buffers and config
equal the plain path's (the model loaded whole, then sharded) and 2 training steps give the same losses as the
llava-hf folder loaded shard by shard. Covered: the tower saved in the folder, the tower read from the folder's
``mm_vision_tower`` (with a vocabulary one row short of the tokenizer, so ``<image>`` grows the embeddings), bf16.
A folder whose weights disagree with its config, or that names no readable tower, or a run naming no template, is
refused before any weight is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from training_helpers import adamw_losses, anyres_batch, debug_config, debug_stage, local_shard

from llavakit.conversion import original
from llavakit.conversion.original import export_original, import_original
from llavakit.distributed import DistContext
from llavakit.errors import CheckpointError, ConfigError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training import sharded_load
from llavakit.training.config_loading import config_from_dict
from llavakit.training.model_setup import build_model
from llavakit.training.sharded_load import meta_model
from llavakit.training.strategies.fsdp import FSDP2Strategy
from llavakit.training.trainer import train

WORLD = 2
STEPS = 2
TEMPLATE = "vicuna_v1"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``full``: an exported debug-clip-llama with its tower; ``towerless``: the same without tower weights and with
    one embedding row (and head row) fewer than its tokenizer has tokens. Each with its llava-hf conversion."""
    from llavakit.model.presets import build_parts

    root = tmp_path_factory.mktemp("original")
    parts = build_parts("debug-clip-llama", root / "parts")
    torch.manual_seed(0)
    model = LlavaNextModel.from_parts(**parts.from_parts_kwargs()).eval()
    with pytest.warns(UserWarning, match="unpads with round"):
        full = export_original(model, root / "full")
    towerless = export_original(model, root / "towerless")
    weights = load_file(str(towerless / "model.safetensors"))
    weights = {
        k: v[:-1] if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in weights.items()
    }
    save_file(
        {k: v for k, v in weights.items() if ".vision_tower." not in k}, str(towerless / "model.safetensors")
    )
    config = json.loads((towerless / "config.json").read_text())
    config["vocab_size"] -= 1
    (towerless / "config.json").write_text(json.dumps(config))
    assert config["mm_vision_tower"] == str(parts.vision_dir)
    converted = {}
    for folder in (full, towerless):
        torch.manual_seed(1)  # the run's seed below: `<image>`'s new rows are drawn from it
        converted[folder.name] = import_original(folder, template=TEMPLATE).save_pretrained(
            root / f"{folder.name}-hf"
        )
    return {"full": (full, converted["full"]), "towerless": (towerless, converted["towerless"])}


def _config(run_dir: Path, synth, path: Path, **sections):
    stage = debug_stage(synth, data={"template": TEMPLATE})
    config = debug_config(run_dir, [stage], model={"path": str(path)}, seed=1, **sections)
    del config["model"]["preset"]
    return config_from_dict(config)


def test_one_process_trains_as_from_the_converted_folder(folders, synth, tmp_path):
    orig, hf = folders["full"]
    stage = train(_config(tmp_path / "orig", synth, orig)).stages[0]
    from_hf = train(_config(tmp_path / "hf", synth, hf)).stages[0].losses
    assert len(stage.losses) == STEPS and stage.losses == from_hf
    exported = LlavaNextModel.from_pretrained(stage.export_dir)
    assert exported.config.template == TEMPLATE
    assert exported.config.image_spec.unpad_rounding == "floor"


def _worker(rank: int, init_file: str, cases: list, synth, run_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        context = DistContext(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"))
        for orig, hf, param_dtype in cases:
            _compare(context, synth, Path(run_dir), Path(orig), Path(hf), param_dtype)
    finally:
        dist.destroy_process_group()


def _compare(context, synth, run_dir: Path, orig: Path, hf: Path, param_dtype: str) -> None:
    strategy = {"param_dtype": param_dtype}
    plain_config = _config(run_dir, synth, orig, strategy={"name": "single", **strategy})
    sharded_config = _config(run_dir, synth, orig, strategy={"name": "fsdp2", **strategy})
    stage = sharded_config.stages[0]
    plain = build_model(plain_config, stage, None, context)
    with torch.no_grad():
        batch = anyres_batch(plain)
    old = FSDP2Strategy(sharded_config.strategy, context).wrap(plain)
    loader = FSDP2Strategy(sharded_config.strategy, context)
    new = loader.wrap(build_model(sharded_config, stage, None, context))
    assert new.config == old.config

    old_params, new_params = dict(old.named_parameters()), dict(new.named_parameters())
    assert old_params.keys() == new_params.keys()
    for name, param in new_params.items():
        assert param.dtype == old_params[name].dtype, name
        assert torch.equal(local_shard(param), local_shard(old_params[name])), name
    old_buffers = dict(old.named_buffers())
    for name, buffer in new.named_buffers():
        assert torch.equal(buffer, old_buffers[name]), name
    assert loader.load_stats is not None and loader.load_stats.bytes_read > 0

    dtype = {"auto": None, "bf16": torch.bfloat16}[param_dtype]
    converted = FSDP2Strategy(sharded_config.strategy, context).wrap(meta_model(hf, None, dtype))
    assert adamw_losses(new, batch, STEPS) == adamw_losses(converted, batch, STEPS)


def test_fsdp2_shards_equal_the_plain_path_and_train_as_the_converted_folder(folders, synth, tmp_path):
    cases = [
        (str(orig), str(hf), dtype)
        for (orig, hf), dtype in zip(folders.values(), ("auto", "bf16"), strict=True)
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(
        _worker, args=(str(tmp_path / "init"), cases, synth, str(tmp_path / "run")), nprocs=WORLD, join=True
    )


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any read of a weight (whole file, or rows of one) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(original, "_read_weights", refuse)
    monkeypatch.setattr(sharded_load, "_read_rows", refuse)


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, to))


@pytest.mark.parametrize("strategy", ["single", "fsdp2"])
def test_weights_that_disagree_with_the_config_are_refused_before_reading(
    folders, synth, tmp_path, no_weight_reads, strategy
):
    bad = _copy(folders["full"][0], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\..*has shape .* but the config builds"):
        train(_config(tmp_path / "run", synth, bad, strategy={"name": strategy}))


def test_a_towerless_folder_whose_tower_is_missing_is_refused_before_reading(
    folders, synth, tmp_path, no_weight_reads
):
    bad = _copy(folders["towerless"][0], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["mm_vision_tower"] = str(tmp_path / "nowhere")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision tower .*nowhere.* cannot be read"):
        train(_config(tmp_path / "run", synth, bad))


def test_a_run_that_names_no_template_is_refused(folders, synth, tmp_path, no_weight_reads):
    config = debug_config(tmp_path / "run", [debug_stage(synth)], model={"path": str(folders["full"][0])})
    del config["model"]["preset"]
    with pytest.raises(
        ConfigError, match=r"stages\.0 \(finetune\).*records no chat template.*data\.template"
    ):
        train(config_from_dict(config))


def test_planner_and_upstream_flags_read_an_original_folder(folders, synth, tmp_path):
    from llavakit.training.plan import model_config_for
    from llavakit.training.upstream_flags import config_from_upstream_flags

    orig, hf = folders["full"]
    planned = model_config_for(_config(tmp_path / "plan", synth, orig))
    converted = LlavaNextModel.from_pretrained(hf).config
    assert planned.vision_config["hidden_size"] == converted.vision_config["hidden_size"]
    assert planned.text_config["num_hidden_layers"] == converted.text_config["num_hidden_layers"]
    assert planned.image_spec.unpad_rounding == "floor"
    flags = config_from_upstream_flags(
        ["--model_name_or_path", str(orig), "--data_path", str(synth.finetune_path), "--output_dir", str(tmp_path)]
    )
    assert flags.model.path == str(orig) and not flags.model.vision
