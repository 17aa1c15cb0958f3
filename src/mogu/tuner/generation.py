"""Routed generation with Hugging Face ``generate`` semantics.

Reference MoGU inference (``handoff="fixed"``): the routed model picks the first m tokens, then the
*plain* base model generates from the prompt plus those tokens. Routing changes every hidden state,
so the routed KV cache is not the base model's: the hand-off is one base prefill of (prompt + m
tokens).

That makes a refusal five tokens deep: "I'm sorry, but... However, here's how" is the base model
finishing what the unwilling expert began. ``handoff="hold"`` (the default) keeps the refusal:
a row whose routing judged the prompt harmful stays with the unwilling expert to the end of the
answer (or its EOS), continuing on its own KV cache with no second prefill. The signal is the
prompt gate's decision, or for token routers the routed prefix's mean u against its mean g over
layers and routed tokens. Every other row takes the reference hand-off unchanged, so benign answers
and their cost are the fixed hand-off's. In a batch, rows take their own path.

Every phase is an ordinary cached ``generate`` call, so greedy, sampling, streamers, logits
processors and stopping criteria all behave as usual.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from mogu.errors import ConfigError
from mogu.tuner.routing import handoff_policy


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


def _first_eos(generation_config) -> int:
    """The id generate pads finished rows with when no pad id is set: the first EOS id, in the config's order."""
    eos = generation_config.eos_token_id
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    if isinstance(eos, int):
        return eos
    return eos[0] if eos else 0


