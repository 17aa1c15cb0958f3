"""Interoperability: the authors' released checkpoints, PEFT adapters, and the Hugging Face Hub.

- ``convert_reference`` reads the MoGU authors' release (reference v1): two PEFT LoRA folders
  (``resp_glad/<step>_lora``, ``resp_unwill/<step>_lora``) and a ``torch.save``d router state dict
  (``model.routers.{i}`` / ``transformer.routers.{i}``; scorer ``alpha_`` weighs the unwilling
  expert, ``beta_`` the glad one; LoRA scaling fixed at 2) and writes a mogu checkpoint whose
  logits are the reference model's.
- ``convert_peft`` imports any two PEFT LoRA adapters as the glad / unwill experts of a new
  MoGU model with fresh routers.
- ``export_experts`` writes the experts as standard PEFT adapter folders.
- ``push_to_hub`` uploads a checkpoint folder with ``huggingface_hub``.

Every input is validated before anything is written: on any error ``out`` is left untouched.
``.pth`` files are read only with ``torch.load(..., weights_only=True)``; a file that needs
arbitrary unpickling is refused, never executed.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mogu.tuner.config import CONFIG_NAME, MoGUConfig
from mogu.errors import CheckpointMismatchError, ConfigError, MoGUError, first_line
from mogu.tuner.families import family_for, is_projection, layer_index, matches_target, projection_shape, \
    resolve_target_modules
from mogu.io import atomic_directory, check_replaceable, sha256_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
REFERENCE_SCALING = 2.0  # the reference modules hard-code ``self.scaling = torch.tensor(2)``
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_ROUTER_KEY = re.compile(r"^(?P<prefix>.*?)routers\.(?P<layer>\d+)\.(?P<scorer>alpha_|beta_)\."
                         r"(?P<param>linear_0\.weight|linear_1\.weight|linear_1\.bias|linear_2\.weight|linear_2\.bias)$")
ROUTER_PARAMS = ("linear_0.weight", "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")
# Reference scorer -> mogu router role: alpha_ weighs lora_0 (resp_unwill), beta_ weighs lora_1 (resp_glad).
SCORER_ROLES = {"alpha_": "unwill", "beta_": "glad"}
_UNSAFE_HINT = ("mogu never unpickles arbitrary objects; re-save the tensors with safetensors "
                "(or torch.save of a plain state dict) in an environment you trust")


class ReferenceFormatError(CheckpointMismatchError):
    """A file in the authors' released layout is missing, unreadable, or has missing / extra / misshapen keys."""


class UnsafeCheckpointError(CheckpointMismatchError):
    """A ``.pth`` file would need arbitrary unpickling (``torch.load(weights_only=True)`` refused it)."""


class AdapterMismatchError(MoGUError):
    """Two adapters do not fit each other, the base model, or the requested MoGU config."""


class UnsupportedAdapterError(AdapterMismatchError):
    """A PEFT adapter uses a feature mogu's experts cannot represent (DoRA, biases, extra modules...)."""


# -- reading files -----------------------------------------------------------------------------

def safe_torch_load(path: str | Path, error: type[MoGUError] = ReferenceFormatError) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with one-line errors.

    Anything the restricted unpickler rejects (code, unknown classes, not a pickle at all)
    raises ``UnsafeCheckpointError``; nothing in the file is executed.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        text = str(e)
        if "weights only" in text.lower() or "weights_only" in text or "WeightsUnpickler" in text:
            raise UnsafeCheckpointError(
                f"{path}: refused: not a plain tensor file ({_weights_only_reason(text)}); {_UNSAFE_HINT}") from None
        raise error(f"{path}: unreadable .pth file ({first_line(e)})") from None


