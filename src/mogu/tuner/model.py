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
from mogu.tuner.families import candidate_targets, is_projection, layer_index, matches_target, resolve_target_modules
from mogu.io import atomic_directory
from mogu.tuner.checkpoint import (ADAPTER_FILE, CHECKPOINT_KIND, FORMAT_VERSION, ROUTER_FILE,
                                     check_keys, load_safetensors, read_config)
from mogu.tuner.backbone import BACKBONE_FILE
from mogu.tuner.layer import EXPERTS, MODES, PrefixScore, RoutedLinear, RoutingState
from mogu.tuner.routing import strategy_class

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
        from mogu.tuner.routing import make_strategy

        self._strategy = make_strategy(self)
        # Registered as a submodule, so .to() and .parameters() see it; None with token routers.
        self.gate = self._strategy.module
        from mogu.tuner.backbone import attach_backbone_modules

        # Last, so the experts' and routers' random initialisation does not depend on it.
        self._backbone = attach_backbone_modules(self)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: nn.Module | str, config: MoGUConfig | None = None, *, tokenizer=None,
                  revision: str | None = None, dtype=None, device: str | None = None,
                  quantization: str | None = None) -> "MoGUModel":
        """Attach fresh experts and routers to ``base`` (a model, a folder, a Hub id or the default alias)."""
        from mogu.tuner.loading import load_base_model, prepare_tokenizer

        config = MoGUConfig.from_dict(config.to_dict()) if config is not None else MoGUConfig()
        if isinstance(base, (str, Path)):
            name = str(base)
            base, loaded_tokenizer = load_base_model(name, revision=revision, dtype=dtype, device=device,
                                                     quantization=quantization)
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
            hidden = config.router_hidden if strategy_class(config.router_type).per_layer_routers else None
            routed = RoutedLinear(module, idx, r=config.r, lora_alpha=config.lora_alpha,
                                  lora_dropout=config.lora_dropout, router_hidden=hidden, state=self._state)
            routed.train(module.training)  # a fresh module defaults to train mode (dropout on)
            setattr(parent, child, routed)
            self._routed[name] = routed

    # -- the routing strategy (routing.py) --------------------------------------------------
    @property
    def routing_strategy(self):
        """Who decides the expert weights: token routers or the prompt gate (``mogu.tuner.routing``)."""
        return self._strategy

    def gate_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt gate's harmfulness logit per sequence, [B] (``PromptGateRouting.scores``)."""
        if not self._strategy.decides_per_prompt:
            raise MoGUError("gate_scores needs a model with router_type='prompt'")
        return self._strategy.scores(input_ids, attention_mask)

    def routing_weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A prompt-gated model's (u, g) per sequence, [B, 2] ([B, 3] (u, g, base) with ``gate_benign="base"``)."""
        weights = self._strategy.decide(input_ids, attention_mask)
        if weights is None:
            raise MoGUError("routing_weights needs a model with router_type='prompt': token routers decide per token")
        return weights

    def routing_decision(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                         ) -> torch.Tensor | None:
        """The per-sequence weights to pin for a call on these prompts, or None: nothing to pin (token
        routers decide per token, routing is not ``auto``, or a decision is pinned already)."""
        if self._state.mode != "auto" or self._state.pinned is not None:
            return None
        return self._strategy.decide(input_ids, attention_mask)

    @property
    def pinned_routing(self) -> torch.Tensor | None:
        """The per-sequence weights pinned by ``pin_routing`` (None when none are)."""
        return self._state.pinned

    @contextlib.contextmanager
    def pin_routing(self, weights: torch.Tensor) -> Iterator["MoGUModel"]:
        """Route every call inside with fixed per-sequence weights ([B, 2] rows of (u, g), or [B, 3] rows of
        (u, g, b) where b weighs the base layer alone); strategies that decide per prompt only."""
        if not self._strategy.decides_per_prompt:
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
        """Pin the strategy's decision on these prompts for the calls inside (nothing to do when it decides
        per token, when routing is not ``auto``, or when a decision is pinned already)."""
        weights = self.routing_decision(input_ids, attention_mask)
        if weights is None:
            yield self
            return
        with self.pin_routing(weights):
            yield self

    @contextlib.contextmanager
    def collecting_router_weights(self) -> Iterator[list]:
        """Inside, every routed layer appends its (u, g) per forward to the yielded list (the router loss)."""
        state = self._state
        state.collect, state.collected = True, []
        try:
            yield state.collected
        finally:
            state.collect, state.collected = False, []

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

    @property
    def routing_trace_enabled(self) -> bool:
        return self._state.trace_enabled

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
        return self._strategy.parameters()

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone modules v2's router stage trains (``config.router_backbone``; none by default)."""
        return list(self._backbone.values())

    def added_parameters(self) -> list[nn.Parameter]:
        return (self.expert_parameters("glad") + self.expert_parameters("unwill") + self.router_parameters()
                + self.backbone_parameters())

    def num_added_parameters(self) -> int:
        return sum(p.numel() for p in self.added_parameters())

    def set_trainable(self, params: list[nn.Parameter]) -> None:
        """Freeze everything, then unfreeze exactly ``params``."""
        keep = {id(p) for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)

    # -- running ---------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._strategy.decides_per_prompt and self._state.mode == "auto" and self._state.pinned is None:
            # The strategy decides once per sequence, from the prompt; a cached step cannot re-decide.
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise MoGUError("a prompt-gated model needs input_ids (or a decision pinned with pin_routing)")
            if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:  # both spellings
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
        if m == 0:  # what the CLI and the config mean by 0: route every token (no hand-off)
            m = None
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ConfigError(f"route_tokens must be None (every token), 0 (the same) or a positive int, got {m!r}")
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
        return self._strategy.state_dict()

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self._backbone.items()}

    def load_backbone_state_dict(self, sd: dict[str, torch.Tensor], source: str = BACKBONE_FILE) -> None:
        check_keys(self.backbone_state_dict(), sd, source)
        with torch.no_grad():
            for n, p in self._backbone.items():
                p.copy_(sd[n])

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
        self._strategy.load_state_dict(sd)

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

        self._strategy.require_ready()
        self.config.validate()  # before the swap: a config that would not load must not replace a good checkpoint
        directory = Path(directory)
        with atomic_directory(directory, kind=CHECKPOINT_KIND, overwrite=overwrite, protected=protected) as tmp:
            meta = {"mogu_version": __version__, "format_version": FORMAT_VERSION, **self.config.to_dict()}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
            for expert in EXPERTS:
                self._write_adapter(expert, tmp / expert)
            save_file(self.router_state_dict(), str(tmp / ROUTER_FILE), metadata={"format": "pt"})
            if self._backbone:
                save_file(self.backbone_state_dict(), str(tmp / BACKBONE_FILE), metadata={"format": "pt"})
            from mogu.tuner.task_adapter import TASK_ADAPTER_DIR, has_task_adapter, write_task_adapter

            if has_task_adapter(self):  # fine-tuned by `mogu finetune`: its task LoRA as a PEFT folder
                write_task_adapter(self, tmp / TASK_ADAPTER_DIR)
            for name, text in (extra_files or {}).items():
                if Path(name).name != name or name in {CONFIG_NAME, ROUTER_FILE, BACKBONE_FILE, "README.md"}:
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
                        tokenizer=None, dtype=None, device: str | None = None,
                        quantization: str | None = None) -> "MoGUModel":
        """Load a saved checkpoint onto ``base_model`` (default: the base it names, loaded with ``dtype`` and
        ``quantization``: '4bit' / '8bit' puts the experts and routers over a bitsandbytes-quantised base)."""
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
                                                     dtype=dtype, device=device, quantization=quantization)
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
        if model._backbone:
            if not (directory / BACKBONE_FILE).is_file():
                raise CheckpointMismatchError(f"{directory}: incomplete checkpoint, {BACKBONE_FILE} is missing "
                                              f"(router_backbone={config.router_backbone!r})")
            model.load_backbone_state_dict(load_safetensors(directory / BACKBONE_FILE),
                                           source=str(directory / BACKBONE_FILE))
        from mogu.tuner.task_adapter import TASK_ADAPTER_DIR, load_task_adapter

        if (directory / TASK_ADAPTER_DIR).is_dir():  # a `mogu finetune` checkpoint: apply its task LoRA
            load_task_adapter(model, directory / TASK_ADAPTER_DIR)
        model.eval()
        return model


def check_compatible(config: MoGUConfig, base_model: nn.Module, where: Path | str) -> None:
    model_type = getattr(base_model.config, "model_type", None)
    hidden = _hidden_size(base_model.config)
    if config.base_model_type and model_type != config.base_model_type:
        raise CheckpointMismatchError(
            f"{where}: checkpoint was trained on a {config.base_model_type!r} model, the base is {model_type!r}")
    if config.base_hidden_size and hidden != config.base_hidden_size:
        raise CheckpointMismatchError(
            f"{where}: checkpoint hidden size {config.base_hidden_size} does not match the base model's {hidden}")


