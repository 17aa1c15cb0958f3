"""The routed layer: a wrapped projection with two LoRA experts and a router.

Output in ``auto`` mode is the exact v1 formula

    (u + g) * W x + s * (u * B_u A_u x + g * B_g A_g x),   s = lora_alpha / r

The wrapper replaces the target ``nn.Linear`` (or GPT-2 ``Conv1D``) in place, the way
PEFT tuners do, so the surrounding modeling code and its KV cache are untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mogu.errors import MoGUError
from mogu.tuner.families import projection_shape
from mogu.tuner.router import Router

MODES = ("auto", "glad", "unwill", "off")
EXPERTS = ("glad", "unwill")


class PrefixScore:
    """Running mean of u - g over routed layers and generated steps, per row (the hold hand-off's signal).

    Each step adds every routed layer's weights at the batch's last position: the one whose output
    picks the next token, so m steps score exactly the m routed tokens."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, u: torch.Tensor, g: torch.Tensor) -> None:
        step = (u[:, -1, 0] - g[:, -1, 0]).detach().float()
        self.total = step if self.total is None else self.total + step
        self.count += 1

    def margin(self) -> torch.Tensor:
        """[B] mean u - g; > 0 means the routers leaned to the unwilling expert."""
        if self.total is None:
            raise MoGUError("no routed step was scored")
        return self.total / self.count


@dataclass
class RoutingState:
    """State shared by every routed layer of one model (a plain object, not a module)."""

    mode: str = "auto"
    trace_enabled: bool = False
    trace: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # During router training the layers hand their (u, g) here for the weight loss.
    collect: bool = False
    collected: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # A prompt-gated model's per-sequence (u, g), [B, 2], pinned for the routed calls of one prompt batch.
    pinned: torch.Tensor | None = None
    # While set, token routers add their weights to it (generation's hold hand-off).
    prefix_score: PrefixScore | None = None


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the experts and routers over a backbone weight of ``base_dtype``: float32 unless the
    backbone is float32 or float64 already."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


class RoutedLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, layer_idx: int, *, r: int, lora_alpha: float,
                 lora_dropout: float, router_hidden: int | None, state: RoutingState):
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx = layer_idx
        self.r = r
        self.scaling = lora_alpha / r
        self.in_features, self.out_features = projection_shape(base_layer)
        weight = base_layer.weight
        # Experts and routers stay float32 over a bf16/fp16 (or quantised) backbone, as PEFT's
        # autocast_adapter_dtype does: their updates are small, and router scores are sigmoids averaged over layers.
        kw = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        # Same module names as PEFT (lora_A.<adapter>, lora_B.<adapter>) to keep export trivial.
        self.lora_A = nn.ModuleDict({e: nn.Linear(self.in_features, r, bias=False, **kw) for e in EXPERTS})
        self.lora_B = nn.ModuleDict({e: nn.Linear(r, self.out_features, bias=False, **kw) for e in EXPERTS})
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # None: a prompt-gated model (gate.py) pins per-sequence weights in ``state`` instead.
        self.router = Router(self.in_features, router_hidden, **kw) if router_hidden is not None else None
        self._state = state
        self._fused: tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # router_backbone="o_proj" (backbone.py): a trained update D of W inside the routed formula.
        self.backbone_delta: nn.Parameter | None = None
        self.reset_lora_parameters()

    def enable_backbone_delta(self) -> nn.Parameter:
        """Add the zero-initialised full-rank update ``D`` ([out, in], the experts' dtype) and return it."""
        if self.backbone_delta is None:
            weight = self.lora_A["glad"].weight
            self.backbone_delta = nn.Parameter(torch.zeros(self.out_features, self.in_features, dtype=weight.dtype,
                                                           device=weight.device))
        return self.backbone_delta

    def reset_lora_parameters(self) -> None:
        # PEFT's default LoRA init: A kaiming-uniform, B zero, so a fresh expert is the base layer.
        for e in EXPERTS:
            nn.init.kaiming_uniform_(self.lora_A[e].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[e].weight)

    # -- fused inference weights ------------------------------------------------------------
    def _fused_params(self) -> list[torch.Tensor]:
        router = list(self.router.parameters()) if self.router is not None else []
        return [self.lora_A["unwill"].weight, self.lora_A["glad"].weight,
                self.lora_B["unwill"].weight, self.lora_B["glad"].weight, *router]

    def _fused_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One down matrix [2r+2, d] = [A_u; A_g; w_u; w_g], its bias, and B = [B_u | B_g].

        Rebuilt only when a parameter changed (tracked by tensor version and storage).
        """
        params = self._fused_params()
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                dtype = self.lora_A["glad"].weight.dtype
                parts = [self.lora_A["unwill"].weight, self.lora_A["glad"].weight]
                biases = [torch.zeros(2 * self.r, dtype=dtype, device=parts[0].device)]
                if self.router is not None:
                    w_router, b_router = self.router.affine()
                    parts.append(w_router.to(dtype))
                    biases.append(b_router.to(dtype))
                down = torch.cat(parts, dim=0)
                bias = torch.cat(biases)
                up = torch.cat([self.lora_B["unwill"].weight, self.lora_B["glad"].weight], dim=1)
            self._fused = (key, down, bias, up)
        return self._fused[1], self._fused[2], self._fused[3]

    @property
    def routing_state(self) -> RoutingState:
        """The routing state this layer shares with the other routed layers of its model."""
        return self._state

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self._state
        mode = state.mode
        result = self.base_layer(x, *args, **kwargs)
        if mode == "off":
            return result
        result_dtype = result.dtype
        if mode != "auto":  # a single expert: exactly PEFT's LoRA forward (and its cast back)
            lora_A, lora_B = self.lora_A[mode], self.lora_B[mode]
            x = x.to(lora_A.weight.dtype)
            return (result + lora_B(lora_A(self.lora_dropout(x))) * self.scaling).to(result_dtype)

        x = x.to(self.lora_A["glad"].weight.dtype)
        r = self.r
        if torch.is_grad_enabled() or self.training:
            # Training path: the factorised router, so gradients follow the paper's parametrisation.
            u, g, b = (*self.router(x), None) if self.router is not None else self._pinned_weights(x)
            down = F.linear(self.lora_dropout(x), torch.cat([self.lora_A["unwill"].weight,
                                                             self.lora_A["glad"].weight]))
            up = torch.cat([self.lora_B["unwill"].weight, self.lora_B["glad"].weight], dim=1)
        else:
            # Inference path: LoRA down-projections and both collapsed scorers (if any) in one cached matmul.
            fused_down, fused_bias, up = self._fused_weights()
            z = F.linear(x, fused_down, fused_bias)
            down = z[..., : 2 * r]
            if self.router is None:  # a prompt gate's per-sequence weights
                u, g, b = self._pinned_weights(x)
            else:
                scores = torch.sigmoid(z[..., 2 * r:])
                u, g, b = scores[..., :1], scores[..., 1:], None
        mixed = torch.cat([u * down[..., :r], g * down[..., r:]], dim=-1)
        # b: a pinned share of the base layer alone; (0, 0, 1) is 1.0 * W x + 0, the base output bit for bit.
        out = ((u + g) if b is None else (u + g + b)) * result + F.linear(mixed, up) * self.scaling
        if self.backbone_delta is not None:  # (u + g)(W + D) x: the unfrozen W, under the experts' weights
            out = out + (u + g) * F.linear(x, self.backbone_delta)
        if state.collect:
            state.collected.append((u, g))
        if state.prefix_score is not None and self.router is not None:
            state.prefix_score.add(u, g)
        if state.trace_enabled:
            state.trace.setdefault(self.layer_idx, []).append(  # per token, also for a per-sequence gate
                torch.cat([u, g], dim=-1).expand(*x.shape[:-1], 2).detach().float().cpu())
        return out.to(result_dtype)

    def _pinned_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The prompt gate's (u, g, b) for this batch, shaped [B, 1, 1] to broadcast over tokens (b is None
        for [B, 2] weights)."""
        pinned = self._state.pinned
        if pinned is None:
            raise MoGUError("a prompt-gated layer runs inside MoGUModel.forward/generate, which pin the "
                            "gate's decision; use model.pin_routing(...) to call the base model directly")
        if pinned.shape[0] != x.shape[0]:
            if x.shape[0] % pinned.shape[0]:
                raise MoGUError(f"pinned routing has {pinned.shape[0]} rows for a batch of {x.shape[0]}")
            # generate() expands each prompt into num_return_sequences consecutive rows.
            pinned = pinned.repeat_interleave(x.shape[0] // pinned.shape[0], dim=0)
        width = pinned.shape[-1]
        pinned = pinned.to(device=x.device, dtype=x.dtype).view(x.shape[0], *([1] * (x.dim() - 2)), width)
        return pinned[..., :1], pinned[..., 1:2], (pinned[..., 2:3] if width == 3 else None)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, r={self.r}, scaling={self.scaling}"
