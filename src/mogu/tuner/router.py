"""The MoGU router: two independent sigmoid scorers per routed layer.

Each scorer is ``sigmoid(W2 (W1 (W0 x) + b1) + b2)`` with shapes d -> hidden -> d -> 1,
exactly as in the reference code (no activation between the linear maps). Because the
map is affine before the sigmoid, it collapses to one d-vector and a bias at inference
(``Scorer.affine``), which is what the fused inference path uses.
"""

from __future__ import annotations

import torch
from torch import nn

ROLES = ("unwill", "glad")  # row order of the fused router weights: u first, then g


class Scorer(nn.Module):
    def __init__(self, in_features: int, hidden: int, *, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.linear_0 = nn.Linear(in_features, hidden, bias=False, **kw)
        self.linear_1 = nn.Linear(hidden, in_features, bias=True, **kw)
        self.linear_2 = nn.Linear(in_features, 1, bias=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear_2(self.linear_1(self.linear_0(x))))

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, b) with ``logit = x @ w + b``; computed in float64 to keep the collapse exact."""
        w0 = self.linear_0.weight.double()
        w1 = self.linear_1.weight.double()
        w2 = self.linear_2.weight.double()
        w = (w2 @ w1 @ w0).squeeze(0)
        b = (w2 @ self.linear_1.bias.double() + self.linear_2.bias.double()).squeeze(0)
        return w, b


class Router(nn.Module):
    """Per-token weights ``u`` (unwill expert) and ``g`` (glad expert), each in (0, 1)."""

    def __init__(self, in_features: int, hidden: int, *, device=None, dtype=None):
        super().__init__()
        self.unwill = Scorer(in_features, hidden, device=device, dtype=dtype)
        self.glad = Scorer(in_features, hidden, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.unwill(x), self.glad(x)

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (W [2, d], b [2]) in float64, rows ordered as ROLES."""
        wu, bu = self.unwill.affine()
        wg, bg = self.glad.affine()
        return torch.stack([wu, wg]), torch.stack([bu, bg])
