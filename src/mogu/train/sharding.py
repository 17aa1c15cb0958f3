"""A frozen backbone sharded over processes, by FSDP2 (``fully_shard``) or DeepSpeed ZeRO-3; the experts and
routers stay whole.

- fsdp2: each decoder layer, then the rest of the model (embeddings, final norm, head), becomes one FSDP2
  group over a 1-D mesh of every process: a process holds 1/N of each frozen weight and all-gathers a layer
  only while it runs.
- zero3: DeepSpeed's ZeRO-3 parameter partitioning (its ``DeepSpeedZeRoOffload`` hooks, what
  ``deepspeed.initialize`` installs for a stage-3 model without an optimizer): every frozen tensor is cut into
  N flat partitions and each module gathers its own tensors while it runs, in forward and in backward. The
  launcher's ``zero_optimization`` settings (``offload_param`` to the CPU among them) are honoured.

Either way the experts and routers are kept whole on every process (FSDP2's ``ignored_params``; ZeRO-3's
persistent parameters): they are a fraction of a percent of the weights, and keeping them whole keeps the
Trainer's exact gradient sum (``Trainer._reduce_step``), its optimizer, its checkpoint files and the saved
format unchanged, so a run can resume on another number of processes, or under the other engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mogu.errors import ConfigError

if TYPE_CHECKING:  # the trainer's model; imported lazily at run time
    from mogu.tuner.model import MoGUModel

# "auto": fsdp2 when the launcher's config asks for FSDP (configs/accelerate/fsdp.yaml), zero3 when it asks for
# DeepSpeed ZeRO stage 3 (deepspeed_zero3.yaml), else none.
BACKBONE_SHARDING = ("auto", "none", "fsdp2", "zero3")


def decoder_layers(base: nn.Module) -> list[nn.Module]:
    """The base model's repeated blocks: the classes it names in ``_no_split_modules`` (what Accelerate's
    transformer-based wrap policy reads), outermost first."""
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    # A block class nested in another listed one would be grouped twice; keep the outer ones.
    inner = {id(c) for m in layers for c in m.modules() if c is not m}
    return [m for m in layers if id(m) not in inner]


def _local_numel(p: torch.Tensor) -> int:
    if hasattr(p, "ds_tensor"):  # a ZeRO-3 parameter: this process's flat partition (padded to N equal parts)
        return p.ds_tensor.numel()
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _full_numel(p: torch.Tensor) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def kept_whole(model: "MoGUModel") -> list[nn.Parameter]:
    """The tensors every process keeps whole: the experts and routers, and a `mogu finetune` task LoRA if the
    model carries one (its checkpoint writes it out whole)."""
    from mogu.tuner.task_adapter import has_task_adapter, task_adapter_parameters

    task = list(task_adapter_parameters(model).values()) if has_task_adapter(model) else []
    return model.added_parameters() + task


def backbone_footprint(model: "MoGUModel") -> dict[str, int]:
    """Frozen backbone parameters in the model, and how many of them this process holds."""
    added = {id(p) for p in kept_whole(model)}
    backbone = [p for p in model.base_model.parameters() if id(p) not in added]
    return {"backbone_params": sum(_full_numel(p) for p in backbone),
            "backbone_params_local": sum(_local_numel(p) for p in backbone)}


def _require_process_group(flag: str) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(f"--shard-backbone {flag} needs several processes: launch with `accelerate launch` "
                          "(configs/accelerate/fsdp.yaml or deepspeed_zero3.yaml, or cpu_2proc.yaml on CPU) "
                          "or torchrun")


def shard_frozen_backbone(model: "MoGUModel", *, device: torch.device, reshard_after_forward: bool = True
                          ) -> dict[str, int]:
    """Shard ``model``'s backbone over every process of the default process group, in place.

    Call it on every process, after the experts and routers exist and the model is on ``device``.
    Returns this process's ``backbone_footprint``.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _require_process_group("fsdp2")
    base = model.base_model
    layers = decoder_layers(base)
    if not layers:
        raise ConfigError(f"{type(base).__name__} names no decoder-layer class in _no_split_modules, so its "
                          "backbone cannot be sharded layer by layer; train without --shard-backbone")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    whole = set(kept_whole(model))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=whole)
    # The root group: embeddings, final norm and head (tied weights stay in one group). Its weights are
    # used first and last, so it is never resharded between forward and backward.
    fully_shard(base, mesh=mesh, reshard_after_forward=False, ignored_params=whole)
    return backbone_footprint(model)


# Launcher settings that only concern DeepSpeed's own optimizer and step, which mogu does not use (the
# Trainer keeps its exact data-parallel step for the whole experts and routers).
_ZERO_OPTIMIZER_KEYS = ("offload_optimizer", "reduce_scatter", "reduce_bucket_size", "contiguous_gradients",
                        "overlap_comm", "round_robin_gradients", "sub_group_size", "elastic_checkpoint",
                        "gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save")
# Settings that would quantise the tensors mogu keeps whole and trains in float32.
_ZERO_REFUSED_KEYS = ("zero_quantized_weights", "zero_quantized_nontrainable_weights")


