"""A frozen backbone sharded over processes with FSDP2 (``fully_shard``); the experts and routers stay whole.

Each decoder layer, then the rest of the model (embeddings, final norm, head), becomes one FSDP2 group over a
1-D mesh of every process: a process holds 1/N of each frozen weight and all-gathers a layer only while it
runs. The experts and routers are ``ignored_params``: they are a fraction of a percent of the weights, and
keeping them whole on every process keeps the Trainer's exact gradient sum (``Trainer._reduce_step``), its
checkpoint files and the saved format unchanged, so a run can resume on another number of processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mogu.errors import ConfigError

if TYPE_CHECKING:  # the trainer's model; imported lazily at run time
    from mogu.tuner.model import MoGUModel

# "auto": fsdp2 when the launcher's config asks for FSDP (configs/accelerate/fsdp.yaml), else none.
BACKBONE_SHARDING = ("auto", "none", "fsdp2")


def decoder_layers(base: nn.Module) -> list[nn.Module]:
    """The base model's repeated blocks: the classes it names in ``_no_split_modules`` (what Accelerate's
    transformer-based wrap policy reads), outermost first."""
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    # A block class nested in another listed one would be grouped twice; keep the outer ones.
    inner = {id(c) for m in layers for c in m.modules() if c is not m}
    return [m for m in layers if id(m) not in inner]


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def backbone_footprint(model: "MoGUModel") -> dict[str, int]:
    """Frozen backbone parameters in the model, and how many of them this process holds."""
    added = {id(p) for p in model.added_parameters()}
    backbone = [p for p in model.base_model.parameters() if id(p) not in added]
    return {"backbone_params": sum(p.numel() for p in backbone),
            "backbone_params_local": sum(_local_numel(p) for p in backbone)}


def shard_frozen_backbone(model: "MoGUModel", *, device: torch.device, reshard_after_forward: bool = True
                          ) -> dict[str, int]:
    """Shard ``model``'s backbone over every process of the default process group, in place.

    Call it on every process, after the experts and routers exist and the model is on ``device``.
    Returns this process's ``backbone_footprint``.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("--shard-backbone fsdp2 needs several processes: launch with `accelerate launch` "
                          "(configs/accelerate/fsdp.yaml, or cpu_2proc.yaml on CPU) or torchrun")
    base = model.base_model
    layers = decoder_layers(base)
    if not layers:
        raise ConfigError(f"{type(base).__name__} names no decoder-layer class in _no_split_modules, so its "
                          "backbone cannot be sharded layer by layer; train without --shard-backbone")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    whole = set(model.added_parameters())
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=whole)
    # The root group: embeddings, final norm and head (tied weights stay in one group). Its weights are
    # used first and last, so it is never resharded between forward and backward.
    fully_shard(base, mesh=mesh, reshard_after_forward=False, ignored_params=whole)
    return backbone_footprint(model)
