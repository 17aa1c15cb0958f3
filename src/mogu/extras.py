"""Optional dependencies, grouped as pip extras (``pip install 'mogu[serve]'``).

The core (``mogu.tuner``, training, calibration, the offline judges) needs none of them. A feature
that does calls ``require_extra`` first, so a missing package is one line that names the extra to
install, not an ImportError from deep inside a run.
"""

from __future__ import annotations

import importlib.util

from mogu.errors import MoGUError

# extra -> the import names it provides (pyproject.toml's [project.optional-dependencies] install them)
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "pydantic", "openai"),
    "eval": ("sacrebleu", "openai"),
    "plots": ("matplotlib",),
    "gguf": ("gguf",),
    "quant": ("bitsandbytes",),
    "zero3": ("deepspeed",),
}

# What each extra is for, in the error message.
PURPOSE: dict[str, str] = {
    "serve": "the OpenAI-compatible server and `mogu chat --url`",
    "eval": "`mogu eval` (chrF agreement, the openai judge)",
    "plots": "the Pareto, routing and probe plots",
    "gguf": "loading GGUF models, the embedded SmolLM2 default among them",
    "quant": "4-bit and 8-bit backbones (`--load-in-4bit`, `--load-in-8bit`)",
    "zero3": "a backbone partitioned with DeepSpeed ZeRO-3 (`--shard-backbone zero3`, deepspeed_zero3.yaml)",
}


class MissingExtraError(MoGUError, ImportError):
    """An optional dependency is not installed."""


def missing_modules(extra: str, *modules: str) -> list[str]:
    """The import names of ``extra`` (or just ``modules`` of it) that cannot be imported."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    names = modules or EXTRAS[extra]
    out = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken package
            found = False
        if not found:
            out.append(name)
    return out


def has_extra(extra: str, *modules: str) -> bool:
    return not missing_modules(extra, *modules)


def require_extra(extra: str, *modules: str) -> None:
    """Raise ``MissingExtraError`` (one line, naming the extra) unless ``extra``'s packages import."""
    missing = missing_modules(extra, *modules)
    if missing:
        raise MissingExtraError(f"{PURPOSE[extra]} needs the '{extra}' extra ({', '.join(missing)} missing): "
                                f"pip install 'mogu[{extra}]'")
