"""Routed generation with Hugging Face ``generate`` semantics.

Reference MoGU inference: the routed model picks the first m tokens, then the *plain*
base model generates from the prompt plus those tokens. Routing changes every hidden
state, so the routed KV cache is not the base model's: the hand-off is one base prefill
of (prompt + m tokens). Both phases are ordinary cached ``generate`` calls, so greedy,
sampling, streamers, logits processors and stopping criteria all behave as usual.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from .errors import ConfigError


class _PhaseStreamer:
    """Lets one streamer span two generate calls: skips the second prompt echo and the first end()."""

    def __init__(self, inner, *, skip_prompt: bool, forward_end: bool):
        self.inner = inner
        self.skip_prompt = skip_prompt
        self.forward_end = forward_end

    def put(self, value):
        if self.skip_prompt:
            self.skip_prompt = False
            return
        self.inner.put(value)

    def end(self):
        if self.forward_end:
            self.inner.end()


def _eos_ids(generation_config) -> set[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        return set()
    return set(eos.tolist() if isinstance(eos, torch.Tensor) else ([eos] if isinstance(eos, int) else eos))


def routed_generate(model, inputs: torch.Tensor | None = None, *, route_tokens: int | None,
                    generation_config=None, streamer=None, stopping_criteria=None, logits_processor=None,
                    **kwargs: Any):
    base = model.base_model
    input_ids = kwargs.pop("input_ids", inputs)
    if input_ids is None:
        raise ConfigError("generate() needs input_ids")
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if getattr(model, "gate", None) is not None and model.routing_mode == "auto" and model._state.pinned is None:
        # A prompt-gated model decides once per prompt (gate.py), then generates with that decision pinned.
        start = time.perf_counter()
        weights = model.routing_weights(input_ids, attention_mask)
        gate_s = time.perf_counter() - start
        with model.pin_routing(weights):
            out = routed_generate(model, input_ids=input_ids, attention_mask=attention_mask, route_tokens=route_tokens,
                                  generation_config=generation_config, streamer=streamer,
                                  stopping_criteria=stopping_criteria, logits_processor=logits_processor, **kwargs)
        timing = model.last_generate_timing
        timing["gate_s"] = gate_s
        timing["total_s"] = timing.get("total_s", 0.0) + gate_s
        return out
    gen_config = copy.deepcopy(generation_config if generation_config is not None else base.generation_config)
    model_kwargs = gen_config.update(**kwargs)
    common = dict(stopping_criteria=stopping_criteria, logits_processor=logits_processor, **model_kwargs)
    timing = model.last_generate_timing = {}

    if route_tokens is None or model.routing_mode != "auto":
        start = time.perf_counter()
        out = base.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config,
                            streamer=streamer, **common)
        timing["total_s"] = time.perf_counter() - start
        return out

    if gen_config.num_beams and gen_config.num_beams > 1:
        raise ConfigError("beam search cannot hand off mid-beam: use route_tokens=None with num_beams > 1")
    if gen_config.return_dict_in_generate:
        raise ConfigError("return_dict_in_generate is not supported with a routed prefix; use route_tokens=None")
    prompt_len = input_ids.shape[1]
    if gen_config.max_new_tokens is not None:
        total_new = gen_config.max_new_tokens
    else:
        total_new = max(0, (gen_config.max_length or 20) - prompt_len)
    n_return = gen_config.num_return_sequences or 1

    # Phase 1: the routed model picks the first m tokens.
    phase1 = copy.deepcopy(gen_config)
    phase1.max_new_tokens = min(route_tokens, total_new)
    phase1.max_length = None
    phase1.min_new_tokens = min(gen_config.min_new_tokens or 0, phase1.max_new_tokens) or None
    start = time.perf_counter()
    first = _PhaseStreamer(streamer, skip_prompt=False, forward_end=False) if streamer is not None else None
    with model.routing("auto"):
        prefix = base.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=phase1,
                               streamer=first, **common)
    timing["routed_s"] = time.perf_counter() - start
    if n_return > 1:
        attention_mask = attention_mask.repeat_interleave(n_return, dim=0)
    generated = prefix.shape[1] - prompt_len
    remaining = total_new - generated
    pad_id = gen_config.pad_token_id
    if pad_id is None:
        pad_id = next(iter(_eos_ids(gen_config)), 0)

    alive = ~_finished_rows(prefix[:, prompt_len:], gen_config, pad_id)
    if stopping_criteria:
        dummy_scores = torch.zeros(prefix.shape[0], 1, device=prefix.device)
        for criterion in stopping_criteria:
            alive &= ~torch.as_tensor(criterion(prefix, dummy_scores), device=prefix.device, dtype=torch.bool)
    if remaining <= 0 or not bool(alive.any()):
        if streamer is not None:
            streamer.end()
        timing["total_s"] = timing["routed_s"]
        return prefix

    # Phase 2: the plain base model continues from prompt + prefix (one prefill = the hand-off).
    rows = alive.nonzero(as_tuple=True)[0]
    phase2 = copy.deepcopy(gen_config)
    phase2.max_new_tokens = remaining
    phase2.max_length = None
    phase2.num_return_sequences = 1
    phase2.min_new_tokens = max(0, (gen_config.min_new_tokens or 0) - generated) or None
    mask2 = torch.cat([attention_mask[rows], attention_mask.new_ones(len(rows), generated)], dim=1)
    second = _PhaseStreamer(streamer, skip_prompt=True, forward_end=True) if streamer is not None else None
    start = time.perf_counter()
    with model.routing("off"):
        continued = base.generate(input_ids=prefix[rows], attention_mask=mask2, generation_config=phase2,
                                  streamer=second, **common)
    timing["base_s"] = time.perf_counter() - start
    timing["total_s"] = timing["routed_s"] + timing["base_s"]

    out = prefix.new_full((prefix.shape[0], continued.shape[1]), pad_id)
    out[:, : prefix.shape[1]] = prefix
    out[rows] = continued
    return out


def _finished_rows(new_tokens: torch.Tensor, gen_config, pad_id: int) -> torch.Tensor:
    """Rows that stopped during the routed phase: they hold an EOS (or trailing padding)."""
    eos = _eos_ids(gen_config)
    finished = torch.zeros(new_tokens.shape[0], dtype=torch.bool, device=new_tokens.device)
    for token in eos:
        finished |= (new_tokens == token).any(dim=1)
    if pad_id not in eos and new_tokens.shape[1] > 0:
        finished |= new_tokens[:, -1] == pad_id
    return finished
