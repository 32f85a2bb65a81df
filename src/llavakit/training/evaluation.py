"""Training-time evaluation: a stage's ``eval:`` benchmarks answered every N optimizer steps, metrics logged.

Each evaluation goes through `llavakit.evaluation.runner.evaluate`, the code of ``llavakit eval``: same prompts,
length-sorted batches, scores and output files (``<stage>/eval/step-NNNNNN/<benchmark>/predictions.jsonl`` and
``metrics.json``; a stale folder of the same step, from a run resumed before it, is replaced). Benchmark ids and data
are resolved by `check_evaluations` before any weight is loaded, so a typo fails first.

Every rank takes part, as under ``llavakit eval`` with torchrun: the benchmark's batches are dealt round-robin and
rank 0 scores. What each rank generates with:

- single process and DDP: the model itself (each rank holds all of it; the DDP wrapper is bypassed, so ranks may
  generate different lengths without collectives), under the strategy's autocast;
- FSDP2: a full, unsharded copy gathered on every rank before the evaluation and freed after it. Generation calls
  submodules outside the root forward and stops at different lengths on different ranks, which sharded parameters
  (all-gathered inside each unit's forward, by all ranks together) cannot follow. The copy holds the whole model in
  the compute dtype (bf16 under ``mixed_precision: bf16``) on each rank's device for the evaluation's duration; the
  gather briefly holds the fp32 weights. With LoRA the copy is wrapped by peft like the model; with QLoRA its 4-bit
  base layers are copies of the model's own (replicated on every rank), so it generates with the same quantised
  base and the trained adapters, as the model itself would.

Generation forks the RNG (`llavakit.inference.generate`), so an evaluation leaves the training run's random state,
and hence its losses, unchanged.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llavakit.distributed import DistContext, barrier
from llavakit.errors import ConfigError, TrainingError
from llavakit.training.config import EvalSection, TrainConfig
from llavakit.training.lora import peft_skeleton, quantised_params
from llavakit.training.strategies.base import Strategy


@dataclass(frozen=True)
class Evaluation:
    """One training-time evaluation.

    Attributes:
        step: the optimizer step after which it ran.
        metrics: benchmark id → its metrics (on rank 0; empty on other ranks).
        seconds: wall-clock time of the evaluation (gathering included).
    """

    step: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


class StageEvaluator:
    """Runs one stage's ``eval:`` section.

    Args:
        section: the stage's eval section.
        data: each benchmark's rows (`llavakit.evaluation.sources.BenchmarkData`), already limited.
    """

    def __init__(self, section: EvalSection, data: list[Any]) -> None:
        self.section = section
        self.data = data

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to evaluate after optimizer step ``step``."""
        return self.section.due(step, total_steps)

    def run(
        self, model: nn.Module, strategy: Strategy, context: DistContext, out_dir: Path, step: int
    ) -> Evaluation:
        """Evaluate ``model`` (the unwrapped module; collective) into ``out_dir/step-NNNNNN``; leaves it in eval mode.

        Args:
            model: the model as trained so far (with FSDP2, its parameters are this rank's shards).
            strategy: the stage's strategy (autocast and precision).
            context: this process's rank and world.
            out_dir: the stage's evaluation folder.
            step: the optimizer step just done.
        """
        from llavakit.evaluation.runner import EvalOptions, evaluate
        from llavakit.inference.api import Assistant

        started = time.perf_counter()
        target = out_dir / f"step-{step:06d}"
        if context.is_main:
            shutil.rmtree(target, ignore_errors=True)
        barrier(context)
        options = EvalOptions(
            batch_size=self.section.batch_size, max_new_tokens=self.section.max_new_tokens, progress=False
        )
        generator = generation_model(model, strategy, context)
        assistant = Assistant(generator)
        with strategy.autocast():
            results = [
                evaluate(assistant, data, target / data.benchmark.id, options, context) for data in self.data
            ]
        del assistant, generator
        if context.device.type == "cuda":
            torch.cuda.empty_cache()
        metrics = {result.benchmark: result.metrics for result in results} if context.is_main else {}
        return Evaluation(step, metrics, time.perf_counter() - started)


