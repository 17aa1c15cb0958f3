"""Operating point: shift every router toward the glad (or unwilling) expert by one scalar chosen on dev prompts.

Each router is a classifier, and where it draws the line between "refuse" and "answer" is a choice,
like a classifier's threshold. ``shift_router_bias(model, delta)`` adds ``delta`` to every glad
scorer's logit and subtracts it from every unwilling scorer's logit (u falls, g rises for delta > 0).
It is folded into each scorer's output bias, so the v1 layer formula and the checkpoint format stay
unchanged and a calibrated checkpoint loads anywhere a trained one does.

``calibrate`` picks ``delta`` from a grid by one documented rule (``RULE``), scoring each point by
refusal rates (greedy, keyword judge) on harmful and benign dev prompts. Report results on prompts
other than the ones calibrated on: the chosen point is tuned to those.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from mogu.errors import ConfigError

CALIBRATION_FILE = "calibration.json"
DEFAULT_GRID = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_MIN_HARMFUL = 0.95  # issue 18: the whole-answer target is >= 95 % harmful refusal
# Bisection steps between the last grid point that keeps min_harmful and the next one that misses it:
# on SmolLM2 harmful refusal fell 94 % -> 88 % between +0 and +0.25, and +0.125 kept 92 % with 4 points
# fewer benign refusals (docs/RESULTS.md). Each step costs one harmful pass (plus a benign one if it passes).
DEFAULT_REFINE = 2
RULE = ("among the scored points (grid and bisection) whose harmful-dev refusal is >= min_harmful, the one with the lowest benign-dev "
        "refusal (ties: higher harmful refusal, then the smaller |shift|, then the lower shift); if none reaches min_harmful, the point "
        "with the highest harmful refusal")


FULL_ROUTING_JUDGED_TOKENS = 16  # judged tokens when a model routes every token (no routed prefix to stop at)


def judged_tokens(config, max_new_tokens: int | None = None) -> int:
    """Tokens to generate per dev prompt: ``max_new_tokens``, else the routed prefix (``route_tokens``).

    The shift changes only the routed tokens; the base model writes the rest. On SmolLM2 judging the
    5 routed tokens gave the same refusal rates as 16 and 64 tokens (docs/RESULTS.md) at half the cost
    of 16, because generating past the prefix also pays the base model's hand-off prefill.
    """
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return max_new_tokens
    route = getattr(config, "route_tokens", None)
    return route if route else FULL_ROUTING_JUDGED_TOKENS


def shift_router_bias(model, delta: float) -> None:
    """Move the routing strategy's operating point ``delta`` logits toward glad: every routed layer's
    scorers (u's logit - delta, g's logit + delta), or a prompt gate's threshold (fewer prompts flagged)."""
    model.routing_strategy.shift_toward_glad(delta)


def gate_rate_functions(model, prompts_by_set: dict[str, list[str]],
                        refusals: Callable[[list[str], str], list[bool]], *, batch_size: int = 32
                        ) -> dict[str, Callable[[], float]]:
    """Refusal-rate functions of a prompt-gated model that read its current threshold, without generating.

    The gate sends a whole prompt to one expert (gate.py), so a prompt's routed answer depends only on
    which side of the threshold its score falls. ``refusals(prompts, expert)`` generates every prompt
    once with that expert (routed prefix, as in calibration) and judges it; each threshold's rate then
    follows exactly from the scores. Two generation passes per set replace two per calibration point.
    """
    import torch

    from mogu.train.probe import collect_layer_features

    if not model.routing_strategy.decides_per_prompt:
        raise ConfigError("gate_rate_functions needs a strategy that decides once per prompt (router_type='prompt')")
    gate = model.gate
    rates = {}
    for name, prompts in prompts_by_set.items():
        feats = collect_layer_features(model, model.tokenizer, prompts, batch_size=batch_size)
        with torch.no_grad():
            scores = gate.score({i: feats[i]["last"].to(gate.weight.device) for i in gate.layers})
        unwill = torch.tensor(refusals(prompts, "unwill"), dtype=torch.float64)
        glad = torch.tensor(refusals(prompts, "glad"), dtype=torch.float64)

        def rate(scores=scores, unwill=unwill, glad=glad) -> float:
            flagged = (scores > gate.threshold).cpu()  # the comparison PromptGate.weights makes
            return float(torch.where(flagged, unwill, glad).mean())

        rates[name] = rate
    return rates


