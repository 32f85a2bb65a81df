"""fp16 with a dynamic loss scaler: it trains, an overflow skips exactly its step (as HF Trainer and DeepSpeed do:
the step counted, weights, optimizer state and LR schedule held, the scale halved), a collapsed scale stops training,
the scale survives a resume, FSDP2 runs it (one rank; two ranks agree on an overflow only one of them saw) and the
upstream ``--fp16`` flag maps onto it.

CPU autocast supports float16 in the torch versions llavakit runs on, so the real fp16 path runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from training_helpers import debug_config, debug_stage

from llavakit.distributed import DistContext, init_distributed
from llavakit.errors import CheckpointError, ConfigError, TrainingError
from llavakit.training.config import StrategyConfig
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.strategies import build_strategy
from llavakit.training.trainer import Trainer
from llavakit.training.upstream_flags import config_from_upstream_flags

INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's default, DeepSpeed's initial_scale_power 16


def _trainer(tmp_path, synth, precision="fp16", name="run", **stage):
    fields = {"max_steps": 4, "optim": {"lr": 2e-3, "warmup_ratio": 0.0, "schedule": "linear"}, **stage}
    config = config_from_dict(
        debug_config(tmp_path / name, [debug_stage(synth, **fields)], strategy={"mixed_precision": precision})
    )
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    return trainer


def _steps(trainer, count):
    stream = trainer.micro_batches()
    return [
        trainer.train_step([next(stream) for _ in range(trainer.plan.accumulation_steps)])
        for _ in range(count)
    ]


def _poison(trainer):
    """An fp16 overflow in the projector's output: every gradient upstream of the loss turns inf/NaN."""
    return trainer.unwrapped.projector.register_forward_hook(
        lambda module, args, output: output * float("inf")
    )


def _adam_steps(trainer):
    return [float(state["step"]) for state in trainer.optimizer.state.values()]


def test_fp16_trains_and_reports_the_unscaled_gradient_norm(tmp_path, synth):
    fp16 = _trainer(tmp_path, synth)
    fp32 = _trainer(tmp_path, synth, precision="no", name="fp32")
    first = _steps(fp32, 1)[0]
    metrics = _steps(fp16, 4)
    # The same weights and batch in float32: the norm of the unscaled gradients (a scaled one is 65536x larger).
    assert metrics[0].grad_norm == pytest.approx(first.grad_norm, rel=0.05)
    assert metrics[0].loss == pytest.approx(first.loss, rel=0.02)
    assert metrics[-1].loss < metrics[0].loss
    assert fp16.strategy.loss_scale() == INITIAL_SCALE and fp16.state.skipped_steps == 0
    assert all(param.dtype == torch.float32 for param in fp16.model.parameters())


def test_an_overflow_skips_exactly_its_step_and_training_goes_on(tmp_path, synth):
    trainer = _trainer(tmp_path, synth)
    stream = trainer.micro_batches()
    batches = lambda: [next(stream) for _ in range(trainer.plan.accumulation_steps)]  # noqa: E731
    trainer.train_step(batches())
    weights = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    adam, schedule = _adam_steps(trainer), trainer.scheduler.state_dict()
    hook = _poison(trainer)
    skipped = trainer.train_step(batches())  # no TrainingError: an overflow is normal under fp16
    hook.remove()
    assert not torch.isfinite(torch.tensor(skipped.grad_norm))
    assert (trainer.state.step, trainer.state.skipped_steps, skipped.step) == (2, 1, 2)  # counted, as HF does
    assert trainer.strategy.loss_scale() == INITIAL_SCALE / 2
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, weights[name]), name
        assert param.grad is None
    assert _adam_steps(trainer) == adam
    assert trainer.scheduler.state_dict() == schedule  # the LR schedule waits for the next applied update
    applied = trainer.train_step(batches())
    assert torch.isfinite(torch.tensor(applied.grad_norm)) and trainer.state.skipped_steps == 1
    assert applied.lr == skipped.lr  # the LR the skipped step would have used
    assert _adam_steps(trainer) == [step + 1 for step in adam]
    assert not torch.equal(trainer.unwrapped.projector.linear_1.weight, weights["projector.linear_1.weight"])
    assert trainer.scheduler.state_dict()["last_epoch"] == schedule["last_epoch"] + 1


def test_a_collapsed_loss_scale_stops_training(tmp_path, synth):
    trainer = _trainer(tmp_path, synth)
    scaler = trainer.strategy.grad_scaler
    scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0})
    _poison(trainer)
    stream = trainer.micro_batches()
    trainer.train_step(
        [next(stream) for _ in range(trainer.plan.accumulation_steps)]
    )  # 2 -> 1: still allowed
    assert trainer.strategy.loss_scale() == 1.0 and trainer.state.skipped_steps == 1
    with pytest.raises(
        TrainingError, match=r"step 2: the gradient norm is (nan|inf) and the fp16 loss scale 0\.5"
    ):
        trainer.train_step([next(stream) for _ in range(trainer.plan.accumulation_steps)])
    assert trainer.state.step == 1


