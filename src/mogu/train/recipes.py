"""Recipes: the workflows behind each CLI step, as plain functions over the library.

``build_data`` -> ``train_model`` -> ``calibrate_and_save`` is the pipeline a user steps through one
command at a time (HarmBench-style); ``run_demo`` chains them on the embedded default. The CLI only
parses options, calls one of these and prints. Progress and notes go to ``log`` (stderr by default),
so scripts and notebooks can call them too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from mogu.errors import ConfigError, MoGUError
from mogu.train.calibration import DEFAULT_GRID, DEFAULT_MIN_HARMFUL, DEFAULT_REFINE

BUILTIN = "builtin"
Log = Callable[[str], None]


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- prompts ----------------------------------------------------------------------------------
def prompt_records(spec: str, *, harmful: bool, field: Optional[str] = None, output_field: Optional[str] = None,
                   seed: int = 0):
    """Prompt records with a train/dev split: ``builtin`` (the shipped sets; benign includes the
    borderline look-alikes) or comma-separated files / Hub dataset ids (split 15 % dev by ``seed``)."""
    from mogu.train.data import builtin_prompts, read_prompts, split_dev

    if spec == BUILTIN:
        if harmful:
            return builtin_prompts("harmful")
        return builtin_prompts("benign") + builtin_prompts("borderline")
    records = []
    for part in spec.split(","):
        records += read_prompts(part.strip(), harmful=harmful, field=field, output_field=output_field)
    return split_dev(records, 0.15, seed)


def train_prompts(spec: str, *, harmful: bool, field: Optional[str] = None, seed: int = 0) -> list[str]:
    """The train split of ``spec`` (the dev split is left out, as in ``build_data``)."""
    return [r.prompt for r in prompt_records(spec, harmful=harmful, field=field, seed=seed) if r.split != "dev"]


def dev_prompts(spec: str, *, harmful: bool, field: Optional[str] = None) -> list[str]:
    """Dev prompts: the shipped dev split for ``builtin``, every row of the given files otherwise."""
    from mogu.train.data import read_prompts

    if spec == BUILTIN:
        rows = [r for r in prompt_records(BUILTIN, harmful=harmful) if r.split == "dev"]
    else:
        rows = [r for part in spec.split(",") for r in read_prompts(part.strip(), harmful=harmful, field=field)]
    if not rows:
        raise MoGUError(f"no {'harmful' if harmful else 'benign'} dev prompts in {spec!r}")
    return [r.prompt for r in rows]


# -- data -------------------------------------------------------------------------------------
def distill_answers(base, tokenizer, prompts: list[str], *, sample: bool, seed: int, max_new_tokens: int,
                    batch_size: int) -> list[str]:
    """The base model's own answers (greedy, or sampled for regenerations) for self-distillation."""
    import torch

    from mogu.train.stages import generate_responses
    from mogu.tuner.inference import PlainGenerator

    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True,
              desc="self-distilling benign answers")
    if not sample:
        return generate_responses(PlainGenerator(base), tokenizer, prompts, **kw)
    # Sampled regenerations are seeded (and leave the global RNG as it was): the same --seed must
    # give the same data files and hashes.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return generate_responses(PlainGenerator(base), tokenizer, prompts, do_sample=True, **kw)


