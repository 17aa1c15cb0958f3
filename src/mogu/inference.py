"""Loading a model for inference: a MoGU checkpoint folder or a plain base model."""

from __future__ import annotations

from pathlib import Path

from .config import CONFIG_NAME
from .loading import load_base_model
from .model import MoGUModel


def load_for_inference(name_or_path: str, *, dtype=None, device: str | None = None):
    """(model, tokenizer, is_mogu). A folder with mogu_config.json loads as MoGU; anything else as a base."""
    if (Path(name_or_path) / CONFIG_NAME).is_file():
        model = MoGUModel.from_pretrained(name_or_path, dtype=dtype, device=device)
        return model, model.tokenizer, True
    model, tokenizer = load_base_model(name_or_path, dtype=dtype, device=device)
    return model, tokenizer, False
