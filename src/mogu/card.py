"""The generated model card (README.md) of a MoGU checkpoint."""

from __future__ import annotations


def model_card(model, extra: str | None = None) -> str:
    config = model.config
    base = config.base_model_name_or_path or "unknown"
    layers = "all" if config.routed_layers is None else ", ".join(map(str, config.routed_layers))
    header = ["---", "library_name: mogu", "tags:", "- mogu", "- safety", "- lora", "- peft"]
    if base != "unknown" and "/" in base and not base.startswith(("/", ".")):
        header.append(f"base_model: {base}")
    header.append("---")
    body = f"""
# MoGU model on `{base}`

A [MoGU](https://arxiv.org/abs/2405.14488) safety wrapper made with `mogu`: two LoRA experts
(glad: answers; unwill: refuses) on `{', '.join(config.target_modules or [])}` and a router that
weighs them per token.

| setting | value |
|---|---|
| version | {config.version} |
| routed layers | {layers} |
| LoRA r / alpha / dropout | {config.r} / {config.lora_alpha} / {config.lora_dropout} |
| router hidden size | {config.router_hidden} |
| routed generated tokens (m) | {config.route_tokens if config.route_tokens is not None else 'all'} |
| added parameters | {model.num_added_parameters():,} |

## Use

```python
from mogu import MoGUModel
model = MoGUModel.from_pretrained("path/to/this/folder")
```

`glad/` and `unwill/` are standard PEFT LoRA adapters (`PeftModel.from_pretrained(base, "glad")`).
"""
    return "\n".join(header) + "\n" + body + (f"\n{extra}\n" if extra else "")
