"""Routing strategies: the one interface through which a MoGU model decides between its experts.

Two kinds of decision make up routing, and each has a registry:

- **who decides** (``ROUTING_STRATEGIES``, chosen by ``MoGUConfig.router_type``):
  ``TokenRouters``, the paper's per-layer, per-token routers inside each ``RoutedLinear``; and
  ``PromptGateRouting``, one decision per prompt from layer probes (``gate.py``), pinned for the
  whole routed prefix;
- **what happens after the routed prefix** (``HANDOFF_POLICIES``, chosen by ``MoGUConfig.handoff``):
  ``FixedHandoff``, the paper's hand-off of every answer to the base model; and ``HoldRefusal``,
  which keeps an answer that routing judged harmful with the unwilling expert to its end.

Model, generation, likelihood, training, calibration and serving ask the strategy (what to pin for
these prompts, which parameters it trains, how the operating point moves, what to save) instead of
testing which kind of router a model has.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from mogu.errors import ConfigError, MoGUError


class RoutingStrategy(ABC):
    """Who decides the expert weights of a MoGU model. Subclasses register in ``ROUTING_STRATEGIES``."""

    name: ClassVar[str]
    # One decision per prompt, pinned for its routed calls (True), or one per layer and token (False).
    decides_per_prompt: ClassVar[bool]
    # The router stage takes gradient steps (True) or fits the strategy in closed form (False).
    trains_by_gradient: ClassVar[bool]
    # Each routed layer carries its own router (RoutedLinear's ``router``), sized by ``router_hidden``.
    per_layer_routers: ClassVar[bool]
    # For the model card: "two LoRA experts ... and {description}".
    description: ClassVar[str]
    # The strategy's own module (registered on the model as ``model.gate``), or None.
    module: nn.Module | None = None

    def __init__(self, model):
        self.model = model

    @classmethod
    def card_setting(cls, config) -> str:
        """The model card's "router" row."""
        return cls.name

    def materialise(self) -> None:
        """Give the strategy's own meta-device tensors real, unfitted storage (``interop`` loading)."""

    # -- decisions ------------------------------------------------------------------------
    def decide(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per-sequence weights to pin for these prompts ([B, 2] or [B, 3]), or None: decided per token."""
        return None

    def require_ready(self) -> None:
        """Raise if the strategy would route nonsensically (e.g. never fitted)."""

    # -- parameters -----------------------------------------------------------------------
    @abstractmethod
    def parameters(self) -> list[nn.Parameter]:
        """The tensors the router stage trains or fits."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """What ``router.safetensors`` holds, by key."""

    @abstractmethod
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy ``sd`` (keys checked by the caller) into the strategy's tensors."""

    # -- the operating point --------------------------------------------------------------
    @abstractmethod
    def operating_point(self) -> Any:
        """A snapshot of what ``shift_toward_glad`` moves, for ``set_operating_point``."""

    @abstractmethod
    def set_operating_point(self, snapshot: Any, delta: float = 0.0) -> None:
        """Restore ``snapshot``, moved ``delta`` logits toward glad (> 0 refuses less)."""

    def shift_toward_glad(self, delta: float) -> None:
        """Move the operating point ``delta`` logits toward glad from where it is now."""
        if not math.isfinite(delta):
            raise ConfigError(f"router bias shift must be finite, got {delta}")
        self.set_operating_point(self.operating_point(), delta)


class TokenRouters(RoutingStrategy):
    """The paper's routers: every routed layer's own router weighs each token (layer.py)."""

    name = "token"
    decides_per_prompt = False
    trains_by_gradient = True
    per_layer_routers = True
    description = "a router per layer that weighs them per token"

    @classmethod
    def card_setting(cls, config) -> str:
        return f"{cls.name} (hidden size {config.router_hidden})"

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.model.routed_modules.values() for p in m.router.parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.router.{k}": v.detach().contiguous()
                for name, m in self.model.routed_modules.items() for k, v in m.router.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for name, m in self.model.routed_modules.items():
            for k, v in m.router.state_dict(keep_vars=True).items():
                v.copy_(sd[f"{name}.router.{k}"])

    def operating_point(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(m.router.unwill.linear_2.bias.detach().clone(), m.router.glad.linear_2.bias.detach().clone())
                for m in self.model.routed_modules.values()]

    @torch.no_grad()
    def set_operating_point(self, snapshot, delta: float = 0.0) -> None:
        # In-place updates bump the parameters' versions, which invalidates the fused inference weights.
        for m, (unwill0, glad0) in zip(self.model.routed_modules.values(), snapshot):
            m.router.unwill.linear_2.bias.copy_(unwill0 - delta)
            m.router.glad.linear_2.bias.copy_(glad0 + delta)


class PromptGateRouting(RoutingStrategy):
    """One decision per prompt (gate.py): the gate reads the conversation with routing off, and its
    (u, g) (or (u, g, b) with ``gate_benign="base"``) is pinned for every routed layer and token."""

    name = "prompt"
    decides_per_prompt = True
    trains_by_gradient = False
    per_layer_routers = False
    description = ("a prompt gate (every layer's probe votes at the prompt's last token) that sends each prompt "
                   "to one of them")

    def __init__(self, model):
        super().__init__(model)
        from mogu.tuner.features import probe_modules
        from mogu.tuner.families import projection_shape
        from mogu.tuner.gate import PromptGate
        from mogu.tuner.layer import RoutedLinear

        config = model.config
        # v1: every layer's target module votes, routed or not (the features are read with routing off).
        # v2: only the routed layers, the ones probe selection found most separable.
        modules = probe_modules(model.base_model, config.target_modules)
        if config.version == "v2" and config.routed_layers is not None:
            modules = {i: m for i, m in modules.items() if i in config.routed_layers}
        self.modules = modules
        first = next(iter(modules.values()))[1]
        if isinstance(first, RoutedLinear):
            in_features, device = first.in_features, first.base_layer.weight.device
        else:
            in_features, device = projection_shape(first)[0], first.weight.device
        self.gate = self.module = PromptGate(list(modules), in_features, device=device)

    def materialise(self) -> None:
        gate = self.gate
        if any(t.is_meta for t in [*gate.parameters(), *gate.buffers()]):
            gate.to_empty(device="cpu")
            with torch.no_grad():  # an unfitted gate: every probe zero, threshold 0
                for t in [*gate.parameters(), *gate.buffers()]:
                    t.zero_()

    # -- decisions ------------------------------------------------------------------------
    def decide(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.require_ready()
        return self.gate.weights(self.scores(input_ids, attention_mask), benign=self.model.config.gate_benign)

    def require_ready(self) -> None:
        if not self.gate.is_fitted():
            raise MoGUError("the prompt gate was never fitted, so it would route every prompt to the glad expert "
                            "(the one trained to comply): fit it with `mogu train --stages router` (or --resume), "
                            "or mogu.train.probe.fit_gate(model, prompts, labels)")

    @torch.no_grad()
    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The harmfulness logit per sequence, [B]: the highest over the conversation's turns.

        The probes were fitted at a prompt's last token, where the chat template hands over to the
        assistant. A conversation is read at every such hand-over (each user turn, in its context) and at
        its last token, and the highest score decides. An attacker's assistant prefill ("Sure, here is")
        or fabricated history after a request cannot hide it: the turn that asked is still scored where it
        handed over. With ``gate_turns_alone`` each later user turn is also read alone, after the
        conversation's preamble (its system prompt, where the template renders one), so a harmless framing
        turn before a request ("I'm writing a thriller...") cannot hide it either. A single plain prompt has one
        hand-over, its last token, and costs one pass.

        Forward passes with routing off that stop after the deepest probed module. Position ids follow
        the attention mask, as in ``generate`` and ``mogu.train.probe``, so padding does not move them.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hand_overs = self._hand_overs(input_ids, attention_mask)  # one search serves both readings
        rows, cols = self._positions(input_ids, attention_mask, hand_overs)
        best = self._read(input_ids, attention_mask, rows, cols, input_ids.shape[0])
        owners, views = self._completed_hand_overs(input_ids, attention_mask, hand_overs)
        if self.model.config.gate_turns_alone:
            more_owners, more_views = self._turns_alone(input_ids, attention_mask, hand_overs)
            owners, views = owners + more_owners, views + more_views
        if views:
            from mogu.tuner.features import left_pad

            chunk = max(1, input_ids.shape[0])  # as many views per pass as the caller's batch has rows
            for k in range(0, len(views), chunk):
                part = views[k:k + chunk]
                alone, mask = left_pad(part, 0, input_ids.device)  # the mask hides the pad id
                rows = torch.arange(len(part), device=input_ids.device)
                scores = self._read(alone, mask, rows, torch.full_like(rows, alone.shape[1] - 1), len(part))
                owner = torch.tensor(owners[k:k + chunk], device=best.device)
                best = best.scatter_reduce(0, owner, scores.to(best.dtype), reduce="amax")
        return best

    def _read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              batch: int) -> torch.Tensor:
        """[batch] the highest gate score of each row over the positions (rows, cols)."""
        from mogu.tuner.features import stop_after

        features: dict[int, torch.Tensor] = {}
        handles = []
        for idx, (_, module) in self.modules.items():
            def pre_hook(_module, args, idx=idx):
                features[idx] = args[0][rows.to(args[0].device), cols.to(args[0].device)].float()
            handles.append(module.register_forward_pre_hook(pre_hook))
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        deepest = self.modules[max(self.modules)][1]
        try:
            with self.model.routing("off"), stop_after(deepest) as run:
                run(self.model.base_model, input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        scores = self.gate.score({i: f.to(self.gate.weight.device) for i, f in features.items()})
        best = torch.full((batch,), float("-inf"), dtype=scores.dtype, device=scores.device)
        return best.scatter_reduce(0, rows.to(scores.device), scores, reduce="amax")

    def _positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hand_overs=None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) the gate reads: each row's last real token and every end of an assistant header."""
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(dim=1)  # last 1 per row
        rows = [torch.arange(input_ids.shape[0], device=input_ids.device)]
        cols = [last]
        r, end, _ = hand_overs if hand_overs is not None else self._hand_overs(input_ids, attention_mask)
        rows.append(r)
        cols.append(end)
        return torch.cat(rows), torch.cat(cols)

    def _hand_overs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """(rows, end columns, missing tail) of every assistant hand-over in the real tokens.

        A header that ends in whitespace (Llama-3's ``<|end_header_id|>\n\n``) can tokenize differently when
        a reply follows it: a byte-level BPE with GPT-2's split rule cuts ``\n\nSure`` into ``\n``, ``\n``,
        ``Sure``. A plain last token can merge with a reply's first character (Mistral v0.1's ``]`` and ``,``
        into ``],``). Where the whole header is not found, its head is (without the trailing whitespace, or
        without the plain last token where the next token starts with its text): the gate reads there, and
        reads the conversation up to there with the missing tail back (``_completed_hand_overs``), as a turn
        read alone gets it: the template's own rendering."""
        empty = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        header = self._assistant_header()
        if not header:
            return empty, empty, []
        rows, ends = _find(input_ids, attention_mask, header)
        tokenizer = self.model.tokenizer
        decode, width = tokenizer.decode, input_ids.shape[1]
        found = set(zip(rows.tolist(), ends.tolist()))
        extra: list[tuple[int, int, tuple[int, ...]]] = []
        # (head, does the token after the head carry the rest of the header merged into the reply?)
        heads = []
        head = _without_trailing_space(tokenizer, header)
        if head != header:  # whitespace tail: the next token starts with whitespace
            heads.append((head, lambda text: text[:1].isspace()))
        last = decode([header[-1]])
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        if len(header) > 1 and header[-1] not in special and last.strip():
            # A plain last token (Mistral v0.1's "]"): "]" and a reply's "," can merge into "],".
            heads.append((header[:-1], lambda text, last=last: len(text) > len(last) and text.startswith(last)))
        for head, merged in heads:
            skip = len(header) - len(head)
            h_rows, h_ends = _find(input_ids, attention_mask, head)
            # Only where the next token holds the rest merged with the reply; anything else after the head
            # (user text that happens to hold it) is no hand-over.
            extra += [(r, e, tuple(header[len(head):])) for r, e in zip(h_rows.tolist(), h_ends.tolist())
                      if (r, e + skip) not in found and e + 1 < width and merged(decode([int(input_ids[r, e + 1])]))]
        if not extra:
            return rows, ends, [[] for _ in range(len(rows))]
        every = sorted({(r, e, ()) for r, e in zip(rows.tolist(), ends.tolist())} | set(extra))  # conversation order
        rows = torch.tensor([r for r, _, _ in every], dtype=torch.long, device=input_ids.device)
        ends = torch.tensor([e for _, e, _ in every], dtype=torch.long, device=input_ids.device)
        return rows, ends, [list(t) for _, _, t in every]

    def _completed_hand_overs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hand_overs
                              ) -> tuple[list[int], list[list[int]]]:
        """(owner row, token ids) of the conversation up to each hand-over whose header merged into the reply,
        with the header's missing tail back: the prompt as the template renders it, read at its last token."""
        first = attention_mask.long().argmax(dim=1).tolist()  # first real token per row (left padding)
        owners, views = [], []
        for r, e, tail in zip(hand_overs[0].tolist(), hand_overs[1].tolist(), hand_overs[2]):
            if tail:
                owners.append(r)
                views.append(input_ids[r, first[r]:e + 1].tolist() + list(tail))
        return owners, views

    def _turns_alone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hand_overs=None
                     ) -> tuple[list[int], list[list[int]]]:
        """(owner row, token ids) of each later user turn read alone: the row's preamble (everything before
        its first user turn) + that turn + the assistant header after it. Empty without a chat template the
        split can be derived for (``user_turn_opening_ids``) or when no row has a second user turn."""
        header, opening = self._assistant_header(), self._user_opening()
        if not header or not opening:
            return [], []
        h_rows, h_ends, tails = hand_overs if hand_overs is not None else self._hand_overs(input_ids, attention_mask)
        o_rows, o_ends = _find(input_ids, attention_mask, opening)
        if not len(h_rows) or not len(o_rows):
            return [], []
        first = attention_mask.long().argmax(dim=1).tolist()  # first real token per row (left padding)
        openings: dict[int, list[int]] = {}
        for r, e in zip(o_rows.tolist(), o_ends.tolist()):
            openings.setdefault(r, []).append(e - len(opening) + 1)
        owners, views = [], []
        tokens: dict[int, list[int]] = {}
        for r, h, tail in zip(h_rows.tolist(), h_ends.tolist(), tails):
            starts = [s for s in openings.get(r, []) if s < h]
            if len(starts) < 2:  # the first user turn: its in-context reading is already the alone one
                continue
            row = tokens.setdefault(r, input_ids[r].tolist())
            owners.append(r)
            views.append(row[first[r]:starts[0]] + row[starts[-1]:h + 1] + tail)
        return owners, views

    def _user_opening(self) -> list[int] | None:
        if not hasattr(self, "_opening_ids"):
            self._opening_ids = user_turn_opening_ids(self.model.tokenizer)
        return self._opening_ids

    def _assistant_header(self) -> list[int] | None:
        """The token ids the chat template adds to hand a turn to the assistant (None without a template)."""
        if not hasattr(self, "_header_ids"):
            self._header_ids = assistant_header_ids(self.model.tokenizer)
        return self._header_ids

    # -- parameters -----------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return list(self.gate.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:  # weight, bias and the calibrated threshold
        return {f"gate.{k}": v.detach().contiguous() for k, v in self.gate.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in self.gate.state_dict(keep_vars=True).items():
            v.copy_(sd[f"gate.{k}"])

    # -- the operating point: the threshold (toward glad = up, fewer prompts flagged) ------
    def operating_point(self) -> torch.Tensor:
        return self.gate.threshold.detach().clone()

    @torch.no_grad()
    def set_operating_point(self, snapshot, delta: float = 0.0) -> None:
        self.gate.threshold.copy_(torch.as_tensor(snapshot, dtype=self.gate.threshold.dtype) + delta)


ROUTING_STRATEGIES: dict[str, type[RoutingStrategy]] = {s.name: s for s in (TokenRouters, PromptGateRouting)}


def strategy_class(router_type: str) -> type[RoutingStrategy]:
    """The registered strategy for a ``MoGUConfig.router_type``."""
    try:
        return ROUTING_STRATEGIES[router_type]
    except KeyError:
        raise ConfigError(f"router_type must be one of {tuple(ROUTING_STRATEGIES)}, got {router_type!r}") from None


def make_strategy(model) -> RoutingStrategy:
    """The registered strategy for ``model.config.router_type``, bound to ``model``."""
    return strategy_class(model.config.router_type)(model)


# -- after the routed prefix ------------------------------------------------------------------
class HandoffPolicy(ABC):
    """What follows the routed prefix. Subclasses register in ``HANDOFF_POLICIES``."""

    name: ClassVar[str]
    # Token routers sum each step's (u - g) while the prefix is generated (layer.PrefixScore).
    scores_prefix: ClassVar[bool]

    @abstractmethod
    def held_rows(self, pinned: torch.Tensor | None, prefix_score, batch: int) -> torch.Tensor:
        """[batch] bool: the rows that stay with the unwilling expert instead of handing off."""


class FixedHandoff(HandoffPolicy):
    """The paper's: every answer goes to the base model after the routed prefix."""

    name = "fixed"
    scores_prefix = False

    def held_rows(self, pinned, prefix_score, batch: int) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.bool)