def _weights_only_reason(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error:")
    useful = [ln for ln in lines if not ln.startswith(skip)]
    reason = useful[0] if useful else "torch.load(weights_only=True) rejected it"
    return reason[:200]


def _load_tensor_file(path: Path, error: type[MoGUError]) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors or a (weights-only) .pth / .bin / .pt file."""
    if not path.is_file():
        raise error(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors has its own error types
            raise error(f"{path}: unreadable safetensors file ({first_line(e)})") from None
    obj = safe_torch_load(path, error)
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):  # a {"state_dict": {...}} wrapper
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a state dict of tensors, found a {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise error(f"{path}: expected a state dict of tensors; not tensors: {_short(bad)}")
    return obj


# -- PEFT adapters -----------------------------------------------------------------------------

@dataclass
class _Adapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, dict[str, torch.Tensor]]  # module name -> {"A": [r, in], "B": [out, r]}
    r: int
    lora_alpha: float
    lora_dropout: float

    @property
    def layers(self) -> list[int]:
        return sorted({layer_index(n) for n in self.modules})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{_PEFT_PREFIX}{name}.lora_{part}.weight": t
                for name, parts in self.modules.items() for part, t in parts.items()}


def find_adapter_dir(path: str | Path, role: str = "adapter") -> Path:
    """``path`` if it is a PEFT folder, else its only ``*_lora``-style sub-folder holding one."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterMismatchError(f"{role} adapter {path}: no such folder")
    if (path / ADAPTER_CONFIG).is_file():
        return path
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file())
    if len(subs) == 1:
        return subs[0]
    if subs:
        raise AdapterMismatchError(f"{role} adapter {path} holds several adapters; pick one: "
                                   + ", ".join(str(s) for s in subs))
    raise AdapterMismatchError(f"{role} adapter {path}: not a PEFT adapter folder ({ADAPTER_CONFIG} is missing)")


