"""Instruction fine-tuning with a task LoRA, optionally mixing MoGU's router set into every batch.

The task LoRA is a real PEFT LoRA (``peft.inject_adapter_in_model``, adapter name ``task``) on the
backbone's projections other than the MoGU-routed ones (Llama-like: q/k/v/gate/up/down_proj); the
same default applies to a plain base model, so base and MoGU fine-tunes train the same adapter.
Everything else stays frozen: the backbone, and on a MoGUModel both experts and the routers. A
MoGUModel trains with routing ``auto`` and every position routed (as in the router stage), its
routed layers in eval mode so the frozen experts run as at inference.

Loss: mean response-token cross-entropy per example (``training.sequence_nll``), averaged over the
optimizer batch, so each example weighs the same whatever its length and ``mix_ratio`` is the share
of the loss that the mix rows carry.

Batches (``MixSchedule``): batch ``s`` holds ``floor(r*B*(s+1)) - floor(r*B*s)`` rows of the mix set
(router.jsonl: harmful prompt + refusal, benign prompt + helpful answer) and the rest task rows. So
every batch holds floor or ceil of r*B mix rows and the first s batches exactly floor(r*B*s). Both
sources are read as concatenated seeded permutations (one per pass), so a batch is a function of
(step, seed) alone and ``resume`` needs only the step.

Output (``--out``): ``run.json``, ``metrics.jsonl``, ``checkpoints/step-*`` (task LoRA, optimizer,
RNG, step; written atomically), ``summary.json`` and ``model/``: a MoGU checkpoint with a
``task_adapter/`` subfolder (``MoGUModel.from_pretrained`` applies it), or for a plain base the
task adapter itself as a PEFT folder (``PeftModel.from_pretrained(base, "model")``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mogu.errors import ConfigError, DataError, MoGUError
from mogu.io import atomic_directory, atomic_write_text, mark_run_folder, run_record
from mogu.tuner.model import MoGUModel
from mogu.tuner.task_adapter import (TASK_ADAPTER_KIND, add_task_adapter, load_task_adapter, save_task_adapter, task_adapter_parameters,
                                       task_adapter_state_dict, load_task_state_dict)
from mogu.train.loop import run_steps
from mogu.train.tasks import load_task_rows, score_exact, task_file, task_name_of

_CKPT_TENSORS = "task_lora.safetensors"


# -- where the task LoRA goes -----------------------------------------------------------------------

# -- the task adapter -----------------------------------------------------------------------------

def _read_metric_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
    return rows


def _inputs(cfg: "FinetuneConfig", model_name: str | None) -> tuple:
    """The paths a fine-tuning run reads: never replaced by its output."""
    return tuple(p for p in (model_name, cfg.task_data, cfg.mix_data) if p)


# -- configuration and batches ----------------------------------------------------------------------
def mix_file(path: str | Path) -> Path:
    """A router set: the jsonl itself, or router.jsonl inside a folder from ``mogu data build``."""
    from mogu.train.data import STAGE_FILES

    path = Path(path)
    if path.is_dir():
        path = path / STAGE_FILES["router"]
    if not path.is_file():
        raise DataError(f"{path}: no such mix file (pass a router.jsonl or the folder from `mogu data build`)")
    return path


@dataclass
class FinetuneConfig:
    task_data: str  # a task jsonl, or a folder from `mogu data task` (its train.jsonl)
    output_dir: str
    mix_data: str | None = None  # router.jsonl or the `mogu data build` folder holding it
    mix_ratio: float = 0.0  # share of every batch drawn from mix_data, in [0, 1)
    steps: int | None = None  # optimizer steps; or
    epochs: float | None = None  # passes over the task rows (default 1 when steps is None)
    lr: float = 2e-4
    batch_size: int = 8  # rows per optimizer step (task + mix)
    micro_batch_size: int | None = None  # rows per forward pass (None: the whole batch)
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every decoder projection but MoGU's targets
    max_response_tokens: int = 48
    save_every: int = 50
    keep_checkpoints: int = 2  # newest step checkpoints kept (0: all)
    seed: int = 0
    # Prompt-gated MoGU models: refit the gate's probes on the mix set's labelled prompts after training, since
    # the task adapter moves the features they read (the calibrated threshold is kept).
    refit_gate: bool = True
    dtype: str = "auto"  # the backbone's (mogu.tuner.loading.resolve_dtype); the task LoRA and MoGU's parts stay float32
    gradient_checkpointing: bool = False  # recompute the backbone's activations in backward
    quantization: str | None = None  # "4bit" / "8bit": a bitsandbytes-quantised backbone (mogu.tuner.loading)
    overwrite: bool = False  # replace output_dir/model even if mogu did not write it (mogu.io.check_replaceable)

    def validate(self) -> None:
        """Ranges and input files, checked before any model is loaded."""
        from mogu.tuner.loading import check_quantization, resolve_dtype

        resolve_dtype(self.dtype)
        check_quantization(self.quantization)
        if not 0.0 <= self.mix_ratio < 1.0:
            raise ConfigError(f"mix ratio must be in [0, 1), got {self.mix_ratio}")
        if self.mix_ratio > 0 and not self.mix_data:
            raise ConfigError(f"mix ratio {self.mix_ratio} needs mix data (--mix-data: a router.jsonl or the folder "
                              "from `mogu data build`)")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give steps or epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr must be in (0, 1), got {self.lr}")
        if self.batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise ConfigError("batch sizes must be >= 1")
        if not isinstance(self.r, int) or not 1 <= self.r <= 1024:
            raise ConfigError(f"r must be an integer in [1, 1024], got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 1 <= self.max_response_tokens <= 4096:
            raise ConfigError(f"max_response_tokens must be in [1, 4096], got {self.max_response_tokens}")
        if self.save_every < 1 or self.keep_checkpoints < 0:
            raise ConfigError("save_every must be >= 1 and keep_checkpoints >= 0")
        task_file(self.task_data)
        if self.mix_ratio > 0:
            mix_file(self.mix_data)

    def total_steps(self, n_task: int) -> int:
        if self.steps is not None:
            return self.steps
        epochs = Fraction(self.epochs if self.epochs is not None else 1.0).limit_denominator(10_000)
        task_per_batch = self.batch_size * (1 - _fraction(self.mix_ratio))
        return max(1, math.ceil(epochs * n_task / task_per_batch))


def _fraction(x: float) -> Fraction:
    # 0.3 is 0.29999... as a float: floor(0.3 * 10) must still be 3.
    return Fraction(x).limit_denominator(10_000)


class MixSchedule:
    """Which rows make optimizer batch ``step``: a pure function of (step, sizes, batch size, ratio, seed)."""

    def __init__(self, n_task: int, n_mix: int, batch_size: int, ratio: float, seed: int):
        if n_task < 1 or (ratio > 0 and n_mix < 1):
            raise DataError("the task set (and, with a mix ratio, the mix set) must hold at least one row")
        self.sizes = {"task": n_task, "mix": n_mix}
        self.batch_size, self.ratio, self.seed = batch_size, _fraction(ratio), seed
        self._perms: dict[tuple[str, int], list[int]] = {}

    def mix_before(self, step: int) -> int:
        """Mix rows in batches 0 .. step-1."""
        return math.floor(self.ratio * self.batch_size * step)

    def mix_count(self, step: int) -> int:
        return self.mix_before(step + 1) - self.mix_before(step)

    def batch(self, step: int) -> list[tuple[str, int]]:
        """(source, row index) pairs: the batch's task rows, then its mix rows."""
        m0, m1 = self.mix_before(step), self.mix_before(step + 1)
        t0, t1 = step * self.batch_size - m0, (step + 1) * self.batch_size - m1
        return [("task", self._row("task", p)) for p in range(t0, t1)] + \
               [("mix", self._row("mix", p)) for p in range(m0, m1)]

    def _row(self, source: str, position: int) -> int:
        n = self.sizes[source]
        cycle, offset = divmod(position, n)
        key = (source, cycle)
        if key not in self._perms:
            order = list(range(n))
            random.Random(f"mogu-finetune:{self.seed}:{source}:{cycle}").shuffle(order)
            self._perms[key] = order
        return self._perms[key][offset]