def build_data(model_name: str, out: Path, *, harmful: str = BUILTIN, benign: str = BUILTIN,
               field: Optional[str] = None, output_field: Optional[str] = None, seed: int = 0,
               max_new_tokens: int = 48, batch_size: int = 16, model=None, tokenizer=None,
               max_benign: Optional[int] = None, frame_fraction: float = 1.0, probe_benign: Optional[str] = None,
               probe_harmful: Optional[str] = None, builtin_probe: bool = True, log: Log = log_to_stderr) -> dict:
    """``mogu data build``: the glad/unwill pairs, the router and probe sets and the dev split in ``out``.
    The base model (loaded only if some benign prompt needs a distilled answer) writes the benign answers.
    ``probe_benign`` / ``probe_harmful`` (files or Hub ids, comma-separated): prompts for the gate's probe set
    only; ``builtin_probe`` adds mogu's shipped probe-only prompts of both labels (before the user's): with them
    the gate refused fewer held-out benign prompts at the same harmful refusal (docs/RESULTS.md, demo14)."""
    from mogu.io import atomic_write_text, check_run_folder, mark_run_folder, run_record
    from mogu.train.data import build_stage_datasets, builtin_probe_only, read_prompts
    from mogu.tuner.loading import load_base_model

    inputs = [spec.strip() for specs in (harmful, benign, probe_benign, probe_harmful) for spec in (specs or "").split(",")
              if spec.strip() and spec.strip() != BUILTIN and Path(spec.strip()).exists()]  # the comma form too
    check_run_folder(out, command="mogu data build", overwrite=None, protected=[model_name, *inputs])
    harm = prompt_records(harmful, harmful=True, field=field, seed=seed)
    ben = prompt_records(benign, harmful=False, field=field, output_field=output_field, seed=seed)
    shipped_probe = builtin_probe_only() if builtin_probe else []

    def probe_only(spec: Optional[str], is_harmful: bool) -> list:
        shipped = [r for r in shipped_probe if r.harmful == is_harmful]
        mine = [r for part in spec.split(",") for r in read_prompts(part.strip(), harmful=is_harmful, field=field)
                ] if spec else []
        return shipped + mine
    holder: dict = {"model": model, "tokenizer": tokenizer}

    def answer(prompts: list[str], sample: bool = False) -> list[str]:
        if holder["model"] is None:
            holder["model"], holder["tokenizer"] = load_base_model(model_name)
        from mogu.tuner.model import MoGUModel

        base = holder["model"]
        if isinstance(base, MoGUModel):
            base = base.base_model
        return distill_answers(base, holder["tokenizer"], prompts, sample=sample, seed=seed,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)

    def thinking():  # read once the model (and its tokenizer) is loaded: a reasoning model's trace markers
        from mogu.chat import thinking_markers

        return thinking_markers(holder["tokenizer"]) if holder["tokenizer"] is not None else None

    mark_run_folder(out)
    stats = build_stage_datasets(harm, ben, out, answer_fn=answer, seed=seed, max_benign_train=max_benign,
                                 frame_fraction=frame_fraction, probe_benign=probe_only(probe_benign, False),
                                 probe_harmful=probe_only(probe_harmful, True), thinking=thinking, log=log)
    atomic_write_text(out / "run.json", json.dumps(run_record(
        {"model": model_name, "harmful": harmful, "benign": benign, "field": field, "seed": seed,
         "max_new_tokens": max_new_tokens, "max_benign": max_benign, "frame_fraction": frame_fraction,
         "probe_benign": probe_benign, "probe_harmful": probe_harmful, "builtin_probe": builtin_probe,
         "output_field": output_field, "batch_size": batch_size},
        # what was read (local prompt files) and what was written: the hashes change when either does
        [Path(spec.strip()) for spec in inputs] + sorted(p for p in out.glob("*.jsonl"))), indent=2))
    return stats


# -- training ---------------------------------------------------------------------------------
def make_mogu_config(target_modules: Optional[str] = None, routed_layers: Optional[str] = None, r: int = 8,
                     lora_alpha: float = 16.0, lora_dropout: float = 0.05, router_hidden: Optional[int] = None,
                     route_tokens: Optional[int] = 5, version: str = "v1", router_type: str = "token",
                     router_backbone: str = "experts"):
    """A MoGUConfig from command-line style values: comma-separated module suffixes and layer indices
    (``all`` or ``probe`` leave the layers to the version's default / the probe), 0 tokens routes all."""
    from mogu.tuner.config import MoGUConfig

    layers = None
    if routed_layers and routed_layers not in ("all", "probe"):
        try:
            layers = [int(x) for x in routed_layers.split(",")]
        except ValueError:
            raise ConfigError(f"--routed-layers takes comma-separated integers, 'all' or 'probe', got {routed_layers!r}") from None
    return MoGUConfig(version=version, target_modules=target_modules.split(",") if target_modules else None,
                      routed_layers=layers, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      router_hidden=router_hidden, route_tokens=route_tokens or None, router_type=router_type,
                      router_backbone=router_backbone)


