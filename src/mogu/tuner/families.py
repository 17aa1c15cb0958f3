"""Model families: where the attention output projection lives in each architecture.

A family is a name, the ``config.model_type`` values it covers, and the module-name
suffix(es) of the layer MoGU wraps. New families register with ``register_family``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from mogu.errors import UnknownFamilyError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    target_modules: tuple[str, ...]


FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    return family


register_family(Family(
    "llama-like",
    ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
     "gemma3", "gemma3_text", "phi3", "olmo", "olmo2", "granite", "starcoder2", "stablelm",
     "cohere", "smollm3", "glm", "helium", "exaone4"),
    ("o_proj",),
))
register_family(Family("falcon", ("falcon",), ("self_attention.dense",)))
register_family(Family("bloom", ("bloom",), ("self_attention.dense",)))
register_family(Family("gpt2", ("gpt2", "gpt_bigcode"), ("attn.c_proj",)))
register_family(Family("gpt-neox", ("gpt_neox",), ("attention.dense",)))
register_family(Family("phi", ("phi",), ("self_attn.dense",)))
register_family(Family("opt", ("opt",), ("self_attn.out_proj",)))
register_family(Family("gptj", ("gptj",), ("attn.out_proj",)))

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def family_for(model_type: str | None) -> Family | None:
    return _BY_MODEL_TYPE.get(model_type or "")


def is_projection(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a wrapped projection."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape  # Conv1D stores [in, out]
    return in_features, out_features


def layer_index(module_name: str) -> int | None:
    """The decoder-layer index in a module path such as ``model.layers.3.self_attn.o_proj``."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def matches_target(module_name: str, targets: list[str] | tuple[str, ...]) -> bool:
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def candidate_targets(model: nn.Module) -> list[str]:
    """Distinct suffixes (last two name parts) of projections inside numbered layers."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if is_projection(module) and layer_index(name) is not None:
            seen[".".join(name.split(".")[-2:])] = None
    return list(seen)


def resolve_target_modules(model: nn.Module, target_modules: list[str] | None) -> list[str]:
    """The target suffixes to wrap: the override if given, else the family default."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules:
        return list(target_modules)
    family = family_for(model_type)
    if family is None:
        candidates = candidate_targets(model)
        raise UnknownFamilyError(
            f"unknown model family {model_type!r}: pass target_modules (CLI: --target-modules) naming the "
            f"attention output projection. Linear layers found in decoder layers: {', '.join(candidates) or 'none'}"
        )
    return list(family.target_modules)
