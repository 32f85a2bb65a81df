"""``strategy.loss_kernel``: validated with the config, mapped from ``--use_liger_kernel``, and a run trained with
the chunked fused kernel takes the same steps as one trained from the logits."""

from __future__ import annotations

import pytest
from training_helpers import debug_config, debug_stage

from llavakit.distributed import init_distributed
from llavakit.errors import ConfigError
from llavakit.model import fused_loss, loss
from llavakit.training import config as training_config
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.trainer import Trainer
from llavakit.training.upstream_flags import config_from_upstream_flags


def test_loss_kernel_is_validated_with_the_config():
    assert training_config.LOSS_KERNELS == loss.LOSS_KERNELS
    assert config_from_dict({}).strategy.loss_kernel == "logits"
    assert config_from_dict({"strategy": {"loss_kernel": "chunked"}}).strategy.loss_kernel == "chunked"
    with pytest.raises(ConfigError, match=r"strategy.loss_kernel 'fused' is not one of \("):
        config_from_dict({"strategy": {"loss_kernel": "fused"}})


def test_use_liger_kernel_flag_selects_the_liger_loss():
    base = ["--model_name_or_path", "llm", "--vision_tower", "vit", "--data_path", "d", "--output_dir", "o"]
    assert config_from_upstream_flags(base).strategy.loss_kernel == "logits"
    assert config_from_upstream_flags([*base, "--use_liger_kernel", "True"]).strategy.loss_kernel == "liger"
    assert config_from_upstream_flags([*base, "--use_liger_kernel", "False"]).strategy.loss_kernel == "logits"


def _two_steps(tmp_path, synth, kernel: str) -> list:
    stage = debug_stage(synth, global_batch_size=4, micro_batch_size=2, max_steps=2)
    config = config_from_dict(debug_config(tmp_path / kernel, [stage], strategy={"loss_kernel": kernel}))
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    stream = trainer.micro_batches()
    return [trainer.train_step([next(stream), next(stream)]) for _ in range(2)]


def test_chunked_kernel_trains_the_same_steps_as_the_logits(tmp_path, synth, monkeypatch):
    reference = _two_steps(tmp_path, synth, "logits")
    calls = []
    kernel = fused_loss.FUSED_KERNELS["chunked"]

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setitem(fused_loss.FUSED_KERNELS, "chunked", counted)
    chunked = _two_steps(tmp_path, synth, "chunked")
    assert len(calls) == 4  # 2 steps x 2 micro-batches went through the fused kernel
    for ours, expected in zip(chunked, reference, strict=True):
        assert ours.loss == pytest.approx(expected.loss, rel=1e-5)
        assert ours.grad_norm == pytest.approx(expected.grad_norm, rel=1e-4)
    # The second step's loss depends on the first update, so it also checks the gradients took effect alike.
    assert chunked[1].loss != chunked[0].loss
