"""QLoRA (4-bit nf4 base) under FSDP2 and DDP: 2-process torchrun (gloo) losses, export and resume equal the
1-process QLoRA run.

The quantised base weights are FSDP2 ``ignored_params`` (whole on every rank); adapters, projector and the rest are
sharded. nf4 quantisation is deterministic, so both world sizes train the same base; losses are compared with the
tolerance of `test_training_distributed` (summation order and padding differ between world sizes). The adapter-only
export is checked with peft itself on the LLM the stage started from, quantised with the run's config. Both runs
have an ``eval:`` section: under FSDP2 every rank generates with a gathered copy carrying the same 4-bit base and
the trained adapters, so its answers equal the 1-process run's (which generates with the model itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from training_helpers import debug_config, debug_stage, heldout_questions

from llavakit.errors import ConfigError
from llavakit.model.llava_next import LlavaNextModel
from llavakit.training import lora
from llavakit.training.checkpoint import _SafeFileSystemReader
from llavakit.training.config import LoraConfig
from llavakit.training.config_loading import config_from_dict
from llavakit.training.model_setup import _loads_sharded, preflight
from llavakit.training.trainer import train

bnb = pytest.importorskip("bitsandbytes", reason='QLoRA needs bitsandbytes: pip install -e ".[quant]"')
peft = pytest.importorskip("peft")

TOLERANCE = 1e-4
STEPS = 4
# No LoRA dropout: its masks come from each rank's RNG stream, which differs between world sizes.
QLORA = {"enabled": True, "bits": 4, "r": 4, "alpha": 8, "dropout": 0.0}
# peft on the nf4 base vs the merged fp32 export (see `_check_adapter_on_quantised_base`).
ADAPTER_ATOL = 1e-2
# bitsandbytes' quantisation constants, which checkpoints leave out (`llavakit.training.checkpoint`).
QUANT_CONSTANTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.")


def _config(synth, run_dir: Path, strategy: str, questions: Path | None = None, **lora_fields) -> dict:
    evaluation = {} if questions is None else {"eval": _eval_section(questions)}
    stage = debug_stage(
        synth,
        max_steps=STEPS,
        global_batch_size=4,
        micro_batch_size=1,
        optim={"lr": 2e-3, "warmup_ratio": 0.0, "schedule": "constant"},
        **evaluation,
    )
    return debug_config(run_dir, [stage], lora={**QLORA, **lora_fields}, strategy={"name": strategy})


def _eval_section(questions: Path) -> dict:
    return {"benchmarks": ["heldout"], "data": {"heldout": str(questions)}, "every": 2, "batch_size": 2}


@pytest.fixture(scope="module")
def questions(synth, tmp_path_factory) -> Path:
    """Three held-out-style questions about synthetic images (two batches of 2: one rank answers 2, the other 1)."""
    return heldout_questions(synth, tmp_path_factory.mktemp("questions"), 3)


def _predictions(run_dir: Path, step: int) -> list[dict]:
    folder = run_dir / "finetune" / "eval" / f"step-{step:06d}" / "heldout"
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def _launch(tmp_path: Path, config: dict, *overrides: str) -> list[float]:
    config_file = tmp_path / f"{Path(config['run_dir']).name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("-m", "llavakit.cli.main", "train", "--config", str(config_file), *overrides),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = (Path(config["run_dir"]) / "finetune" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in metrics]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, synth, questions):
    run_dir = tmp_path_factory.mktemp("qlora-single") / "single"
    losses = train(config_from_dict(_config(synth, run_dir, "single", questions))).stages[0].losses
    return run_dir, losses


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, synth, questions):
    tmp_path = tmp_path_factory.mktemp("qlora-fsdp2")
    config = _config(synth, tmp_path / "fsdp2", "fsdp2", questions)
    return tmp_path, config, _launch(tmp_path, config, "logging.save_every=2")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, synth):
    tmp_path = tmp_path_factory.mktemp("qlora-ddp")
    config = _config(synth, tmp_path / "ddp", "ddp")
    return tmp_path, config, _launch(tmp_path, config, "logging.save_every=2")


def test_qlora_fsdp2_preflight_accepts_4_bits_and_refuses_what_cannot_work(tmp_path, synth, monkeypatch):
    four_bits = config_from_dict(_config(synth, tmp_path / "run", "fsdp2"))
    preflight(four_bits, world_size=2)
    # The quantised LLM is loaded through transformers, whole, never by the meta-device load.
    assert not _loads_sharded(four_bits, None)
    with pytest.raises(
        ConfigError, match=r"lora \(QLoRA, lora.bits=8\) with strategy fsdp2 is not supported"
    ):
        preflight(config_from_dict(_config(synth, tmp_path / "run", "fsdp2", bits=8)), world_size=2)
    offload = _config(synth, tmp_path / "run", "fsdp2")
    offload["strategy"]["cpu_offload"] = True
    with pytest.raises(ConfigError, match="strategy.cpu_offload=true is not supported"):
        preflight(config_from_dict(offload), world_size=2)

    def old_fully_shard(module, *, mesh=None, reshard_after_forward=None):
        """fully_shard's signature before torch 2.7."""

    monkeypatch.setattr(lora, "fully_shard", old_fully_shard)
    with pytest.raises(ConfigError, match=r"needs torch >= 2.7 .*ignored_params"):
        preflight(four_bits, world_size=2)


def _llm_logits(llm: torch.nn.Module) -> torch.Tensor:
    input_ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return llm(input_ids=input_ids).logits


