"""The checkpoint format: file names, the config reader, and exact, checked state-dict loading."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mogu.tuner.config import CONFIG_NAME, MoGUConfig, read_json_object
from mogu.errors import CheckpointMismatchError, MoGUError


ROUTER_FILE = "router.safetensors"


ADAPTER_FILE = "adapter_model.safetensors"


_META_KEYS = ("mogu_version", "format_version")


FORMAT_VERSION = 1


CHECKPOINT_KIND = "checkpoint"  # the marker kind of a save_pretrained folder (mogu.io)


def read_config(directory: Path) -> MoGUConfig:
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise MoGUError(f"{directory}: no such checkpoint folder")
    if not path.is_file():
        raise CheckpointMismatchError(f"{directory}: not a MoGU checkpoint ({CONFIG_NAME} is missing)")
    data = read_json_object(path, CheckpointMismatchError)
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{path}: checkpoint format_version {version!r}; this mogu reads format_version "
                                      f"{FORMAT_VERSION} (upgrade mogu to load it)")
    for key in _META_KEYS:
        data.pop(key, None)
    return MoGUConfig.from_dict(data)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointMismatchError(f"{path}: unreadable safetensors file ({e})") from None


def check_keys(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shapes = [f"{k} {tuple(got[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in got and got[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {_short(missing)}")
    if extra:
        problems.append(f"unexpected {_short(extra)}")
    if shapes:
        problems.append(f"wrong shape {_short(shapes)}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the model: " + "; ".join(problems))


def _short(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
