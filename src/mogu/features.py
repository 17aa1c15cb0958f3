"""Forward passes that stop early: feature collection needs a module's input, not the logits.

The router probes (router_init.py) and the layer probes (probe.py) read the inputs of routed
modules. Everything after the last of those modules (the remaining layers, the final norm and the
LM head, about a fifth of SmolLM2's forward FLOPs because of its 49k vocabulary) is wasted work, so
a forward hook on that module ends the pass.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn


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