def _check_adapter_on_quantised_base(final: Path, base_llm_dir: Path) -> None:
    """peft's ``PeftModel.from_pretrained`` of the adapter folder on the nf4 base gives the merged export's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quantization = lora.quantization_config(LoraConfig(**QLORA), torch.float32)
    base = AutoModelForCausalLM.from_pretrained(
        base_llm_dir, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    ).eval()
    with_adapter = PeftModel.from_pretrained(base, final / lora.ADAPTER_DIR).eval()
    merged = LlavaNextModel.from_pretrained(final).llm.eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    adapted, plain = _llm_logits(with_adapter), _llm_logits(merged)
    with with_adapter.disable_adapter():
        base_only = _llm_logits(with_adapter)
    # bitsandbytes' CPU 4-bit kernel repacks the weights and computes within ~1e-3 of the dequantised matmul the
    # merge uses, so the two agree to ADAPTER_ATOL; the adapters themselves move the logits by far more.
    torch.testing.assert_close(adapted, plain, rtol=0, atol=ADAPTER_ATOL)
    assert (base_only - plain).abs().max() > 10 * ADAPTER_ATOL, "the adapters did not change the LLM"


def test_two_process_fsdp2_qlora_matches_one_process_and_exports(single_run, fsdp2_run):
    single_dir, single_losses = single_run
    _, config, losses = fsdp2_run
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert losses == pytest.approx(single_losses, rel=TOLERANCE)
    # The merged export (dequantised base + adapters, fp32) is a plain llava-hf model equal to the 1-process one.
    final = Path(config["run_dir"]) / "finetune" / "final"
    _check_same_export(final, single_dir / "finetune" / "final")
    text_config = json.loads((final / "config.json").read_text())["text_config"]
    assert "quantization_config" not in text_config
    _check_adapter_on_quantised_base(final, Path(config["run_dir"]) / "parts" / "debug-clip-llama" / "llm")


def test_two_process_fsdp2_qlora_evaluates_the_trained_model(single_run, fsdp2_run):
    single_dir, _ = single_run
    _, config, _ = fsdp2_run
    run_dir = Path(config["run_dir"])
    logged = [json.loads(line) for line in (run_dir / "finetune" / "eval.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [2, STEPS]
    for step in (2, STEPS):
        ours, alone = _predictions(run_dir, step), _predictions(single_dir, step)
        assert [r["question_id"] for r in ours] == [r["question_id"] for r in alone] == ["q0", "q1", "q2"]
        # The 2-process model differs from the 1-process one by float summation order only (losses equal to 1e-4).
        assert [r["prediction"] for r in ours] == [r["prediction"] for r in alone]


def test_two_process_fsdp2_qlora_resume_reproduces_the_lost_steps(fsdp2_run):
    _check_resume_reproduces_the_lost_steps(*fsdp2_run)


def test_two_process_ddp_qlora_matches_one_process_and_resumes(single_run, ddp_run):
    """DDP keeps a whole 4-bit model per rank; its losses, export and resume follow the 1-process run too."""
    single_dir, single_losses = single_run
    tmp_path, config, losses = ddp_run
    assert losses == pytest.approx(single_losses, rel=TOLERANCE)
    final = Path(config["run_dir"]) / "finetune" / "final"
    _check_same_export(final, single_dir / "finetune" / "final")
    _check_resume_reproduces_the_lost_steps(tmp_path, config, losses)


def _check_same_export(final: Path, expected_final: Path) -> None:
    """The merged exports (dequantised base + adapters, fp32) hold the same tensors, to summation-order rounding."""
    exported = LlavaNextModel.from_pretrained(final).state_dict()
    expected = LlavaNextModel.from_pretrained(expected_final).state_dict()
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


def _check_resume_reproduces_the_lost_steps(tmp_path: Path, config: dict, first: list[float]) -> None:
    """Relaunch a finished 2-process run from its step-2 checkpoint: steps 3.. and the export come out the same."""
    stage_dir = Path(config["run_dir"]) / "finetune"
    checkpoint = stage_dir / "checkpoints" / "step-000002"
    metadata = _SafeFileSystemReader(str(checkpoint)).read_metadata()
    # The packed 4-bit base and its quantisation constants are rebuilt with the model, not saved.
    saved = metadata.state_dict_metadata
    assert not [fqn for fqn in saved if fqn.endswith(QUANT_CONSTANTS)]
    assert not [fqn for fqn in saved if fqn.startswith("model.") and fqn.endswith("_proj.base_layer.weight")]
    tensors = [item for item in saved.values() if getattr(item, "properties", None) is not None]
    assert not [item for item in tensors if item.properties.dtype == torch.uint8], "packed 4-bit bytes were saved"
    # Without the export, the next launch resumes from step 2 (a fresh start would rewrite that checkpoint).
    (stage_dir / "final").rename(stage_dir / "first-final")
    for later in (stage_dir / "checkpoints").glob("step-*"):
        if later != checkpoint:
            later.rename(tmp_path / later.name)
    inode = checkpoint.stat().st_ino
    resumed = _launch(tmp_path, config, "logging.save_every=2")
    assert checkpoint.stat().st_ino == inode, "the run started over instead of resuming"
    assert resumed[:2] == first[:2]
    assert resumed[2:] == pytest.approx(first[2:], rel=1e-6)
    first_export = LlavaNextModel.from_pretrained(stage_dir / "first-final").state_dict()
    for name, tensor in LlavaNextModel.from_pretrained(stage_dir / "final").state_dict().items():
        torch.testing.assert_close(tensor, first_export[name], rtol=1e-6, atol=1e-6, msg=name)