def check_evaluations(config: TrainConfig) -> list[StageEvaluator | None]:
    """Per stage, its evaluator (None without an ``eval:`` section): benchmark ids and data checked and loaded.

    Raises:
        RegistryError: an unknown benchmark id (the valid ones are listed).
        ConfigError: a benchmark graded by an LLM judge (each evaluation would send a paid request per question).
        DataError: a missing or unreadable data source, or one lacking a benchmark's columns.
    """
    from llavakit.evaluation.judge import JudgedBenchmark
    from llavakit.evaluation.registry import get_benchmark
    from llavakit.evaluation.sources import load_benchmark_data

    evaluators: list[StageEvaluator | None] = []
    for number, stage in enumerate(config.stages):
        section = stage.eval
        if not section.enabled:
            evaluators.append(None)
            continue
        judged = [name for name in section.benchmarks if isinstance(get_benchmark(name), JudgedBenchmark)]
        if judged:
            raise ConfigError(
                f"stages.{number}.eval.benchmarks: {judged} are graded by an LLM judge, which training-time "
                "evaluation does not call; evaluate the exported checkpoint with `llavakit eval` instead"
            )
        data = [
            load_benchmark_data(get_benchmark(name), section.data.get(name)).limited(section.limit)
            for name in section.benchmarks
        ]
        evaluators.append(StageEvaluator(section, data))
    return evaluators


def generation_model(model: nn.Module, strategy: Strategy, context: DistContext) -> nn.Module:
    """What this rank generates with: ``model`` itself, or (FSDP2-sharded) a gathered full copy (collective)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(param, DTensor) for param in model.parameters()):
        return model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(strategy.config.mixed_precision)
    return full_copy(model, context.device, dtype)


def full_copy(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """An unsharded copy of an FSDP2-sharded `LlavaNextModel` on ``device`` (collective: every rank calls it).

    The skeleton is built on the meta device (no random initialisation, no memory), wrapped by peft like ``model``
    when it has LoRA (`llavakit.training.lora.peft_skeleton`), and takes the gathered tensors as its parameters;
    buffers, which FSDP2 does not shard, are the model's own (non-persistent ones, such as rotary frequencies, are
    not in a state dict). QLoRA: the quantised base layers, whole on every rank (FSDP2 ``ignored_params``), are
    copies of ``model``'s own (`peft_skeleton`), so the copy computes with the trained model's 4-bit base and its
    gathered adapters; their packed weights are not taken from the state dict (the copy holds the same bytes, and
    a plain tensor assigned in their place would lose bitsandbytes' quantisation state). The copies add the
    quantised base's size (about 0.5 byte per weight of the LLM's linear layers) on each rank's device.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from llavakit.model.llava_next import LlavaNextModel

    quantised = _quantised_names(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    state = {
        name: _cast(tensor.to(device), dtype)
        for name, tensor in state.items()
        if not _belongs_to(name, quantised)
    }
    with torch.device("meta"):
        copy = LlavaNextModel.from_config(model.config, tokenizer=model.tokenizer)
    # Outside the meta context: bitsandbytes cannot copy its quantised weights under it. peft draws the adapters'
    # initial values on the CPU (the gathered ones replace them below).
    peft_skeleton(copy, model)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    if set(missing) != quantised or unexpected:
        raise TrainingError(
            f"the gathered state of the FSDP2 model does not fit its unsharded copy (missing: {sorted(missing)[:3]}, "
            f"unexpected: {sorted(unexpected)[:3]}); this is a llavakit bug: please report it"
        )
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        copy.get_submodule(owner).register_buffer(leaf, buffer, persistent=name in state)
    return copy.requires_grad_(False).eval()


def _quantised_names(model: nn.Module) -> set[str]:
    """Names of bitsandbytes' quantised weights in ``model`` (empty without QLoRA)."""
    quantised = quantised_params(model)
    return {name for name, param in model.named_parameters() if param in quantised}


def _belongs_to(key: str, names: set[str]) -> bool:
    """Whether state-dict ``key`` is one of ``names`` or one of their quantisation constants (``<name>.absmax``)."""
    return key in names or any(key.startswith(name + ".") for name in names)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