def routed_generate(model, inputs: torch.Tensor | None = None, *, route_tokens: int | None,
                    handoff: str = "hold", generation_config=None, streamer=None, stopping_criteria=None,
                    logits_processor=None, _prompt_checked: bool = False, **kwargs: Any):
    base = model.base_model
    input_ids = kwargs.pop("input_ids", inputs)
    if input_ids is None:
        raise ConfigError("generate() needs input_ids")
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not _prompt_checked and _checks_prompt(model, route_tokens, handoff, generation_config, kwargs):
        return _prompt_checked_generate(model, input_ids, attention_mask, route_tokens=route_tokens,
                                        generation_config=generation_config, streamer=streamer,
                                        stopping_criteria=stopping_criteria, logits_processor=logits_processor,
                                        **kwargs)
    start = time.perf_counter()
    weights = model.routing_decision(input_ids, attention_mask)
    if weights is not None:
        # The strategy decides once per prompt (routing.py), then generates with that decision pinned.
        gate_s = time.perf_counter() - start
        greedy_prefix = not model.config.routed_sampling and _samples(model, generation_config, kwargs)
        if weights.shape[1] == 3 and handoff == "hold" and route_tokens is not None and not greedy_prefix:
            # gate_benign="base" with the hold hand-off: a passed row is the base model and a flagged row the
            # unwilling expert for the whole answer, so neither hands off: one call, one prefill, rows mixed.
            return _single_pass(model, weights, gate_s, input_ids=input_ids, attention_mask=attention_mask,
                                generation_config=generation_config, streamer=streamer,
                                stopping_criteria=stopping_criteria, logits_processor=logits_processor, **kwargs)
        with model.pin_routing(weights):
            out = routed_generate(model, input_ids=input_ids, attention_mask=attention_mask, route_tokens=route_tokens,
                                  handoff=handoff, generation_config=generation_config, streamer=streamer,
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

    policy = handoff_policy(handoff)
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
    if not model.config.routed_sampling and phase1.do_sample:
        if n_return > 1:
            raise ConfigError("routed_sampling=False decodes the routed prefix greedily, so num_return_sequences > 1 "
                              "would repeat one prefix; sample with routed_sampling=True")
        phase1.do_sample = False  # the authors decode the routed tokens greedily; phase 2 samples as asked
    start = time.perf_counter()
    first = _PhaseStreamer(streamer, skip_prompt=False, forward_end=False) if streamer is not None else None
    hold = policy.scores_prefix
    pinned = model.pinned_routing
    # Token routers: the layers sum u - g at each step's last position (the one that picks the next token).
    score_prefix = hold and pinned is None
    phase1.return_dict_in_generate = hold  # the held rows may continue on this call's KV cache
    if hold:
        # A held row continues on the routed prefix's own cache whatever use_cache says: recomputed without
        # it, the prefix would be re-read by the unwilling expert alone, another model than the one that chose
        # it. A static cache would be sized for the prefix only, so the prefix gets a dynamic one.
        phase1.use_cache = True
        phase1.cache_implementation = None
    with model.routing("auto"), model.scoring_routed_prefix(score_prefix) as prefix_score:
        first_out = base.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=phase1,
                                  streamer=first, **common)
    prefix = first_out.sequences if hold else first_out
    timing["routed_s"] = time.perf_counter() - start
    if n_return > 1:
        attention_mask = attention_mask.repeat_interleave(n_return, dim=0)
    generated = prefix.shape[1] - prompt_len
    remaining = total_new - generated
    pad_id = gen_config.pad_token_id
    if pad_id is None:
        pad_id = _first_eos(gen_config)

    alive = ~_finished_rows(prefix[:, prompt_len:], gen_config, pad_id)
    if generated < phase1.max_new_tokens:
        alive[:] = False  # generate stops short only once every row has stopped (EOS, stop_strings, max_time)
    if gen_config.stop_strings and model_kwargs.get("tokenizer") is not None:
        # A row that met a stop string on the last routed token is done, as base generate would have it.
        from transformers.generation.stopping_criteria import StopStringCriteria

        stop = StopStringCriteria(tokenizer=model_kwargs["tokenizer"], stop_strings=gen_config.stop_strings)
        alive &= ~stop(prefix, torch.zeros(prefix.shape[0], 1, device=prefix.device)).to(alive.device)
    if stopping_criteria:
        dummy_scores = torch.zeros(prefix.shape[0], 1, device=prefix.device)
        for criterion in stopping_criteria:
            alive &= ~torch.as_tensor(criterion(prefix, dummy_scores), device=prefix.device, dtype=torch.bool)
    held = policy.held_rows(pinned, prefix_score, prefix.shape[0]).to(alive.device)
    timing["held_rows"] = int((held & alive).sum())
    timing["held"] = held.tolist()  # per row: routing judged the prompt harmful (hold hand-off only)
    if remaining <= 0 or not bool(alive.any()):
        if streamer is not None:
            streamer.end()
        timing["total_s"] = timing["routed_s"]
        return prefix

    phase2 = copy.deepcopy(gen_config)
    phase2.max_new_tokens = remaining
    phase2.max_length = None
    phase2.num_return_sequences = 1
    phase2.min_new_tokens = max(0, (gen_config.min_new_tokens or 0) - generated) or None
    full_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], generated)], dim=1)
    second = _PhaseStreamer(streamer, skip_prompt=True, forward_end=True) if streamer is not None else None
    # Rows handed to the base model go first, so a benign row's latency is the fixed hand-off's even in a batch
    # that also holds rows; the held rows then continue on the routed cache (kept until they are done).
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    rows = (alive & ~held).nonzero(as_tuple=True)[0]
    if len(rows):
        # Phase 2: the plain base model continues from prompt + prefix (one prefill = the hand-off).
        start = time.perf_counter()
        with model.routing("off"):
            continued = base.generate(input_ids=prefix[rows], attention_mask=full_mask[rows], generation_config=phase2,
                                      streamer=second, **common)
        pieces.append((rows, continued))
        timing["base_s"] = time.perf_counter() - start
    held_rows = (held & alive).nonzero(as_tuple=True)[0]
    if len(held_rows):
        start = time.perf_counter()
        # The unwilling expert keeps the answer, on the routed cache: only the last prefix token is new to it.
        cache = _returned_cache(first_out)
        if len(held_rows) != prefix.shape[0]:
            cache.batch_select_indices(held_rows.to(prefix.device))
        held_config = copy.deepcopy(phase2)
        held_config.use_cache, held_config.cache_implementation = True, None  # it continues on that cache
        with model.routing("unwill"):
            kept = base.generate(input_ids=prefix[held_rows], attention_mask=full_mask[held_rows],
                                 generation_config=held_config, streamer=second, **{_CACHE_KWARG: cache}, **common)
        pieces.append((held_rows, kept))
        timing["held_s"] = time.perf_counter() - start
        del cache
    timing["total_s"] = timing["routed_s"] + timing.get("held_s", 0.0) + timing.get("base_s", 0.0)

    width = max(piece.shape[1] for _, piece in pieces)
    out = prefix.new_full((prefix.shape[0], width), pad_id)
    out[:, : prefix.shape[1]] = prefix
    for idx, piece in pieces:
        out[idx, : piece.shape[1]] = piece
    return out


def _checks_prompt(model, route_tokens, handoff, generation_config, kwargs) -> bool:
    """``token_benign="base"`` applies: token routers, routing on, the hold hand-off, one answer per prompt."""
    def option(name):
        return kwargs.get(name) or getattr(generation_config, name, None)

    # Beams and dict outputs go down the routed path, whose one-line errors then apply to every batch alike.
    return (model.config.token_benign == "base" and model.routing_strategy.per_layer_routers
            and model.routing_mode == "auto" and model.pinned_routing is None and handoff == "hold"
            and route_tokens is not None and (option("num_return_sequences") or 1) == 1
            and (option("num_beams") or 1) == 1 and not option("return_dict_in_generate"))


