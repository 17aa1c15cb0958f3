"""Chat-template rendering and tokenisation: the one place every layer renders a prompt.

A tokenizer without a chat template falls back to plain ``User:`` / ``Assistant:`` turns.
"""

from __future__ import annotations

from typing import Sequence


def context_length(model) -> int | None:
    """The longest sequence a plain Hugging Face model's position embeddings allow, read from its config
    (or its ``text_config``), or None when the config does not say."""
    config = model.config
    for c in (config, getattr(config, "text_config", None)):
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(c, attr, None) if c is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def render_prompt(tokenizer, prompt: "str | Sequence[dict]", system: str | None = None) -> str:
    """The chat-template rendering of one user turn (or of a conversation ending in one), ready for the
    assistant's answer."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    messages = ([{"role": "system", "content": system}] if system else []) + turns
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "


def encode_pair(tokenizer, prompt: str, response: str, max_response_tokens: int,
                append_eos: bool = True) -> tuple[list[int], int]:
    """(token ids of prompt+response, number of response tokens); EOS closes untruncated responses
    (unless ``append_eos`` is False)."""
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if len(response_ids) >= max_response_tokens:
        response_ids = response_ids[:max_response_tokens]
    elif append_eos and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, len(response_ids)


# -- thinking traces (reasoning models) ----------------------------------------------------------
def parse_thinking_markers(spec: str) -> tuple[str, str]:
    """``"OPEN,CLOSE"`` (e.g. ``"<think>,</think>"``) as a pair; a one-line error otherwise."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        from mogu.errors import ConfigError

        raise ConfigError(f"thinking markers are 'OPEN,CLOSE' (two different, non-empty strings), got {spec!r}")
    return parts[0], parts[1]


def thinking_markers(tokenizer) -> tuple[str, str] | None:
    """The (open, close) markers a reasoning model's chat template puts around its thinking trace, read
    from the tokenizer, or None for a model that does not think.

    Two readings, no names assumed: (1) a template with an ``enable_thinking`` switch (Qwen3-style)
    renders an empty trace, ``OPEN CLOSE``, when thinking is off; (2) a template that opens the trace
    in the generation prompt (DeepSeek-R1-style) ends the prompt with an added token ``<X>`` whose closing
    ``</X>`` is an added token too."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    messages = [{"role": "user", "content": "Hello there."}]

    def render(**kw) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
        except Exception:  # jinja's TemplateError and the like
            return None

    off, on = render(enable_thinking=False), render(enable_thinking=True)
    if off and on and off != on and off.startswith(on):
        block = off[len(on):].split()
        if len(block) == 2 and block[0] != block[1]:
            return block[0], block[1]
    try:
        added = set(tokenizer.get_added_vocab())
    except Exception:
        added = set()
    prompt = render() or ""
    for token in added:
        if token.startswith("<") and not token.startswith("</") and token.endswith(">"):
            closing = "</" + token[1:]
            if closing in added and prompt.rstrip().endswith(token):
                return token, closing
    return None


def split_thinking(text: str, markers: tuple[str, str] | None) -> tuple[str, str]:
    """(trace, answer) of a generated text. The open marker may sit in the prompt (DeepSeek-R1-style), so
    the close marker ends the trace; a text that opens a trace and never closes it is all trace (thinking
    cut off). A text with neither marker, or no markers given, is all answer: judged whole, as an answer,
    which errs toward counting deliberation as compliance rather than missing one."""
    if not markers:
        return "", text
    open_, close = markers
    head, sep, tail = text.partition(close)
    if not sep:
        if open_ not in text:
            return "", text.strip()
        head, tail = text, ""
    start = head.find(open_)
    trace = head[start + len(open_):] if start >= 0 else head
    return trace.strip(), tail.strip()
