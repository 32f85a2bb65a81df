"""LoRA under FSDP2: 2-process torchrun (gloo) losses equal the 1-process LoRA run; resume; merged and adapter export.

The adapters sit inside the decoder layers, so each FSDP2 group holds frozen base weights and trainable adapters
together. Losses are compared with the tolerance of `test_training_distributed` (float summation order and padding
differ between world sizes). The adapter-only export is checked with peft itself: ``PeftModel.from_pretrained`` on
the LLM the stage started from gives the logits of the merged export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from training_helpers import debug_config, debug_stage, heldout_questions

from llavakit.errors import ConfigError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training.config_loading import config_from_dict
from llavakit.training.lora import ADAPTER_DIR
from llavakit.training.model_setup import preflight
from llavakit.training.trainer import train

peft = pytest.importorskip("peft")

TOLERANCE = 1e-4
STEPS = 4
# No LoRA dropout: its masks come from each rank's RNG stream, which differs between world sizes, and a resumed
# run's fresh DataLoader draws its base seed from the restored RNG (one draw the first run made before step 1).
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}


def _config(
    synth, run_dir: Path, strategy: str, path: Path | None = None, questions: Path | None = None
) -> dict:
    # A stage eval section generates with a gathered copy under FSDP2; it must carry the peft wrapping.
    section = {"benchmarks": ["heldout"], "data": {"heldout": str(questions)}, "every": 2, "batch_size": 2}
    evaluation = {} if questions is None else {"eval": section}
    stage = debug_stage(
        synth,
        max_steps=STEPS,
        global_batch_size=4,
        micro_batch_size=1,
        optim={"lr": 2e-3, "warmup_ratio": 0.0, "schedule": "constant"},
        **evaluation,
    )
    config = debug_config(run_dir, [stage], lora=LORA, strategy={"name": strategy})
    if path is not None:
        config["model"] = {"path": str(path)}
    return config


def _launch(tmp_path: Path, config: dict, nproc: int, *overrides: str) -> list[float]:
    config_file = tmp_path / f"{Path(config['run_dir']).name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    )
    command = [sys.executable, *launcher, "-m", "llavakit.cli.main", "train", "--config", str(config_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([*command, *overrides], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = (Path(config["run_dir"]) / "finetune" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in metrics]


def _llm_logits(llm: torch.nn.Module) -> torch.Tensor:
    input_ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return llm(input_ids=input_ids).logits


def _check_adapter_matches_merged(final: Path, base_llm_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = final / ADAPTER_DIR
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(base_llm_dir, dtype=torch.float32).eval()
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    merged = LlavaNextModel.from_pretrained(final).llm.eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    adapted, plain = _llm_logits(with_adapter), _llm_logits(merged)
    with with_adapter.disable_adapter():
        base_only = _llm_logits(with_adapter)
    assert not torch.allclose(base_only, plain, atol=1e-4), "the adapters did not change the LLM"
    torch.testing.assert_close(adapted, plain, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def questions(synth, tmp_path_factory) -> Path:
    """Three held-out-style questions about synthetic images (two batches of 2: one rank answers 2, the other 1)."""
    return heldout_questions(synth, tmp_path_factory.mktemp("questions"), 3)


def _predictions(run_dir: Path, step: int) -> list[str]:
    folder = run_dir / "finetune" / "eval" / f"step-{step:06d}" / "heldout"
    return [json.loads(line)["prediction"] for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, synth, questions):
    run_dir = tmp_path_factory.mktemp("lora-single") / "single"
    losses = train(config_from_dict(_config(synth, run_dir, "single", questions=questions))).stages[0].losses
    return run_dir, losses


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, synth, questions):
    tmp_path = tmp_path_factory.mktemp("lora-fsdp2")
    config = _config(synth, tmp_path / "fsdp2", "fsdp2", questions=questions)
    return tmp_path, config, _launch(tmp_path, config, 2, "logging.save_every=2")


def test_lora_with_fsdp2_passes_preflight_and_8bit_qlora_is_refused(tmp_path, synth):
    preflight(config_from_dict(_config(synth, tmp_path / "run", "fsdp2")), world_size=2)
    qlora = _config(synth, tmp_path / "run", "fsdp2")
    qlora["lora"] = {**LORA, "bits": 8}
    with pytest.raises(ConfigError, match=r"lora \(QLoRA, lora.bits=8\) with strategy fsdp2 is not supported"):
        preflight(config_from_dict(qlora), world_size=2)


def test_adapter_export_loads_in_peft_with_the_merged_logits(single_run):
    run_dir, _ = single_run
    _check_adapter_matches_merged(
        run_dir / "finetune" / "final", run_dir / "parts" / "debug-clip-llama" / "llm"
    )


@pytest.mark.slow
def test_two_process_fsdp2_lora_matches_one_process_and_exports(tmp_path, synth, single_run, fsdp2_run):
    _, single_losses = single_run
    _, config, losses = fsdp2_run
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert losses == pytest.approx(single_losses, rel=TOLERANCE)
    # The merged export equals 2-process DDP's (the unsharded LoRA path, same micro-batch pairing): with one process
    # the weights differ by up to ~lr where Adam normalises near-zero gradients that summation order changes.
    ddp = _config(synth, tmp_path / "ddp", "ddp")
    assert _launch(tmp_path, ddp, 2) == pytest.approx(losses, rel=1e-6)
    final = Path(config["run_dir"]) / "finetune" / "final"
    exported = LlavaNextModel.from_pretrained(final).state_dict()
    expected = LlavaNextModel.from_pretrained(Path(ddp["run_dir"]) / "finetune" / "final").state_dict()
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    _check_adapter_matches_merged(final, Path(config["run_dir"]) / "parts" / "debug-clip-llama" / "llm")


@pytest.mark.slow
def test_two_process_fsdp2_lora_evaluates_the_trained_model(single_run, fsdp2_run):
    single_dir, _ = single_run
    _, config, _ = fsdp2_run
    for step in (2, STEPS):
        assert _predictions(Path(config["run_dir"]), step) == _predictions(single_dir, step)


@pytest.mark.slow
def test_two_process_fsdp2_lora_resume_reproduces_the_lost_steps(fsdp2_run):
    # Checkpoint after step 2; without the export the next launch resumes there (DCP, LoRA DTensors included).
    tmp_path, config, first = fsdp2_run
    shutil.rmtree(Path(config["run_dir"]) / "finetune" / "final")
    resumed = _launch(tmp_path, config, 2, "logging.save_every=2")
    assert resumed[:2] == first[:2]
    assert resumed[2:] == pytest.approx(first[2:], rel=1e-6)


@pytest.mark.slow
def test_fsdp2_lora_from_a_checkpoint_folder_matches_across_world_sizes(tmp_path, synth, checkpoint):
    # From a folder FSDP2 builds the model on the meta device and reads each rank's shards: the wrapped weights
    # are found under peft's names and the adapters are initialised after the read, independently of the world.
    one = _launch(tmp_path, _config(synth, tmp_path / "one", "fsdp2", path=checkpoint), 1)
    two = _launch(tmp_path, _config(synth, tmp_path / "two", "fsdp2", path=checkpoint), 2)
    assert len(one) == STEPS and one[-1] < one[0]
    assert two == pytest.approx(one, rel=TOLERANCE)