def test_resume_restores_the_loss_scale(tmp_path, synth):
    trainer = _trainer(tmp_path, synth)
    _steps(trainer, 1)
    hook = _poison(trainer)
    _steps(trainer, 1)
    hook.remove()
    saved = trainer.strategy.grad_scaler.state_dict()
    assert saved["scale"] == INITIAL_SCALE / 2
    checkpoint = trainer.save()
    assert json.loads((checkpoint / "rank-00000.json").read_text())["grad_scaler"] == saved
    resumed = _trainer(tmp_path, synth)
    assert resumed.resume()
    assert resumed.strategy.grad_scaler.state_dict() == saved
    assert (resumed.state.step, resumed.state.skipped_steps) == (2, 1)
    _steps(resumed, 1)  # the restored scale is the one the first backward uses
    assert resumed.strategy.grad_scaler.state_dict()["scale"] == INITIAL_SCALE / 2
    with pytest.raises(CheckpointError, match="written with an fp16 loss scaler"):
        resumed.checkpoints.load(checkpoint, resumed.model, resumed.optimizer, resumed.scheduler, None)


def test_fp16_needs_float32_trainable_weights(preset_model):
    with pytest.raises(ConfigError, match="param_dtype"):
        StrategyConfig(mixed_precision="fp16", param_dtype="bf16")
    context = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    strategy = build_strategy(StrategyConfig(mixed_precision="fp16"), context)
    model = preset_model("debug-clip-llama").to(
        torch.bfloat16
    )  # a half-precision checkpoint, param_dtype auto
    with pytest.raises(ConfigError, match="trainable parameters are torch.bfloat16.*param_dtype=fp32"):
        strategy.prepare(model)


def test_upstream_fp16_flag_maps_to_fp16_with_float32_weights():
    base = ["--model_name_or_path", "llm", "--vision_tower", "vit", "--data_path", "d", "--output_dir", "o"]
    strategy = config_from_upstream_flags([*base, "--fp16", "True"]).strategy
    assert (strategy.mixed_precision, strategy.param_dtype) == ("fp16", "fp32")
    assert config_from_upstream_flags([*base, "--fp16", "False"]).strategy.mixed_precision == "no"
    with pytest.raises(ConfigError, match="--bf16 True and --fp16 True"):
        config_from_upstream_flags([*base, "--fp16", "True", "--bf16", "True"])


_FSDP2_SCRIPT = """
import sys, torch
from torch.distributed.tensor import DTensor
sys.path.insert(0, sys.argv[3])
from test_training_fp16 import _poison, _steps
from llavakit.distributed import init_distributed
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.trainer import Trainer
from training_helpers import debug_config, debug_stage
from llavakit.data.synth import SynthConfig, generate_synth
from pathlib import Path

synth = generate_synth(Path(sys.argv[2]), SynthConfig(n_train=48, n_heldout=1))
stage = debug_stage(synth, max_steps=5, optim={"lr": 2e-3, "warmup_ratio": 0.0})
strategy = {"name": "fsdp2", "mixed_precision": "fp16"}
config = config_from_dict(debug_config(Path(sys.argv[1]), [stage], strategy=strategy))
trainer = Trainer(config, 0, init_distributed(needs_process_group=True), build_train_data)
trainer.build()
losses = [metrics.loss for metrics in _steps(trainer, 3)]
assert losses[-1] < losses[0], losses
projector = trainer.unwrapped.projector.linear_1.weight
assert isinstance(projector, DTensor) and projector.dtype == torch.float32
before = projector.detach().full_tensor().clone()
hook = _poison(trainer)
_steps(trainer, 1)
hook.remove()
assert torch.equal(projector.detach().full_tensor(), before)
assert trainer.strategy.loss_scale() == 2.0**15 and trainer.state.skipped_steps == 1
_steps(trainer, 1)
assert not torch.equal(projector.detach().full_tensor(), before)
print("ok")
"""


@pytest.mark.slow
def test_fsdp2_fp16_in_a_world_of_one_trains_and_skips_an_overflow(tmp_path):
    here = os.path.dirname(__file__)
    command = [sys.executable, "-c", _FSDP2_SCRIPT, str(tmp_path / "run"), str(tmp_path / "synth"), here]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-4000:]


_TWO_RANK_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch, torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    for layer in model:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 8)).float().pow(2).mean()).backward()
    if rank == 1:  # an overflow in one rank's shard only
        model[0].weight.grad.to_local().view(-1)[0] = float("inf")
    before = [param.detach().to_local().clone() for param in model.parameters()]
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p.detach().to_local(), b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**15, scaler.get_scale()
    Path(sys.argv[1], f"ok-{rank}").touch()  # a file per rank: both ranks' prints can interleave on one stdout
    # Both ranks done before either tears gloo down (a rank destroying its group while the other still talks to
    # it aborted one CI run with "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_grad_scaler_sees_an_overflow_in_another_ranks_fsdp2_shard(tmp_path):
    # torch.amp.GradScaler, not FSDP1's ShardedGradScaler: DTensor's handler of the inf check all-reduces the flag.
    script = tmp_path / "two_rank_scaler.py"
    script.write_text(_TWO_RANK_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "ok-0").is_file() and (tmp_path / "ok-1").is_file()