def _without_auto(settings: dict) -> dict:
    """``settings`` without the values a launcher left "auto" (DeepSpeed's own trainer integration fills
    them in; DeepSpeed itself rejects them), at any depth."""
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in settings.items() if v != "auto"}


def launcher_zero_settings(deepspeed_plugin=None) -> dict | None:
    """The ``zero_optimization`` settings of the DeepSpeed launcher config this process runs under, or None.

    From Accelerate's DeepSpeed plugin when it made one; else from what `accelerate launch` exports for a
    DeepSpeed config (its ``deepspeed_config_file``, or the yaml's ``zero_stage`` and ``offload_param_device``),
    which it also exports on a CPU-only machine, where mogu runs the processes as MULTI_CPU.
    """
    import json
    import os
    from pathlib import Path

    if deepspeed_plugin is not None:
        return dict(deepspeed_plugin.deepspeed_config.get("zero_optimization") or {})
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file:
        try:
            return dict(json.loads(Path(config_file).read_text(encoding="utf-8")).get("zero_optimization") or {})
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the launcher's DeepSpeed config {config_file}: {e}") from None
    zero: dict = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    if offload != "none":
        zero["offload_param"] = {"device": offload}
        if offload == "nvme":
            nvme_path = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_NVME_PATH")
            if not nvme_path or nvme_path == "none":
                raise ConfigError("the launcher's DeepSpeed config offloads parameters to nvme but names no "
                                  "offload_param_nvme_path")
            zero["offload_param"]["nvme_path"] = nvme_path
    return zero


def zero3_config(launcher_zero: dict | None = None) -> dict:
    """The DeepSpeed config for partitioning a frozen backbone: the launcher's ``zero_optimization`` (from
    its deepspeed_config; values left "auto" dropped) at stage 3, with nothing persistent by size (mogu marks
    the experts and routers persistent itself), torch's own F.linear, and a batch size DeepSpeed asks for but
    never uses here."""
    zero = {k: v for k, v in _without_auto(launcher_zero or {}).items() if k not in _ZERO_OPTIMIZER_KEYS}
    refused = [k for k in _ZERO_REFUSED_KEYS if zero.get(k)]
    if refused:
        raise ConfigError(f"the launcher's DeepSpeed config sets {', '.join(refused)}: mogu keeps the experts and "
                          "routers whole in float32 and does not partition quantised weights; drop the setting")
    if zero.get("stage", 3) != 3:
        raise ConfigError(f"--shard-backbone zero3 partitions parameters, which is ZeRO stage 3; the launcher's "
                          f"DeepSpeed config asks for stage {zero['stage']} (use deepspeed_zero3.yaml)")
    # memory_efficient_linear off: it replaces torch's F.linear for the whole process, for good.
    zero.update(stage=3, stage3_param_persistence_threshold=0, memory_efficient_linear=False)
    zero.pop("param_persistence_threshold", None)
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def zero3_partition_frozen_backbone(model: "MoGUModel", *, device: torch.device, launcher_zero: dict | None = None):
    """Partition ``model``'s backbone over every process with DeepSpeed ZeRO-3, in place; returns the
    DeepSpeed engine, whose hooks gather each module's tensors while it runs (the model holds it).

    Call it on every process, after the experts and routers exist, with the model still where it was
    loaded (host memory): DeepSpeed moves each tensor to ``device`` and keeps 1/N of it there. The experts and
    routers are gathered once and marked persistent, so they stay whole on every process: the Trainer reads,
    writes, sums and steps them as plain tensors.
    """
    import os

    from mogu.extras import require_extra

    _require_process_group("zero3")
    require_extra("zero3")
    if device.type == "cpu":  # DeepSpeed picks its accelerator at import; a CPU-only run must not look for CUDA
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("WARNING")  # its per-module init lines would bury the run's own log
    added = kept_whole(model)
    for p in added:  # trainable or not, they are whole tensors of the Trainer's: they go persistent below
        p.requires_grad_(False)
    config = zero3_config(launcher_zero)
    # Partitioned first, tensor by tensor (each moved to the device, cut, the rest freed): handed whole to
    # deepspeed.initialize, the model would first be moved to the device in one piece.
    deepspeed.zero.Init(module=model, config_dict_or_path=config)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    for p in added:
        # Never released after a module runs: ZeRO-3 releases even a persistent tensor while it records its
        # first trace, but never an external one (a tensor a module reads without owning it, as the routed
        # layers read their experts' weights).
        p.ds_persist = True
        p.is_external_param = True
    added[0].all_gather(param_list=added)  # whole on every process from here on
    for buf in model.buffers():  # DeepSpeed moves the parameters it partitions; the buffers stay where they are
        buf.data = buf.data.to(device)
    # The model keeps the engine alive (not as a submodule): a collected engine removes its hooks, and the
    # partitioned backbone would then run on empty weights in whatever comes after training.
    model.__dict__["_zero3_engine"] = engine
    model.__dict__["_zero3_settings"] = config["zero_optimization"]  # what run.json records (offload among them)
    return engine