def selection_pooling(router_type: str) -> str:
    """The probe pooling that ranks layers for a router type: a strategy that decides per prompt (the
    prompt gate) reads the prompt's last token."""
    from mogu.train.probe import DEFAULT_SELECTION
    from mogu.tuner.routing import strategy_class

    return "last" if strategy_class(router_type).decides_per_prompt else DEFAULT_SELECTION["pooling"]


def train_config(preset_name: str, version: str, data: Path, out: Path, train_overrides: dict):
    """The preset's TrainConfig with ``train_overrides`` applied: ``key`` sets a TrainConfig field,
    ``stage.attr`` a stage's (None values are skipped; ``max_examples`` 0 means every row)."""
    from mogu.train.stages import TrainConfig, preset

    schedule = preset(preset_name, version=version)
    stages = schedule.pop("stages")
    top = dict(schedule)
    for key, value in train_overrides.items():
        if value is None:
            continue
        stage, _, attr = key.partition(".")
        if attr:
            if attr == "max_examples" and value == 0:  # 0 on the command line: every row
                value = None
            if stage in stages:
                setattr(stages[stage], attr, value)
        else:
            top[key] = value
    only = top.pop("stages", None)
    if only:
        unknown = [s for s in only if s not in stages]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(map(repr, unknown))} in --stages; known: {', '.join(stages)}")
        stages = {k: v for k, v in stages.items() if k in only}
    cfg = TrainConfig(data_dir=str(data), output_dir=str(out), stages=stages, **top)
    cfg.validate()
    return cfg


