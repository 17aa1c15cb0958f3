"""MoGUModel: a Hugging Face causal LM with routed glad/unwill experts."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from mogu.tuner.config import CONFIG_NAME, MoGUConfig
from mogu.errors import CheckpointMismatchError, ConfigError, MoGUError
from mogu.tuner.families import (candidate_targets, is_projection, layer_index, matches_target, projection_shape,
                       resolve_target_modules)
from mogu.io import atomic_directory
from mogu.tuner.checkpoint import (ADAPTER_FILE, CHECKPOINT_KIND, FORMAT_VERSION, ROUTER_FILE,
                                     check_keys, load_safetensors, read_config)
from mogu.tuner.layer import EXPERTS, MODES, PrefixScore, RoutedLinear, RoutingState

_PEFT_PREFIX = "base_model.model."

def _num_layers(config) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    return _num_layers(text_config) if text_config is not None else None


def _hidden_size(config) -> int | None:
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    return _hidden_size(text_config) if text_config is not None else None


class MoGUModel(nn.Module):
    """Wraps a causal LM in place; ``forward`` routes every position, ``generate`` the first m tokens."""

    def __init__(self, base_model: nn.Module, config: MoGUConfig, tokenizer=None):
        super().__init__()
        self.base_model = base_model
        self.config = config
        self.tokenizer = tokenizer
        self._state = RoutingState()
        self._inject()
        self.gate = self._make_gate() if config.router_type == "prompt" else None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: nn.Module | str, config: MoGUConfig | None = None, *, tokenizer=None,
                  revision: str | None = None, dtype=None, device: str | None = None) -> "MoGUModel":
        """Attach fresh experts and routers to ``base`` (a model, a folder, a Hub id or the default alias)."""
        from mogu.tuner.loading import load_base_model, prepare_tokenizer

        config = MoGUConfig.from_dict(config.to_dict()) if config is not None else MoGUConfig()
        if isinstance(base, (str, Path)):
            name = str(base)
            base, loaded_tokenizer = load_base_model(name, revision=revision, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer
            config.base_model_name_or_path = config.base_model_name_or_path or name
            config.base_model_revision = config.base_model_revision or revision
        elif config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base.config, "_name_or_path", None) or None
        if tokenizer is not None:
            tokenizer = prepare_tokenizer(tokenizer)
        config.base_model_type = getattr(base.config, "model_type", None)
        config.base_hidden_size = _hidden_size(base.config)
        return cls(base, config, tokenizer)

    def _inject(self) -> None:
        base = self.base_model
        config = self.config
        targets = resolve_target_modules(base, config.target_modules)
        config.target_modules = targets
        n_layers = _num_layers(base.config)
        if config.routed_layers is not None and n_layers is not None:
            bad = [i for i in config.routed_layers if i >= n_layers]
            if bad:
                raise ConfigError(f"routed_layers {bad} out of range: the model has {n_layers} layers")
        for p in base.parameters():
            p.requires_grad_(False)
        found = []
        for name, module in list(base.named_modules()):
            if not matches_target(name, targets) or not is_projection(module):
                continue
            idx = layer_index(name)
            if idx is None or (config.routed_layers is not None and idx not in config.routed_layers):
                continue
            found.append((name, idx, module))
        if not found:
            raise ConfigError(f"no projection matches target_modules {targets}; candidates: "
                              f"{', '.join(candidate_targets(base)) or 'none'}")
        self._routed: dict[str, RoutedLinear] = {}
        for name, idx, module in found:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            hidden = config.router_hidden if config.router_type == "token" else None
            routed = RoutedLinear(module, idx, r=config.r, lora_alpha=config.lora_alpha,
                                  lora_dropout=config.lora_dropout, router_hidden=hidden, state=self._state)
            routed.train(module.training)  # a fresh module defaults to train mode (dropout on)
            setattr(parent, child, routed)
            self._routed[name] = routed

    def _make_gate(self):
        from mogu.tuner.gate import PromptGate
        from mogu.tuner.features import probe_modules as _probe_modules

        # v1: every layer's target module votes, routed or not (the features are read with routing off).
        # v2: only the routed layers, the ones probe selection found most separable.
        modules = _probe_modules(self.base_model, self.config.target_modules)
        if self.config.version == "v2" and self.config.routed_layers is not None:
            modules = {i: m for i, m in modules.items() if i in self.config.routed_layers}
        self._gate_modules = modules
        first = next(iter(self._gate_modules.values()))[1]
        if isinstance(first, RoutedLinear):
            in_features, device = first.in_features, first.base_layer.weight.device
        else:
            in_features, device = projection_shape(first)[0], first.weight.device
        return PromptGate(list(self._gate_modules), in_features, device=device)

    # -- prompt gate -----------------------------------------------------------------------
    @torch.no_grad()
    def gate_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt gate's harmfulness logit per sequence, [B]: the highest over the conversation's turns.

        The probes were fitted at a prompt's last token, where the chat template hands over to the
        assistant. A conversation is read at every such hand-over (each user turn, in its context) and at
        its last token, and the highest score decides. An attacker's assistant prefill ("Sure, here is")
        or fabricated history therefore cannot hide the request: the turn that asked it is still scored
        exactly as if it were asked alone. A single plain prompt has one hand-over, its last token.

        One forward pass with routing off that stops after the deepest probed module. Position ids
        follow the attention mask, as in ``generate`` and ``mogu.train.probe``, so padding does not move them.
        """
        from mogu.tuner.features import stop_after

        if self.gate is None:
            raise MoGUError("gate_scores needs a model with router_type='prompt'")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows, cols = self._gate_positions(input_ids, attention_mask)
        features: dict[int, torch.Tensor] = {}
        handles = []
        for idx, (_, module) in self._gate_modules.items():
            def pre_hook(_module, args, idx=idx):
                features[idx] = args[0][rows.to(args[0].device), cols.to(args[0].device)].float()
            handles.append(module.register_forward_pre_hook(pre_hook))
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        deepest = self._gate_modules[max(self._gate_modules)][1]
        try:
            with self.routing("off"), stop_after(deepest) as run:
                run(self.base_model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False)
        finally:
            for h in handles:
                h.remove()
        scores = self.gate.score({i: f.to(self.gate.weight.device) for i, f in features.items()})
        best = torch.full((input_ids.shape[0],), float("-inf"), dtype=scores.dtype, device=scores.device)
        return best.scatter_reduce(0, rows.to(scores.device), scores, reduce="amax")

    def _gate_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) the gate reads: each row's last real token and every end of an assistant header."""
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(dim=1)  # last 1 per row
        rows = [torch.arange(input_ids.shape[0], device=input_ids.device)]
        cols = [last]
        header = self._assistant_header()
        if header and input_ids.shape[1] >= len(header):
            target = torch.tensor(header, device=input_ids.device)
            windows = input_ids.unfold(1, len(header), 1)  # [B, T - L + 1, L]
            hits = (windows == target).all(-1) & attention_mask[:, len(header) - 1:].bool()
            r, start = hits.nonzero(as_tuple=True)
            rows.append(r)
            cols.append(start + len(header) - 1)
        return torch.cat(rows), torch.cat(cols)

    def _assistant_header(self) -> list[int] | None:
        """The token ids the chat template adds to hand a turn to the assistant (None without a template)."""
        if not hasattr(self, "_header_ids"):
            self._header_ids = _assistant_header_ids(self.tokenizer)
        return self._header_ids

    def routing_weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A prompt-gated model's (u, g) per sequence, [B, 2] ([B, 3] (u, g, base) with ``gate_benign="base"``)."""
        self._require_fitted_gate()
        return self.gate.weights(self.gate_scores(input_ids, attention_mask), benign=self.config.gate_benign)

    def _require_fitted_gate(self) -> None:
        if self.gate is not None and not self.gate.is_fitted():
            raise MoGUError("the prompt gate was never fitted, so it would route every prompt to the glad expert "
                            "(the one trained to comply): fit it with `mogu train --stages router` (or --resume), "
                            "or mogu.train.probe.fit_gate(model, prompts, labels)")

    @contextlib.contextmanager
    def pin_routing(self, weights: torch.Tensor) -> Iterator["MoGUModel"]:
        """Route every call inside with fixed per-sequence weights ([B, 2] rows of (u, g), or [B, 3] rows of
        (u, g, b) where b weighs the base layer alone); prompt gate only."""
        if self.gate is None:
            raise MoGUError("pin_routing is for router_type='prompt' models")
        if weights.dim() != 2 or weights.shape[1] not in (2, 3):
            raise MoGUError(f"pinned routing weights must be [batch, 2] or [batch, 3], got {tuple(weights.shape)}")
        previous = self._state.pinned
        self._state.pinned = weights
        try:
            yield self
        finally:
            self._state.pinned = previous

    @contextlib.contextmanager
    def gated(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Iterator["MoGUModel"]:
        """Pin the gate's decision on these prompts for the calls inside (nothing to do without a gate,
        when routing is not ``auto``, or when a decision is pinned already)."""
        if self.gate is None or self._state.mode != "auto" or self._state.pinned is not None:
            yield self
            return
        with self.pin_routing(self.routing_weights(input_ids, attention_mask)):
            yield self

    # -- routing control -------------------------------------------------------------------
    @property
    def routed_modules(self) -> dict[str, RoutedLinear]:
        return dict(self._routed)

    @property
    def routing_mode(self) -> str:
        return self._state.mode

    def set_routing(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"routing mode must be one of {MODES}, got {mode!r}")
        self._state.mode = mode

    @contextlib.contextmanager
    def routing(self, mode: str) -> Iterator["MoGUModel"]:
        previous = self._state.mode
        self.set_routing(mode)
        try:
            yield self
        finally:
            self._state.mode = previous

    @contextlib.contextmanager
    def scoring_routed_prefix(self, enabled: bool = True) -> Iterator[PrefixScore | None]:
        """Token routers add each step's (u - g) to the yielded PrefixScore inside (None when not enabled)."""
        if not enabled:
            yield None
            return
        previous = self._state.prefix_score
        self._state.prefix_score = score = PrefixScore()
        try:
            yield score
        finally:
            self._state.prefix_score = previous

    def enable_routing_trace(self, enabled: bool = True) -> None:
        self._state.trace_enabled = enabled

    def clear_routing_trace(self) -> None:
        self._state.trace.clear()

    def routing_trace(self) -> dict[int, torch.Tensor]:
        """Per layer, a [batch, tokens, 2] tensor of (u, g) for every routed position since the last clear.

        Forward calls are concatenated along the token axis, so after ``generate`` the
        trace covers the prompt and each routed step. Enable it with ``enable_routing_trace()``.
        """
        out = {}
        for idx, chunks in sorted(self._state.trace.items()):
            out[idx] = torch.cat(chunks, dim=1) if len({c.shape[0] for c in chunks}) == 1 else chunks
        return out

    # -- parameters ------------------------------------------------------------------------
    def expert_parameters(self, expert: str) -> list[nn.Parameter]:
        if expert not in EXPERTS:
            raise ConfigError(f"expert must be one of {EXPERTS}, got {expert!r}")
        return [p for m in self._routed.values() for p in (m.lora_A[expert].weight, m.lora_B[expert].weight)]

    def router_parameters(self) -> list[nn.Parameter]:
        if self.gate is not None:
            return list(self.gate.parameters())
        return [p for m in self._routed.values() for p in m.router.parameters()]

    def added_parameters(self) -> list[nn.Parameter]:
        return self.expert_parameters("glad") + self.expert_parameters("unwill") + self.router_parameters()

    def num_added_parameters(self) -> int:
        return sum(p.numel() for p in self.added_parameters())

    def set_trainable(self, params: list[nn.Parameter]) -> None:
        """Freeze everything, then unfreeze exactly ``params``."""
        keep = {id(p) for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)

    # -- running ---------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self.gate is not None and self._state.mode == "auto" and self._state.pinned is None:
            # The gate decides per sequence from its last real token; a cached step cannot re-decide.
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise MoGUError("a prompt-gated model needs input_ids (or a decision pinned with pin_routing)")
            if kwargs.get("past_key_values") is not None:
                raise MoGUError("a prompt-gated model decides once per prompt: pin the prompt's decision with "
                                "model.gated(prompt_ids, mask) around cached calls")
            with self.gated(input_ids, kwargs.get("attention_mask")):
                return self.base_model(*args, **kwargs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, route_tokens: int | None | str = "config", handoff: str = "config", **kwargs):
        """Hugging Face ``generate`` with routing: ``route_tokens`` routed tokens, then the hand-off
        (``handoff``: "hold" keeps a refusal with the unwilling expert, "fixed" is the paper's hand-off
        to the base model; both default to the config's)."""
        from mogu.tuner.generation import routed_generate

        m = self.config.route_tokens if route_tokens == "config" else route_tokens
        policy = self.config.handoff if handoff == "config" else handoff
        return routed_generate(self, *args, route_tokens=m, handoff=policy, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    # -- state dicts -----------------------------------------------------------------------
    def expert_state_dict(self, expert: str) -> dict[str, torch.Tensor]:
        """PEFT-format adapter weights (``base_model.model.<module>.lora_A.weight`` ...)."""
        sd = {}
        for name, m in self._routed.items():
            sd[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A[expert].weight.detach().contiguous()
            sd[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B[expert].weight.detach().contiguous()
        return sd

    def router_state_dict(self) -> dict[str, torch.Tensor]:
        if self.gate is not None:  # weight, bias and the calibrated threshold
            return {f"gate.{k}": v.detach().contiguous() for k, v in self.gate.state_dict().items()}
        return {f"{name}.router.{k}": v.detach().contiguous()
                for name, m in self._routed.items() for k, v in m.router.state_dict().items()}

    def load_expert_state_dict(self, expert: str, sd: dict[str, torch.Tensor], source: str = "adapter") -> None:
        expected = self.expert_state_dict(expert)
        check_keys(expected, sd, source)
        with torch.no_grad():
            for name, m in self._routed.items():
                for part in ("lora_A", "lora_B"):
                    getattr(m, part)[expert].weight.copy_(sd[f"{_PEFT_PREFIX}{name}.{part}.weight"])

    def load_router_state_dict(self, sd: dict[str, torch.Tensor], source: str = ROUTER_FILE) -> None:
        expected = self.router_state_dict()
        check_keys(expected, sd, source)
        with torch.no_grad():
            if self.gate is not None:
                for k, v in self.gate.state_dict(keep_vars=True).items():
                    v.copy_(sd[f"gate.{k}"])
                return
            for name, m in self._routed.items():
                for k, v in m.router.state_dict(keep_vars=True).items():
                    v.copy_(sd[f"{name}.router.{k}"])

    # -- save / load -----------------------------------------------------------------------
    def peft_config(self, expert: str):
        from peft import LoraConfig

        config = self.config
        # All layers: plain suffixes (what vLLM and other LoRA tools expect); a subset: full names.
        targets = list(config.target_modules) if config.routed_layers is None else sorted(self._routed)
        fan_in_fan_out = any(type(m.base_layer).__name__ == "Conv1D" for m in self._routed.values())
        return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM",
                          fan_in_fan_out=fan_in_fan_out,
                          base_model_name_or_path=config.base_model_name_or_path,
                          revision=config.base_model_revision)

    def export_adapter(self, expert: str, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write one expert as a standard PEFT LoRA folder (``PeftModel.from_pretrained`` loads it).
        An existing folder is replaced only if mogu wrote it as an adapter, or with ``overwrite``."""
        directory = Path(directory)
        with atomic_directory(directory, kind="adapter", overwrite=overwrite) as tmp:
            self._write_adapter(expert, tmp)
        return directory

    def _write_adapter(self, expert: str, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.peft_config(expert).save_pretrained(str(directory))
        save_file(self.expert_state_dict(expert), str(directory / ADAPTER_FILE), metadata={"format": "pt"})

    def save_pretrained(self, directory: str | Path, *, extra_card: str | None = None,
                        extra_files: dict[str, str] | None = None, overwrite: bool = False,
                        protected: "list[str | Path] | tuple" = ()) -> Path:
        """Write config, both experts (PEFT folders), router weights, a task adapter if fine-tuned, and a model
        card, atomically. ``extra_files`` (name -> text, e.g. a calibration record) go in the same rename.

        An existing ``directory`` is replaced only if it is a mogu checkpoint (or empty); anything else raises
        ``RefusedOverwriteError`` unless ``overwrite``. ``protected`` paths (inputs) are never replaced."""
        from mogu.version import __version__
        from mogu.tuner.card import model_card

        self._require_fitted_gate()
        directory = Path(directory)
        with atomic_directory(directory, kind=CHECKPOINT_KIND, overwrite=overwrite, protected=protected) as tmp:
            meta = {"mogu_version": __version__, "format_version": FORMAT_VERSION, **self.config.to_dict()}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
            for expert in EXPERTS:
                self._write_adapter(expert, tmp / expert)
            save_file(self.router_state_dict(), str(tmp / ROUTER_FILE), metadata={"format": "pt"})
            from mogu.tuner.task_adapter import TASK_ADAPTER_DIR, has_task_adapter, write_task_adapter

            if has_task_adapter(self):  # fine-tuned by `mogu finetune`: its task LoRA as a PEFT folder
                write_task_adapter(self, tmp / TASK_ADAPTER_DIR)
            for name, text in (extra_files or {}).items():
                if Path(name).name != name or name in {CONFIG_NAME, ROUTER_FILE, "README.md"}:
                    raise ValueError(f"extra file name {name!r} must be a plain file name that is not part of the checkpoint")
                (tmp / name).write_text(text)
            (tmp / "README.md").write_text(model_card(self, extra=extra_card, directory=directory))
        return directory

    def push_to_hub(self, repo_id: str, **kwargs):
        """Save to a temporary folder and upload it to the Hub (see ``mogu.tuner.hub.push_to_hub``)."""
        from mogu.tuner.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_model: nn.Module | str | None = None, *,
                        tokenizer=None, dtype=None, device: str | None = None) -> "MoGUModel":
        directory = Path(directory)
        config = read_config(directory)
        for part in (ROUTER_FILE, f"glad/{ADAPTER_FILE}", f"unwill/{ADAPTER_FILE}"):
            if not (directory / part).is_file():
                raise CheckpointMismatchError(f"{directory}: incomplete checkpoint, {part} is missing")
        if base_model is None:
            if not config.base_model_name_or_path:
                raise CheckpointMismatchError(f"{directory}: the config names no base model; pass base_model=")
            base_model = config.base_model_name_or_path
        if isinstance(base_model, (str, Path)):
            from mogu.tuner.loading import load_base_model

            base_model, loaded_tok = load_base_model(str(base_model), revision=config.base_model_revision,
                                                     dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tok
        check_compatible(config, base_model, directory)
        if tokenizer is not None:
            from mogu.tuner.loading import prepare_tokenizer

            tokenizer = prepare_tokenizer(tokenizer)
        model = cls(base_model, config, tokenizer)
        for expert in EXPERTS:
            path = directory / expert / ADAPTER_FILE
            model.load_expert_state_dict(expert, load_safetensors(path), source=str(path))
        model.load_router_state_dict(load_safetensors(directory / ROUTER_FILE), source=str(directory / ROUTER_FILE))
        from mogu.tuner.task_adapter import TASK_ADAPTER_DIR, load_task_adapter

        if (directory / TASK_ADAPTER_DIR).is_dir():  # a `mogu finetune` checkpoint: apply its task LoRA
            load_task_adapter(model, directory / TASK_ADAPTER_DIR)
        model.eval()
        return model


def _assistant_header_ids(tokenizer) -> list[int] | None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hello there."}]
    try:
        with_header = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    except Exception:  # jinja's TemplateError and the like: the gate then reads the last token only
        return None
    full = tokenizer(with_header, add_special_tokens=False)["input_ids"]
    head = tokenizer(without, add_special_tokens=False)["input_ids"]
    if len(full) <= len(head) or full[:len(head)] != head:
        return None
    return list(full[len(head):])


def check_compatible(config: MoGUConfig, base_model: nn.Module, where: Path | str) -> None:
    model_type = getattr(base_model.config, "model_type", None)
    hidden = _hidden_size(base_model.config)
    if config.base_model_type and model_type != config.base_model_type:
        raise CheckpointMismatchError(
            f"{where}: checkpoint was trained on a {config.base_model_type!r} model, the base is {model_type!r}")
    if config.base_hidden_size and hidden != config.base_hidden_size:
        raise CheckpointMismatchError(
            f"{where}: checkpoint hidden size {config.base_hidden_size} does not match the base model's {hidden}")


