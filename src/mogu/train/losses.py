"""The training losses: response-token NLL, the expert stages' CE ratio, and the router stage's CE + MSE.

Batches are left-padded (``collate``) so that every response ends at the right edge; logits are then
computed only where labels live.
"""

from __future__ import annotations

import inspect

import torch

from mogu.tuner.features import position_kwargs


def collate(sequences: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad; labels are -100 except on response tokens."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, (ids, n_resp) in enumerate(sequences):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
        labels[i, width - n_resp:] = torch.tensor(ids[len(ids) - n_resp:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.base_model.forward).parameters


def sequence_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean response-token NLL per sequence, computing logits only where labels live."""
    labels = batch["labels"]
    resp_len = int((labels != -100).sum(dim=1).max())
    kwargs = position_kwargs(model, batch["attention_mask"])
    keep = resp_len + 1
    if _supports_logits_to_keep(model) and keep < labels.shape[1]:
        kwargs["logits_to_keep"] = keep  # left padding puts every response at the right edge
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **kwargs)
    logits = out.logits[:, -keep:, :]
    targets = labels[:, -keep + 1:]
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    mask = targets != -100
    token_nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return token_nll.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def ratio_terms(model, numerators: dict, denominators: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence CE(numerator_i) and CE(denominator_i): one forward over both halves."""
    n = numerators["input_ids"].shape[0]
    nll = sequence_nll(model, _stack_batches(numerators, denominators))
    return nll[:n], nll[n:]


def ratio_loss(model, numerators: dict, denominators: dict) -> tuple[torch.Tensor, dict]:
    """mean_i CE(numerator_i) / CE(denominator_i): one forward over both halves."""
    num, den = ratio_terms(model, numerators, denominators)
    loss = (num / den.clamp(min=1e-6)).mean()
    return loss, {"ce_num": num.mean().item(), "ce_den": den.mean().item()}


def router_terms(model, batch: dict, labels: torch.Tensor, *, per_example: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(per-sequence CE, summed squared errors of u and of g over routed layers and non-pad tokens, layers).

    ``per_example``: the squared errors per sequence ([B]), each already divided by its own tokens x layers."""
    with model.collecting_router_weights() as weights:
        ce = sequence_nll(model, batch)
        collected = list(weights)
    mask = batch["attention_mask"].to(torch.float32).unsqueeze(-1)  # [B, T, 1]
    t_u = labels.to(torch.float32).view(-1, 1, 1)
    t_g = 1.0 - t_u
    if per_example:
        per_row = mask.sum(dim=(1, 2)).clamp(min=1.0) * len(collected)  # tokens x layers, per sequence
        err_u = sum(((u.float() - t_u) ** 2 * mask).sum(dim=(1, 2)) for u, _ in collected) / per_row
        err_g = sum(((g.float() - t_g) ** 2 * mask).sum(dim=(1, 2)) for _, g in collected) / per_row
        return ce, err_u, err_g, len(collected)
    err_u = sum(((u.float() - t_u) ** 2 * mask).sum() for u, _ in collected)
    err_g = sum(((g.float() - t_g) ** 2 * mask).sum() for _, g in collected)
    return ce, err_u, err_g, len(collected)


def router_loss(model, batch: dict, labels: torch.Tensor, weight: float) -> tuple[torch.Tensor, dict]:
    """CE(target) + weight * [MSE(u, t_u) + MSE(g, t_g)], the MSEs over routed layers and non-pad tokens."""
    ce, err_u, err_g, layers = router_terms(model, batch, labels)
    denom = batch["attention_mask"].sum() * layers
    ce, mse_u, mse_g = ce.mean(), err_u / denom, err_g / denom
    loss = ce + weight * (mse_u + mse_g)
    return loss, {"ce": ce.item(), "mse_u": mse_u.item(), "mse_g": mse_g.item()}


def _stack_batches(a: dict, b: dict) -> dict:
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        parts = []
        for batch in (a, b):
            t = batch[key]
            pad = t.new_full((t.shape[0], width - t.shape[1]), fill)
            parts.append(torch.cat([pad, t], dim=1))
        out[key] = torch.cat(parts)
    return out