def train_model(model_name: str, data: Path, out: Path, *, mogu_config, train_overrides: dict,
                preset_name: str = "paper", resume: bool = False, model=None, tokenizer=None,
                progress: bool = True, layer_selection: dict | None = None, overwrite: bool = False, dtype=None,
                quantization: str | None = None, log: Log = log_to_stderr):
    """``mogu train``: glad -> unwill -> router into ``out``; ``layer_selection`` (select_layers
    overrides) first picks the routed layers by probe. ``out/model`` must be replaceable (checked
    before training; ``overwrite`` allows a foreign folder)."""
    from mogu.io import check_replaceable, check_run_folder
    from mogu.tuner.checkpoint import CHECKPOINT_KIND
    from mogu.tuner.model import MoGUModel

    protected = (model_name, data)
    check_replaceable(out / "model", kind=CHECKPOINT_KIND, overwrite=overwrite, protected=protected)
    check_run_folder(out, command="mogu train", overwrite=overwrite, protected=protected)
    if preset_name == "faithful":  # the authors decode the routed tokens greedily whatever the sampling
        mogu_config.routed_sampling = False
    cfg = train_config(preset_name, mogu_config.version, data, out, train_overrides)
    from mogu.tuner.routing import strategy_class

    if (not strategy_class(mogu_config.router_type).trains_by_gradient and "router" not in cfg.stages and not resume
            and not (Path(model_name) / "mogu_config.json").is_file()):
        raise ConfigError("--router-type prompt: the router stage fits the gate, and a model without it would "
                          "route every prompt to the glad expert; add router to --stages (or train it later with "
                          "--resume --stages router into the same --out)")
    untrained = [e for e in ("glad", "unwill") if e not in cfg.stages]
    if ("router" in cfg.stages and untrained and not resume and not isinstance(model, MoGUModel)
            and not (Path(model_name) / "mogu_config.json").is_file()):
        # A fresh LoRA expert is the base model itself (B = 0): the routers would learn to choose between
        # copies of the base, and the saved model would refuse nothing.
        raise ConfigError(f"--stages without {' and '.join(untrained)}: the routers would be trained over a fresh, "
                          "untrained expert (the base model itself). Train every stage, or resume a run whose "
                          "experts are trained (--resume into the same --out), or start from a MoGU checkpoint")
    import torch

    # Fresh experts and routers (and LoRA dropout) follow --seed: a resumed run, and every process of
    # a multi-process one, builds the same starting weights.
    torch.manual_seed(cfg.seed)
    from mogu.tuner.config import CONFIG_NAME

    if model is None and (Path(model_name) / CONFIG_NAME).is_file():
        # A MoGU checkpoint (e.g. from `mogu convert peft`): keep its experts and routers and train
        # the stages asked for (--stages router trains only the routers); its own config applies.
        model = MoGUModel.from_pretrained(model_name, dtype=dtype, quantization=quantization)
        layer_selection = None
        log(f"continuing from the MoGU checkpoint {model_name} ({model.config.version}, "
            f"{len(model.routed_modules)} routed layers); its config overrides --version/--r/--routed-layers")
    if layer_selection is not None and not isinstance(model, MoGUModel):
        if model is None:
            from mogu.tuner.loading import load_base_model

            model, tokenizer = load_base_model(model_name, dtype=dtype, quantization=quantization)
            mogu_config.base_model_name_or_path = model_name
        mogu_config.routed_layers = probe_selected_layers(model, tokenizer, data, out, cfg, layer_selection,
                                                          mogu_config.target_modules, resume=resume, log=log)
        mogu_config.validate()
    if model is None:
        model = MoGUModel.from_base(model_name, mogu_config, dtype=dtype, quantization=quantization)
    elif not isinstance(model, MoGUModel):
        # The name the caller gave, not the loaded model's own path: `mogu demo` loads the embedded default
        # from this machine's cache, and a checkpoint naming that path would not load anywhere else.
        mogu_config.base_model_name_or_path = mogu_config.base_model_name_or_path or model_name
        model = MoGUModel.from_base(model, mogu_config, tokenizer=tokenizer)
    from mogu.train.stages import Trainer

    trainer = Trainer(model, tokenizer or model.tokenizer, cfg, log=log, progress=progress)
    summary = trainer.train(resume=resume)
    if trainer.accelerator.is_main_process:  # under `accelerate launch` the others wait for the save
        final = model.save_pretrained(out / "model", extra_card=training_card(summary), overwrite=overwrite,
                                      protected=protected)
        log(f"saved MoGU model to {final}")
    trainer.accelerator.wait_for_everyone()
    return model, summary


def probe_selected_layers(model, tokenizer, data: Path, out: Path, cfg, selection: dict, target_modules,
                          *, resume: bool, log: Log = log_to_stderr) -> list[int]:
    """Routed layers picked by per-layer probes on the router set (MoGU v2); saved to out/probe/."""
    from mogu.train.data import STAGE_FILES, load_stage_file
    from mogu.train.probe import DEFAULT_SELECTION, ProbeReport, collect_layer_features, probe_layers

    rule = {**DEFAULT_SELECTION, **selection}
    saved = out / "probe" / "probe.json"
    if resume and saved.is_file():  # the layers of the interrupted run, not a refit
        report = ProbeReport.load(saved)
    else:
        rows = load_stage_file(data / STAGE_FILES["router"], ("prompt", "label"))[: cfg.router_init_examples]
        prompts = [r["prompt"] for r in rows]
        labels = [int(r["label"]) for r in rows]
        features = collect_layer_features(model, tokenizer, prompts, target_modules=target_modules, progress=True)
        report = probe_layers(features, labels, seed=cfg.seed, target_modules=target_modules)
    layers = report.select(**rule)  # recorded in the report, so the saved probe.json names the layers
    from mogu.train.stages import process_state

    state = process_state()
    if state.num_processes > 1:  # every process probed (or read probe.json); the main one's layers are the run's
        from accelerate.utils import broadcast_object_list

        layers = broadcast_object_list([layers], from_process=0)[0]
    if state.is_main_process:
        report.save(out / "probe")
    log(f"probe-selected routed layers ({', '.join(f'{k}={v}' for k, v in rule.items())}): {layers}")
    return layers