class _CausalLM:
    """What ``training.sequence_nll`` expects (a callable with ``base_model``) for a plain HF model, so it
    can ask for logits on the response positions only."""

    def __init__(self, lm: nn.Module):
        self.base_model = lm

    def __call__(self, **kwargs):
        return self.base_model(**kwargs)


# -- the trainer ----------------------------------------------------------------------------------
class FineTuner:
    """Fine-tunes a task LoRA on ``model`` (a MoGUModel or a plain causal LM) with ``cfg``."""

    def __init__(self, model: nn.Module, tokenizer, cfg: FinetuneConfig, *, model_name: str | None = None,
                 log: Callable[[str], None] = print, progress: bool = True):
        from accelerate import Accelerator

        from mogu.train.data import load_stage_file
        from mogu.train.stages import _cpu_only_launch, process_state

        cfg.validate()
        if tokenizer is None:
            raise MoGUError("fine-tuning needs a tokenizer")
        process_state()  # fails clearly when several processes were launched without a backend
        self.accelerator = Accelerator(cpu=_cpu_only_launch())
        if self.accelerator.num_processes > 1:
            raise MoGUError("mogu finetune runs in a single process; start it without accelerate launch/torchrun")
        self.model, self.tokenizer, self.cfg, self.log, self.progress = model, tokenizer, cfg, log, progress
        self.is_mogu = isinstance(model, MoGUModel)
        # A prompt gate decides on the prompt alone, but training rows hold prompt + response: each micro-batch
        # pins the gate's decision on its prompts (see _gate_weights), as generate() does at inference.
        self.gated = self.is_mogu and model.routing_strategy.decides_per_prompt
        self.model_name = model_name or (model.config.base_model_name_or_path if self.is_mogu
                                         else getattr(model.config, "_name_or_path", None))
        self.out = Path(cfg.output_dir)
        self.metrics_path = self.out / "metrics.jsonl"
        self.task_path = task_file(cfg.task_data)
        self.task_rows = load_task_rows(self.task_path)
        self.mix_path = mix_file(cfg.mix_data) if cfg.mix_ratio > 0 else None
        self.mix_rows = load_stage_file(self.mix_path, ("prompt", "response")) if self.mix_path else []
        self.schedule = MixSchedule(len(self.task_rows), len(self.mix_rows), cfg.batch_size, cfg.mix_ratio, cfg.seed)
        self.total_steps = cfg.total_steps(len(self.task_rows))
        torch.manual_seed(cfg.seed)  # the task LoRA's initial A matrices, then dropout, follow the seed
        self.lora_config = add_task_adapter(model, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=cfg.target_modules)
        model.to(self.accelerator.device)
        self.params = task_adapter_parameters(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        self._lm = model if self.is_mogu else _CausalLM(model)
        if cfg.gradient_checkpointing:
            from mogu.train.stages import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)

    # ---- bookkeeping
    def _record(self) -> dict[str, Any]:
        args = {"finetune_config": asdict(self.cfg), "model": self.model_name, "is_mogu": self.is_mogu,
                "task": task_name_of(self.task_rows), "task_rows": len(self.task_rows), "mix_rows": len(self.mix_rows),
                "total_steps": self.total_steps, "task_lora": {
                    "r": self.lora_config.r, "lora_alpha": self.lora_config.lora_alpha,
                    "lora_dropout": self.lora_config.lora_dropout,
                    "target_modules": sorted(self.lora_config.target_modules)}}
        if self.is_mogu:
            args["mogu_config"] = self.model.config.to_dict()
        return run_record(args, [p for p in (self.task_path, self.mix_path) if p is not None])

    def _append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint and any line cut by a kill."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in kept))

    def _sweep_scratch(self) -> None:
        """Scratch files and folders a killed run left (all dot-named, never read)."""
        for pattern in (".metrics.jsonl.*", ".run.json.*", ".summary.json.*", ".model.*", "checkpoints/.*"):
            for leftover in self.out.glob(pattern):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    # ---- checkpoints
    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state()}
        if self.accelerator.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.accelerator.device)
        return state

    def _save_checkpoint(self, optimizer, step: int) -> None:
        from mogu.train.stages import _remove_dir

        root = self.out / "checkpoints"
        with atomic_directory(root / f"step-{step:07d}", kind="finetune-step") as tmp:
            save_file(task_adapter_state_dict(self.model), str(tmp / _CKPT_TENSORS))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self._rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step}))
        if self.cfg.keep_checkpoints:
            for old in sorted(root.glob("step-*"))[:-self.cfg.keep_checkpoints]:
                _remove_dir(old)

    def _latest_checkpoint(self) -> Path | None:
        found = sorted(p for p in (self.out / "checkpoints").glob("step-*") if (p / "state.json").is_file())
        return found[-1] if found else None

    def _restore(self, ckpt: Path, optimizer) -> int:
        load_task_state_dict(self.model, load_file(str(ckpt / _CKPT_TENSORS)), str(ckpt / _CKPT_TENSORS))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.accelerator.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.accelerator.device)
        return int(json.loads((ckpt / "state.json").read_text())["step"])

    # ---- running
    def _train_mode(self) -> None:
        self.model.train()
        if self.is_mogu:
            self.model.set_routing("auto")
            for m in self.model.routed_modules.values():
                m.eval()  # frozen experts without dropout, as at inference

    def encode(self) -> dict[str, list]:
        """(token ids, response length) per row of each source, in file order."""
        from mogu.chat import encode_pair

        m = self.cfg.max_response_tokens
        return {src: [encode_pair(self.tokenizer, r["prompt"], r["response"], m) for r in rows]
                for src, rows in (("task", self.task_rows), ("mix", self.mix_rows))}

    def _step(self, step: int, encoded: dict[str, list]) -> dict[str, float]:
        """Forward and backward of optimizer batch ``step``; leaves the gradient in ``.grad``."""
        from mogu.train.losses import collate, sequence_nll

        picks = self.schedule.batch(step)
        n = len(picks)
        micro = self.cfg.micro_batch_size or n
        device = self.accelerator.device
        sums = {"task": 0.0, "mix": 0.0}
        for i in range(0, n, micro):
            chunk = picks[i:i + micro]
            seqs = [encoded[src][j] for src, j in chunk]
            batch = {k: v.to(device) for k, v in collate(seqs, self.tokenizer.pad_token_id).items()}
            with self.accelerator.autocast():  # the launcher's mixed precision, if any; NLLs are float32
                if self.gated:
                    with self.model.pin_routing(self._gate_weights(seqs)):
                        nll = sequence_nll(self._lm, batch)
                else:
                    nll = sequence_nll(self._lm, batch)
            self.accelerator.backward(nll.sum() / n)  # every micro-batch's share of the batch mean
            for (src, _), value in zip(chunk, nll.detach().tolist()):
                sums[src] += value
        n_mix = sum(src == "mix" for src, _ in picks)
        logs = {"loss": (sums["task"] + sums["mix"]) / n, "task_ce": sums["task"] / max(1, n - n_mix),
                "task_rows": n - n_mix, "mix_rows": n_mix}
        if n_mix:
            logs["mix_ce"] = sums["mix"] / n_mix
        return logs

    def _refit_gate(self) -> dict[str, Any] | None:
        """Refit the prompt gate's probes on the fine-tuned backbone (the mix set's prompts and labels), keeping
        the threshold; None when not asked for or without labelled mix rows (then the gate reads shifted features)."""
        from mogu.train.data import probe_input
        from mogu.train.probe import fit_gate

        labelled = [r for r in self.mix_rows if r.get("label") in (0, 1)]
        if not self.cfg.refit_gate or not labelled or len({r["label"] for r in labelled}) < 2:
            self.log("[finetune] the prompt gate was not refit (needs --mix-data with harmful and benign rows): its "
                     "probes read the fine-tuned backbone's features with the weights fitted before fine-tuning")
            return None
        start = time.perf_counter()
        strategy = self.model.routing_strategy
        operating_point = strategy.operating_point()
        threshold = float(operating_point)
        stats = fit_gate(self.model, [probe_input(r) for r in labelled], [int(r["label"]) for r in labelled],
                         batch_size=self.cfg.micro_batch_size or self.cfg.batch_size, progress=self.progress)
        strategy.set_operating_point(operating_point)  # the refit probes keep the calibrated threshold
        stats = {**stats, "threshold": threshold, "seconds": round(time.perf_counter() - start, 1)}
        self.log(f"[finetune] refit the prompt gate on {stats['examples']} mix-set prompts: training accuracy "
                 f"{stats['accuracy']:.3f}, threshold kept at {threshold:+g}")
        return stats

    def _gate_weights(self, seqs: list[tuple[list[int], int]]) -> torch.Tensor:
        """The prompt gate's (u, g) per row, decided on the rows' prompts alone with the current backbone
        (task adapter included, as at inference) and without dropout."""
        from mogu.train.losses import collate

        prompts = collate([(ids[:len(ids) - n_resp], 0) for ids, n_resp in seqs], self.tokenizer.pad_token_id)
        device = self.accelerator.device
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model.routing_weights(prompts["input_ids"].to(device),
                                                  prompts["attention_mask"].to(device))
        finally:
            self._train_mode()

    def train(self, resume: bool = False) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from mogu.train.stages import _remove_dir

        cfg, model = self.cfg, self.model
        mark_run_folder(self.out)
        if resume:
            self._sweep_scratch()
        else:  # a fresh run never resumes from, or keeps, an older run's checkpoints and metrics
            _remove_dir(self.out / "checkpoints")
            self.metrics_path.unlink(missing_ok=True)
        atomic_write_text(self.out / "run.json", json.dumps(self._record(), indent=2))
        encoded = self.encode()
        optimizer = self.accelerator.prepare(
            torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, weight_decay=0.0))
        step = 0
        ckpt = self._latest_checkpoint() if resume else None
        if ckpt is not None:
            step = self._restore(ckpt, optimizer)
            self.log(f"[finetune] resuming from {ckpt.name} (step {step} of {self.total_steps})")
        if resume:
            self._truncate_metrics(step)
        self._train_mode()
        bar = tqdm(total=self.total_steps, initial=step, desc="finetune", disable=not self.progress)
        start = time.perf_counter()
        first_loss = last_loss = None

        def after_step(done: int, loss: float, logs: dict[str, Any]) -> None:
            nonlocal first_loss, last_loss
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            self._append_metrics({"step": done, "loss": loss, **logs, "lr": cfg.lr,
                                  "elapsed_s": round(time.perf_counter() - start, 2)})
            if done % cfg.save_every == 0 or done == self.total_steps:
                self._save_checkpoint(optimizer, done)

        step = run_steps(optimizer, start=step, stop=self.total_steps, step_fn=lambda s: self._step(s, encoded),
                         after_step=after_step, bar=bar)
        bar.close()
        model.eval()
        for p in self.params.values():
            p.requires_grad_(False)
        gate_refit = self._refit_gate() if self.gated else None
        model_dir = self._save_model()
        mix_seen = self.schedule.mix_before(step)
        # Losses from the metrics file, which a resume keeps: the run's first and last steps, not this call's.
        losses = [r["loss"] for r in _read_metric_rows(self.metrics_path) if "loss" in r]
        first_loss, last_loss = (losses[0], losses[-1]) if losses else (first_loss, last_loss)
        summary = {"steps": step, "total_steps": self.total_steps, "train_s": round(time.perf_counter() - start, 1),
                   "first_loss": first_loss, "last_loss": last_loss, "mix_ratio": cfg.mix_ratio,
                   "mix_rows_seen": mix_seen, "task_rows_seen": step * cfg.batch_size - mix_seen,
                   "trainable_params": sum(p.numel() for p in self.params.values()),
                   "target_modules": sorted(self.lora_config.target_modules), "model_dir": str(model_dir),
                   "is_mogu": self.is_mogu}
        if gate_refit is not None:
            summary["gate_refit"] = gate_refit
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        self.log(f"[finetune] {step} steps; saved {'the MoGU checkpoint' if self.is_mogu else 'the task adapter'} "
                 f"to {model_dir}")
        return summary

    def _save_model(self) -> Path:
        target = self.out / "model"
        if self.is_mogu:
            cfg = self.cfg
            card = (f"## Task fine-tuning\n\n`task_adapter/` is a PEFT LoRA (r={cfg.r}, alpha={cfg.lora_alpha}) on "
                    f"`{', '.join(sorted(self.lora_config.target_modules))}`, trained by `mogu finetune` on "
                    f"`{self.task_path}` for {self.total_steps} steps with mix ratio {cfg.mix_ratio}"
                    + (f" of `{self.mix_path}`" if self.mix_path else "") + "; it is applied on load.")
            return self.model.save_pretrained(target, extra_card=card, overwrite=self.cfg.overwrite,
                                              protected=_inputs(self.cfg, self.model_name))
        return save_task_adapter(self.model, target, base_model_name_or_path=self.model_name,
                                 overwrite=self.cfg.overwrite, protected=_inputs(self.cfg, self.model_name))


