"""Each stage trains exactly its configured parameters; the optimizer carries the separate learning rates."""

from __future__ import annotations

import copy

import pytest
import torch
from training_helpers import debug_config, debug_stage

from llavakit.distributed import init_distributed
from llavakit.training.config import OptimConfig
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.optim import build_optimizer
from llavakit.training.stages import part_of
from llavakit.training.trainer import Trainer

# CLIP's key-projection bias cannot receive a gradient (softmax is invariant to it), so it stays equal though trained.
_GRADIENT_FREE = ("k_proj.bias",)


def _built_trainer(tmp_path, synth, stage_fields):
    config = config_from_dict(debug_config(tmp_path / "run", [debug_stage(synth, **stage_fields)]))
    trainer = Trainer(config, 0, init_distributed(needs_process_group=False), build_train_data)
    trainer.build()
    return trainer


def _train(trainer, steps):
    stream = trainer.micro_batches()
    for _ in range(steps):
        trainer.train_step([next(stream) for _ in range(trainer.plan.accumulation_steps)])


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("align", ["projector"]),
        ("finetune", ["projector", "language_model"]),
        ("finetune", ["vision_tower", "projector", "language_model"]),
    ],
)
def test_stage_trains_exactly_its_parts(tmp_path, synth, name, parts):
    trainer = _built_trainer(tmp_path, synth, {"name": name, "trainable": parts})
    model = trainer.unwrapped
    model_frozen = {"vision_encoder.model.vision_model.post_layernorm", "post_layernorm"}
    before = {key: value.detach().clone() for key, value in model.named_parameters()}
    _train(trainer, steps=2)
    for key, param in model.named_parameters():
        expected_trainable = part_of(key) in parts and key in trainer.trainable
        assert param.requires_grad == expected_trainable, key
        changed = not torch.equal(before[key], param.detach())
        if not expected_trainable:
            assert not changed, f"frozen parameter {key} changed"
        elif not key.endswith(_GRADIENT_FREE):
            assert changed, f"trainable parameter {key} did not change"
    vision_frozen = [
        k for k, p in model.named_parameters() if k.startswith("vision_encoder.") and not p.requires_grad
    ]
    assert any(marker in key for key in vision_frozen for marker in model_frozen), (
        "the model's own freezing was lost"
    )


def test_trainable_set_follows_the_stage(tmp_path, synth):
    trainer = _built_trainer(tmp_path, synth, {"name": "align", "trainable": ["projector"]})
    assert set(trainer.trainable) == {
        k for k, _ in trainer.unwrapped.named_parameters() if part_of(k) == "projector"
    }
    assert "image_newline" in trainer.trainable


def test_optimizer_groups_carry_part_learning_rates(tmp_path, synth):
    optim = {"lr": 2e-5, "vision_tower_lr": 2e-6, "projector_lr": 1e-4, "weight_decay": 0.1}
    trainer = _built_trainer(
        tmp_path, synth, {"trainable": ["vision_tower", "projector", "language_model"], "optim": optim}
    )
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert set(groups) == {
        f"{part}/{kind}"
        for part in ("vision_tower", "projector", "language_model")
        for kind in ("decay", "no_decay")
    }
    expected_lr = {"vision_tower": 2e-6, "projector": 1e-4, "language_model": 2e-5}
    names = {id(param): key for key, param in trainer.model.named_parameters()}
    for name, group in groups.items():
        part, kind = name.split("/")
        assert group["initial_lr"] == pytest.approx(expected_lr[part])
        assert group["weight_decay"] == (0.1 if kind == "decay" else 0.0)
        for param in group["params"]:
            assert part_of(names[id(param)]) == part
            assert (param.ndim >= 2 and not names[id(param)].endswith(".bias")) == (kind == "decay")
    grouped = {id(p) for group in groups.values() for p in group["params"]}
    assert grouped == {id(p) for p in trainer.model.parameters() if p.requires_grad}


def test_fused_adamw_updates_like_the_python_loop(tmp_path, synth):
    torch.manual_seed(0)
    base = torch.nn.Module()
    base.llm = torch.nn.Linear(4, 8)
    grads = [{name: torch.randn_like(p) for name, p in base.named_parameters()} for _ in range(3)]
    updated = {}
    for fused in (True, False):
        model = copy.deepcopy(base)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused))
        assert optimizer.defaults["fused"] is fused
        for step in grads:
            for name, param in model.named_parameters():
                param.grad = step[name].clone()
            optimizer.step()
        updated[fused] = dict(model.named_parameters())
    for name, initial in base.named_parameters():
        torch.testing.assert_close(updated[True][name], updated[False][name])
        assert not torch.equal(updated[True][name], initial)
    trainer = _built_trainer(tmp_path, synth, {"optim": {"lr": 1e-3, "fused": True}})
    assert trainer.optimizer.defaults["fused"] is True


def test_schedule_warms_up_then_decays_to_zero(tmp_path, synth):
    trainer = _built_trainer(tmp_path, synth, {"max_steps": 10, "optim": {"lr": 1e-3, "warmup_ratio": 0.25}})
    lrs = []
    for _ in range(10):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    # ceil(10 * 0.25) = 3 warmup steps (HF TrainingArguments.get_warmup_steps), then cosine to 0.
    assert lrs[:4] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_packed_rows_train_and_report_no_padding_inside(tmp_path, synth):
    trainer = _built_trainer(tmp_path, synth, {"data": {"packing": True, "max_length": 512}})
    stream = trainer.micro_batches()
    batches = [next(stream) for _ in range(trainer.plan.accumulation_steps)]
    assert all(batch["attention_mask"].dim() == 4 and batch["num_samples"] > 2 for batch in batches)
    metrics = trainer.train_step(batches)
    assert metrics.num_tokens == sum(batch["num_tokens"] for batch in batches)
    assert metrics.num_padding == sum(batch["num_padding"] for batch in batches)
    assert metrics.loss > 0


def test_evaluate_is_the_token_mean_loss(tmp_path, synth):
    trainer = _built_trainer(tmp_path, synth, {})
    stream = trainer.micro_batches()
    batches = [next(stream) for _ in range(2)]
    trainer.unwrapped.eval()
    with torch.no_grad():
        # Oracle: transformers' own mean loss per batch, weighted by the batch's supervised tokens.
        losses = [float(trainer.unwrapped(**{k: b[k] for k in b if k in _INPUTS}).loss) for b in batches]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    expected = sum(loss * count for loss, count in zip(losses, counts)) / sum(counts)
    assert trainer.evaluate(batches) == pytest.approx(expected, rel=1e-6)


_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "image_tiled")


def test_hooks_see_every_step_of_every_stage_and_training_goes_on_in_train_mode(tmp_path, synth):
    from llavakit.training.trainer import train

    stages = [debug_stage(synth, "align"), debug_stage(synth, max_steps=3)]
    events, modes = [], []

    def hook(event):
        events.append((event.stage, event.step, event.total_steps))
        modes.append(event.model.training)
        event.model.eval()  # an evaluating hook; the trainer must switch training back on

    train(config_from_dict(debug_config(tmp_path / "run", stages)), hooks=[hook])
    assert events == [("align", 1, 2), ("align", 2, 2), ("finetune", 1, 3), ("finetune", 2, 3), ("finetune", 3, 3)]
    assert all(modes)
