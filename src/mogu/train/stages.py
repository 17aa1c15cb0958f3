"""The three MoGU training stages (glad -> unwill -> router), on Accelerate.

- glad:   CE(comply) / CE(refuse) on harmful prompts; trains only the glad expert.
- unwill: CE(refuse) / CE(comply) on benign prompts; trains only the unwill expert.
- router: CE(target) + lambda * [MSE(u, t_u) + MSE(g, t_g)] over all routed layers and
          non-pad tokens, targets (1, 0) for harmful and (0, 1) for benign; trains only routers
          (v1), or routers and both experts with their own learning rate (v2's joint stage).

The backbone stays frozen throughout. Checkpoints are atomic folders holding only the
stage's trainable tensors, the optimizer state, every process's RNG state and the data position,
so ``resume=True`` continues mid-epoch on the same batch order (the order is a function of seed
and epoch) and reaches the same weights as an uninterrupted run.

Several processes (``accelerate launch --num_processes N``, or torchrun) split every optimizer
step's global batch: ``batch_size`` is the global batch whatever N is, each process takes a
contiguous slice of it, every loss term is normalised by the whole step's batch, and the
trainable gradients are summed across processes; so N processes compute the one-process gradient
(exactly the same micro-batches when N divides the accumulation count). Only the main process
writes files; scores and checkpoint choices are the main process's, broadcast to the others.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from mogu.train.data import DEV_FILE, PROBE_FILE, STAGE_FILES, load_stage_file
from mogu.errors import ConfigError, DataError, MoGUError
from mogu.verdicts import is_refusal
from mogu.io import atomic_directory, atomic_write_text, mark_run_folder, run_record
from mogu.chat import context_length, encode_pair, render_prompt
from mogu.train.loop import run_steps
from mogu.train.sharding import (BACKBONE_SHARDING, backbone_footprint, launcher_zero_settings,
                                 shard_frozen_backbone, zero3_partition_frozen_backbone)
from mogu.train.losses import collate, ratio_terms, router_terms, sequence_nll

STAGES = ("glad", "unwill", "router")
STAGE_MODES = {"glad": "glad", "unwill": "unwill", "router": "auto"}
LOG_KEYS = {"router": ("ce", "mse_u", "mse_g"), "ratio": ("ce_num", "ce_den"), "sft": ("ce_num",)}


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of the backbone's decoder layers: the backbone is frozen, so
    the reentrant variant would see no input that needs a gradient and drop the experts' and routers' ones."""
    base = getattr(model, "base_model", model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(base).__name__} does not support gradient checkpointing")
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _cpu_only_launch() -> bool:
    """Several processes launched (torchrun, ``accelerate launch``) on a machine with no GPU.

    Accelerate picks the gloo backend for them only when asked for the CPU; otherwise every
    process would silently run alone and they would all write the same files.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from accelerate.utils import is_npu_available, is_xpu_available

    return not (torch.cuda.is_available() or is_npu_available() or is_xpu_available())


def process_state():
    """Accelerate's process state (rank, world size, device), the same way Trainer sets it up."""
    from accelerate import PartialState

    state = PartialState(cpu=_cpu_only_launch())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and state.num_processes == 1:
        raise MoGUError(f"launched {os.environ['WORLD_SIZE']} processes, but accelerate found no distributed "
                        "backend for them; on CPU launch with torchrun or the configs/accelerate files")
    return state