def generated_rate_functions(model, tokenizer, prompts_by_set: dict[str, list[str]], *, max_new_tokens: int,
                             batch_size: int = 32, log: Callable[[str], None] | None = None
                             ) -> dict[str, Callable[[], float]]:
    """Token routers: each call generates every prompt of the set at the current operating point
    (greedy, ``max_new_tokens``) and returns its keyword-judged refusal rate."""
    from mogu.train.stages import generate_responses, refusal_rate

    def rate_of(name: str, prompts: list[str]) -> Callable[[], float]:
        return lambda: refusal_rate(generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                       batch_size=batch_size, progress=True, desc=f"{name} dev"))

    return {name: rate_of(name, prompts) for name, prompts in prompts_by_set.items()}


def gate_generated_rate_functions(model, tokenizer, prompts_by_set: dict[str, list[str]], *, max_new_tokens: int,
                                  batch_size: int = 32, log: Callable[[str], None] | None = None
                                  ) -> dict[str, Callable[[], float]]:
    """A prompt gate: each prompt is generated once per expert (pinned), and every threshold's rates
    follow from the gate's scores (``gate_rate_functions``)."""
    import torch

    from mogu.train.stages import generate_responses
    from mogu.verdicts import is_refusal

    def refusals(ps: list[str], expert: str) -> list[bool]:
        if model.config.gate_benign == "base":  # a passed prompt is the base model's alone
            weights = torch.tensor([[1.0, 0.0, 0.0] if expert == "unwill" else [0.0, 0.0, 1.0]])
        else:
            weights = torch.tensor([[1.0, 0.0] if expert == "unwill" else [0.0, 1.0]])
        with model.pin_routing(weights):  # one row: repeated for every row of each batch
            out = generate_responses(model, tokenizer, ps, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     progress=True, desc=f"{expert} expert")
        return [is_refusal(o) for o in out]

    if log:
        log("[calibrate] prompt gate: each dev prompt is generated once per expert; every threshold's "
            "refusal rates follow from the gate's scores")
    return gate_rate_functions(model, prompts_by_set, refusals, batch_size=batch_size)


# How each routing strategy (mogu.tuner.routing.ROUTING_STRATEGIES) scores a calibration point.
RATE_FUNCTIONS: dict[str, Callable[..., dict[str, Callable[[], float]]]] = {
    "token": generated_rate_functions, "prompt": gate_generated_rate_functions}


def rate_functions(model, tokenizer, prompts_by_set: dict[str, list[str]], **kwargs) -> dict[str, Callable[[], float]]:
    """The refusal-rate functions ``calibrate`` scores points with, for the model's routing strategy."""
    name = model.routing_strategy.name
    if name not in RATE_FUNCTIONS:
        raise ConfigError(f"no calibration rates for routing strategy {name!r}; known: {', '.join(RATE_FUNCTIONS)}")
    return RATE_FUNCTIONS[name](model, tokenizer, prompts_by_set, **kwargs)


@dataclass
class CalibrationPoint:
    glad_bias: float
    harmful_refusal: float
    benign_refusal: float | None  # None: not scored (a search skipped it, see ``calibrate``)


@dataclass
class CalibrationResult:
    chosen: float
    reason: str
    min_harmful: float
    points: list[CalibrationPoint] = field(default_factory=list)
    rule: str = RULE
    search: str = "monotone"
    refine: int = 0
    max_new_tokens: int | None = None
    num_harmful: int = 0
    num_benign: int = 0
    wall_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = ["| glad bias | harmful refusal | benign refusal |", "|---:|---:|---:|"]
        for p in sorted(self.points, key=lambda p: p.glad_bias):
            mark = " **(chosen)**" if p.glad_bias == self.chosen else ""
            benign = "-" if p.benign_refusal is None else f"{p.benign_refusal:.1%}"
            lines.append(f"| {p.glad_bias:+g}{mark} | {p.harmful_refusal:.1%} | {benign} |")
        return "\n".join(lines)


def validate_grid(grid) -> list[float]:
    values = sorted({float(v) for v in grid})
    if not values:
        raise ConfigError("the calibration grid is empty")
    bad = [v for v in values if not math.isfinite(v) or abs(v) > 20]
    if bad:
        raise ConfigError(f"calibration grid values must be finite and within [-20, 20], got {bad}")
    return values