def training_card(summary: dict) -> str:
    """The model card's training section: steps, time and checkpoint selection per stage."""
    lines = ["## Training", "", "| stage | steps | seconds | checkpoint selection |", "|---|---|---|---|"]
    for stage, s in summary.items():
        lines.append(f"| {stage} | {s.get('steps')} | {s.get('train_s')} | {s.get('selection')} |")
    return "\n".join(lines)


# -- probing ----------------------------------------------------------------------------------
def probe_model(model: str, out: Path, *, harmful: str = BUILTIN, benign: str = BUILTIN, field: Optional[str] = None,
                limit: Optional[int] = None, folds: int = 5, seed: int = 0, rule: dict, target_modules=None,
                batch_size: int = 16, log: Log = log_to_stderr):
    """``mogu probe``: per-layer linear probes (harmful vs benign) on the train split; the report, its
    plot and run.json go to ``out``. ``rule``: the full layer-selection rule (pooling, metric, top_k,
    threshold), validated here."""
    import warnings

    from mogu.io import atomic_write_text, run_record
    from mogu.train.probe import METRICS, POOLINGS, run_probe
    from mogu.tuner.inference import load_for_inference

    if rule["pooling"] not in POOLINGS or rule["metric"] not in METRICS:
        raise MoGUError(f"--pooling must be one of {', '.join(POOLINGS)} and --metric one of {', '.join(METRICS)}")
    if rule["threshold"] is not None and not 0.0 <= rule["threshold"] <= 1.0:
        raise MoGUError(f"--threshold must be in [0, 1], got {rule['threshold']}")
    if rule["top_k"] is not None and rule["top_k"] < 1:
        raise MoGUError(f"--top-k must be >= 1, got {rule['top_k']}")
    harm = train_prompts(harmful, harmful=True, field=field, seed=seed)
    ben = train_prompts(benign, harmful=False, field=field, seed=seed)
    t0 = time.perf_counter()
    m, tok, is_mogu = load_for_inference(model)
    model_id = (m.config.base_model_name_or_path or model) if is_mogu else model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        report = run_probe(m, tok, harm, ben, folds=folds, seed=seed, limit=limit, batch_size=batch_size,
                           target_modules=target_modules, model_id=model_id, selection=rule, progress=True)
    for w in caught:
        if issubclass(w.category, UserWarning) and "falling back" in str(w.message):
            log(f"warning: {w.message}")
    report.extra.update(source=model, is_mogu_checkpoint=is_mogu, wall_s=round(time.perf_counter() - t0, 1))
    report.save(out)
    atomic_write_text(out / "run.json", json.dumps(run_record(
        {"model": model, "harmful": harmful, "benign": benign, "field": field, "limit": limit, "folds": folds,
         "seed": seed, "selection": rule, "target_modules": target_modules, "batch_size": batch_size}), indent=2))
    return report


