"""Loading a model for inference: a MoGU checkpoint folder or a plain base model."""

from __future__ import annotations

from pathlib import Path

from mogu.tuner.config import CONFIG_NAME, GATE_BENIGN, HANDOFFS
from mogu.errors import ConfigError
from mogu.tuner.loading import load_base_model
from mogu.tuner.model import MoGUModel


def load_for_inference(name_or_path: str, *, dtype=None, device: str | None = None, handoff: str | None = None,
                       gate_benign: str | None = None):
    """(model, tokenizer, is_mogu). A folder with mogu_config.json loads as MoGU; anything else as a base.

    ``handoff`` ("hold" or "fixed") and ``gate_benign`` ("glad" or "base") override the checkpoint's policies
    for this session."""
    if handoff is not None and handoff not in HANDOFFS:
        raise ConfigError(f"--handoff must be one of {', '.join(HANDOFFS)}, got {handoff!r}")
    if gate_benign is not None and gate_benign not in GATE_BENIGN:
        raise ConfigError(f"--gate-benign must be one of {', '.join(GATE_BENIGN)}, got {gate_benign!r}")
    if (Path(name_or_path) / CONFIG_NAME).is_file():
        model = MoGUModel.from_pretrained(name_or_path, dtype=dtype, device=device)
        if handoff is not None:
            model.config.handoff = handoff
        if gate_benign is not None:
            model.config.gate_benign = gate_benign
        return model, model.tokenizer, True
    model, tokenizer = load_base_model(name_or_path, dtype=dtype, device=device)
    return model, tokenizer, False


class PlainGenerator:
    """Gives a plain HF model the small interface generate_responses uses."""

    def __init__(self, model):
        self.model = model
        self.training = model.training

    def eval(self):
        self.model.eval()

    def train(self, mode=True):
        self.model.train(mode)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def routing(self, mode):
        import contextlib

        return contextlib.nullcontext()

    def generate(self, *args, route_tokens=None, **kwargs):
        return self.model.generate(*args, **kwargs)