def choose_operating_point(points: list[CalibrationPoint], min_harmful: float) -> tuple[float, str]:
    """Apply ``RULE`` to scored points; returns (glad_bias, why)."""
    if not points:
        raise ConfigError("no calibration points to choose from")
    passing = [p for p in points if p.harmful_refusal >= min_harmful and p.benign_refusal is not None]
    if passing:
        best = min(passing, key=lambda p: (p.benign_refusal, -p.harmful_refusal, abs(p.glad_bias), p.glad_bias))
        return best.glad_bias, (f"lowest benign refusal ({best.benign_refusal:.1%}) among the {len(passing)} "
                                f"point(s) refusing >= {min_harmful:.0%} of harmful dev prompts")
    best = max(points, key=lambda p: (p.harmful_refusal, -(p.benign_refusal or 0.0), -abs(p.glad_bias), -p.glad_bias))
    return best.glad_bias, (f"no point refuses >= {min_harmful:.0%} of harmful dev prompts; kept the highest "
                            f"harmful refusal ({best.harmful_refusal:.1%})")


def calibrate(model, score_harmful: Callable[[], float], score_benign: Callable[[], float], *,
              grid=DEFAULT_GRID, min_harmful: float = DEFAULT_MIN_HARMFUL, exhaustive: bool = False,
              refine: int = DEFAULT_REFINE, log: Callable[[str], None] | None = None) -> CalibrationResult:
    """Score grid points, choose one by ``RULE`` and leave ``model`` shifted to it.

    ``score_harmful`` / ``score_benign`` return the refusal rate of the model as it currently is.
    The default search assumes refusal falls as the shift grows (it does: the shift only moves weight
    from the unwilling to the glad expert) and so scores few points: it walks up from the grid point
    nearest 0 while harmful refusal stays >= ``min_harmful``, or down until it gets there, and scores the
    benign side only where the harmful side passes. ``exhaustive=True`` scores every point on both sides.
    Then ``refine`` bisection steps split the gap between the largest passing shift and the scored
    point just above it that misses (the grid is coarse where refusal falls fast); ``RULE`` chooses
    among every point scored.
    """
    values = validate_grid(grid)
    if not 0.0 <= min_harmful <= 1.0:
        raise ConfigError(f"min_harmful must be in [0, 1], got {min_harmful}")
    if not isinstance(refine, int) or not 0 <= refine <= 10:
        raise ConfigError(f"refine must be an integer in [0, 10], got {refine!r}")
    # Each point is set from the original biases, not by accumulating shifts, so that the chosen
    # point is exactly ``original + delta`` and a failure restores the original bit for bit.
    strategy = model.routing_strategy
    original = strategy.operating_point()

    def set_shift(delta: float) -> None:
        strategy.set_operating_point(original, delta)

    points: dict[float, CalibrationPoint] = {}

    def score(delta: float, benign: bool) -> CalibrationPoint:
        set_shift(delta)
        harmful = score_harmful()
        point = CalibrationPoint(delta, round(harmful, 4),
                                 round(score_benign(), 4) if benign or harmful >= min_harmful else None)
        points[delta] = point
        if log:
            benign_txt = "-" if point.benign_refusal is None else f"{point.benign_refusal:.1%}"
            log(f"[calibrate] glad bias {delta:+g}: harmful refusal {harmful:.1%}, benign refusal {benign_txt}")
        return point

    try:
        if exhaustive:
            for delta in values:
                score(delta, benign=True)
        else:
            start = min(range(len(values)), key=lambda i: (abs(values[i]), values[i]))
            if score(values[start], benign=False).harmful_refusal >= min_harmful:
                for delta in values[start + 1:]:  # more glad: stop at the first point that misses harmful
                    if score(delta, benign=False).harmful_refusal < min_harmful:
                        break
            else:
                for delta in reversed(values[:start]):  # more unwilling: stop at the first point that passes
                    if score(delta, benign=False).harmful_refusal >= min_harmful:
                        break
        for _ in range(refine):
            scored = sorted(points.values(), key=lambda p: p.glad_bias)
            passing = [p.glad_bias for p in scored if p.harmful_refusal >= min_harmful]
            above = [p.glad_bias for p in scored if passing and p.glad_bias > max(passing)]
            if not above:
                break  # nothing passes, or the largest shift passes: no boundary to refine
            score((max(passing) + min(above)) / 2, benign=exhaustive)
        ordered = sorted(points.values(), key=lambda p: p.glad_bias)
        chosen, reason = choose_operating_point(ordered, min_harmful)
    except BaseException:
        set_shift(0.0)  # leave the model as it came in
        raise
    set_shift(chosen)
    return CalibrationResult(chosen=chosen, reason=reason, min_harmful=min_harmful, points=ordered,
                             search="exhaustive" if exhaustive else "monotone", refine=refine)
