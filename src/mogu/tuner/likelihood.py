"""Teacher-forced likelihood of a given answer under routed generation (``generate``'s own routing).

``mogu eval`` scores usefulness without an endpoint by the mean token NLL of reference answers
(AlpacaEval, Just-Eval): how likely the defended model is to say what a good answer says. The NLL
must be the one the model's *generation* assigns, hand-off included, not a plain forward with
routing on:

- a prompt-gated model decides once from the prompt; with ``gate_benign="base"`` and the hold
  hand-off every answer token is scored by that one decision's model (the base layers for a passed
  prompt, the unwilling expert for a flagged one), as ``generation._single_pass`` generates;
- otherwise the first m answer tokens come from the routed model, fed one step at a time exactly as
  ``generate`` feeds them (so token routers' hold signal is the same mean u - g), and the rest from
  the base model over prompt + answer (the fixed hand-off's prefill) or, for a held row, from the
  unwilling expert continuing on the routed KV cache.

Rows are scored one at a time, unpadded: no padding or position-id question can move a row's NLL.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mogu.errors import MoGUError
from mogu.tuner.generation import _CACHE_KWARG, _returned_cache
from mogu.tuner.routing import handoff_policy


@dataclass(frozen=True)
class AnswerNLL:
    """Summed negative log-likelihood (nats) of one answer's tokens, their count, and whether routing held."""

    nll: float
    tokens: int
    held: bool

    @property
    def mean(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")


@torch.no_grad()
def answer_nll(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], *, route_tokens: int | None | str = "config",
               handoff: str = "config") -> AnswerNLL:
    """NLL of ``answer_ids`` after ``prompt_ids`` under ``model.generate``'s routing (module docstring).

    ``model`` is a MoGUModel; its current routing mode is honoured (``off`` scores the base model,
    ``glad``/``unwill`` one expert throughout, ``auto`` the routed generation).
    """
    if not list(answer_ids):
        return AnswerNLL(0.0, 0, False)
    logits, held = answer_logits(model, prompt_ids, answer_ids, route_tokens=route_tokens, handoff=handoff)
    targets = torch.tensor(list(answer_ids), dtype=torch.long, device=logits.device)
    return AnswerNLL(float(F.cross_entropy(logits.float(), targets, reduction="sum")), len(targets), held)


@torch.no_grad()
def answer_logits(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], *,
                  route_tokens: int | None | str = "config", handoff: str = "config") -> tuple[torch.Tensor, bool]:
    """The logits [n, V] that ``generate`` would pick each of the n answer tokens from, teacher-forced, and
    whether routing held the answer with the unwilling expert. Greedy decoding's answer is their argmax."""
    m = model.config.route_tokens if route_tokens == "config" else route_tokens
    policy = model.config.handoff if handoff == "config" else handoff
    handoff_policy(policy)  # a one-line error for an unknown name
    prompt_ids, answer = list(prompt_ids), list(answer_ids)
    if not prompt_ids or not answer:
        raise MoGUError("answer_logits needs a non-empty prompt and answer")
    device = model.device
    full = torch.tensor([prompt_ids + answer], dtype=torch.long, device=device)
    n_prompt = len(prompt_ids)
    base = model.base_model

    def forward_all() -> torch.Tensor:  # every answer token's logits in the current routing mode
        return base(input_ids=full, use_cache=False).logits[0, n_prompt - 1: -1]

    if model.routing_mode != "auto" or m is None:
        with model.gated(full[:, :n_prompt]):  # a no-op without a gate or when routing is not auto
            return forward_all(), False
    if (model.config.token_benign == "base" and policy == "hold" and model.routing_strategy.per_layer_routers
            and model.pinned_routing is None):  # generation's rule (generation._checks_prompt)
        from mogu.tuner.generation import prompt_margins

        prompt = full[:, :n_prompt]
        if not bool(prompt_margins(model, prompt, torch.ones_like(prompt))[0] > 0):  # the base model's answer
            with model.routing("off"):
                return forward_all(), False
    pinned = model.routing_decision(full[:, :n_prompt])
    if pinned is not None:
        if pinned.shape[1] == 3 and policy == "hold":
            with model.pin_routing(pinned):  # one decision, one model, every token (generation._single_pass)
                return forward_all(), bool(pinned[0, 0] > 0.5)
    with (model.pin_routing(pinned) if pinned is not None else contextlib.nullcontext()):
        return _stepwise(model, full, n_prompt, len(answer), m, policy)


def _stepwise(model, full: torch.Tensor, n_prompt: int, n_answer: int, m: int, policy: str) -> tuple[torch.Tensor, bool]:
    """The routed prefix step by step on one cache, then the hand-off (base prefill) or the held continuation."""
    base = model.base_model
    routed = min(m, n_answer)
    handoff = handoff_policy(policy)
    hold = handoff.scores_prefix
    pinned = model.pinned_routing
    with model.routing("auto"), model.scoring_routed_prefix(hold and pinned is None) as prefix_score:
        out = base(input_ids=full[:, :n_prompt], use_cache=True)
        pieces = [out.logits[0, -1:]]
        cache = _returned_cache(out)
        for j in range(routed - 1):  # feed answer tokens 0..m-2, one step each, as generate does
            out = base(input_ids=full[:, n_prompt + j: n_prompt + j + 1], use_cache=True, **{_CACHE_KWARG: cache})
            pieces.append(out.logits[0, -1:])
            cache = _returned_cache(out)
    held = bool(handoff.held_rows(pinned, prefix_score, 1)[0])
    if routed < n_answer:
        if held:  # the unwilling expert continues on the routed cache: token m-1 onward is new to it
            with model.routing("unwill"):
                pieces.append(base(input_ids=full[:, n_prompt + routed - 1: -1], use_cache=True,
                                   **{_CACHE_KWARG: cache}).logits[0])
        else:  # the fixed hand-off: the base model prefills prompt + routed tokens and goes on
            with model.routing("off"):
                pieces.append(base(input_ids=full, use_cache=False).logits[0, n_prompt + routed - 1: -1])
    return torch.cat(pieces), held