@torch.no_grad()
def prompt_margins(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] the token routers' mean u - g over the routed layers at each prompt's last position (left padding:
    the last column), from one forward pass with routing on; > 0 leans to the unwilling expert. Positions
    follow the mask, as in generate, so a row scores the same alone or padded in a batch."""
    from mogu.tuner.features import position_kwargs

    tracing = model.routing_trace_enabled
    model.enable_routing_trace(False)  # a scoring pass, not part of the answer's routing trace
    try:
        with model.routing("auto"), model.scoring_routed_prefix(True) as score:
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             **position_kwargs(model, attention_mask))
    finally:
        model.enable_routing_trace(tracing)
    return score.margin()


def _prompt_checked_generate(model, input_ids, attention_mask, *, route_tokens, generation_config, streamer,
                             stopping_criteria, logits_processor, **kwargs):
    """token_benign="base": the rows the routers lean benign on are the base model's answers, the others the
    routed prefix and the hold rule (routed_generate), each group in one call."""
    start = time.perf_counter()
    flagged = prompt_margins(model, input_ids, attention_mask) > 0
    check_s = time.perf_counter() - start
    base_rows, flagged_rows = (~flagged).nonzero(as_tuple=True)[0], flagged.nonzero(as_tuple=True)[0]
    common = dict(generation_config=generation_config, streamer=streamer, stopping_criteria=stopping_criteria,
                  logits_processor=logits_processor, **kwargs)
    pieces, timing = [], {}
    if len(flagged_rows):
        out = routed_generate(model, input_ids=input_ids[flagged_rows], attention_mask=attention_mask[flagged_rows],
                              route_tokens=route_tokens, handoff="hold", _prompt_checked=True, **common)
        timing = dict(model.last_generate_timing)
        pieces.append((flagged_rows, out))
    held = [False] * input_ids.shape[0]
    for row, h in zip(flagged_rows.tolist(), timing.get("held", [False] * len(flagged_rows))):
        held[row] = h
    if len(base_rows):
        start = time.perf_counter()
        with model.routing("off"):
            out = model.base_model.generate(input_ids=input_ids[base_rows], attention_mask=attention_mask[base_rows],
                                            **common)
        timing["base_s"] = timing.get("base_s", 0.0) + time.perf_counter() - start
        pieces.append((base_rows, out))
    gen_config = generation_config if generation_config is not None else model.base_model.generation_config
    pad_id = kwargs.get("pad_token_id", gen_config.pad_token_id)
    if pad_id is None:
        pad_id = _first_eos(gen_config)
    width = max(piece.shape[1] for _, piece in pieces)
    merged = input_ids.new_full((input_ids.shape[0], width), pad_id)
    for rows, piece in pieces:
        merged[rows, : piece.shape[1]] = piece
    timing.update(check_s=check_s, prompt_flagged=flagged.tolist(), held=held, held_rows=sum(held))
    timing["total_s"] = check_s + timing.get("routed_s", 0.0) + timing.get("held_s", 0.0) + timing.get("base_s", 0.0)
    model.last_generate_timing = timing
    return merged


def _single_pass(model, weights: torch.Tensor, gate_s: float, *, generation_config=None, **kwargs):
    """One routed ``generate`` with the gate's per-row (u, g, b) pinned: b = 1 rows are the base model bit for
    bit (layer.py), u = 1 rows the unwilling expert throughout."""
    base = model.base_model
    gen_config = copy.deepcopy(generation_config if generation_config is not None else base.generation_config)
    model_kwargs = gen_config.update(**kwargs)
    if gen_config.return_dict_in_generate:
        raise ConfigError("return_dict_in_generate is not supported with a routed prefix; use route_tokens=None")
    timing = model.last_generate_timing = {}
    start = time.perf_counter()
    with model.pin_routing(weights), model.routing("auto"):
        out = base.generate(generation_config=gen_config, **model_kwargs)
    held = (weights[:, 0] > weights[:, 1]).tolist()
    n_return = gen_config.num_return_sequences or 1
    held = [h for h in held for _ in range(n_return)]
    timing.update(routed_s=time.perf_counter() - start, gate_s=gate_s, held=held, held_rows=sum(held),
                  single_pass=True)
    timing["total_s"] = timing["routed_s"] + gate_s
    return out


def _samples(model, generation_config, kwargs) -> bool:
    """Whether this generate call samples (its kwargs, else the given or the base model's generation config)."""
    if "do_sample" in kwargs:
        return bool(kwargs["do_sample"])
    config = generation_config if generation_config is not None else model.base_model.generation_config
    return bool(getattr(config, "do_sample", False))


def _returned_cache(output):
    """The KV cache a ``return_dict_in_generate`` call hands back (``cache`` from transformers 5.x on), or None."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _cache_kwarg() -> str:
    from dataclasses import fields

    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in {f.name for f in fields(GenerateDecoderOnlyOutput)} else "past_key_values"


_CACHE_KWARG = _cache_kwarg()


def _finished_rows(new_tokens: torch.Tensor, gen_config, pad_id: int) -> torch.Tensor:
    """Rows that stopped during the routed phase: they hold an EOS (or trailing padding)."""
    eos = _eos_ids(gen_config)
    finished = torch.zeros(new_tokens.shape[0], dtype=torch.bool, device=new_tokens.device)
    for token in eos:
        finished |= (new_tokens == token).any(dim=1)
    if pad_id not in eos and new_tokens.shape[1] > 0:
        finished |= new_tokens[:, -1] == pad_id
    return finished
