"""The task adapter: a PEFT LoRA on the backbone's other projections, written by ``mogu finetune``.

It sits beside MoGU's experts, never on the routed projections, and is saved as a standard PEFT folder
(``task_adapter/`` inside a checkpoint). This module sits below ``model.py`` (which saves and loads the
adapter), so it recognises a MoGU model by its interface, not its class.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mogu.errors import CheckpointMismatchError, ConfigError, MoGUError
from mogu.tuner.families import family_for, is_projection, layer_index, matches_target
from mogu.io import atomic_directory
from mogu.tuner.checkpoint import ADAPTER_FILE, check_keys


def is_routed_model(model: nn.Module) -> bool:
    """A MoGUModel (or anything with its routed-module interface), not a plain causal LM."""
    return isinstance(getattr(model, "routed_modules", None), dict) and isinstance(getattr(model, "base_model", None), nn.Module)


ADAPTER_NAME = "task"


TASK_ADAPTER_DIR = "task_adapter"


_PEFT_PREFIX = "base_model.model."


def backbone_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model the task LoRA is injected into (a MoGUModel's wrapped base, or the model)."""
    return model.base_model if is_routed_model(model) else model


def _reserved(model: nn.Module) -> list[str]:
    """Names of the modules the task LoRA must leave alone: MoGU's target projections (routed or not)
    and everything inside them (their experts and routers). For a plain base, the family's MoGU target,
    so a base fine-tune trains the same adapter as a MoGU one."""
    backbone = backbone_of(model)
    if is_routed_model(model):
        targets = model.config.target_modules or []
    else:
        family = family_for(getattr(getattr(backbone, "config", None), "model_type", None))
        targets = list(family.target_modules) if family else []
    from mogu.tuner.backbone import BackboneLoRA

    # A router_backbone="lora" model's own LoRA factors (the projection under them, base_layer, stays a target).
    own = [f"{n}.{part}" for n, m in backbone.named_modules() if isinstance(m, BackboneLoRA)
           for part in ("lora_A", "lora_B")]
    return [n for n, _ in backbone.named_modules() if n and matches_target(n, targets)] + own


def _inside(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _projections(model: nn.Module) -> list[str]:
    """Full names of the linear projections inside numbered decoder layers."""
    return [n for n, m in backbone_of(model).named_modules() if is_projection(m) and layer_index(n) is not None]


def _suffixes(names: list[str]) -> list[str]:
    return list(dict.fromkeys(".".join(n.split(".")[-2:]) for n in names))


def default_task_targets(model: nn.Module) -> list[str]:
    """The shortest name suffixes that select every decoder projection except the reserved ones.

    Llama-like: q_proj, k_proj, v_proj, gate_proj, up_proj, down_proj; GPT-2: c_attn, c_fc, mlp.c_proj
    (plain ``c_proj`` would also select the routed ``attn.c_proj``).
    """
    reserved = _reserved(model)
    blocked = [n for n, _ in backbone_of(model).named_modules() if _inside(n, reserved)]
    targets: dict[str, None] = {}
    for name in _projections(model):
        if _inside(name, reserved):
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(matches_target(b, [suffix]) for b in blocked):
                targets[suffix] = None
                break
    return list(targets)


def resolve_task_targets(model: nn.Module, target_modules: list[str] | None = None) -> list[str]:
    """``target_modules`` checked against the model, or the default; errors list the candidates."""
    reserved = _reserved(model) if is_routed_model(model) else []
    projections = _projections(model)
    free = [n for n in projections if not _inside(n, reserved)]
    candidates = ", ".join(_suffixes(free)) or "none"
    if not target_modules:
        targets = default_task_targets(model)
        if not targets:
            raise ConfigError(f"no projection is left for the task LoRA; candidates: {candidates}")
        return targets
    names = [n for n, _ in backbone_of(model).named_modules() if n]
    for t in target_modules:
        hits = [n for n in names if matches_target(n, [t])]
        taken = [n for n in hits if _inside(n, reserved)]
        if taken:
            raise ConfigError(f"target module {t!r} selects MoGU-routed modules ({taken[0]}, ...); the task LoRA "
                              f"goes on the other projections: {candidates}")
        if not hits:
            raise ConfigError(f"target module {t!r} matches no projection in the decoder layers; "
                              f"candidates: {candidates}")
        other = [n for n in hits if n not in free]
        if other:  # PEFT would fail on a non-linear module, or put a LoRA outside the decoder layers
            raise ConfigError(f"target module {t!r} selects {other[0]}, not a projection in a decoder layer; "
                              f"candidates: {candidates}")
    return list(target_modules)


def task_lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers holding the task adapter, by name inside the backbone."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in backbone_of(model).named_modules()
            if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A}


def has_task_adapter(model: nn.Module) -> bool:
    return bool(task_lora_modules(model))


