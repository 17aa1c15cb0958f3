"""Loading a model for inference: a MoGU checkpoint folder or a plain base model."""

from __future__ import annotations

from pathlib import Path

from mogu.tuner.config import CONFIG_NAME, GATE_BENIGN, HANDOFFS
from mogu.errors import ConfigError
from mogu.tuner.loading import load_base_model
from mogu.tuner.model import MoGUModel


def load_for_inference(name_or_path: str, *, dtype=None, device: str | None = None, handoff: str | None = None,
                       gate_benign: str | None = None, quantization: str | None = None):
    """(model, tokenizer, is_mogu). A folder with mogu_config.json loads as MoGU; anything else as a base.

    ``handoff`` ("hold" or "fixed") and ``gate_benign`` ("glad" or "base") override the checkpoint's policies
    for this session."""
    if handoff is not None and handoff not in HANDOFFS:
        raise ConfigError(f"--handoff must be one of {', '.join(HANDOFFS)}, got {handoff!r}")
    if gate_benign is not None and gate_benign not in GATE_BENIGN:
        raise ConfigError(f"--gate-benign must be one of {', '.join(GATE_BENIGN)}, got {gate_benign!r}")
    if (Path(name_or_path) / CONFIG_NAME).is_file():
        model = MoGUModel.from_pretrained(name_or_path, dtype=dtype, device=device, quantization=quantization)
        if handoff is not None:
            model.config.handoff = handoff
        if gate_benign is not None:
            model.config.gate_benign = gate_benign
        return model, model.tokenizer, True
    model, tokenizer = load_base_model(name_or_path, dtype=dtype, device=device, quantization=quantization)
    return model, tokenizer, False


def load_tokenizer_for(name_or_path: str):
    """The tokenizer :func:`load_for_inference` would return, without loading any weights: a MoGU
    checkpoint's is its base model's (at the recorded revision)."""
    from mogu.tuner.checkpoint import read_config
    from mogu.tuner.loading import load_tokenizer

    if (Path(name_or_path) / CONFIG_NAME).is_file():
        config = read_config(Path(name_or_path))
        if not config.base_model_name_or_path:
            raise ConfigError(f"{name_or_path}: the config names no base model, so it has no tokenizer to read")
        return load_tokenizer(config.base_model_name_or_path, revision=config.base_model_revision)
    return load_tokenizer(name_or_path)


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


def sampling_kwargs(tokenizer, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """``generate`` keyword arguments: greedy for ``temperature`` 0, else nucleus sampling."""
    kw = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def generate_answers(model, tokenizer, prompts: list[str], *, is_mogu: bool, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, route_tokens: int | None = None,
                     mode: str = "auto", trace: bool = False) -> tuple[list[str], dict]:
    """(answers, {layer: (mean u, mean g)}): one left-padded batch through the chat template.

    MoGU models route with ``mode``; ``route_tokens`` overrides the routed prefix (0 routes every token);
    ``trace`` returns the mean router weights per layer (empty otherwise)."""
    from mogu.chat import render_prompt

    texts = [render_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = sampling_kwargs(tokenizer, max_new_tokens, temperature, top_p)
    if is_mogu:
        model.set_routing(mode)
        if route_tokens is not None:
            if route_tokens < 0:
                raise ConfigError(f"--route-tokens must be >= 0 (0 routes every token), got {route_tokens}")
            kw["route_tokens"] = route_tokens or None
        model.enable_routing_trace(trace)
    out = model.generate(**enc.to(model.device), **kw)
    n = enc["input_ids"].shape[1]
    answers = [tokenizer.decode(row[n:], skip_special_tokens=True).strip() for row in out]
    weights = {}
    if is_mogu and trace:
        weights = {layer: (float(t[..., 0].mean()), float(t[..., 1].mean())) for layer, t in model.routing_trace().items()}
    return answers, weights


class ChatSession:
    """A multi-turn conversation with a local model: the history, rendered by the chat template each turn."""

    def __init__(self, model, tokenizer, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.kwargs = sampling_kwargs(tokenizer, max_new_tokens, temperature, top_p)
        self.reset()

    def reset(self) -> None:
        self.history: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, *, streamer=None) -> str:
        """The model's answer to one user turn (streamed to ``streamer`` as it is generated)."""
        from mogu.chat import render_prompt

        self.history.append({"role": "user", "content": text})
        enc = self.tokenizer(render_prompt(self.tokenizer, self.history), return_tensors="pt",
                             add_special_tokens=False).to(self.model.device)
        out = self.model.generate(**enc, streamer=streamer, **self.kwargs)
        answer = self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer
