"""Forward passes that stop early: feature collection needs a module's input, not the logits.

The router probes (router_init.py) and the layer probes (probe.py) read the inputs of routed
modules. Everything after the last of those modules (the remaining layers, the final norm and the
LM head, about a fifth of SmolLM2's forward FLOPs because of its 49k vocabulary) is wasted work, so
a forward hook on that module ends the pass.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch
from torch import nn

from mogu.errors import ConfigError
from mogu.tuner.families import candidate_targets, is_projection, layer_index, matches_target
from mogu.tuner.layer import RoutedLinear


class _StopForward(Exception):
    """Raised by a hook once the last module of interest has run; never escapes ``stop_after``."""


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[Callable[..., None]]:
    """Yield ``run(model, **inputs)``: a forward pass that ends right after ``module`` has run.

    Pre-hooks on ``module`` and on earlier modules still fire, so they capture what they need first.
    """
    def hook(_module, _args, _output):
        raise _StopForward

    handle = module.register_forward_hook(hook)

    def run(model: nn.Module, **inputs) -> None:
        try:
            model(**inputs)
        except _StopForward:
            pass

    try:
        yield run
    finally:
        handle.remove()


def position_kwargs(model, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``position_ids`` that follow the attention mask, as ``generate`` computes them for left-padded rows.

    Without them a family with absolute positions (GPT-2) trains a padded row at other positions than it
    generates at: the same row's loss was 4.8110 alone and 4.8476 in a padded batch. Rotary families were
    already exact (a shift of every position leaves their attention unchanged); a family whose forward
    takes no position ids (BLOOM's ALiBi) gets none."""
    forward = model.base_model.forward if hasattr(model, "base_model") else model.forward
    if "position_ids" not in inspect.signature(forward).parameters:
        return {}
    return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}


def probe_modules(base: torch.nn.Module, targets: list[str]) -> dict[int, tuple[str, torch.nn.Module]]:
    """{layer index: (name, module)} of the target projection (or the RoutedLinear now in its place)."""
    found: dict[int, tuple[str, torch.nn.Module]] = {}
    for name, module in base.named_modules():
        if not matches_target(name, targets):
            continue
        if not (is_projection(module) or isinstance(module, RoutedLinear)):
            continue
        idx = layer_index(name)
        if idx is None:
            continue
        if idx in found:
            raise ConfigError(f"target_modules {targets} match more than one module in layer {idx} "
                              f"({found[idx][0]}, {name}); the probe needs exactly one per layer")
        found[idx] = (name, module)
    if not found:
        raise ConfigError(f"no projection matches target_modules {targets}; candidates: "
                          f"{', '.join(candidate_targets(base)) or 'none'}")
    return dict(sorted(found.items()))


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id rows padded on the left, as ``generate`` pads a batch."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return input_ids.to(device), mask.to(device)
