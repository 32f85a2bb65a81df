"""FSDP2: parameters, gradients and optimizer state sharded over ranks with ``fully_shard``.

Each unit from ``model.shard_units()`` (decoder layers, vision encoder layers) becomes one FSDP group, and the
root holds the rest (embeddings, projector, head). ``reshard_after_forward=False`` keeps a unit's parameters
gathered between forward and backward, which is DeepSpeed ZeRO-2's trade-off; True is ZeRO-3. Mixed precision is
FSDP2's own (bf16 compute copies, fp32 gradient reduction), so no autocast is used. The sharded parameters the
optimizer updates are in ``strategy.param_dtype`` (fp32 master weights, or bf16 to halve their memory).

A model built by `llavakit.training.sharded_load.meta_model` has no weights yet: it is sharded on the meta device
and each rank then reads only its own shards from the checkpoint files (see that module). Any other model is
loaded whole on every rank and rank 0's weights are broadcast before sharding. LoRA adapters (peft, inside the
decoder layers) are sharded in their layer's group with its frozen base weights; on a meta model they are filled
after the shards are read (`llavakit.training.lora.initialise_sharded_adapters`). QLoRA's quantised base weights
(bitsandbytes ``Params4bit``) are ``ignored_params`` of every ``fully_shard`` call: each rank keeps them whole,
like ZeRO-2's replicated frozen base, and FSDP2 shards the rest (why: `llavakit.training.lora`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from llavakit.errors import ConfigError
from llavakit.training.lora import (
    has_lora,
    initialise_sharded_adapters,
    peft_checkpoint_keys,
    quantised_params,
)
from llavakit.training.sharded_load import LoadStats, materialise, take_source
from llavakit.training.strategies.base import COMPUTE_DTYPES, STRATEGIES, Strategy


@STRATEGIES.register("fsdp2")
class FSDP2Strategy(Strategy):
    """``fully_shard`` per shard unit, then the root, over a 1-D mesh of all ranks."""

    needs_process_group = True
    #: What reading the shards cost on this rank, once `wrap` has read them (None: the model came with weights).
    load_stats: LoadStats | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` in place (its class becomes an FSDP subclass; names are unchanged)."""
        if self.config.cpu_offload and self.context.device.type == "cpu":
            raise ConfigError(
                "strategy.cpu_offload needs a CUDA device (FSDP2 offloads from the accelerator); on a CPU-only "
                "machine the parameters already live in CPU memory: set strategy.cpu_offload=false"
            )
        source = take_source(model)
        lora_on_meta = source is not None and has_lora(model)
        if lora_on_meta:
            source = dataclasses.replace(source, keys=peft_checkpoint_keys(model, source.keys))
        if source is None:
            if not self.config.cpu_offload:
                model = model.to(self.context.device)
            _broadcast_from_rank0(model, self.context.device)
        mesh = init_device_mesh(self.context.device.type, (self.context.world_size,))
        options = {
            "mesh": mesh,
            "reshard_after_forward": self.config.reshard_after_forward,
            "mp_policy": self._mixed_precision(),
        }
        if self.config.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        quantised = quantised_params(model)
        if quantised:
            # QLoRA: the packed 4-bit base weights stay whole on every rank (module docstring).
            options["ignored_params"] = quantised
        for unit in sharded_units(model):
            fully_shard(unit, **options)
        fully_shard(model, **options)
        if source is not None:
            device = torch.device("cpu") if self.config.cpu_offload else self.context.device
            self.load_stats = materialise(model, source, device)
        if lora_on_meta:
            initialise_sharded_adapters(model)
        return model

    def _mixed_precision(self) -> MixedPrecisionPolicy:
        """bf16/fp16 compute copies of the gathered parameters, gradients reduced in float32.

        fp16 gradients are reduced in float32 too: a sum over ranks of scaled fp16 gradients would overflow where
        each rank's did not. The scaler (`Strategy.grad_scaler`) sees the float32 sharded DTensor gradients.
        """
        dtype = COMPUTE_DTYPES[self.config.mixed_precision]
        if dtype is None:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """No autocast: FSDP2 already computes in ``param_dtype``."""
        yield

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Reduce-scatter after every micro-batch, as DeepSpeed ZeRO-3 does: gradients accumulate sharded.

        Skipping it on accumulation micro-batches (FSDP2's ``set_requires_gradient_sync(False)``) saves
        communication but keeps every trainable parameter's gradient unsharded in float32 between them: 275 GB per
        GPU for the 72B recipe's finetune stage (two micro-batches per step), more than the model's shards.
        """
        return None


def sharded_units(model: nn.Module) -> list[nn.Module]:
    """The shard units that run, frozen ones included; vision layers after the selected one stay in the root group.

    A frozen unit gets its own group too: in the root group it would stay gathered from forward to backward (a
    frozen 72B LLM in an align stage: its whole bf16 copy on every GPU). A unit that never runs (vision layers after
    ``select_layer``) would break FSDP2's gradient accumulation (its parameters are never unsharded).
    """
    units = list(model.shard_units())
    unused = {id(layer) for layer in model.vision_encoder.layers[model.vision_encoder.num_layers_run :]}
    return [unit for unit in units if id(unit) not in unused]


@torch.no_grad()
def _broadcast_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Give every rank rank 0's weights before sharding (DDP does this itself; ``fully_shard`` does not).

    Each rank keeps only its shard of what it holds, so ranks that built different random weights (a projector
    initialised after different RNG use) would otherwise train a silent mix of several models.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        # NCCL broadcasts device tensors only; with CPU offload the weights are still on the host here.
        on_device = tensor.data.to(device)
        dist.broadcast(on_device, src=0)
        tensor.data.copy_(on_device)