@dataclass
class StageConfig:
    epochs: float = 1.0
    lr: float = 5e-5
    batch_size: int = 8  # effective batch (pairs for glad/unwill, examples for router)
    micro_batch_size: int = 8  # per forward pass; batch_size / micro_batch_size accumulation steps
    max_examples: int | None = None  # cap on training rows (speed knob for CPU demos)

    def validate(self, name: str) -> None:
        if not self.epochs > 0:
            raise ConfigError(f"{name}: epochs must be > 0, got {self.epochs}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"{name}: lr must be in (0, 1), got {self.lr}")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError(f"{name}: batch sizes must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"{name}: batch_size {self.batch_size} is not a multiple of "
                              f"micro_batch_size {self.micro_batch_size}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"{name}: max_examples must be >= 1")

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size


def _default_stages() -> dict[str, StageConfig]:
    return preset("paper")["stages"]


def preset(name: str, version: str = "v1") -> dict[str, Any]:
    """Named training schedules: ``stages`` plus top-level TrainConfig fields.

    - ``paper``: the reference recipe (ratio losses; lr 5e-5 / 5e-4; batch 8 / 16; 10 epochs each, the
      responder checkpoint chosen per epoch on the dev split). Meant for a GPU.
    - ``cpu-fast``: what ``mogu demo`` runs in ~20 minutes on 2 CPU cores: CE on the target response
      for the responders, higher learning rates, capped responder data, probe-initialised routers and
      one router epoch, 32-token targets (docs/RESULTS.md has the measurements behind each choice).
      For ``version="v2"`` the unwilling expert gets 3 epochs: in a few layers, one epoch teaches it a
      hedge ("I'm not sure how to ..."), not a refusal (RESULTS, "MoGU v2 against v1"); the dev split
      keeps the best epoch.
    - ``faithful``: ``paper`` as the authors' code runs it, where mogu's defaults differ: no EOS appended to
      targets (``add_eos_token=False``) and the router weight loss averaged per example. With it, ``mogu
      train`` also saves ``routed_sampling=False`` (greedy routed tokens); the router stage has no LoRA
      dropout in every preset.
    """
    if name == "paper":
        return {"stages": {"glad": StageConfig(epochs=10, lr=5e-5, batch_size=8, micro_batch_size=8),
                           "unwill": StageConfig(epochs=10, lr=5e-5, batch_size=8, micro_batch_size=8),
                           "router": StageConfig(epochs=10, lr=5e-4, batch_size=16, micro_batch_size=16)},
                "responder_loss": "ratio", "max_response_tokens": 256}
    if name == "cpu-fast":
        return {"stages": {"glad": StageConfig(epochs=1, lr=1e-3, batch_size=8, micro_batch_size=8, max_examples=64),
                           "unwill": StageConfig(epochs=3 if version == "v2" else 1, lr=2e-3, batch_size=8,
                                                 micro_batch_size=8, max_examples=128),
                           "router": StageConfig(epochs=1, lr=5e-4, batch_size=16, micro_batch_size=16,
                                                 max_examples=256)},
                "responder_loss": "sft", "max_response_tokens": 32, "router_init": "probe",
                "score_router_init": False}
    if name == "faithful":
        return {**preset("paper", version), "append_eos": False, "router_weight_average": "example"}
    raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")


PRESETS = ("paper", "cpu-fast", "faithful")


# Settings a resumed run may change mid-stage: where files are, how often it saves, how it is spread over
# processes and memory. Anything else changes the steps still to come.
_RESUME_FREE = frozenset({"data_dir", "output_dir", "save_every", "keep_checkpoints", "select_batch_size",
                          "backbone_sharding", "gradient_checkpointing", "mixed_precision"})
_RESUME_FREE_STAGE = frozenset({"micro_batch_size"})  # accumulation only: the loss is over the global batch
# The model settings a stage's steps depend on; the rest (where the base model is, the hand-off, sampling)
# matter only when the model answers.
_RESUME_MODEL_KEYS = ("version", "target_modules", "routed_layers", "r", "lora_alpha", "lora_dropout",
                      "router_hidden", "route_tokens", "router_type", "router_backbone")


def _read_record(path: Path) -> dict | None:
    """A run.json, or None when there is none (or it cannot be read: nothing to compare against)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class TrainConfig:
    data_dir: str
    output_dir: str
    stages: dict[str, StageConfig] = field(default_factory=_default_stages)
    router_loss_weight: float = 2.0  # lambda
    # "ratio" is the paper's CE(target)/CE(opposite). "sft" is CE(target) alone: in short CPU runs the
    # ratio mostly raises CE(opposite) (its gradient weight is CE(target)/CE(opposite) times larger),
    # so the expert stops answering before it learns to refuse; see docs/RESULTS.md.
    responder_loss: str = "ratio"
    # "default" (PyTorch init, as the reference) or "probe" (router_init.py: start from per-layer
    # linear probes fitted on the router set; same shapes, far fewer steps needed).
    router_init: str = "default"
    router_init_examples: int = 512  # router-set rows whose prompt tokens feed the probes
    router_init_refits: int = 1  # probe rounds under routing (router_init.py: one removes the feature shift)
    router_init_glad_bias: float = 0.0  # logit shift toward glad: trades missed harmful for over-refusal
    # The prompt gate's probe L2 (standardised features). 1e-3 halved AlpacaEval's flagged share against
    # 1e-2 on the tuning sets (benchmarks/gate_transfer.py; docs/RESULTS.md, "The gate on unseen styles").
    gate_l2: float = 1e-3
    # Score the probe-initialised routers on the dev split so they compete in checkpoint selection. Off
    # in cpu-fast: the trained routers have won every run measured, and a router stage with a single
    # candidate left is kept without a dev pass (the caller's own evaluation scores it; ~80 s each on CPU).
    score_router_init: bool = True
    # v2's joint stage: the router stage also trains both experts (None: on for v2 models, off for v1).
    # Roles stay put because an expert's gradient is scaled by its routing weight: unwill learns
    # from the tokens routed to it (harmful prompts, refusal targets), glad from the benign ones.
    joint_experts: bool | None = None
    joint_expert_lr: float = 1e-4
    max_response_tokens: int = 48  # response tokens trained on (routing acts on the first few)
    # Response tokens the router stage trains on. None or "all": max_response_tokens (the reference trains the
    # routers on whole targets). "route": the model's route_tokens, the only response tokens generate()
    # routes; later ones come from the plain base model, so routing them in training fits a case that
    # never occurs at inference (docs/RESULTS.md, "Router targets cut to the routed prefix").
    router_response_tokens: int | str | None = None
    seed: int = 0
    save_every: int = 50  # optimizer steps between mid-epoch checkpoints
    keep_checkpoints: int = 2  # newest step checkpoints kept per stage (0: keep all, e.g. to study them)
    select_max_new_tokens: int = 16  # tokens generated per dev prompt for checkpoint scoring
    select_batch_size: int = 16
    # Autocast for the forward passes: None honours the launcher's setting (`accelerate launch`, the
    # configs/accelerate files), else "no" / "fp16" / "bf16". Losses and router scores are float32 either way.
    mixed_precision: str | None = None
    # Recompute the backbone's activations in backward instead of keeping them (non-reentrant checkpointing).
    gradient_checkpointing: bool = False
    # EOS closes every untruncated target (True), or targets end where the text ends (False: the authors'
    # add_eos_token=False). mogu appends it so that a refusal learns to stop: a held refusal is an answer.
    append_eos: bool = True
    # The router weight loss's mean: over every token of the step (mogu), or per example, then over examples
    # (the authors'), which weighs a short prompt as much as a long one.
    router_weight_average: str = "token"
    # The frozen backbone over several processes: "none" replicates it on each; "fsdp2" (torch) or "zero3"
    # (DeepSpeed) shards it (sharding.py; the experts and routers stay whole); "auto" shards when the
    # launcher's config is FSDP or DeepSpeed ZeRO stage 3.
    backbone_sharding: str = "auto"

    def validate(self) -> None:
        for name, stage in self.stages.items():
            if name not in STAGES:
                raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
            stage.validate(name)
        if not 0 <= self.router_loss_weight <= 1000:
            raise ConfigError(f"router_loss_weight must be in [0, 1000], got {self.router_loss_weight}")
        if not 1 <= self.max_response_tokens <= 4096:
            raise ConfigError(f"max_response_tokens must be in [1, 4096], got {self.max_response_tokens}")
        rrt = self.router_response_tokens
        if not (rrt is None or rrt in ("route", "all") or (isinstance(rrt, int) and not isinstance(rrt, bool)
                                                   and 1 <= rrt <= 4096)):
            raise ConfigError(f"router_response_tokens must be None, 'all', 'route' or in [1, 4096], got {rrt!r}")
        if self.save_every < 1:
            raise ConfigError("save_every must be >= 1")
        if self.keep_checkpoints < 0:
            raise ConfigError(f"keep_checkpoints must be >= 0 (0 keeps all), got {self.keep_checkpoints}")
        if self.router_init not in ("default", "probe"):
            raise ConfigError(f"router_init must be 'default' or 'probe', got {self.router_init!r}")
        if not 0 <= self.router_init_refits <= 10:
            raise ConfigError(f"router_init_refits must be in [0, 10], got {self.router_init_refits}")
        if not -20 <= self.router_init_glad_bias <= 20:
            raise ConfigError(f"router_init_glad_bias must be in [-20, 20], got {self.router_init_glad_bias}")
        if not 0 < self.gate_l2 <= 100:
            raise ConfigError(f"gate_l2 must be in (0, 100], got {self.gate_l2}")
        if self.router_init_examples < 2:
            raise ConfigError("router_init_examples must be >= 2")
        if self.responder_loss not in ("ratio", "sft"):
            raise ConfigError(f"responder_loss must be 'ratio' or 'sft', got {self.responder_loss!r}")
        if not 0 < self.joint_expert_lr < 1:
            raise ConfigError(f"joint_expert_lr must be in (0, 1), got {self.joint_expert_lr}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if self.router_weight_average not in ("token", "example"):
            raise ConfigError(f"router_weight_average must be 'token' or 'example', got {self.router_weight_average!r}")
        if self.backbone_sharding not in BACKBONE_SHARDING:
            raise ConfigError(f"backbone_sharding must be one of {', '.join(BACKBONE_SHARDING)}, "
                              f"got {self.backbone_sharding!r}")
        if not isinstance(self.append_eos, bool):
            raise ConfigError(f"append_eos must be true or false, got {self.append_eos!r}")


# -- tokenisation ---------------------------------------------------------------------------


# -- stage losses ---------------------------------------------------------------------------

# -- dev scoring (checkpoint selection) ------------------------------------------------------
@torch.no_grad()
def _balanced_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, size) of ceil(n / batch_size) batches whose sizes differ by at most one.

    66 prompts at batch 32 run as 22+22+22, not 32+32+2: a tiny last batch pays a full
    decode loop for a few rows (batched CPU decoding is ~1.3x faster per row at 32 than at 16).
    """
    if n <= 0:
        return []
    count = -(-n // max(1, batch_size))
    sizes = [n // count + (1 if i < n % count else 0) for i in range(count)]
    starts = [sum(sizes[:i]) for i in range(count)]
    return list(zip(starts, sizes))


def generate_responses(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 16,
                       mode: str = "auto", route_tokens: int | None | str = "config", do_sample: bool = False,
                       progress: bool = False, desc: str = "generating") -> list[str]:
    """Batched chat-template generation; returns decoded responses in prompt order."""
    from tqdm.auto import tqdm

    from mogu.tuner.inference import sampling_kwargs

    was_training = model.training
    model.eval()
    # Longest prompts first keeps padding low; results are put back in order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    batches = [order[i:i + size] for i, size in _balanced_batches(len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        texts = [render_prompt(tokenizer, prompts[i]) for i in idx]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        gen_kwargs = sampling_kwargs(tokenizer, max_new_tokens, *((0.7, 0.9) if do_sample else (0.0, 1.0)))
        with model.routing(mode):
            out = model.generate(**enc, route_tokens=route_tokens, **gen_kwargs)
        for row, i in enumerate(idx):
            results[i] = tokenizer.decode(out[row, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    model.train(was_training)
    return results


def refusal_rate(responses: list[str]) -> float:
    return sum(map(is_refusal, responses)) / max(1, len(responses))


def score_stage(stage: str, model, tokenizer, dev: list[dict], cfg: TrainConfig) -> dict[str, float]:
    """Dev-split refusal rates for a stage's model; ``score`` is higher-is-better.

    glad: 1 - refusal on harmful dev (it should comply); unwill: refusal on benign dev
    (it should refuse); router: harmful refusal - benign refusal (routed, m tokens).
    """
    harmful = [d["prompt"] for d in dev if d["harmful"]]
    benign = [d["prompt"] for d in dev if not d["harmful"]]
    kw = dict(max_new_tokens=cfg.select_max_new_tokens, batch_size=cfg.select_batch_size)
    if stage == "glad":
        rate = refusal_rate(generate_responses(model, tokenizer, harmful, mode="glad", **kw))
        return {"harmful_refusal": rate, "score": 1 - rate}
    if stage == "unwill":
        rate = refusal_rate(generate_responses(model, tokenizer, benign, mode="unwill", **kw))
        return {"benign_refusal": rate, "score": rate}
    h = refusal_rate(generate_responses(model, tokenizer, harmful, mode="auto", **kw))
    b = refusal_rate(generate_responses(model, tokenizer, benign, mode="auto", **kw))
    return {"harmful_refusal": h, "benign_refusal": b, "score": h - b}


def _atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, fsync, then one rename: a reader (or a resumed run) never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_dir(path: Path) -> None:
    """Rename out of sight first, then delete: a kill mid-delete never leaves a half-removed folder in view."""
    if path.exists():
        trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{time.time_ns()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


# -- the trainer ----------------------------------------------------------------------------
class Trainer:
    def __init__(self, model, tokenizer, cfg: TrainConfig, *, log: Callable[[str], None] = print,
                 progress: bool = True):
        from accelerate import Accelerator

        cfg.validate()
        if tokenizer is None:
            raise MoGUError("training needs a tokenizer")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.out = Path(cfg.output_dir)
        self.data_dir = Path(cfg.data_dir)
        process_state()  # fails clearly when several processes were launched without a backend
        self.accelerator = acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=_cpu_only_launch())
        self.log = log if acc.is_main_process else (lambda msg: None)
        self.progress = progress and acc.is_main_process
        if cfg.gradient_checkpointing:  # before sharding: FSDP2 hooks the checkpointed layers' forward
            enable_gradient_checkpointing(model)
        self._place_model(cfg.backbone_sharding)
        self._check_precision(acc.mixed_precision)
        self.metrics_path = self.out / "metrics.jsonl"
        strategy = model.routing_strategy
        if not strategy.trains_by_gradient and cfg.joint_experts:
            raise ConfigError("joint_experts trains the experts with token routers; a prompt gate is fitted, "
                              "not trained (leave joint_experts unset or pass --frozen-experts)")
        # A gate's router stage takes no gradient steps, so it has nothing to train the experts with.
        self.joint = strategy.trains_by_gradient and (cfg.joint_experts if cfg.joint_experts is not None
                                             else model.config.version == "v2")
        if acc.num_processes > 1:
            self.log(f"[train] {acc.num_processes} processes ({acc.distributed_type.value}): each step's global "
                     "batch is split across them and the trainable gradients are summed")
        if self.sharding in ("fsdp2", "zero3"):
            self.log(f"[train] {self.sharding}: the frozen backbone is sharded over {acc.num_processes} processes "
                     f"({self.footprint['backbone_params_local']:,} of {self.footprint['backbone_params']:,} "
                     "parameters on this one); the experts and routers are whole on each")
        elif self._own_step:
            self.log(f"[train] {acc.distributed_type.value}: the frozen backbone is replicated on every process "
                     "(--shard-backbone fsdp2 or zero3, fsdp.yaml or deepspeed_zero3.yaml, shard it); only the "
                     "experts' and routers' gradients are exchanged")

    def _place_model(self, sharding: str) -> None:
        """Shard the frozen backbone (``sharding``: fsdp2 or zero3, or auto under an FSDP or ZeRO-3 launcher) and
        move the model to this process's device. The model is never handed to prepare(): the Trainer keeps its
        own data-parallel step for the (small) trainable part under every launcher."""
        from accelerate.utils import DistributedType

        acc, model = self.accelerator, self.model
        self._own_step = acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        launcher_zero = launcher_zero_settings(getattr(acc.state, "deepspeed_plugin", None))
        if sharding == "auto":
            sharding = ("fsdp2" if acc.distributed_type == DistributedType.FSDP
                        else "zero3" if launcher_zero is not None and launcher_zero.get("stage") == 3 else "none")
        if sharding in ("fsdp2", "zero3") and acc.num_processes == 1:
            self.log(f"[train] --shard-backbone {sharding} with one process: nothing to shard, the backbone "
                     "stays whole")
        self.sharding = sharding if acc.num_processes > 1 else "none"
        from mogu.tuner.loading import backbone_quantization

        self.quantization = backbone_quantization(model.base_model)
        if self.sharding in ("fsdp2", "zero3") and self.quantization:
            raise ConfigError(f"a {self.quantization} backbone cannot be sharded with {self.sharding} here: drop "
                              f"--load-in-4bit/--load-in-8bit, or --shard-backbone {self.sharding} (use ddp.yaml)")
        if self.sharding == "fsdp2":
            # Sharded where it lies (host memory), so a device never holds the whole backbone: fully_shard
            # moves each shard to the mesh's device, and .to() then moves the whole experts and routers.
            plugin = getattr(acc.state, "fsdp_plugin", None)
            reshard = getattr(plugin, "reshard_after_forward", True)
            shard_frozen_backbone(model, device=acc.device, reshard_after_forward=reshard if isinstance(reshard, bool)
                                  else True)
        elif self.sharding == "zero3":
            # Partitioned from host memory too: DeepSpeed moves each tensor to the device and keeps 1/N of it.
            zero3_partition_frozen_backbone(model, device=acc.device, launcher_zero=launcher_zero)
        model.to(acc.device)
        self.footprint = backbone_footprint(model)

    def _autocast(self):
        """The forward passes' autocast. Accelerate leaves it to DeepSpeed's engine under a DeepSpeed launcher,
        and the Trainer uses no such engine for its step, so there the launcher's bf16 is applied here (fp16
        would need a gradient scaler, which only DeepSpeed's optimizer has: logged once, not applied)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type != DistributedType.DEEPSPEED or acc.mixed_precision == "no":
            return acc.autocast()
        if acc.mixed_precision == "bf16":
            return torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16)
        if not getattr(self, "_fp16_logged", False):
            self._fp16_logged = True
            self.log("[train] mixed_precision fp16 under a DeepSpeed launcher: not applied (no gradient scaler "
                     "outside DeepSpeed's optimizer); the forward passes run in the backbone's dtype")
        return contextlib.nullcontext()

    def _check_precision(self, mixed: str) -> None:
        """One line where the launcher's autocast and the backbone's dtype disagree."""
        backbone = next(p.dtype for n, p in self.model.named_parameters() if "lora_" not in n and "router" not in n)
        clash = {("fp16", torch.bfloat16): "bfloat16", ("bf16", torch.float16): "float16"}.get((mixed, backbone))
        if clash:
            self.log(f"[train] mixed_precision {mixed} over a {clash} backbone: autocast runs the matmuls in "
                     f"{mixed} while the weights stay {clash}; pass --dtype float32, or match the two")

    # ---- bookkeeping
    def _stage_dir(self, stage: str) -> Path:
        return self.out / "stages" / stage

    def _ckpt_root(self, stage: str) -> Path:
        return self.out / "checkpoints" / stage

    def _stage_params(self, stage: str) -> dict[str, torch.nn.Parameter]:
        model = self.model
        if stage == "router":
            params = model.router_parameters()
            if self.joint:
                params = params + model.expert_parameters("glad") + model.expert_parameters("unwill")
            if model.routing_strategy.trains_by_gradient:  # config.router_backbone's modules, if any
                params = params + model.backbone_parameters()
        else:
            params = model.expert_parameters(stage)
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: p for p in params}

    def _param_groups(self, stage: str, params: dict[str, torch.nn.Parameter], lr: float) -> list[dict]:
        """One AdamW group per learning rate: in the joint stage the experts (and any backbone modules) get
        ``joint_expert_lr``."""
        if stage != "router" or not (self.joint or self.model.backbone_parameters()):
            return [{"params": list(params.values()), "lr": lr}]
        router_ids = {id(p) for p in self.model.router_parameters()}
        return [{"params": [p for p in params.values() if id(p) in router_ids], "lr": lr},
                {"params": [p for p in params.values() if id(p) not in router_ids], "lr": self.cfg.joint_expert_lr}]

    def _snapshot(self, stage: str) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._stage_params(stage).items()}

    def _restore(self, stage: str, tensors: dict[str, torch.Tensor]) -> None:
        params = self._stage_params(stage)
        if set(params) != set(tensors):
            raise MoGUError(f"{stage}: saved tensors do not match the model's {stage} parameters")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[n])

    def _append_metrics(self, row: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, stage: str, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (``step=-1``: every row of the stage) and any
        line cut by a kill, so no step appears twice or half."""
        if not self.metrics_path.is_file():
            return
        kept = []
        stages_after = STAGES[STAGES.index(stage) + 1:]
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict):
                continue
            if row.get("stage") in stages_after or (row.get("stage") == stage and row.get("step", 0) > step):
                continue
            kept.append(line)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in kept))

    # ---- processes
    def _distribution(self) -> dict[str, Any]:
        """run.json's record of how the run was spread: strategy, processes, backbone parameters per rank.
        Every process calls it."""
        acc = self.accelerator
        local = self.footprint["backbone_params_local"]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            per_rank = gather_object([local])
        else:
            per_rank = [local]
        return {"processes": acc.num_processes, "launcher": acc.distributed_type.value,
                "backbone_sharding": self.sharding, "backbone_quantization": self.quantization,
                "backbone_params": self.footprint["backbone_params"],
                "backbone_params_per_rank": per_rank,
                # DeepSpeed's partitioning settings as applied (the launcher's offload_param among them)
                "zero_optimization": self.model.__dict__.get("_zero3_settings") if self.sharding == "zero3" else None}

    def _from_main(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process: decisions read from files, dev scores."""
        if self.accelerator.num_processes == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def _broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Every process takes the main process's weights (as DDP does when it wraps a model)."""
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def _reduce_step(self, params: dict[str, torch.nn.Parameter], totals: dict[str, float]) -> None:
        """Sum the trainable gradients and the step's logged values over processes, in buckets.

        A gradient stays ``None`` only where no process produced one, as in a single process.
        """
        import torch.distributed as dist

        device = self.accelerator.device
        plist = list(params.values())
        small = torch.tensor([float(p.grad is not None) for p in plist] + list(totals.values()),
                             dtype=torch.float64, device=device)
        dist.all_reduce(small)
        bucket: list[torch.nn.Parameter] = []

        def flush() -> None:
            flat = torch.cat([p.grad.detach().reshape(-1).float() if p.grad is not None
                              else torch.zeros(p.numel(), dtype=torch.float32, device=device) for p in bucket])
            dist.all_reduce(flat)
            offset = 0
            for p in bucket:
                p.grad = flat[offset:offset + p.numel()].view(p.shape).to(p.dtype)
                offset += p.numel()
            bucket.clear()

        size = 0
        for p in plist:
            bucket.append(p)
            size += p.numel()
            if size >= 1 << 24:  # 64 MB of float32 per collective
                flush()
                size = 0
        if bucket:
            flush()
        present = small[:len(plist)].tolist()
        for p, has in zip(plist, present):
            if not has:
                p.grad = None
        totals.update(zip(list(totals), small[len(plist):].tolist()))

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state()}
        if self.accelerator.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.accelerator.device)
        return state

    def _gather_rng(self) -> list[dict[str, torch.Tensor]]:
        """Every process's RNG state, by rank (LoRA dropout replays on resume). All processes call it."""
        if self.accelerator.num_processes == 1:
            return [self._rng_state()]
        from accelerate.utils import gather_object

        return gather_object([self._rng_state()])

    @staticmethod
    def _write_rng(path: Path, states: list[dict[str, torch.Tensor]]) -> None:
        torch.save({"torch": states[0]["torch"], "states": states}, path)

    def _load_rng(self, path: Path) -> None:
        if not path.is_file():
            return
        saved = torch.load(path, weights_only=True)
        states = saved.get("states") or [{"torch": saved["torch"]}]
        acc = self.accelerator
        if len(states) != acc.num_processes:
            self.log(f"[rng] {path} holds {len(states)} process state(s) for {acc.num_processes} process(es): "
                     "dropout masks will differ from the interrupted run's")
        state = states[acc.process_index] if acc.process_index < len(states) else states[0]
        torch.set_rng_state(state["torch"])
        if "cuda" in state and acc.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], acc.device)

    # ---- data
    def _rows(self, stage: str, capped: bool = True) -> list[dict]:
        required = {"glad": ("prompt", "comply", "refuse"), "unwill": ("prompt", "refuse", "comply"),
                    "router": ("prompt", "response", "label")}[stage]
        rows = load_stage_file(self.data_dir / STAGE_FILES[stage], required)
        cap = self.cfg.stages[stage].max_examples if capped else None
        return rows[:cap] if cap else rows

    def router_response_tokens(self) -> int:
        """Response tokens per router-set row (TrainConfig.router_response_tokens resolved on this model)."""
        rrt = self.cfg.router_response_tokens
        if rrt == "route":
            rrt = self.model.config.route_tokens  # None: generate() routes every token
        if rrt is None or rrt == "all":
            return self.cfg.max_response_tokens
        return min(rrt, self.cfg.max_response_tokens)

    def _encode(self, stage: str, rows: list[dict]) -> list:
        m = self.cfg.max_response_tokens
        tok, eos = self.tokenizer, self.cfg.append_eos
        if stage == "router":
            m = self.router_response_tokens()
            examples = [(encode_pair(tok, r["prompt"], r["response"], m, eos), int(r["label"])) for r in rows]
            self._check_context(stage, [[ex[0]] for ex in examples])
            return examples
        num, den = ("comply", "refuse") if stage == "glad" else ("refuse", "comply")
        examples = [(encode_pair(tok, r["prompt"], r[num], m, eos), encode_pair(tok, r["prompt"], r[den], m, eos))
                    for r in rows]
        self._check_context(stage, [list(ex) for ex in examples])
        return examples

    def _check_context(self, stage: str, encoded_rows: list[list[tuple[list[int], int]]]) -> None:
        """Past its position table a model fails with an opaque index error (or reads garbage), so a row
        too long for it is named, by file and row, before any step runs."""
        limit = context_length(getattr(self.model, "base_model", self.model))
        if limit is None:
            return
        for i, pairs in enumerate(encoded_rows):
            longest = max(len(ids) for ids, _ in pairs)
            if longest > limit:
                raise DataError(f"{STAGE_FILES[stage]} row {i + 1} is {longest} tokens with its chat template "
                                f"and response, past the model's context of {limit}; shorten its prompt, "
                                f"lower max_response_tokens, or drop the row")

    def _epoch_order(self, n: int, epoch: int) -> list[int]:
        """The global example order of an epoch (a function of seed and epoch only, never of the process)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def _loss(self, stage: str, examples: list, norm: dict[str, int]) -> tuple[torch.Tensor, dict]:
        """One micro-batch's share of the step loss: every term is normalised by the whole step's batch
        (``norm``: its examples, and its tokens for the router weight loss), so the shares of all micro-batches
        on all processes add up to the loss of the step's global batch however it was split."""
        pad = self.tokenizer.pad_token_id
        device = self.accelerator.device
        n = norm["examples"]
        if stage == "router":
            batch = {k: v.to(device) for k, v in collate([e[0] for e in examples], pad).items()}
            labels = torch.tensor([e[1] for e in examples], device=device)
            if self.cfg.router_weight_average == "example":  # each example's mean, averaged over the step's
                ce, err_u, err_g, _ = router_terms(self.model, batch, labels, per_example=True)
                ce, mse_u, mse_g = ce.sum() / n, err_u.sum() / n, err_g.sum() / n
            else:
                ce, err_u, err_g, layers = router_terms(self.model, batch, labels)
                denom = norm["tokens"] * layers
                ce, mse_u, mse_g = ce.sum() / n, err_u / denom, err_g / denom
            loss = ce + self.cfg.router_loss_weight * (mse_u + mse_g)
            return loss, {"ce": ce.item(), "mse_u": mse_u.item(), "mse_g": mse_g.item()}
        num = {k: v.to(device) for k, v in collate([e[0] for e in examples], pad).items()}
        if self.cfg.responder_loss == "sft":
            ce = sequence_nll(self.model, num).sum() / n
            return ce, {"ce_num": ce.item()}
        den = {k: v.to(device) for k, v in collate([e[1] for e in examples], pad).items()}
        ce_num, ce_den = ratio_terms(self.model, num, den)
        loss = (ce_num / ce_den.clamp(min=1e-6)).sum() / n
        return loss, {"ce_num": ce_num.sum().item() / n, "ce_den": ce_den.sum().item() / n}

    def _step(self, stage: str, params: dict[str, torch.nn.Parameter], batch: list) -> dict[str, float]:
        """Forward and backward of one optimizer step's global batch; leaves its gradient in ``.grad``.

        Process r of N takes the r-th contiguous slice of the batch and cuts it into micro-batches; when N
        divides the accumulation count these are exactly one process's micro-batches.
        """
        acc = self.accelerator
        n, world, rank = len(batch), acc.num_processes, acc.process_index
        mine = batch[n * rank // world:n * (rank + 1) // world]
        norm = {"examples": n, "tokens": sum(len(e[0][0]) for e in batch) if stage == "router" else 0}
        keys = LOG_KEYS["router" if stage == "router" else self.cfg.responder_loss]
        totals = dict.fromkeys(("loss", *keys), 0.0)
        micro = self.cfg.stages[stage].micro_batch_size
        for i in range(0, len(mine), micro):
            with self._autocast():  # the launcher's (or TrainConfig's) mixed precision; a no-op for "no"
                loss, parts = self._loss(stage, mine[i:i + micro], norm)
            if self._own_step:
                loss.backward()
            else:
                acc.backward(loss)
            totals["loss"] += loss.item()
            for k, v in parts.items():
                totals[k] += v
        if self.sharding != "none":
            # A sharded backbone gathers each layer with a collective in every forward and backward, so a
            # process with fewer micro-batches than another (a short last batch) would wait forever: it runs
            # zero-weighted ones on the step's first rows until every process has run as many.
            counts = [math.ceil(len(batch[n * r // world:n * (r + 1) // world]) / micro) for r in range(world)]
            for _ in range(max(counts) - counts[rank]):
                with self._autocast():
                    loss, _ = self._loss(stage, batch[:micro], norm)
                (loss * 0.0).backward()
        if world > 1:
            self._reduce_step(params, totals)
        return totals

    def _train_mode(self, stage: str) -> None:
        """Train mode, with the LoRA dropout off in the router stage: its experts are frozen there, and a
        dropout mask on a frozen expert only adds noise to the router's loss (three identical loss calls gave
        5.8180, 5.8195 and 5.8133). The authors' LoRA layer has no dropout; the responder stages keep it."""
        self.model.train()
        if stage == "router":
            for m in self.model.routed_modules.values():
                m.lora_dropout.eval()

    def _fit_gate_stage(self) -> dict[str, Any]:
        """The router stage of a prompt-gated model: fit the gate's per-layer probes (gate.py), no steps.

        Every process fits the same probes on the same rows (deterministic, no-grad), so nothing is exchanged.
        """
        from mogu.train.probe import fit_gate

        from mogu.train.data import load_probe_rows, probe_input

        stage, model = "router", self.model
        if (self.data_dir / PROBE_FILE).is_file():  # every train prompt (data.PROBE_FILE); the probes need no answer
            rows = load_probe_rows(self.data_dir)
        else:
            rows = self._rows(stage, capped=False)[: self.cfg.router_init_examples]
        start = time.perf_counter()
        model.eval()
        stats = fit_gate(model, [probe_input(r) for r in rows], [int(r["label"]) for r in rows],
                         batch_size=self.cfg.stages[stage].micro_batch_size, l2=self.cfg.gate_l2,
                         progress=self.progress)
        model.routing_strategy.set_operating_point(0.0, self.cfg.router_init_glad_bias)
        elapsed = round(time.perf_counter() - start, 1)
        self._append_metrics({"stage": stage, "step": 0, "gate_fit": stats})
        reason = (f"prompt gate fitted on {stats['examples']} labelled train prompts: training accuracy "
                  f"{stats['accuracy']:.3f} (per layer min {stats['layer_accuracy_min']:.3f}, mean "
                  f"{stats['layer_accuracy_mean']:.3f}); threshold {self.cfg.router_init_glad_bias:+g}")
        self.log(f"[{stage}] {reason} in {elapsed:.0f} s")
        result = {"stage": stage, "steps": 0, "train_s": elapsed, "init_s": 0.0, "history": [], "selection": reason}
        return self._finish_stage(stage, result)

    def _finish_stage(self, stage: str, result: dict[str, Any]) -> dict[str, Any]:
        """Write the stage's selected tensors, RNG state and done.json (last: it marks the stage finished)."""
        states = self._gather_rng()
        if self.accelerator.is_main_process:
            stage_dir = self._stage_dir(stage)
            selected = {n: t.contiguous() for n, t in self._snapshot(stage).items()}
            _atomic_save(stage_dir / "selected.safetensors", lambda tmp: save_file(selected, str(tmp)))
            _atomic_save(stage_dir / "rng.pt", lambda tmp: self._write_rng(tmp, states))
            atomic_write_text(stage_dir / "done.json", json.dumps(result, indent=2))
        self.accelerator.wait_for_everyone()
        self.model.set_trainable([])
        return result

    # ---- checkpoints
    def _save_checkpoint(self, stage: str, optimizer, position: dict) -> None:
        states = self._gather_rng()  # every process calls this; only the main one writes
        if not self.accelerator.is_main_process:
            return
        root = self._ckpt_root(stage)
        self._sweep(root)
        with atomic_directory(root / f"step-{position['step']:07d}", kind="training-step") as tmp:
            save_file({n: t.contiguous() for n, t in self._snapshot(stage).items()}, str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            self._write_rng(tmp / "rng.pt", states)
            (tmp / "state.json").write_text(json.dumps(position))
        if self.cfg.keep_checkpoints:
            for old in sorted(root.glob("step-*"))[:-self.cfg.keep_checkpoints]:
                _remove_dir(old)

    @staticmethod
    def _sweep(root: Path) -> None:
        """Remove scratch folders a killed run left beside the checkpoints (never a checkpoint itself)."""
        if root.is_dir():
            for leftover in root.glob(".step-*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def _sweep_scratch(self) -> None:
        """On resume, delete the scratch files and folders a killed run left (all dot-named, never read)."""
        for pattern in (".metrics.jsonl.*", ".run.json.*", ".model.*", "stages/.*", "stages/*/.*",
                        "checkpoints/.*", "checkpoints/*/.step-*"):
            for leftover in self.out.glob(pattern):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    def _latest_checkpoint(self, stage: str) -> Path | None:
        found = sorted(p for p in self._ckpt_root(stage).glob("step-*") if (p / "state.json").is_file())
        return found[-1] if found else None

    def _save_best(self, stage: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.accelerator.is_main_process:
            _atomic_save(self._stage_dir(stage) / "best.safetensors", lambda tmp: save_file(tensors, str(tmp)))

    # ---- running
    def train(self, resume: bool = False) -> dict[str, Any]:
        acc = self.accelerator
        record = run_record({"train_config": asdict(self.cfg), "mogu_config": self.model.config.to_dict()},
                            [self.data_dir / f for f in (*STAGE_FILES.values(), DEV_FILE, PROBE_FILE)
                             if f != PROBE_FILE or (self.data_dir / f).is_file()])
        record["distribution"] = self._distribution()
        if resume:
            previous = self._from_main(_read_record(self.out / "run.json") if acc.is_main_process else None)
            if previous is not None:
                self._check_resumed_settings(previous, record)
                # The run's first record is kept: the steps already taken ran under it.
                record["earlier_runs"] = [*previous.pop("earlier_runs", []), previous]
        if acc.is_main_process:
            mark_run_folder(self.out)
            if not resume and self.metrics_path.exists():
                self.metrics_path.unlink()
            if resume:
                self._sweep_scratch()
            atomic_write_text(self.out / "run.json", json.dumps(record, indent=2))
        acc.wait_for_everyone()
        self._broadcast_params(self.model.added_parameters())
        summary = {}
        for stage in STAGES:
            if stage in self.cfg.stages:
                summary[stage] = self.train_stage(stage, resume=resume)
            elif resume and self._from_main((self._stage_dir(stage) / "done.json").is_file()):
                # A stage not asked for this time: reuse what an earlier run selected.
                self._restore(stage, load_file(str(self._stage_dir(stage) / "selected.safetensors")))
                summary[stage] = json.loads((self._stage_dir(stage) / "done.json").read_text())
        self.model.set_routing("auto")
        self.model.eval()
        return summary

    def _check_resumed_settings(self, previous: dict, record: dict) -> None:
        """A ConfigError when a stage stopped mid-way would resume under other settings or data: its next
        steps would not be those of the run it continues. A finished stage is reused whatever changed, and a
        stage not started yet may be configured anew (the demo trains its router so, on finished experts)."""
        now_args = record["args"]
        now_tc = now_args["train_config"]
        hashes = lambda r: {Path(k).name: v for k, v in (r.get("data_sha256") or {}).items()}  # noqa: E731
        now_data = hashes(record)
        for stage in self.cfg.stages:
            mid_stage = self._from_main(self._latest_checkpoint(stage) is not None
                                        and not (self._stage_dir(stage) / "done.json").is_file())
            # The newest earlier record that trained this stage: a run between may have left it out.
            then = next((r for r in [previous, *reversed(previous.get("earlier_runs") or [])]
                         if stage in (((r.get("args") or {}).get("train_config") or {}).get("stages") or {})), None)
            if not mid_stage or then is None:
                continue
            then_args = then["args"]
            then_tc = then_args["train_config"]
            # Keys an older record lacks are not counted as changed: the field did not exist when it ran.
            changed = [k for k in now_tc if k not in _RESUME_FREE and k != "stages" and k in then_tc
                       and then_tc[k] != now_tc[k]]
            then_stage, now_stage = then_tc["stages"][stage], now_tc["stages"][stage]
            changed += [f"stages.{stage}.{k}" for k in now_stage if k not in _RESUME_FREE_STAGE and k in then_stage
                        and then_stage[k] != now_stage[k]]
            then_model = then_args.get("mogu_config") or {}
            changed += [f"mogu_config.{k}" for k in _RESUME_MODEL_KEYS
                        if k in then_model and then_model[k] != now_args["mogu_config"].get(k)]
            file = STAGE_FILES[stage]
            then_data = hashes(then)
            if file in then_data and then_data[file] != now_data.get(file):
                changed.append(f"{file} (its contents)")
            if changed:
                raise ConfigError(f"--resume would continue the {stage} stage, stopped mid-way, with other settings "
                                  f"than it ran with: {', '.join(changed)}. Pass the same options and data, or "
                                  "start afresh without --resume")

    def train_stage(self, stage: str, resume: bool = False) -> dict[str, Any]:
        model, acc = self.model, self.accelerator
        main = acc.is_main_process
        done = self._stage_dir(stage) / "done.json"
        if resume and self._from_main(done.is_file()):
            self._restore(stage, load_file(str(self._stage_dir(stage) / "selected.safetensors")))
            if stage == "router" and not model.routing_strategy.trains_by_gradient:
                # A fitted strategy's operating point is set by the run's config, not stored with the stage.
                model.routing_strategy.set_operating_point(0.0, self.cfg.router_init_glad_bias)
            self._load_rng(self._stage_dir(stage) / "rng.pt")  # the next stage's dropout as if never stopped
            self.log(f"[{stage}] already finished: loaded its selected weights")
            return json.loads(done.read_text())
        if not resume and main:  # a fresh run never resumes from, or keeps, an older run's stage files
            _remove_dir(self._stage_dir(stage))
            _remove_dir(self._ckpt_root(stage))
        if stage == "router" and not model.routing_strategy.trains_by_gradient:
            return self._fit_gate_stage()
        scfg = self.cfg.stages[stage]
        examples = self._encode(stage, self._rows(stage))
        dev_path = self.data_dir / DEV_FILE
        dev = load_stage_file(dev_path, ("prompt", "harmful")) if dev_path.is_file() else []
        params = self._stage_params(stage)
        model.set_trainable(list(params.values()))
        optimizer = torch.optim.AdamW(self._param_groups(stage, params, scfg.lr), lr=scfg.lr, weight_decay=0.0)
        if not self._own_step:
            optimizer = acc.prepare(optimizer)
        steps_per_epoch = math.ceil(len(examples) / scfg.batch_size)
        total_steps = max(1, math.ceil(steps_per_epoch * scfg.epochs))
        position = {"epoch": 0, "batch": 0, "step": 0}
        history: list[dict] = []
        best: dict[str, Any] | None = None
        # Every process resumes from the checkpoint the main process sees.
        ckpt = self._from_main(self._latest_checkpoint(stage) if resume else None)
        if ckpt is not None:
            self._restore(stage, load_file(str(ckpt / "trainable.safetensors")))
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            position = json.loads((ckpt / "state.json").read_text())
            self._load_rng(ckpt / "rng.pt")
            history = position.pop("history", [])
            best_file = self._stage_dir(stage) / "best.safetensors"
            if history and best_file.is_file():
                best = {**max(history, key=lambda h: h["score"]), "tensors": load_file(str(best_file))}
            self.log(f"[{stage}] resuming from {ckpt.name} (epoch {position['epoch']}, step {position['step']})")
        if resume and main:
            self._sweep(self._ckpt_root(stage))
            self._truncate_metrics(stage, position["step"] if ckpt is not None else -1)

        init_s = 0.0
        if stage == "router" and self.cfg.router_init == "probe" and ckpt is None:
            from mogu.train.router_init import probe_init

            t_init = time.perf_counter()

            # The probes see router rows beyond a training cap (no-grad passes cost a third of a step).
            # Only prompt tokens are probed, so responses are cut off, and length-sorted batches keep
            # padding low: together about half the compute of full, shuffled sequences.
            sample = self._encode(stage, self._rows(stage, capped=False)[: self.cfg.router_init_examples])
            sample = sorted((((ids[:len(ids) - n_resp], 0), label) for (ids, n_resp), label in sample),
                            key=lambda e: len(e[0][0]))
            pad, device = self.tokenizer.pad_token_id, acc.device
            batches = []
            for i in range(0, len(sample), scfg.micro_batch_size):
                chunk = sample[i:i + scfg.micro_batch_size]
                batch = {k: v.to(device) for k, v in collate([e[0] for e in chunk], pad).items()}
                batches.append((batch, torch.tensor([e[1] for e in chunk], device=device)))
            model.eval()
            probe_init(model, batches, refits=self.cfg.router_init_refits, glad_bias=self.cfg.router_init_glad_bias,
                       log=self.log)
            self._broadcast_params(list(params.values()))
            init_s = round(time.perf_counter() - t_init, 1)
            self.log(f"[{stage}] probe init took {init_s:.0f} s")
            if dev and self.cfg.score_router_init:
                # The probe-initialised routers compete in checkpoint selection like any epoch,
                # so a short CPU run that drifts from a good start keeps the start.
                scores = self._from_main(score_stage(stage, model, self.tokenizer, dev, self.cfg))
                entry = {"epoch": -1, "step": 0, **scores}
                history.append(entry)
                self._append_metrics({"stage": stage, "step": 0, "dev": scores, "init": "probe"})
                self.log(f"[{stage}] probe init: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))
                best = {**entry, "tensors": self._snapshot(stage)}
                self._save_best(stage, best["tensors"])
        model.set_routing(STAGE_MODES[stage])
        self._train_mode(stage)
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=position["step"], desc=f"train {stage}", disable=not self.progress)
        start = time.perf_counter()
        n_epochs = math.ceil(scfg.epochs)
        # Selection needs scores only when there is a choice; the responders are always scored (their dev
        # refusal rate is the stage's health check), a router stage with one candidate is not.
        score_epochs = bool(dev) and (stage != "router" or n_epochs > 1 or bool(history))
        acc_steps = scfg.accumulation
        micro: list[list[int]] = []

        def step_fn(_step: int) -> dict[str, Any]:
            group = micro[position["batch"]:position["batch"] + acc_steps]
            position["batch"] += len(group)
            return self._step(stage, params, [examples[i] for idx in group for i in idx])

        def after_step(steps_done: int, loss_value: float, logs: dict[str, Any]) -> bool:
            nonlocal best
            position["step"] = steps_done
            self._append_metrics({"stage": stage, "step": position["step"], "epoch": position["epoch"],
                                  "loss": loss_value, **logs, "lr": scfg.lr,
                                  "elapsed_s": round(time.perf_counter() - start, 2)})
            if position["batch"] >= len(micro) or position["step"] >= total_steps:  # the end of an epoch
                if score_epochs:
                    model.eval()
                    # Every process scores (they hold the same weights); the main one's scores decide.
                    scores = self._from_main(score_stage(stage, model, self.tokenizer, dev, self.cfg))
                    self._train_mode(stage)
                    model.set_routing(STAGE_MODES[stage])
                    entry = {"epoch": position["epoch"], "step": position["step"], **scores}
                    history.append(entry)
                    self._append_metrics({"stage": stage, "step": position["step"], "dev": scores})
                    self.log(f"[{stage}] epoch {position['epoch']} step {position['step']}: "
                             + ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))
                    # Strictly better only: on a tie the earlier (less drifted) checkpoint stays.
                    if best is None or scores["score"] > best["score"]:
                        best = {**entry, "tensors": self._snapshot(stage)}
                        self._save_best(stage, best["tensors"])
                position["epoch"] += 1
                position["batch"] = 0
                self._save_checkpoint(stage, optimizer, {**position, "history": history})
                return False
            if position["step"] % self.cfg.save_every == 0:
                self._save_checkpoint(stage, optimizer, {**position, "history": history})
            return True

        while position["step"] < total_steps and position["epoch"] < n_epochs:
            order = self._epoch_order(len(examples), position["epoch"])
            micro[:] = [order[i:i + scfg.micro_batch_size] for i in range(0, len(order), scfg.micro_batch_size)]
            if position["batch"] >= len(micro):
                break  # this epoch was stepped through already: nothing would advance
            run_steps(optimizer, start=position["step"], stop=total_steps, step_fn=step_fn, after_step=after_step,
                      bar=bar)
        bar.close()
        model.eval()
        if best is not None:
            self._restore(stage, best["tensors"])
            reason = (f"kept epoch {best['epoch']} (step {best['step']}): highest dev score {best['score']:.3f} "
                      f"among {len(history)} checkpoint(s); ties go to the earlier one")
        elif dev:
            reason = "one candidate (a single router epoch, probe init not scored): kept the last weights unscored"
        else:
            reason = "no dev set: kept the last weights"
        self.log(f"[{stage}] {reason}")
        # train_s: the optimizer steps and their dev scoring; init_s: the probe init before them.
        result = {"stage": stage, "steps": position["step"], "train_s": round(time.perf_counter() - start, 1),
                  "init_s": init_s,
                  "history": history, "selection": reason}
        return self._finish_stage(stage, result)
