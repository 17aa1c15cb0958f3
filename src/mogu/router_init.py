"""Data-driven router initialisation ("probe init").

The v1 scorer is an affine map before its sigmoid, factorised d -> h -> d -> 1. From a default
(small) initialisation each factor's gradient is scaled by the other two, so a few hundred CPU
steps barely move it. Instead, one no-grad pass collects the routed layers' inputs on the router
set, a diagonal-covariance LDA probe (harmful vs benign) is fitted per layer, and the probe is
written into the same factorised shapes so that ``W2 W1 W0 = w`` and ``W2 b1 + b2 = c`` exactly:
training then starts from a router that already separates the classes. Shapes and parameter
count are unchanged, so checkpoints stay v1-compatible.
"""

from __future__ import annotations

import torch

from .router import Scorer


@torch.no_grad()
def collect_features(model, batches, *, tail_prompt_tokens: int = 8,
                     include_response: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per routed module: (features [N, d], labels [N]) from the prompt's last tokens.

    Response tokens are left out by default: there the harmful class is refusal text, so a probe
    fitted on them detects refusals rather than harmful requests and then reinforces itself while
    generating.
    """
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in model.routed_modules}
    labels_out: list[torch.Tensor] = []
    hooks = []
    current: dict[str, torch.Tensor] = {}
    for name, module in model.routed_modules.items():
        hooks.append(module.register_forward_pre_hook(lambda mod, args, name=name: current.__setitem__(name, args[0])))
    try:
        with model.routing("off"):
            for batch, labels in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                resp = batch["labels"] != -100
                # The prompt's last tokens carry the request; earlier ones (system prompt) are shared.
                first = resp.float().argmax(dim=1)
                positions = torch.arange(resp.shape[1]).unsqueeze(0)
                keep = (positions >= (first - tail_prompt_tokens).unsqueeze(1)) & (positions < first.unsqueeze(1))
                if include_response:
                    keep |= resp
                keep &= batch["attention_mask"].bool()
                for name in feats:
                    feats[name].append(current[name][keep].float().cpu())
                labels_out.append(labels.view(-1, 1).expand_as(keep)[keep].float().cpu())
    finally:
        for h in hooks:
            h.remove()
    y = torch.cat(labels_out)
    return {name: (torch.cat(chunks), y) for name, chunks in feats.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, margin: float = 3.0) -> tuple[torch.Tensor, float]:
    """Diagonal LDA direction w and bias c with logits of about +margin (y=1) and -margin (y=0)."""
    pos, neg = x[y > 0.5].double(), x[y <= 0.5].double()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("probe init needs both harmful and benign examples")
    var = 0.5 * (pos.var(dim=0, unbiased=False) + neg.var(dim=0, unbiased=False)) + 1e-6
    w = (pos.mean(0) - neg.mean(0)) / var
    proj_pos, proj_neg = (pos @ w).mean(), (neg @ w).mean()
    scale = 2 * margin / (proj_pos - proj_neg).clamp(min=1e-12)
    w = w * scale
    c = -0.5 * (proj_pos + proj_neg) * scale
    return w, float(c)


@torch.no_grad()
def write_affine(scorer: Scorer, w: torch.Tensor, c: float, seed: int = 0) -> None:
    """Set the factorised scorer so that its pre-sigmoid map is exactly ``x @ w + c``."""
    g = torch.Generator().manual_seed(seed)
    dtype = scorer.linear_0.weight.dtype
    d = w.numel()
    w = w.to(torch.float64)
    norm = w.norm().clamp(min=1e-12)
    e = torch.randn(d, generator=g, dtype=torch.float64)
    e = e / e.norm()
    # W0's first row reads the probe direction; W1 writes it to direction e; W2 reads e back.
    # The norm is split evenly over the three factors so that Adam's per-element steps move
    # each factor by a similar relative amount (all of it in W2 makes training diverge).
    a = norm ** (1.0 / 3.0)
    scorer.linear_0.weight[0].copy_((w / norm * a).to(dtype))
    scorer.linear_1.weight.zero_()
    scorer.linear_1.weight[:, 0].copy_((e * a).to(dtype))
    scorer.linear_1.bias.zero_()
    scorer.linear_2.weight[0].copy_((e * a).to(dtype))
    scorer.linear_2.bias.fill_(c)


def probe_init(model, batches, *, margin: float = 3.0, log=print) -> dict[str, float]:
    """Initialise every router from per-layer probes; returns each layer's probe training accuracy."""
    data = collect_features(model, batches)
    accuracy = {}
    for i, (name, module) in enumerate(model.routed_modules.items()):
        x, y = data[name]
        w, c = fit_probe(x, y, margin)
        write_affine(module.router.unwill, w, c, seed=i)
        write_affine(module.router.glad, -w, -c, seed=i + 10_000)
        accuracy[name] = float((((x.double() @ w + c) > 0).double() == y.double()).double().mean())
    accs = list(accuracy.values())
    log(f"probe init: {len(accs)} routers, token accuracy min {min(accs):.3f} / mean {sum(accs) / len(accs):.3f}")
    return accuracy