def read_adapter(path: str | Path, role: str = "adapter") -> _Adapter:
    """Read and validate a plain PEFT LoRA adapter (one projection per layer, no extras)."""
    path = find_adapter_dir(path, role)
    where = f"{role} adapter {path}"
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterMismatchError(f"{where}: malformed {ADAPTER_CONFIG} at line {e.lineno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise AdapterMismatchError(f"{where}: {ADAPTER_CONFIG} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"{where}: a {peft_type} adapter; mogu's experts are LoRA adapters")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterMismatchError(f"{where}: {ADAPTER_CONFIG} needs an integer r >= 1 and lora_alpha > 0 "
                                   f"(got r={r!r}, lora_alpha={alpha!r})")
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (use_dora=true)")
    if config.get("bias", "none") not in (None, "none"):
        problems.append(f"trained biases (bias={config['bias']!r})")
    if config.get("lora_bias"):
        problems.append("LoRA biases (lora_bias=true)")
    if config.get("modules_to_save"):
        problems.append(f"fully trained extra modules (modules_to_save={config['modules_to_save']})")
    if config.get("use_rslora"):
        problems.append("rank-stabilised scaling (use_rslora=true)")
    for key in ("layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens"):
        if config.get(key):
            problems.append(f"{key}={config[key]!r}")
    if any(v != r for v in (config.get("rank_pattern") or {}).values()):
        problems.append(f"per-module ranks (rank_pattern={config['rank_pattern']})")
    if any(v != alpha for v in (config.get("alpha_pattern") or {}).values()):
        problems.append(f"per-module lora_alpha (alpha_pattern={config['alpha_pattern']})")
    if problems:
        raise UnsupportedAdapterError(f"{where}: mogu cannot represent {'; '.join(problems)}. Its experts are "
                                      "plain LoRA (A, B) pairs on one projection per layer")
    weights = next((path / f for f in ADAPTER_WEIGHTS if (path / f).is_file()), None)
    if weights is None:
        raise AdapterMismatchError(f"{where}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    sd = _load_tensor_file(weights, AdapterMismatchError)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, tensor in sd.items():
        m = _LORA_KEY.match(key)
        if m is None:
            unsupported.append(key)
            continue
        modules.setdefault(m.group("module"), {})[m.group("part")] = tensor
    if unsupported:
        raise UnsupportedAdapterError(f"{weights}: tensors mogu cannot represent (it imports plain LoRA A/B "
                                      f"weights only): {_short(sorted(unsupported))}")
    if not modules:
        raise AdapterMismatchError(f"{weights}: no LoRA weights")
    bad = []
    for name, parts in sorted(modules.items()):
        for part in ("A", "B"):
            if part not in parts:
                bad.append(f"missing {_PEFT_PREFIX}{name}.lora_{part}.weight")
        a, b = parts.get("A"), parts.get("B")
        if a is not None and (a.dim() != 2 or a.shape[0] != r):
            bad.append(f"{_PEFT_PREFIX}{name}.lora_A.weight {tuple(a.shape)} is not [r={r}, in]")
        if b is not None and (b.dim() != 2 or b.shape[1] != r):
            bad.append(f"{_PEFT_PREFIX}{name}.lora_B.weight {tuple(b.shape)} is not [out, r={r}]")
        for part, t in parts.items():
            if not torch.is_floating_point(t):
                bad.append(f"{_PEFT_PREFIX}{name}.lora_{part}.weight has dtype {t.dtype}")
    if bad:
        raise AdapterMismatchError(f"{weights}: {_short(bad, 6)}")
    by_layer: dict[int, list[str]] = {}
    for name in modules:
        idx = layer_index(name)
        if idx is None:
            raise AdapterMismatchError(f"{where}: {name} is not inside a numbered decoder layer; "
                                       "mogu routes one projection per layer")
        by_layer.setdefault(idx, []).append(name)
    crowded = {i: names for i, names in by_layer.items() if len(names) > 1}
    if crowded:
        i, names = min(crowded.items())
        raise UnsupportedAdapterError(
            f"{where}: targets {len(names)} modules in layer {i} ({', '.join(_suffix(n) for n in sorted(names))}); "
            "mogu routes exactly one projection per layer (the attention output projection)")
    dropout = config.get("lora_dropout", 0.0)
    return _Adapter(path, config, modules, r, float(alpha), float(dropout) if isinstance(dropout, (int, float)) else 0.0)


def _suffix(name: str) -> str:
    """The part of a module name after its layer index: ``model.layers.3.self_attn.o_proj`` -> ``self_attn.o_proj``."""
    m = re.search(r"\.\d+\.(.+)$", name)
    return m.group(1) if m else name


def _check_pair(glad: _Adapter, unwill: _Adapter) -> None:
    where = f"adapters {glad.path} (glad) and {unwill.path} (unwill)"
    if glad.r != unwill.r:
        raise AdapterMismatchError(f"{where} have different ranks: r={glad.r} vs r={unwill.r}; "
                                   "mogu's experts share one r")
    if glad.lora_alpha != unwill.lora_alpha:
        raise AdapterMismatchError(f"{where} have different lora_alpha: {glad.lora_alpha:g} vs {unwill.lora_alpha:g}; "
                                   "mogu's experts share one scaling")
    if set(glad.modules) != set(unwill.modules):
        only_g = sorted(set(glad.modules) - set(unwill.modules))
        only_u = sorted(set(unwill.modules) - set(glad.modules))
        parts = ([f"only in glad: {_short(only_g)}"] if only_g else []) + \
                ([f"only in unwill: {_short(only_u)}"] if only_u else [])
        raise AdapterMismatchError(f"{where} target different modules ({'; '.join(parts)})")
    shapes = [f"{n}: glad A {tuple(glad.modules[n]['A'].shape)} / B {tuple(glad.modules[n]['B'].shape)} vs unwill "
              f"A {tuple(unwill.modules[n]['A'].shape)} / B {tuple(unwill.modules[n]['B'].shape)}"
              for n in sorted(glad.modules)
              if any(glad.modules[n][p].shape != unwill.modules[n][p].shape for p in ("A", "B"))]
    if shapes:
        raise AdapterMismatchError(f"{where} have different shapes: {_short(shapes, 2)}")


# -- base models -------------------------------------------------------------------------------

def _skeleton(name: str, revision: str | None) -> nn.Module:
    """The base model's architecture with its weights on the meta device (no weights are read).

    A conversion only needs module names and shapes; the added parameters are materialised
    on the CPU in float32, so converting a 7B release needs no GPU and little memory.
    """
    from transformers import AutoConfig

    from mogu.tuner.loading import resolve_model_path

    path = resolve_model_path(name)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).exists()
    if looks_local and not Path(path).exists():
        raise MoGUError(f"{name}: no such model folder")
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise MoGUError(f"{name}: not a model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError, KeyError) as e:
        raise MoGUError(f"could not load the config of model {name!r}: {first_line(e)}") from None
    return _skeleton_from_config(config, name)


def _skeleton_from_config(config, name: str | None) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError) as e:
        raise MoGUError(f"could not build model {name or config.model_type!r} from its config: {first_line(e)}") \
            from None
    model.config._name_or_path = name or ""
    model.eval()
    return model