def task_adapter_config(model: nn.Module):
    return backbone_of(model).peft_config[ADAPTER_NAME]


def task_adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The task LoRA's parameters under their PEFT file keys (``base_model.model.<module>.lora_A.weight``)."""
    params = {}
    for name, m in task_lora_modules(model).items():
        params[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A[ADAPTER_NAME].weight
        params[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B[ADAPTER_NAME].weight
    return params


def task_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().contiguous() for k, p in task_adapter_parameters(model).items()}


def load_task_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    params = task_adapter_parameters(model)
    check_keys(params, sd, source)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(sd[k])


def _check_lora_config(config, where: str) -> None:
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise CheckpointMismatchError(f"{where}: not a LoRA adapter ({type(config).__name__})")
    problems = [what for what, bad in (("DoRA", config.use_dora), ("trained biases", config.bias != "none"),
                                       ("modules_to_save", bool(config.modules_to_save)),
                                       ("regex target_modules", isinstance(config.target_modules, str)))
                if bad]
    if problems:
        raise CheckpointMismatchError(f"{where}: unsupported task adapter ({', '.join(problems)})")


def add_task_adapter(model: nn.Module, config=None, *, r: int = 8, lora_alpha: float = 16.0,
                     lora_dropout: float = 0.05, target_modules: list[str] | None = None):
    """Inject a fresh task LoRA with PEFT (A: PEFT's kaiming init from the torch RNG, B: zero); returns its
    ``LoraConfig``. Other parameters keep their ``requires_grad`` flags; the new ones are trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_task_adapter(model):
        raise MoGUError("the model already carries a task adapter (task_adapter/); fine-tune the checkpoint it "
                        "was trained from instead")
    if config is None:
        targets = resolve_task_targets(model, target_modules)
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                            bias="none", task_type="CAUSAL_LM")
    else:
        _check_lora_config(config, "task adapter")
        resolve_task_targets(model, sorted(config.target_modules))
        config = copy.deepcopy(config)
    backbone = backbone_of(model)
    # GPT-2's Conv1D stores its weight transposed; PEFT needs to be told (it warns and guesses otherwise).
    config.fan_in_fan_out = any(type(m).__name__ == "Conv1D" for n, m in backbone.named_modules()
                                if matches_target(n, list(config.target_modules)) and is_projection(m))
    config.inference_mode = False
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        inject_adapter_in_model(config, backbone, adapter_name=ADAPTER_NAME)
    for p, flag in flags:  # PEFT freezes everything else; what trains is the caller's choice
        p.requires_grad_(flag)
    for m, mode in modes:
        m.training = mode
    for m in task_lora_modules(model).values():  # a new LoRA layer runs in the mode of the layer it wraps
        m.train(m.base_layer.training)
    return backbone.peft_config[ADAPTER_NAME]


def write_task_adapter(model: nn.Module, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """The task adapter as a standard PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(task_adapter_config(model))
    if is_routed_model(model):
        config.base_model_name_or_path = model.config.base_model_name_or_path
        config.revision = model.config.base_model_revision
    if base_model_name_or_path:
        config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(directory))
    save_file(task_adapter_state_dict(model), str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    return directory


TASK_ADAPTER_KIND = "task-adapter"


def save_task_adapter(model: nn.Module, directory: str | Path, *, overwrite: bool = False,
                      protected: tuple = (), **kwargs) -> Path:
    """``write_task_adapter`` into ``directory`` in one rename (a reader never sees half a folder)."""
    directory = Path(directory)
    with atomic_directory(directory, kind=TASK_ADAPTER_KIND, overwrite=overwrite, protected=protected) as tmp:
        write_task_adapter(model, tmp, **kwargs)
    return directory


def load_task_adapter(model: nn.Module, directory: str | Path) -> None:
    """Inject the task adapter saved in ``directory`` and load its weights exactly (keys checked)."""
    from peft import LoraConfig

    directory = Path(directory)
    weights = directory / ADAPTER_FILE
    if not (directory / "adapter_config.json").is_file() or not weights.is_file():
        raise CheckpointMismatchError(f"{directory}: incomplete task adapter (adapter_config.json and "
                                      f"{ADAPTER_FILE} are needed)")
    try:
        config = LoraConfig.from_pretrained(str(directory))
    except Exception as e:  # PEFT raises TypeError/ValueError/JSON errors for foreign or broken configs
        raise CheckpointMismatchError(f"{directory}: unreadable adapter_config.json ({e})") from None
    config.inference_mode = False
    try:
        sd = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointMismatchError(f"{weights}: unreadable safetensors file ({e})") from None
    try:
        add_task_adapter(model, config)
    except ConfigError as e:
        raise CheckpointMismatchError(f"{directory}: {e}") from None
    load_task_state_dict(model, sd, str(weights))
    for p in task_adapter_parameters(model).values():
        p.requires_grad_(False)
