"""Data-driven router initialisation ("probe init").

The v1 scorer is an affine map before its sigmoid, factorised d -> h -> d -> 1. From a default
(small) initialisation each factor's gradient is scaled by the other two, so a few hundred CPU
steps barely move it. Instead, no-grad passes collect the routed layers' inputs on the router
set's prompts, an L2-regularised logistic-regression probe (harmful vs benign) is fitted per
layer, and the probe is written into the same factorised shapes so that ``W2 W1 W0 = w`` and
``W2 b1 + b2 = c`` exactly. Shapes and parameter count are unchanged (checkpoints stay v1).

Two findings shape it (docs/RESULTS.md, "Router initialisation"):
- Every prompt token is a training sample, not only the prompt's tail: the router acts on every
  position, and a probe fitted on the tail alone sent the shared system-prompt tokens to the
  unwilling expert, which leaked refusals into benign answers through the KV cache.
- Each layer's input depends on the routing of the layers below, so a probe fitted with routing
  off meets shifted features once routing is on. Refitting on features collected under the
  current routing oscillates; refitting on the union of all rounds (as in DAgger) converges
  after one round.
"""

from __future__ import annotations

import torch

from mogu.tuner.features import position_kwargs, stop_after
from mogu.tuner.router import Scorer


@torch.no_grad()
def collect_features(model, batches, *, mode: str = "off", max_tokens_per_batch: int = 256,
                     seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per routed module: (features [N, d], labels [N]) from every prompt token, under ``mode`` routing.

    Response tokens are left out: there the harmful class is refusal text, so a probe fitted on
    them detects refusals rather than harmful requests and then reinforces itself while
    generating (batches may hold prompts alone: a row without response labels contributes all its
    tokens). Tokens are subsampled per batch (seeded) to bound memory on large models. The pass
    stops after the last routed module.
    """
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in model.routed_modules}
    labels_out: list[torch.Tensor] = []
    hooks = []
    current: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    for name, module in model.routed_modules.items():
        hooks.append(module.register_forward_pre_hook(lambda mod, args, name=name: current.__setitem__(name, args[0])))
    last = list(model.routed_modules.values())[-1]
    try:
        with model.routing(mode), stop_after(last) as run:
            for batch, labels in batches:
                run(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    **position_kwargs(model, batch["attention_mask"]))
                resp = batch["labels"] != -100
                first = torch.where(resp.any(dim=1), resp.float().argmax(dim=1), resp.shape[1])
                positions = torch.arange(resp.shape[1], device=resp.device).unsqueeze(0)
                keep = (positions < first.unsqueeze(1)) & batch["attention_mask"].bool()
                idx = keep.nonzero(as_tuple=False).cpu()
                if len(idx) > max_tokens_per_batch:
                    idx = idx[torch.randperm(len(idx), generator=gen)[:max_tokens_per_batch]]
                rows, cols = idx[:, 0], idx[:, 1]
                for name in feats:
                    feats[name].append(current[name][rows, cols].float().cpu())
                labels_out.append(labels.cpu()[rows].float())
    finally:
        for h in hooks:
            h.remove()
    y = torch.cat(labels_out)
    return {name: (torch.cat(chunks), y) for name, chunks in feats.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, max_iter: int = 100) -> tuple[torch.Tensor, float]:
    """Logistic-regression direction w and bias c (logit = x @ w + c), L2 on standardised features.

    A diagonal-LDA probe, tried first, left the classes overlapping on held-out sets
    (74% harmful / 15% benign flagged, against 92% / 3% for this probe; docs/RESULTS.md).
    """
    if not (y > 0.5).any() or not (y <= 0.5).any():
        raise ValueError("probe init needs both harmful and benign examples")
    x = x.double()
    y = y.double()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    # Class-balanced: both classes weigh the same whatever the token counts.
    pos = float((y > 0.5).double().mean())
    weight = torch.where(y > 0.5, 0.5 / pos, 0.5 / (1 - pos))
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y, weight=weight)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / sd).detach()
    return w_raw, float(b.detach() - (mu * w_raw).sum())


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


def probe_init(model, batches, *, refits: int = 1, l2: float = 1e-2, glad_bias: float = 0.0,
               log=print) -> dict[str, float]:
    """Initialise every router from per-layer probes; returns each layer's probe training accuracy.

    ``refits`` rounds re-collect features under the routing just written and refit on all rounds
    so far. ``glad_bias`` shifts every scorer's logit toward the glad expert (u down, g up): the
    operating point between over-refusal and missed harmful prompts.
    """
    rounds: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    accuracy: dict[str, float] = {}
    for r in range(refits + 1):
        rounds.append(collect_features(model, batches, mode="off" if r == 0 else "auto", seed=r))
        for i, (name, module) in enumerate(model.routed_modules.items()):
            x = torch.cat([d[name][0] for d in rounds])
            y = torch.cat([d[name][1] for d in rounds])
            w, c = fit_probe(x, y, l2=l2)
            write_affine(module.router.unwill, w, c - glad_bias, seed=i)
            write_affine(module.router.glad, -w, -c + glad_bias, seed=i + 10_000)
            accuracy[name] = float((((x.double() @ w + c) > 0).double() == y.double()).double().mean())
        accs = list(accuracy.values())
        log(f"probe init round {r}: {len(accs)} routers, token accuracy min {min(accs):.3f} / "
            f"mean {sum(accs) / len(accs):.3f} ({len(rounds[-1][next(iter(rounds[-1]))][1])} tokens)")
    return accuracy