def _base_module(base: nn.Module | str | Path, revision: str | None) -> tuple[nn.Module, str | None]:
    """A meta-device skeleton of ``base``; a model object is never modified (only its config is used)."""
    if isinstance(base, (str, Path)):
        return _skeleton(str(base), revision), str(base)
    if isinstance(base, nn.Module):
        from transformers import PreTrainedModel

        if isinstance(base, PreTrainedModel):
            config = copy.deepcopy(base.config)
            name = getattr(config, "_name_or_path", None) or None
            return _skeleton_from_config(config, name), name
        return base, None  # not a transformers model: wrapped in place, like MoGUModel.from_base
    raise ConfigError(f"base must be a model, a folder or a Hub id, got {type(base).__name__}")


def _materialise(model) -> None:
    """Give meta-device experts and routers real (CPU, float32) storage, freshly initialised."""
    from mogu.tuner.router import Router

    model.routing_strategy.materialise()
    for m in model.routed_modules.values():
        router = list(m.router.parameters()) if m.router is not None else []
        if not any(p.is_meta for p in [*m.lora_A.parameters(), *m.lora_B.parameters(), *router]):
            continue
        m.lora_A.to_empty(device="cpu")
        m.lora_B.to_empty(device="cpu")
        m.lora_A.float()
        m.lora_B.float()
        m.reset_lora_parameters()
        if m.router is not None:
            m.router.to_empty(device="cpu")
            m.router.float()
            fresh = Router(m.in_features, model.config.router_hidden, device="cpu", dtype=torch.float32)
            m.router.load_state_dict(fresh.state_dict())
        m._fused = None


def _projections(base: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in base.named_modules()
            if is_projection(module) and layer_index(name) is not None}


def _match_targets(base: nn.Module, adapter: _Adapter, target_modules: list[str] | None,
                   where: str) -> tuple[list[str], list[int] | None]:
    """(target_modules, routed_layers) that make mogu wrap exactly the adapter's modules."""
    projections = _projections(base)
    unknown = sorted(n for n in adapter.modules if n not in projections)
    if unknown:
        raise AdapterMismatchError(f"{where}: module(s) not found in the base model (or not linear layers): "
                                   f"{_short(unknown)}")
    layers = set(adapter.layers)
    names = set(adapter.modules)

    def wrapped(targets: list[str]) -> set[str]:
        return {n for n in projections if matches_target(n, targets) and layer_index(n) in layers}

    if target_modules:
        targets = list(target_modules)
    else:
        family = family_for(getattr(getattr(base, "config", None), "model_type", None))
        suffixes = sorted({_suffix(n) for n in names})
        if family is not None and wrapped(list(family.target_modules)) == names:
            targets = list(family.target_modules)
        elif len(suffixes) == 1:
            targets = suffixes
        else:
            raise AdapterMismatchError(f"{where}: the adapter targets different modules in different layers "
                                       f"({', '.join(suffixes)}); mogu wraps one projection suffix")
    got = wrapped(targets)
    if got != names:
        extra = sorted(got - names)
        missing = sorted(names - got)
        parts = ([f"adapter modules not matched: {_short(missing)}"] if missing else []) + \
                ([f"matched modules without adapter weights: {_short(extra)}"] if extra else [])
        raise AdapterMismatchError(f"{where}: target_modules {targets} do not select the adapter's modules "
                                   f"({'; '.join(parts)})")
    all_layers = {layer_index(n) for n in projections if matches_target(n, targets)}
    for i in layers:
        per_layer = [n for n in got if layer_index(n) == i]
        if len(per_layer) != 1:
            raise AdapterMismatchError(f"{where}: target_modules {targets} select {len(per_layer)} modules in layer {i}")
    for name in sorted(names):
        in_f, out_f = projection_shape(projections[name])
        a, b = adapter.modules[name]["A"], adapter.modules[name]["B"]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise AdapterMismatchError(
                f"{where}: {name} is [{in_f} -> {out_f}] in the base model, but the adapter has lora_A "
                f"{tuple(a.shape)} and lora_B {tuple(b.shape)}; is this the right base model?")
    routed_layers = None if layers == all_layers else sorted(layers)
    return targets, routed_layers


