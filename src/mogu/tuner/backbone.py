"""Backbone modules that v2's router stage trains beside the routers ("bidirectional adaptation").

The v2 paper activates backbone modules during router optimisation without saying which. ``router_backbone``
picks one of three, for the ablation in docs/RESULTS.md:

* ``experts``: none; the router stage trains the routers, and the experts in v2's joint stage (the default);
* ``lora``: a fresh LoRA (the experts' rank and scaling) on every other projection of each routed layer, the
  attention's and the MLP's (``BackboneLoRA``);
* ``o_proj``: the routed projections unfrozen (the attention output projections by default; whatever
  ``target_modules`` names otherwise, at out x in float32 each), as a full-rank update ``D`` to ``W`` inside
  the routed formula, ``(u + g)(W + D) x + s (u B_u A_u x + g B_g A_g x)`` (``RoutedLinear.backbone_delta``).

Both start at zero, so a fresh model computes exactly what the experts-only model does, and both act only in
the routed ("auto") mode: routing off is still the base model, and the hand-off still continues on it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mogu.tuner.config import ROUTER_BACKBONES  # noqa: F401  (re-exported: the choices, with their modules)
from mogu.tuner.families import is_projection, layer_index, matches_target, projection_shape
BACKBONE_FILE = "backbone_modules.safetensors"


class BackboneLoRA(nn.Module):
    """A projection of a routed layer with a LoRA that acts only while routing is on ("auto" mode)."""

    def __init__(self, base_layer: nn.Module, *, r: int, lora_alpha: float, state):
        super().__init__()
        from mogu.tuner.layer import adapter_dtype

        self.base_layer = base_layer
        self.in_features, self.out_features = projection_shape(base_layer)
        self.scaling = lora_alpha / r
        kw = {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer.weight.dtype)}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: B = 0, the base layer
        nn.init.zeros_(self.lora_B.weight)
        self._state = state

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._state.mode != "auto":
            return result
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling
        return (result + update).to(result.dtype)


def attach_backbone_modules(model) -> dict[str, nn.Parameter]:
    """Add ``model.config.router_backbone``'s modules to the routed layers; returns their parameters by name
    (the names ``backbone_state_dict`` saves under). Called once, after the experts and routers exist, so
    their random initialisation is unchanged."""
    kind = model.config.router_backbone
    params: dict[str, nn.Parameter] = {}
    if kind == "o_proj":
        for name, routed in model.routed_modules.items():
            params[f"{name}.backbone_delta"] = routed.enable_backbone_delta()
    elif kind == "lora":
        base, config = model.base_model, model.config
        routed = model.routed_modules
        state = next(iter(routed.values())).routing_state
        routed_layers = {m.layer_idx for m in routed.values()}
        for name, module in list(base.named_modules()):
            inside_routed = any(name == r or name.startswith(r + ".") for r in routed)  # the experts, the router
            if (inside_routed or layer_index(name) not in routed_layers or not is_projection(module)
                    or matches_target(name, config.target_modules)):
                continue
            parent_name, _, child = name.rpartition(".")
            wrapped = BackboneLoRA(module, r=config.r, lora_alpha=config.lora_alpha, state=state)
            wrapped.train(module.training)
            setattr(base.get_submodule(parent_name) if parent_name else base, child, wrapped)
            params[f"{name}.lora_A.weight"] = wrapped.lora_A.weight
            params[f"{name}.lora_B.weight"] = wrapped.lora_B.weight
    return params