def run_finetune(model_name: str, cfg: FinetuneConfig, *, resume: bool = False, log: Callable[[str], None] = print,
                 progress: bool = True):
    """Load ``model_name`` (a MoGU checkpoint folder or a base model), fine-tune, save; (model, tokenizer, summary)."""
    from mogu.tuner.inference import load_for_inference

    cfg.validate()  # bad options and missing files fail before the model loads
    from mogu.io import check_replaceable, check_run_folder
    from mogu.tuner.checkpoint import CHECKPOINT_KIND

    check_run_folder(cfg.output_dir, command="mogu finetune", overwrite=cfg.overwrite,
                     protected=_inputs(cfg, model_name))  # before the model loads
    model, tokenizer, is_mogu = load_for_inference(model_name, dtype=cfg.dtype, quantization=cfg.quantization)
    check_replaceable(Path(cfg.output_dir) / "model", kind=CHECKPOINT_KIND if is_mogu else TASK_ADAPTER_KIND,
                      overwrite=cfg.overwrite, protected=_inputs(cfg, model_name))
    tuner = FineTuner(model, tokenizer, cfg, model_name=model_name, log=log, progress=progress)
    return model, tokenizer, tuner.train(resume=resume)


def load_finetuned_base(adapter_dir: str | Path, base: str | None = None):
    """(model, tokenizer) for a fine-tuned plain base: the base (``base`` or the adapter's recorded id) plus the
    task adapter injected as ``mogu finetune`` trained it."""
    from peft import LoraConfig

    from mogu.tuner.loading import load_base_model

    base = base or LoraConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base:
        raise MoGUError(f"{adapter_dir}: the adapter names no base model; pass base=")
    model, tokenizer = load_base_model(base)
    load_task_adapter(model, adapter_dir)
    model.eval()
    return model, tokenizer


