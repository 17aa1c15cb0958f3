"""Typed, validated configuration for a MoGU model."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mogu.errors import ConfigError

CONFIG_NAME = "mogu_config.json"
VERSIONS = ("v1", "v2")
# Router width d -> h -> d -> 1 per version when not given. The scorer is affine before its sigmoid,
# so h changes parameter count and optimisation, never what a scorer can express; v2's default
# is the ablation's choice (docs/RESULTS.md, "MoGU v2").
DEFAULT_ROUTER_HIDDEN = {"v1": 512, "v2": 16}
# "token": the paper's routers, per layer and per token. "prompt": one decision per prompt from the
# layers' probes (gate.py): every layer's for v1, the routed (probe-selected) layers' for v2; the
# experts and the layer formula stay v1's.
ROUTER_TYPES = ("token", "prompt")
# What v2's router stage trains beside the routers (mogu.tuner.backbone).
ROUTER_BACKBONES = ("experts", "lora", "o_proj")
# After the routed prefix: "hold" keeps a prompt that routing judged harmful with the unwilling expert to
# the end of the answer; "fixed" hands every answer to the base model (the paper's). mogu.tuner.generation.
HANDOFFS = ("hold", "fixed")
# A prompt gate's benign decision: "base" (the default) lets the base model answer alone, so a passed prompt's
# answer is the base model's token for token; "glad" routes its prefix through the glad expert (MoGU's
# design), which on SmolLM2 turned 20 % of benign answers into counting loops against the base model's 2 %
# (docs/RESULTS.md, "Benign answers"). Token routers ignore it.
GATE_BENIGN = ("glad", "base")
# Token routers' counterpart, with the hold hand-off: "routed" (the paper's: every prompt gets the routed
# prefix) or "base": the routers first score the prompt (their mean u - g over the routed layers at its last
# token, the position that picks the first answer token); a prompt they lean benign on is answered by the base
# model alone, and the others get the routed prefix and the hold rule. mogu.tuner.generation. On SmolLM2 it
# raised held-out over-refusal (22 % -> 31 % of Just-Eval 101-200 at 95 % harmful dev; docs/RESULTS.md, "v2's
# router stage with backbone modules"), so the default is the paper's.
TOKEN_BENIGN = ("routed", "base")



def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _is_int(value) -> bool:
    """An integer, not a bool (``True`` is an int to Python, and would pass as r=1 or a layer index 1)."""
    return isinstance(value, int) and not isinstance(value, bool)

@dataclass
class MoGUConfig:
    """What to wrap and how big the added parts are.

    ``target_modules=None`` picks the family default (``o_proj`` for Llama-like
    models, ``self_attention.dense`` for Falcon, ``attn.c_proj`` for GPT-2).
    ``routed_layers=None`` routes every decoder layer. ``route_tokens`` is how
    many generated tokens the routed model picks before the hand-off (None routes
    every token). ``handoff="hold"`` keeps an answer that routing judged harmful with
    the unwilling expert to its end; ``"fixed"`` hands every answer to the base model.
    ``gate_benign`` (prompt gate only): what answers a prompt the gate passes, the glad expert's
    prefix (``"glad"``) or the base model alone (``"base"``).

    ``version="v2"`` (MoGU v2) changes defaults, not the layer formula: a lighter
    router (``router_hidden`` defaults to ``DEFAULT_ROUTER_HIDDEN["v2"]``), routers and
    experts only in ``routed_layers`` (``mogu train --version v2`` picks them with
    ``mogu probe``), and a router stage that trains the experts jointly.

    ``router_type="prompt"`` replaces the per-layer, per-token routers with one prompt-level gate
    (``mogu.tuner.gate``): layer probes vote at the prompt's last token and the whole routed prefix goes to
    one expert. It is fitted, not trained, and has no ``router_hidden``. A v1 gate reads every layer;
    a v2 gate reads only ``routed_layers`` (v2's "routers only where the features separate"), so a
    v2 gated model adds experts and probes in the selected layers alone.
    """

    version: str = "v1"
    target_modules: list[str] | None = None
    routed_layers: list[int] | None = None
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    router_hidden: int | None = None  # None: DEFAULT_ROUTER_HIDDEN[version]
    route_tokens: int | None = 5
    router_type: str = "token"
    # v2's router stage: which backbone modules it trains beside the routers (tuner/backbone.py): "experts"
    # (none beyond the joint stage's experts), "lora" (a fresh LoRA on the routed layers' other projections)
    # or "o_proj" (the routed layers' output projections unfrozen).
    router_backbone: str = "experts"
    handoff: str = "hold"
    gate_benign: str = "base"
    # Prompt gate only: besides each user turn in its context, the gate reads each later user turn alone (under
    # the same system preamble) and the highest score decides, so an earlier framing turn cannot hide a request
    # (docs/RESULTS.md, "Each user turn alone"). False: in context only, as checkpoints before it were read.
    gate_turns_alone: bool = True
    token_benign: str = "routed"  # token routers only: TOKEN_BENIGN
    # Sampling settings apply to the routed prefix too (True), or the prefix is always greedy (False: the
    # authors' code decodes the routed tokens greedily whatever the sampling; the `faithful` preset).
    routed_sampling: bool = True
    # Filled in by MoGUModel.from_base so a checkpoint knows what it belongs to.
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_model_type: str | None = None
    base_hidden_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def validate(self) -> None:
        if self.version not in VERSIONS:
            raise ConfigError(f"version must be one of {VERSIONS}, got {self.version!r}")
        if self.router_type not in ROUTER_TYPES:
            raise ConfigError(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        if self.router_backbone not in ROUTER_BACKBONES:
            raise ConfigError(f"router_backbone must be one of {', '.join(ROUTER_BACKBONES)}, "
                              f"got {self.router_backbone!r}")
        if self.router_backbone != "experts" and self.router_type != "token":
            raise ConfigError(f"router_backbone={self.router_backbone!r} trains backbone modules with the token "
                              "routers' gradient; a prompt gate is fitted, not trained (docs/RESULTS.md)")
        if self.handoff not in HANDOFFS:
            raise ConfigError(f"handoff must be one of {HANDOFFS}, got {self.handoff!r}")
        if self.gate_benign not in GATE_BENIGN:
            raise ConfigError(f"gate_benign must be one of {GATE_BENIGN}, got {self.gate_benign!r}")
        if not isinstance(self.gate_turns_alone, bool):
            raise ConfigError(f"gate_turns_alone must be true or false, got {self.gate_turns_alone!r}")
        if self.token_benign not in TOKEN_BENIGN:
            raise ConfigError(f"token_benign must be one of {TOKEN_BENIGN}, got {self.token_benign!r}")
        if not isinstance(self.routed_sampling, bool):
            raise ConfigError(f"routed_sampling must be true or false, got {self.routed_sampling!r}")
        if self.router_hidden is None:
            self.router_hidden = DEFAULT_ROUTER_HIDDEN[self.version]
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None:
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ConfigError("target_modules must be a non-empty list of module-name suffixes")
        if self.routed_layers is not None:
            if not self.routed_layers or not all(_is_int(i) and i >= 0 for i in self.routed_layers):
                raise ConfigError("routed_layers must be a non-empty list of layer indices >= 0, or None")
            self.routed_layers = sorted(set(self.routed_layers))
        if not _is_int(self.r) or not 1 <= self.r <= 1024:
            raise ConfigError(f"r must be an integer in [1, 1024], got {self.r!r}")
        if _is_bool(self.lora_alpha) or not isinstance(self.lora_alpha, (int, float)) or not (
                math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if _is_bool(self.lora_dropout) or not isinstance(self.lora_dropout, (int, float)) or not (
                0.0 <= self.lora_dropout < 1.0):
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not _is_int(self.router_hidden) or not 1 <= self.router_hidden <= 65536:
            raise ConfigError(f"router_hidden must be an integer in [1, 65536], got {self.router_hidden!r}")
        if self.route_tokens is not None and (not _is_int(self.route_tokens) or self.route_tokens < 1):
            raise ConfigError(f"route_tokens must be an integer >= 1 or None, got {self.route_tokens!r}")
        for name in ("base_model_name_or_path", "base_model_revision", "base_model_type"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string or None, got {getattr(self, name)!r}")
        if self.base_hidden_size is not None and (not _is_int(self.base_hidden_size) or self.base_hidden_size < 1):
            raise ConfigError(f"base_hidden_size must be an integer >= 1 or None, got {self.base_hidden_size!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a mapping, got {self.extra!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoGUConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MoGUConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "MoGUConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        return cls.from_dict(read_json_object(path))


def read_json_object(path: Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A JSON object from ``path``; malformed files raise ``error`` naming the line."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