def _guard_out(out: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, to replace what save_pretrained would refuse (mogu.io.check_replaceable: a
    folder mogu did not write, unless ``overwrite``; never /, home or the current folder)."""
    check_replaceable(out, kind="checkpoint", overwrite=overwrite)


# -- the authors' release -------------------------------------------------------------------

def read_reference_router(source: str | Path | dict[str, torch.Tensor], model, *,
                          where: str | None = None) -> dict[str, torch.Tensor]:
    """Map a reference router state dict (or its file) onto ``model``'s routers; every problem is named."""
    if isinstance(source, dict):
        sd, path = source, where or "router state dict"
    else:
        path = Path(source)
        sd = _load_tensor_file(path, ReferenceFormatError)
    prefixes = sorted({m.group("prefix") for k in sd if (m := _ROUTER_KEY.match(k))})
    if len(prefixes) > 1:
        raise ReferenceFormatError(f"{path}: router keys use several prefixes: {', '.join(prefixes)}")
    expected_prefix = f"{getattr(model.base_model, 'base_model_prefix', 'model')}."
    prefix = prefixes[0] if prefixes else expected_prefix
    layers = {m.layer_idx: name for name, m in model.routed_modules.items()}
    found: dict[tuple[int, str, str], torch.Tensor] = {}
    unexpected = []
    for key, tensor in sd.items():
        m = _ROUTER_KEY.match(key)
        if m is None or int(m.group("layer")) not in layers:
            unexpected.append(key)
            continue
        found[(int(m.group("layer")), m.group("scorer"), m.group("param"))] = tensor
    hidden = model.config.router_hidden
    missing, misshapen = [], []
    out: dict[str, torch.Tensor] = {}
    for idx, name in sorted(layers.items()):
        d = model.routed_modules[name].in_features
        shapes = {"linear_0.weight": (hidden, d), "linear_1.weight": (d, hidden), "linear_1.bias": (d,),
                  "linear_2.weight": (1, d), "linear_2.bias": (1,)}
        for scorer, role in SCORER_ROLES.items():
            for param in ROUTER_PARAMS:
                key = f"{prefix}routers.{idx}.{scorer}.{param}"
                t = found.get((idx, scorer, param))
                if t is None:
                    missing.append(key)
                elif tuple(t.shape) != shapes[param]:
                    misshapen.append(f"{key} {tuple(t.shape)} != {shapes[param]}")
                elif not torch.is_floating_point(t):
                    misshapen.append(f"{key} has dtype {t.dtype}")
                else:
                    out[f"{name}.router.{role}.{param}"] = t
    problems = []
    if missing:
        problems.append(f"missing {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {_short(sorted(unexpected))}")
    if misshapen:
        problems.append(f"wrong shape {_short(misshapen)}")
    if problems:
        raise ReferenceFormatError(f"{where or path} does not match the model: " + "; ".join(problems))
    return out


def _router_hidden(sd: dict[str, torch.Tensor], path: Path) -> int:
    sizes = sorted({t.shape[0] for k, t in sd.items()
                    if k.endswith("linear_0.weight") and _ROUTER_KEY.match(k) and t.dim() == 2})
    if not sizes:
        raise ReferenceFormatError(f"{path}: no router weights (expected keys like "
                                   "model.routers.0.alpha_.linear_0.weight)")
    if len(sizes) > 1:
        raise ReferenceFormatError(f"{path}: routers have different hidden sizes {sizes}")
    return int(sizes[0])


def convert_reference(glad_dir: str | Path, unwill_dir: str | Path, router_file: str | Path,
                      base: nn.Module | str | Path, out: str | Path, *, target_modules: list[str] | None = None,
                      route_tokens: int | None = 5, revision: str | None = None, overwrite: bool = False) -> Path:
    """Convert the authors' released parameters (reference v1) into a mogu checkpoint at ``out``.

    ``glad_dir`` / ``unwill_dir``: ``resp_glad/<step>_lora`` / ``resp_unwill/<step>_lora`` (or their
    parent when it holds one adapter). ``router_file``: ``router_layer/<step>_router.pth`` (read with
    ``weights_only=True``) or a ``.safetensors`` copy. ``base``: a folder, a Hub id or a transformers
    model; only its config is read. The checkpoint computes the reference layer exactly:
    ``(a+b)·o_proj(x) + 2·(a·B_u A_u x + b·B_g A_g x)``, a = alpha_ (unwill), b = beta_ (glad).
    Nothing is written to ``out`` unless every file validates.
    """
    from mogu.tuner.model import MoGUModel

    out, router_file = Path(out), Path(router_file)
    _guard_out(out, overwrite)
    glad = read_adapter(glad_dir, "glad")
    unwill = read_adapter(unwill_dir, "unwill")
    _check_pair(glad, unwill)
    if not router_file.is_file():
        raise ReferenceFormatError(f"{router_file}: no such router file")
    router_sd = _load_tensor_file(router_file, ReferenceFormatError)
    hidden = _router_hidden(router_sd, router_file)
    base_model, name = _base_module(base, revision)
    targets = resolve_target_modules(base_model, target_modules)
    targets, routed_layers = _match_targets(base_model, glad, targets, f"glad adapter {glad.path}")
    config = MoGUConfig(version="v1", target_modules=targets, routed_layers=routed_layers, r=glad.r,
                        lora_alpha=REFERENCE_SCALING * glad.r, lora_dropout=min(glad.lora_dropout, 0.99),
                        router_hidden=hidden, route_tokens=route_tokens, base_model_name_or_path=name,
                        base_model_revision=revision,
                        extra={"converted_from": {"format": "mogu-reference-v1", "glad": _tail(glad.path),
                                                  "unwill": _tail(unwill.path), "router": _tail(router_file),
                                                  "router_sha256": sha256_file(router_file)}})
    model = MoGUModel.from_base(base_model, config)
    _materialise(model)
    router_sd = read_reference_router(router_sd, model, where=str(router_file))
    model.load_expert_state_dict("glad", glad.state_dict(), source=str(glad.path))
    model.load_expert_state_dict("unwill", unwill.state_dict(), source=str(unwill.path))
    model.load_router_state_dict(router_sd, source=str(router_file))
    note = (f"## Conversion\n\nConverted with `mogu convert reference` from the MoGU authors' released parameters "
            f"(glad: `{glad.path.name}`, unwill: `{unwill.path.name}`, router: `{router_file.name}`, "
            f"sha256 `{config.extra['converted_from']['router_sha256'][:16]}…`). The reference's fixed LoRA "
            f"scaling 2 is kept (lora_alpha = 2r).")
    return model.save_pretrained(out, extra_card=note, overwrite=overwrite,
                                 protected=(glad_dir, unwill_dir, router_file, *_paths(base)))


def _paths(base) -> tuple:
    return (base,) if isinstance(base, (str, Path)) else ()


# -- any two PEFT adapters ------------------------------------------------------------------

_DERIVED = ("r", "lora_alpha", "target_modules", "routed_layers")


def convert_peft(glad_adapter: str | Path, unwill_adapter: str | Path, base: nn.Module | str | Path | None,
                 out: str | Path, *, revision: str | None = None, overwrite: bool = False, **overrides: Any) -> Path:
    """Import two PEFT LoRA adapters as the glad / unwill experts of a new MoGU model (fresh routers).

    ``r``, ``lora_alpha``, ``target_modules`` and ``routed_layers`` come from the adapters; when given
    in ``overrides`` they must agree. Other MoGUConfig fields (``router_hidden``, ``route_tokens``,
    ``lora_dropout``, ``version``) may be set freely. ``base`` (a folder, a Hub id or a transformers
    model; only its config is read) defaults to the adapters' base model. Train the routers next.
    """
    from mogu.tuner.model import MoGUModel

    out = Path(out)
    _guard_out(out, overwrite)
    allowed = {"r", "lora_alpha", "lora_dropout", "target_modules", "routed_layers", "router_hidden",
               "route_tokens", "version", "extra"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ConfigError(f"convert_peft: unknown or derived option(s) {', '.join(unknown)}")
    glad = read_adapter(glad_adapter, "glad")
    unwill = read_adapter(unwill_adapter, "unwill")
    _check_pair(glad, unwill)
    if base is None:
        base = glad.config.get("base_model_name_or_path")
        if not base:
            raise ConfigError("no base model given and the adapters do not name one (pass --base)")
    base_model, name = _base_module(base, revision)
    given_targets = overrides.get("target_modules")
    if isinstance(given_targets, str):
        given_targets = [given_targets]
    targets, routed_layers = _match_targets(base_model, glad, given_targets, f"glad adapter {glad.path}")
    derived = {"r": glad.r, "lora_alpha": glad.lora_alpha, "target_modules": targets, "routed_layers": routed_layers}
    for key in ("r", "lora_alpha", "routed_layers"):
        want = overrides.get(key)
        have = derived[key]
        if key == "routed_layers" and want is not None:
            want = sorted(set(want))
            have = have if have is not None else sorted({layer_index(n) for n in glad.modules})
        if want is not None and want != have:
            raise AdapterMismatchError(f"the adapters have {key}={have!r} but the config asks for {key}={want!r}")
    fields = {k: v for k, v in overrides.items() if k not in _DERIVED and v is not None}
    fields.setdefault("lora_dropout", min(glad.lora_dropout, 0.99))
    config = MoGUConfig(**derived, **fields, base_model_name_or_path=name, base_model_revision=revision)
    config.extra = {**config.extra, "converted_from": {"format": "peft", "glad": _tail(glad.path),
                                                       "unwill": _tail(unwill.path)}}
    model = MoGUModel.from_base(base_model, config)
    _materialise(model)
    model.load_expert_state_dict("glad", glad.state_dict(), source=str(glad.path))
    model.load_expert_state_dict("unwill", unwill.state_dict(), source=str(unwill.path))
    note = (f"## Conversion\n\nExperts imported with `mogu convert peft` (glad: `{glad.path.name}`, unwill: "
            f"`{unwill.path.name}`); the routers are freshly initialised and need training "
            "(`mogu train --stages router`).")
    return model.save_pretrained(out, extra_card=note, overwrite=overwrite,
                                 protected=(glad_adapter, unwill_adapter, *_paths(base)))


# -- export ------------------------------------------------------------------------------------

EXPERT_CHOICES = ("glad", "unwill", "both")


def export_experts(source, out: str | Path, expert: str = "both", *, overwrite: bool = False) -> Path:
    """Write expert(s) as standard PEFT LoRA folders (``PeftModel.from_pretrained`` loads them).

    ``source``: a MoGUModel or a checkpoint folder (copied; no base model is loaded). One expert is
    written to ``out`` itself; ``both`` writes ``out/glad`` and ``out/unwill``. ``out`` is replaced only if
    an earlier export wrote it (its marker), or with ``overwrite``; never the source checkpoint.
    """
    from mogu.tuner.checkpoint import ADAPTER_FILE, load_safetensors as _load_safetensors, read_config
    from mogu.tuner.model import MoGUModel

    if expert not in EXPERT_CHOICES:
        raise ConfigError(f"expert must be one of {EXPERT_CHOICES}, got {expert!r}")
    out = Path(out)
    experts = ("glad", "unwill") if expert == "both" else (expert,)
    kind = "adapter" if expert != "both" else "adapters"
    protected = () if isinstance(source, MoGUModel) else (Path(source),)
    check_replaceable(out, kind=kind, overwrite=overwrite, protected=protected)
    if isinstance(source, MoGUModel):
        with atomic_directory(out, kind=kind, overwrite=overwrite) as tmp:
            for e in experts:
                source._write_adapter(e, tmp / e if expert == "both" else tmp)
        return out
    directory = Path(source)
    read_config(directory)
    for e in experts:
        for f in (ADAPTER_CONFIG, ADAPTER_FILE):
            if not (directory / e / f).is_file():
                raise CheckpointMismatchError(f"{directory}: incomplete checkpoint, {e}/{f} is missing")
        _load_safetensors(directory / e / ADAPTER_FILE)  # readable (raises a named error otherwise)
    with atomic_directory(out, kind=kind, overwrite=overwrite, protected=protected) as tmp:
        for e in experts:
            target = tmp / e if expert == "both" else tmp
            target.mkdir(parents=True, exist_ok=True)
            for f in (ADAPTER_CONFIG, ADAPTER_FILE):
                shutil.copyfile(directory / e / f, target / f)
    return out


# -- the Hub -----------------------------------------------------------------------------------


def _tail(path: Path) -> str:
    """The last two parts of a path (``resp_glad/800_lora``): provenance without local folder names."""
    return "/".join(Path(path).resolve().parts[-2:])


def _short(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
