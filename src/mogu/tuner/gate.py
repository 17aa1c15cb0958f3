"""Prompt-level routing (``router_type="prompt"``): one decision per prompt from all layers' probes.

v1's routers decide per layer and per token, each from the one layer input it reads. On SmolLM2 the
per-layer decisions over-refuse unseen conversational prompts (Just-Eval) far more than the same
features separate them when every layer votes: the average of per-layer logistic probes at the
prompt's last token flagged 2-5 % of Just-Eval against 14-26 % refused by trained v1 routers
(docs/RESULTS.md, "Prompt gate"). The prompt gate is that ensemble used as the router:

- features: the input of every layer's target module (what a v1 router reads) at the prompt's last
  token, with routing off, so they are the base model's and do not shift with the routing;
- score: ``z = mean_l (w_l . x_l + b_l)``, one logistic probe per layer (``router_init.fit_probe``);
- weights: hard, ``(u, g) = (1, 0)`` if ``z > threshold`` else ``(0, 1)``, for every routed layer and
  every routed token of that sequence. The layer formula stays v1's, so a flagged prompt runs exactly
  the unwilling expert and any other exactly the glad one;
- fitting replaces the router stage's gradient steps: no-grad feature passes and one probe per layer;
  ``threshold`` is the operating point ``mogu calibrate`` moves (toward glad = up).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mogu.errors import ConfigError, MoGUError


class PromptGate(nn.Module):
    """Per-layer probes over the target modules' inputs, averaged into one harmfulness logit per prompt."""

    def __init__(self, layers: Sequence[int], in_features: int, *, device=None):
        super().__init__()
        if not layers:
            raise ConfigError("a prompt gate needs at least one probed layer")
        self.layers = list(layers)
        self.in_features = in_features  # kept: a partitioned weight (DeepSpeed ZeRO-3) has no shape to read
        # float32 whatever the model's dtype: the probes' logits are averaged over many layers.
        self.weight = nn.Parameter(torch.zeros(len(self.layers), in_features, device=device))
        self.bias = nn.Parameter(torch.zeros(len(self.layers), device=device))
        self.register_buffer("threshold", torch.zeros(1, device=device))

    def score(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """Harmfulness logits [B] from {layer: [B, d] last-token inputs}."""
        missing = [i for i in self.layers if i not in features]
        if missing:
            raise MoGUError(f"prompt gate: no features for layer(s) {missing}")
        logits = [features[i].to(self.weight.dtype) @ self.weight[k] + self.bias[k] for k, i in enumerate(self.layers)]
        return torch.stack(logits).mean(0)

    def is_fitted(self) -> bool:
        """A fresh gate is all zeros: it would send every prompt to the glad expert, the one that complies."""
        return bool(self.weight.detach().abs().sum() > 0 or self.bias.detach().abs().sum() > 0)

    def weights(self, scores: torch.Tensor, benign: str = "glad") -> torch.Tensor:
        """(u, g) per prompt, [B, 2]: all unwill above the threshold, all glad otherwise. With ``benign="base"``,
        (u, g, b), [B, 3]: a passed prompt gets (0, 0, 1), the base layer alone (layer.py)."""
        u = (scores > self.threshold).to(torch.float32)
        if benign == "base":
            return torch.stack([u, torch.zeros_like(u), 1.0 - u], dim=-1)
        return torch.stack([u, 1.0 - u], dim=-1)

    @torch.no_grad()
    def set_probes(self, probes: dict[int, tuple[torch.Tensor, float]]) -> None:
        """Write fitted probes ({layer: (w, c)}, logit = x @ w + c) into the gate."""
        if set(probes) != set(self.layers):
            raise MoGUError(f"prompt gate: probes for layers {sorted(probes)}, the gate has {self.layers}")
        for k, i in enumerate(self.layers):
            w, c = probes[i]
            self.weight[k].copy_(w.to(self.weight.dtype))
            self.bias[k].fill_(float(c))

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}, in_features={self.in_features}"