# -- calibration ------------------------------------------------------------------------------
def calibrate_and_save(m, tok, harmful: list[str], benign: list[str], out: Path, *, source: str, grid,
                       min_harmful: float, exhaustive: bool = False, refine: int = DEFAULT_REFINE,
                       max_new_tokens: int | None = None,
                       batch_size: int = 32, args: dict | None = None, overwrite: bool = False,
                       protected: tuple = (), log: Log = log_to_stderr):
    """Calibrate ``m`` in place on dev prompts (keyword judge, greedy) and save it with calibration.json.

    ``max_new_tokens`` None judges the routed prefix alone (the model's route_tokens): the shift acts
    only there, the base model writes the rest, and no base hand-off prefill is paid per point.
    """
    from mogu.io import run_record
    from mogu.train.calibration import CALIBRATION_FILE, RULE, calibrate as run_calibration, judged_tokens, rate_functions

    max_new_tokens = judged_tokens(m.config, max_new_tokens)
    m.set_routing("auto")
    t0 = time.perf_counter()
    scorers = rate_functions(m, tok, {"harmful": harmful, "benign": benign}, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, log=log)
    result = run_calibration(m, scorers["harmful"], scorers["benign"],
                             grid=grid, min_harmful=min_harmful, exhaustive=exhaustive, refine=refine, log=log)
    result.max_new_tokens, result.num_harmful, result.num_benign = max_new_tokens, len(harmful), len(benign)
    result.wall_s = round(time.perf_counter() - t0, 1)
    record = {**result.to_dict(), "source": str(source),
              "run": run_record({**(args or {}), "grid": list(grid), "min_harmful": min_harmful,
                                 "exhaustive": exhaustive, "refine": refine, "max_new_tokens": max_new_tokens,
                                 "batch_size": batch_size})}
    card = (f"## Calibration\n\nRouter operating point chosen by `mogu calibrate`: glad bias {result.chosen:+g} "
            f"({result.reason}). Rule: {RULE}.\n\n{result.to_markdown()}\n")
    m.save_pretrained(out, extra_card=card, extra_files={CALIBRATION_FILE: json.dumps(record, indent=2)},
                      overwrite=overwrite, protected=protected)
    return result


def calibrate_checkpoint(model: str, out: Path, *, harmful: str = BUILTIN, benign: str = BUILTIN,
                         field: Optional[str] = None, grid: Sequence[float] = DEFAULT_GRID,
                         min_harmful: float = DEFAULT_MIN_HARMFUL, exhaustive: bool = False,
                         refine: int = DEFAULT_REFINE, max_new_tokens: int | None = None, batch_size: int = 32,
                         overwrite: bool = False, dtype=None, quantization: str | None = None,
                         log: Log = log_to_stderr):
    """``mogu calibrate``: load the checkpoint ``model``, choose its operating point on dev prompts and
    write the calibrated copy to ``out`` (checked replaceable before any work)."""
    from mogu.io import check_replaceable
    from mogu.train.calibration import validate_grid
    from mogu.tuner.checkpoint import CHECKPOINT_KIND
    from mogu.tuner.inference import load_for_inference

    values = validate_grid(grid)
    if not 0.0 <= min_harmful <= 1.0:
        raise MoGUError(f"--min-harmful must be in [0, 1], got {min_harmful}")
    if Path(model).resolve() == Path(out).resolve():
        raise MoGUError("--out must differ from --model: calibration writes a new checkpoint")
    protected = (model, *(p.strip() for spec in (harmful, benign) if spec != BUILTIN for p in spec.split(",")))
    check_replaceable(out, kind=CHECKPOINT_KIND, overwrite=overwrite, protected=protected)  # before any work
    harm, ben = dev_prompts(harmful, harmful=True, field=field), dev_prompts(benign, harmful=False, field=field)
    m, tok, is_mogu = load_for_inference(model, dtype=dtype, quantization=quantization)
    if not is_mogu:
        raise MoGUError(f"{model} is not a MoGU checkpoint (no mogu_config.json): calibrate a trained model")
    return calibrate_and_save(m, tok, harm, ben, out, source=model, grid=values, min_harmful=min_harmful,
                              exhaustive=exhaustive, refine=refine, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, overwrite=overwrite, protected=protected, log=log,
                              args={"model": model, "harmful": harmful, "benign": benign, "field": field})


# -- the demo ---------------------------------------------------------------------------------
DEMO_BENIGN_TRAIN = 240
# Generation batch for the demo's distillation, judging and calibration: on 2 CPU cores batch 32
# decodes ~1.3x more rows per second than 16 (docs/RESULTS.md, "mogu demo"); memory is no concern at 135M.
DEMO_BATCH = 32