class HoldRefusal(HandoffPolicy):
    """A row that routing judged harmful stays with the unwilling expert to the end of its answer:
    the gate's pinned decision (u > g), or for token routers the routed prefix's mean u > mean g."""

    name = "hold"
    scores_prefix = True

    def held_rows(self, pinned, prefix_score, batch: int) -> torch.Tensor:
        if pinned is not None:
            weights = pinned.repeat_interleave(batch // pinned.shape[0], dim=0) if pinned.shape[0] != batch else pinned
            return weights[:, 0] > weights[:, 1]
        return prefix_score.margin() > 0


HANDOFF_POLICIES: dict[str, HandoffPolicy] = {p.name: p for p in (HoldRefusal(), FixedHandoff())}


def handoff_policy(name: str) -> HandoffPolicy:
    try:
        return HANDOFF_POLICIES[name]
    except KeyError:
        raise ConfigError(f"handoff must be one of {tuple(HANDOFF_POLICIES)}, got {name!r}") from None


def _find(input_ids: torch.Tensor, attention_mask: torch.Tensor, pattern: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, end columns) of every occurrence of the token sequence ``pattern`` in the real tokens."""
    if input_ids.shape[1] < len(pattern):
        empty = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        return empty, empty
    target = torch.tensor(pattern, device=input_ids.device)
    windows = input_ids.unfold(1, len(pattern), 1)  # [B, T - L + 1, L]
    hits = (windows == target).all(-1) & attention_mask[:, len(pattern) - 1:].bool()
    r, start = hits.nonzero(as_tuple=True)
    return r, start + len(pattern) - 1


def _render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _without_trailing_space(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` without its trailing plain whitespace tokens (at least one token kept): the part of a template's
    marker that tokenizes the same whatever text follows it."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = list(ids)
    while len(ids) > 1 and ids[-1] not in special and not tokenizer.decode([ids[-1]]).strip():
        ids = ids[:-1]
    return ids


def user_turn_opening_ids(tokenizer) -> list[int] | None:
    """The token ids that open a later user turn (ChatML's ``<|im_end|>\\n<|im_start|>user\\n``, the end of
    the turn before included), or None where cutting a conversation at them does not give the template's own
    rendering of its last turn asked alone: then the gate reads turns in context only.

    Derived, not hard-coded: from single-turn renderings (their common head is the preamble and the opening)
    and a three-turn one (the opening is what that head shares with the text before the last turn), then
    checked on conversations: preamble + the last turn must equal that turn rendered alone."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    # Contents that start differently (case, a digit, a lone letter, a non-ASCII one), so that no token the
    # tokenizer could merge with a turn's first characters ends up in the opening; earlier replies that end
    # differently, so that none of their text does either (a system prompt and a reply both ending in "."
    # would otherwise put the "." in it).
    contents = ["Alpha request.", "zulu request", "now explain it", "I am here", "1. one", "¿Qué pasa?", "a",
                "\nA new line first."]
    replies = ["Okay.", "sure thing", "Happy to help!", "1"]
    try:
        singles = [_render_ids(tokenizer, [{"role": "user", "content": c}]) for c in contents]
        threes = [_render_ids(tokenizer, [{"role": "user", "content": "Zulu request."},
                                          {"role": "assistant", "content": r},
                                          {"role": "user", "content": contents[0]}]) for r in replies]
        checks = [(_render_ids(tokenizer, [{"role": "user", "content": "First question here."},
                                           {"role": "assistant", "content": replies[k % len(replies)]},
                                           {"role": "user", "content": c}]), single)
                  for k, (c, single) in enumerate(zip(contents, singles))]
    except Exception:  # jinja's TemplateError (e.g. strict role alternation) and the like
        return None
    head = 0
    while head < min(map(len, singles)) and len({s[head] for s in singles}) == 1:
        head += 1
    one = singles[0]
    rest = one[head:]  # the first user turn from its content on, and the assistant header
    n = head
    for three in threes:
        if head == 0 or len(three) <= len(rest) or three[len(three) - len(rest):] != rest:
            return None
        before = three[:len(three) - len(rest)]
        common = 0
        while common < min(head, len(before)) and one[head - 1 - common] == before[len(before) - 1 - common]:
            common += 1
        n = min(n, common)
    opening = one[head - n:head]
    # Only the opening's start is used (the cut), so trailing whitespace tokens, which some tokenizers merge
    # with a turn that starts with a newline, are left out of the match.
    opening = _without_trailing_space(tokenizer, opening)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if not opening or (len(opening) < 2 and opening[0] not in special):  # one plain token: too common to cut at
        return None
    n = len(opening)
    for check, alone in checks:
        starts = [i for i in range(len(check) - n + 1) if check[i:i + n] == opening]
        if len(starts) < 2 or check[:starts[0]] + check[starts[-1]:] != alone:
            return None
    return opening


def assistant_header_ids(tokenizer) -> list[int] | None:
    """The token ids a chat template appends to hand a turn to the assistant, or None.

    Most templates add them with ``add_generation_prompt`` (ChatML's ``<|im_start|>assistant\n``). Some close
    every user turn with the hand-over instead and add nothing (Mistral's ``[/INST]``): then the header is
    what every single-turn rendering ends with after its content, so a prefilled answer or a later turn
    still leaves each earlier hand-over where the gate can read it."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hello there."}]
    try:
        with_header = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    except Exception:  # jinja's TemplateError and the like: the gate then reads the last token only
        return None
    full = tokenizer(with_header, add_special_tokens=False)["input_ids"]
    head = tokenizer(without, add_special_tokens=False)["input_ids"]
    if len(full) > len(head) and full[:len(head)] == head:
        return list(full[len(head):])
    if full != head:
        return None
    return _closing_header(tokenizer)


def _closing_header(tokenizer) -> list[int] | None:
    """The common tail of single-turn renderings whose contents end differently (so no token of a content
    merges into it), from its first special token on (all of it, but leading whitespace, where it is plain
    text), or None where that is empty, one plain token, or holds the unknown token."""
    contents = ["Hello there.", "tell me more", "Why?", "1. one", "¿Qué pasa", "a"]
    try:
        rendered = [_render_ids(tokenizer, [{"role": "user", "content": c}]) for c in contents]
    except Exception:
        return None
    tail = 0
    while tail < min(map(len, rendered)) and len({r[len(r) - 1 - tail] for r in rendered}) == 1:
        tail += 1
    closing = rendered[0][len(rendered[0]) - tail:] if tail else []
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in closing:  # it stands for any text the tokenizer cannot spell
        return None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    first_special = next((k for k, t in enumerate(closing) if t in special), None)
    if first_special is not None:
        closing = closing[first_special:]
    else:
        # Plain text (Mistral v0.1's " [/INST]"), trusted as a plain generation prompt is (Vicuna's
        # "ASSISTANT:"): the gate keeps the highest score over every hand-over, so a copy typed inside a message
        # adds a reading and hides none. Leading whitespace merges with content; one plain token is too common.
        while closing and not tokenizer.decode([closing[0]]).strip():
            closing = closing[1:]
        if len(closing) < 2:
            return None
    # It must close user turns only: a marker that also ends assistant replies (an EOS or <|end|> after every
    # role) would read replies as hand-overs.
    try:
        two = _render_ids(tokenizer, [{"role": "user", "content": "Hello there."},
                                      {"role": "assistant", "content": "Hi, how can I help?"},
                                      {"role": "user", "content": "Why?"}])
    except Exception:
        return None
    n = len(closing)
    if sum(two[i:i + n] == closing for i in range(len(two) - n + 1)) != 2:
        return None
    return closing
