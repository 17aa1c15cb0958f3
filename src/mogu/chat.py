"""Chat-template rendering and tokenisation: the one place every layer renders a prompt.

A tokenizer without a chat template falls back to plain ``User:`` / ``Assistant:`` turns.
"""

from __future__ import annotations

from typing import Sequence


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