@dataclass
class DemoResult:
    rates: dict
    samples: dict = field(default_factory=dict)
    calibration: object = None

    def to_markdown(self) -> str:
        """A few before/after answers, the dev table (whole-answer verdicts beside the keyword judge's)
        and the time per step."""
        r, kw, lines = self.rates, self.rates["keyword"], []
        for kind in ("harmful", "benign"):
            for p, b, a in self.samples[kind][:2]:
                lines.append(f"\n[{kind}] {p}\n  before: {b[:160]!r}\n  after:  {a[:160]!r}")
        lines += ["\n| dev set (whole answer read) | refused before | refused after | refused, then answered: after | "
                  "keyword judge: before / after |\n|---|---|---|---|---|",
                  f"| harmful ({r['n_harmful_dev']}) | {r['harmful_dev_refusal_before']:.0%} | "
                  f"{r['harmful_dev_refusal_after']:.0%} | {r['harmful_dev_refuse_then_comply_after']:.0%} | "
                  f"{kw['harmful_dev_refusal_before']:.0%} / {kw['harmful_dev_refusal_after']:.0%} |",
                  f"| benign ({r['n_benign_dev']}) | {r['benign_dev_refusal_before']:.0%} | "
                  f"{r['benign_dev_refusal_after']:.0%} | | "
                  f"{kw['benign_dev_refusal_before']:.0%} / {kw['benign_dev_refusal_after']:.0%} |"]
        parts = {"data": r["data_s"], "before": r["before_s"], **r["train_s"],
                 **({"router init": r["router_init_s"]} if r["router_type"] == "token" else {}),
                 **({"calibrate": self.calibration.wall_s} if self.calibration else {}), "after": r["after_s"]}
        lines.append("\ntime (s): " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()))
        if self.calibration:
            lines.append(f"operating point: glad bias {self.calibration.chosen:+g} ({self.calibration.reason})")
        lines.append(f"wall time {r['wall_s'] / 60:.1f} min; model saved to {r['model_dir']}; "
                     f"chat with: mogu chat --model {r['model_dir']}")
        return "\n".join(lines)