# -- evaluation -----------------------------------------------------------------------------------
def task_predictions(model: nn.Module, tokenizer, rows: list[dict], name: str | None = None, *,
                     max_new_tokens: int = 16, batch_size: int = 16, progress: bool = False) -> list[dict]:
    """Greedy answers for ``rows`` with their exact-match verdicts (MoGU: routed first m tokens)."""
    from mogu.train.stages import generate_responses

    if not rows:
        raise DataError("no rows to evaluate")
    name = name or task_name_of(rows)
    if name is None:
        raise MoGUError("the rows name no registered task: pass name=")
    if isinstance(model, MoGUModel):
        generator = model
    else:
        from mogu.tuner.inference import PlainGenerator as _PlainGenerator

        generator = _PlainGenerator(model)
    responses = generate_responses(generator, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress, desc=f"task {name}")
    return [{"prompt": r["prompt"], "answer": r["answer"], "response": resp,
             "correct": score_exact(name, resp, r["answer"])} for r, resp in zip(rows, responses)]


def evaluate_task(model: nn.Module, tokenizer, rows: list[dict], name: str | None = None, *,
                  max_new_tokens: int = 16, batch_size: int = 16, progress: bool = False) -> float:
    """Exact-match accuracy of greedy answers (``tasks.score_exact``); ``name`` defaults to the rows' task."""
    preds = task_predictions(model, tokenizer, rows, name, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress)
    return sum(p["correct"] for p in preds) / len(preds)