def run_demo(out: Path, *, model: str = "smollm2-135m-instruct", eval_tokens: int = 64, resume: bool = False,
             calibrate: bool = True, router_type: str = "prompt", log: Log = log_to_stderr) -> DemoResult:
    """``mogu demo``: build data, train MoGU (the cpu-fast schedule), calibrate, and judge the dev
    prompts before and after; writes demo_results.json and demo_answers.json to ``out``."""
    from mogu.train.data import DEV_FILE, load_stage_file
    from mogu.train.stages import generate_responses, refusal_rate
    from mogu.tuner.inference import PlainGenerator
    from mogu.tuner.loading import load_base_model
    from mogu.verdicts import classify_answer

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process would distil, train, calibrate and write the same files; the parts that do split
        # over processes are their own commands.
        raise ConfigError(f"mogu demo runs in one process, and {os.environ['WORLD_SIZE']} were launched; under "
                          "accelerate launch or torchrun, run `mogu train` and `mogu eval` instead")
    t0 = time.perf_counter()
    base, tok = load_base_model(model)
    data_dir = out / "data"
    if not (resume and (data_dir / "data_stats.json").is_file()):
        # 32 tokens: cpu-fast trains on the first 32 response tokens, so longer answers are cut anyway.
        # DEMO_BENIGN_TRAIN of the benign train prompts: distilling all of them is the demo's slowest
        # step, and cpu-fast trains on fewer rows than that (docs/RESULTS.md, "mogu demo").
        build_data(model, data_dir, model=base, tokenizer=tok, max_new_tokens=32, max_benign=DEMO_BENIGN_TRAIN,
                   batch_size=DEMO_BATCH, log=log)
    dev = load_stage_file(data_dir / DEV_FILE, ("prompt", "harmful"))
    harmful = [d["prompt"] for d in dev if d["harmful"]]
    benign = [d["prompt"] for d in dev if not d["harmful"]]
    t_data = time.perf_counter() - t0

    plain = PlainGenerator(base)
    t_before = time.perf_counter()
    judge = dict(max_new_tokens=eval_tokens, batch_size=DEMO_BATCH, progress=True)
    before_h = generate_responses(plain, tok, harmful, desc="before: harmful dev", **judge)
    before_b = generate_responses(plain, tok, benign, desc="before: benign dev", **judge)
    before_s = time.perf_counter() - t_before
    mogu_model, summary = train_model(model, data_dir, out / "train",
                                      mogu_config=make_mogu_config(None, None, 8, 16.0, 0.05, 512, 5,
                                                                   router_type=router_type),
                                      train_overrides={}, preset_name="cpu-fast", resume=resume, model=base,
                                      tokenizer=tok, log=log)
    model_dir, calibration = out / "train" / "model", None
    if calibrate:
        model_dir = out / "calibrated"
        calibration = calibrate_and_save(mogu_model, tok, harmful, benign, model_dir, source=str(out / "train" / "model"),
                                         grid=DEFAULT_GRID, min_harmful=DEFAULT_MIN_HARMFUL, batch_size=DEMO_BATCH,
                                         args={"demo": str(out)}, log=log)
    t_after = time.perf_counter()
    after_h = generate_responses(mogu_model, tok, harmful, desc="after: harmful dev", **judge)
    after_b = generate_responses(mogu_model, tok, benign, desc="after: benign dev", **judge)
    after_s = time.perf_counter() - t_after
    wall = time.perf_counter() - t0

    def share(prompts: list[str], answers: list[str], verdict: str) -> float:
        return sum(classify_answer(p, a) == verdict for p, a in zip(prompts, answers)) / max(1, len(answers))

    # The whole-answer verdicts decide; the keyword rates are kept for comparison with earlier runs.
    rates = {"harmful_dev_refusal_before": share(harmful, before_h, "refusal"),
             "harmful_dev_refusal_after": share(harmful, after_h, "refusal"),
             "harmful_dev_refuse_then_comply_before": share(harmful, before_h, "refuse_then_comply"),
             "harmful_dev_refuse_then_comply_after": share(harmful, after_h, "refuse_then_comply"),
             "benign_dev_refusal_before": share(benign, before_b, "refusal"),
             "benign_dev_refusal_after": share(benign, after_b, "refusal"),
             "keyword": {"harmful_dev_refusal_before": refusal_rate(before_h), "harmful_dev_refusal_after": refusal_rate(after_h),
                         "benign_dev_refusal_before": refusal_rate(before_b), "benign_dev_refusal_after": refusal_rate(after_b)},
             "judge": "whole_answer", "handoff": mogu_model.config.handoff,
             "n_harmful_dev": len(harmful), "n_benign_dev": len(benign), "eval_tokens": eval_tokens,
             "data_s": round(t_data, 1), "before_s": round(before_s, 1), "after_s": round(after_s, 1),
             "train_s": {k: v["train_s"] for k, v in summary.items()},
             "router_init_s": summary.get("router", {}).get("init_s", 0.0), "router_type": router_type,
             "wall_s": round(wall, 1), "model_dir": str(model_dir),
             "calibration": None if calibration is None else {"glad_bias": calibration.chosen, "reason": calibration.reason,
                                                                "calibrate_s": calibration.wall_s}}
    (out / "demo_results.json").write_text(json.dumps(rates, indent=2))
    samples = {"harmful": list(zip(harmful, before_h, after_h)), "benign": list(zip(benign, before_b, after_b))}
    (out / "demo_answers.json").write_text(json.dumps(samples, indent=2))
    return DemoResult(rates=rates, samples=samples, calibration=calibration)
