"""The ``mogu`` command line. Errors print one line and exit 2 (``--debug`` shows the traceback)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from mogu.train.calibration import DEFAULT_GRID, DEFAULT_MIN_HARMFUL, DEFAULT_REFINE
from mogu.errors import MoGUError
from mogu.tuner.inference import PlainGenerator

app = typer.Typer(help="MoGU: safer open LLMs without over-refusal.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Build the stage datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

BUILTIN = "builtin"


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def _setup_torch(threads: Optional[int]) -> None:
    import torch

    if threads is not None and threads < 1:
        raise MoGUError(f"--threads must be >= 1, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def _records(spec: str, *, harmful: bool, field: Optional[str], output_field: Optional[str], seed: int):
    from mogu.train.data import builtin_prompts, read_prompts, split_dev

    if spec == BUILTIN:
        if harmful:
            return builtin_prompts("harmful")
        return builtin_prompts("benign") + builtin_prompts("borderline")
    records = []
    for part in spec.split(","):
        records += read_prompts(part.strip(), harmful=harmful, field=field, output_field=output_field)
    return split_dev(records, 0.15, seed)


def distill_answers(base, tokenizer, prompts: list[str], *, sample: bool, seed: int, max_new_tokens: int,
                    batch_size: int) -> list[str]:
    """The base model's own answers (greedy, or sampled for regenerations) for self-distillation."""
    import torch

    from mogu.train.stages import generate_responses

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
               max_benign: Optional[int] = None, frame_fraction: float = 1.0) -> dict:
    from mogu.train.data import build_stage_datasets
    from mogu.io import atomic_write_text, run_record
    from mogu.tuner.loading import load_base_model

    harm = _records(harmful, harmful=True, field=field, output_field=None, seed=seed)
    ben = _records(benign, harmful=False, field=field, output_field=output_field, seed=seed)
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

    stats = build_stage_datasets(harm, ben, out, answer_fn=answer, seed=seed, max_benign_train=max_benign,
                                 frame_fraction=frame_fraction, log=_echo)
    atomic_write_text(out / "run.json", json.dumps(run_record(
        {"model": model_name, "harmful": harmful, "benign": benign, "field": field, "seed": seed,
         "max_new_tokens": max_new_tokens, "max_benign": max_benign, "frame_fraction": frame_fraction}), indent=2))
    return stats


@data_app.command("build")
def data_build(
    out: Path = typer.Option(..., help="Output folder for glad_pairs/unwill_pairs/router/dev jsonl."),
    harmful: str = typer.Option(BUILTIN, help="Harmful prompts: 'builtin', files (jsonl/json/csv/txt, comma-separated) or a Hub dataset id."),
    benign: str = typer.Option(BUILTIN, help="Benign prompts: 'builtin', files or a Hub dataset id."),
    field: Optional[str] = typer.Option(None, help="Prompt field/column name (default: guessed)."),
    output_field: Optional[str] = typer.Option(None, help="Field holding your own helpful answers for benign prompts."),
    model: str = typer.Option("smollm2-135m-instruct", help="Base model for self-distilled benign answers."),
    seed: int = typer.Option(0),
    max_new_tokens: int = typer.Option(48, min=1, max=4096, help="Length of self-distilled answers."),
    max_benign: Optional[int] = typer.Option(None, min=1, help="Keep a seeded sample of N benign train prompts "
                                             "(fewer answers to distil; the dev split is kept whole)."),
    frame_fraction: float = typer.Option(1.0, min=0.0, max=1.0, help="Share of harmful train prompts (and as many "
                                         "benign ones) that probe.jsonl also wraps in a jailbreak-style frame "
                                         "(role-play, fiction, a framing turn first), so the gate reads the request, "
                                         "not the frame."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Build the three stage datasets (glad pairs, unwill pairs, router set) plus a dev split."""
    _setup_torch(threads)
    stats = build_data(model, out, harmful=harmful, benign=benign, field=field, output_field=output_field,
                       seed=seed, max_new_tokens=max_new_tokens, max_benign=max_benign, frame_fraction=frame_fraction)
    typer.echo(json.dumps({k: v for k, v in stats.items() if k != "sha256"}, indent=2))


@data_app.command("task")
def data_task(
    name: str = typer.Option(..., help="Task: date-iso (dates to YYYY-MM-DD) or arith (small word problems)."),
    out: Path = typer.Option(..., help="Output folder for train.jsonl, test.jsonl and run.json."),
    train: int = typer.Option(400, help="Training rows."),
    test: int = typer.Option(200, help="Test rows (another seed stream; no item shared with train)."),
    seed: int = typer.Option(0),
):
    """Generate a seeded downstream task with exact-match answers (for `mogu finetune`)."""
    from mogu.train.tasks import write_task_data

    stats = write_task_data(name, out, n_train=train, n_test=test, seed=seed)
    typer.echo(json.dumps({k: v for k, v in stats.items() if k != "sha256"}, indent=2))


ROUTER_TYPE_HELP = ("'token' (the paper's per-layer, per-token routers, trained) or 'prompt' (one decision per "
                    "prompt from layer probes, fitted in seconds: every layer's for v1, the probe-selected layers' for v2; "
                    "mogu.tuner.gate, docs/RESULTS.md \"Prompt gate\").")


def _mogu_config(target_modules, routed_layers, r, lora_alpha, lora_dropout, router_hidden, route_tokens,
                 version: str = "v1", router_type: str = "token"):
    from mogu.tuner.config import MoGUConfig
    from mogu.errors import ConfigError

    layers = None
    if routed_layers and routed_layers not in ("all", "probe"):
        try:
            layers = [int(x) for x in routed_layers.split(",")]
        except ValueError:
            raise ConfigError(f"--routed-layers takes comma-separated integers, 'all' or 'probe', got {routed_layers!r}") from None
    return MoGUConfig(version=version, target_modules=target_modules.split(",") if target_modules else None,
                      routed_layers=layers, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      router_hidden=router_hidden, route_tokens=route_tokens or None, router_type=router_type)


OVERWRITE_HELP = ("Replace --out even if mogu did not write it (never /, home, the current folder, or a "
                  "folder holding this command's inputs).")


def _dtype_option():
    return typer.Option("auto", help="Backbone dtype: auto (bfloat16 on a CUDA GPU that supports it, float32 "
                                     "otherwise), bfloat16, float16 or float32. Experts and routers stay float32.")


def _dtype(value: str):
    from mogu.tuner.loading import resolve_dtype

    return resolve_dtype(value)  # a one-line error for an unknown name, before any model loads


def _overwrite_option():
    return typer.Option(False, "--overwrite", help=OVERWRITE_HELP)


def train_model(model_name: str, data: Path, out: Path, *, mogu_config, train_overrides: dict,
                preset_name: str = "paper", resume: bool = False, model=None, tokenizer=None,
                progress: bool = True, layer_selection: dict | None = None, overwrite: bool = False, dtype=None):
    """Train a MoGU model; ``layer_selection`` (select_layers overrides) first picks routed layers by probe.
    ``out/model`` must be replaceable (checked before training; ``overwrite`` allows a foreign folder)."""
    from mogu.io import check_replaceable
    from mogu.tuner.checkpoint import CHECKPOINT_KIND
    from mogu.tuner.model import MoGUModel
    from mogu.train.stages import TrainConfig, preset

    protected = (model_name, data)
    check_replaceable(out / "model", kind=CHECKPOINT_KIND, overwrite=overwrite, protected=protected)

    schedule = preset(preset_name, version=mogu_config.version)
    if preset_name == "faithful":  # the authors decode the routed tokens greedily whatever the sampling
        mogu_config.routed_sampling = False
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
            from mogu.errors import ConfigError

            raise ConfigError(f"unknown stage(s) {', '.join(map(repr, unknown))} in --stages; known: {', '.join(stages)}")
        stages = {k: v for k, v in stages.items() if k in only}
    cfg = TrainConfig(data_dir=str(data), output_dir=str(out), stages=stages, **top)
    cfg.validate()
    if (mogu_config.router_type == "prompt" and "router" not in stages and not resume
            and not (Path(model_name) / "mogu_config.json").is_file()):
        from mogu.errors import ConfigError

        raise ConfigError("--router-type prompt: the router stage fits the gate, and a model without it would "
                          "route every prompt to the glad expert; add router to --stages (or train it later with "
                          "--resume --stages router into the same --out)")
    import torch

    # Fresh experts and routers (and LoRA dropout) follow --seed: a resumed run, and every process of
    # a multi-process one, builds the same starting weights.
    torch.manual_seed(cfg.seed)
    from mogu.tuner.config import CONFIG_NAME

    if model is None and (Path(model_name) / CONFIG_NAME).is_file():
        # A MoGU checkpoint (e.g. from `mogu convert peft`): keep its experts and routers and train
        # the stages asked for (--stages router trains only the routers); its own config applies.
        model = MoGUModel.from_pretrained(model_name, dtype=dtype)
        layer_selection = None
        _echo(f"continuing from the MoGU checkpoint {model_name} ({model.config.version}, "
              f"{len(model.routed_modules)} routed layers); its config overrides --version/--r/--routed-layers")
    if layer_selection is not None and not isinstance(model, MoGUModel):
        if model is None:
            from mogu.tuner.loading import load_base_model

            model, tokenizer = load_base_model(model_name, dtype=dtype)
            mogu_config.base_model_name_or_path = model_name
        mogu_config.routed_layers = _probe_selected_layers(model, tokenizer, data, out, cfg, layer_selection,
                                                           mogu_config.target_modules, resume=resume)
        mogu_config.validate()
    if model is None:
        model = MoGUModel.from_base(model_name, mogu_config, dtype=dtype)
    elif not isinstance(model, MoGUModel):
        model = MoGUModel.from_base(model, mogu_config, tokenizer=tokenizer)
    from mogu.train.stages import Trainer

    trainer = Trainer(model, tokenizer or model.tokenizer, cfg, log=_echo, progress=progress)
    summary = trainer.train(resume=resume)
    if trainer.accelerator.is_main_process:  # under `accelerate launch` the others wait for the save
        final = model.save_pretrained(out / "model", extra_card=_training_card(summary), overwrite=overwrite,
                                      protected=protected)
        _echo(f"saved MoGU model to {final}")
    trainer.accelerator.wait_for_everyone()
    return model, summary


def _probe_selected_layers(model, tokenizer, data: Path, out: Path, cfg, selection: dict, target_modules,
                           *, resume: bool) -> list[int]:
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
    _echo(f"probe-selected routed layers ({', '.join(f'{k}={v}' for k, v in rule.items())}): {layers}")
    return layers


def _training_card(summary: dict) -> str:
    lines = ["## Training", "", "| stage | steps | seconds | checkpoint selection |", "|---|---|---|---|"]
    for stage, s in summary.items():
        lines.append(f"| {stage} | {s.get('steps')} | {s.get('train_s')} | {s.get('selection')} |")
    return "\n".join(lines)


@app.command()
def train(
    data: Path = typer.Option(..., help="Folder written by `mogu data build`."),
    out: Path = typer.Option(..., help="Run folder: checkpoints, metrics.jsonl, run.json and model/."),
    model: str = typer.Option("smollm2-135m-instruct", help="Base model: folder, Hub id or the embedded default."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
    preset: str = typer.Option("paper", help="Training schedule: 'paper' (reference recipe, GPU), 'cpu-fast' (the demo's) "
                               "or 'faithful' (paper exactly as the authors' code: no appended EOS, per-example router "
                               "weight loss, greedy routed tokens)."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated subset of glad,unwill,router (others load from --resume)."),
    responder_loss: Optional[str] = typer.Option(None, help="'ratio' (paper) or 'sft' (CE on the target)."),
    router_init: Optional[str] = typer.Option(None, help="'default' (paper) or 'probe' (start from per-layer linear probes)."),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated module suffixes to wrap (default: per family)."),
    version: str = typer.Option("v1", help="'v1' (MoGU) or 'v2' (probe-selected layers, light routers, joint stage)."),
    routed_layers: Optional[str] = typer.Option(None, help="Comma-separated layer indices, 'all', or 'probe' (select with "
                                                "`mogu probe`'s rule). Default: all for v1, probe for v2."),
    select_top_k: Optional[int] = typer.Option(None, help="Probe selection: keep the k best layers."),
    select_threshold: Optional[float] = typer.Option(None, help="Probe selection: keep layers at or above this held-out score."),
    select_pooling: Optional[str] = typer.Option(None, help="Probe selection: rank layers by 'last' or 'mean' pooled "
                                                 "probes (default: 'last' for a prompt gate, which reads the last "
                                                 "prompt token; 'mean' for token routers)."),
    r: int = typer.Option(8), lora_alpha: float = typer.Option(16.0), lora_dropout: float = typer.Option(0.05),
    router_hidden: Optional[int] = typer.Option(None, help="Router width (default 512 for v1, 16 for v2)."),
    route_tokens: int = typer.Option(5, help="0 routes every token."),
    router_type: str = typer.Option("token", help=ROUTER_TYPE_HELP),
    glad_epochs: Optional[float] = typer.Option(None), unwill_epochs: Optional[float] = typer.Option(None),
    router_epochs: Optional[float] = typer.Option(None),
    glad_lr: Optional[float] = typer.Option(None), unwill_lr: Optional[float] = typer.Option(None),
    router_lr: Optional[float] = typer.Option(None),
    glad_max_examples: Optional[int] = typer.Option(None, min=0, help="Cap on glad pairs used (0: all; cpu-fast: 64)."),
    unwill_max_examples: Optional[int] = typer.Option(None, min=0, help="Cap on unwill pairs used (0: all; cpu-fast: 128)."),
    router_max_examples: Optional[int] = typer.Option(None, min=0, help="Cap on router rows used (0: all; cpu-fast: 256)."),
    joint_experts: Optional[bool] = typer.Option(None, "--joint-experts/--frozen-experts",
                                                 help="Router stage also trains the experts (default: on for v2)."),
    joint_expert_lr: Optional[float] = typer.Option(None, help="Experts' learning rate in the joint stage."),
    router_loss_weight: Optional[float] = typer.Option(None, help="Lambda of the router weight loss (2.0)."),
    router_init_refits: Optional[int] = typer.Option(None, help="Probe init: refit rounds under routing (1)."),
    router_init_glad_bias: Optional[float] = typer.Option(None, help="Probe init: logit shift toward glad; raise it to cut over-refusal (0)."),
    max_response_tokens: Optional[int] = typer.Option(None, help="Response tokens trained on (48)."),
    router_response_tokens: Optional[str] = typer.Option(
        None, help="Router stage: response tokens trained on: a number, 'route' (the model's --route-tokens, "
                   "the tokens generate() routes) or 'all' (--max-response-tokens, the reference)."),
    save_every: Optional[int] = typer.Option(None, help="Optimizer steps between checkpoints (50)."),
    keep_checkpoints: Optional[int] = typer.Option(None, min=0, help="Newest step checkpoints kept per stage (2; 0 keeps all)."),
    seed: Optional[int] = typer.Option(None),
    dtype: str = _dtype_option(),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute the backbone's activations in backward "
                                                "(less memory, about a third more step time)."),
    mixed_precision: Optional[str] = typer.Option(None, help="Autocast: no, fp16 or bf16 (default: the launcher's "
                                                  "mixed_precision, e.g. from configs/accelerate)."),
    overwrite: bool = _overwrite_option(),
    threads: Optional[int] = typer.Option(None),
):
    """Train glad -> unwill -> router on a frozen base model."""
    _setup_torch(threads)
    cfg = _mogu_config(target_modules, routed_layers, r, lora_alpha, lora_dropout, router_hidden, route_tokens,
                       version=version, router_type=router_type)
    selection = None
    if routed_layers == "probe" or (routed_layers is None and version == "v2"):
        pooling = select_pooling or selection_pooling(router_type)
        selection = {k: v for k, v in {"top_k": select_top_k, "threshold": select_threshold,
                                       "pooling": pooling}.items() if v is not None}
    overrides = {"joint_experts": joint_experts, "joint_expert_lr": joint_expert_lr,
                 "glad.epochs": glad_epochs, "unwill.epochs": unwill_epochs, "router.epochs": router_epochs,
                 "glad.lr": glad_lr, "unwill.lr": unwill_lr, "router.lr": router_lr,
                 "glad.max_examples": glad_max_examples, "unwill.max_examples": unwill_max_examples,
                 "router.max_examples": router_max_examples,
                 "router_loss_weight": router_loss_weight, "max_response_tokens": max_response_tokens,
                 "router_response_tokens": _router_response_tokens(router_response_tokens),
                 "save_every": save_every, "keep_checkpoints": keep_checkpoints, "seed": seed,
                 "responder_loss": responder_loss, "router_init": router_init,
                 "router_init_refits": router_init_refits, "router_init_glad_bias": router_init_glad_bias,
                 "stages": stages.split(",") if stages else None,
                 "gradient_checkpointing": gradient_checkpointing or None, "mixed_precision": mixed_precision}
    train_model(model, data, out, mogu_config=cfg, train_overrides=overrides, preset_name=preset, resume=resume,
                layer_selection=selection, overwrite=overwrite, dtype=_dtype(dtype))


def selection_pooling(router_type: str) -> str:
    """The probe pooling that ranks layers for a router type: a prompt gate reads the last prompt token."""
    from mogu.train.probe import DEFAULT_SELECTION

    return "last" if router_type == "prompt" else DEFAULT_SELECTION["pooling"]


def _router_response_tokens(value: str | None):
    """--router-response-tokens: None (preset), 'route', 'all' (-> TrainConfig None) or a number."""
    from mogu.errors import ConfigError

    if value is None:
        return None
    if value in ("route", "all"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--router-response-tokens must be a number, 'route' or 'all', got {value!r}") from None


@app.command()
def finetune(
    model: str = typer.Option(..., help="MoGU checkpoint folder (experts and routers stay frozen) or a base model."),
    task_data: Path = typer.Option(..., help="Task jsonl (prompt, response), or a `mogu data task` folder (its train.jsonl)."),
    out: Path = typer.Option(..., help="Run folder: checkpoints, metrics.jsonl, run.json, summary.json and model/."),
    mix_data: Optional[Path] = typer.Option(None, help="Router set to mix in: router.jsonl or the `mogu data build` folder."),
    mix_ratio: Optional[float] = typer.Option(None, help="Share of every batch from --mix-data, in [0, 1) "
                                              "(default 0.2 with --mix-data, else 0)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (or --epochs; default one epoch of task rows)."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the task rows."),
    lr: float = typer.Option(2e-4),
    batch_size: int = typer.Option(8, help="Rows per optimizer step, task and mix together."),
    micro_batch_size: Optional[int] = typer.Option(None, help="Rows per forward pass (default: the whole batch)."),
    r: int = typer.Option(8), lora_alpha: float = typer.Option(16.0), lora_dropout: float = typer.Option(0.05),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated module suffixes for the task LoRA "
                                                 "(default: every decoder projection but MoGU's routed one)."),
    max_response_tokens: int = typer.Option(48, help="Response tokens trained on."),
    save_every: int = typer.Option(50, help="Optimizer steps between checkpoints."),
    keep_checkpoints: int = typer.Option(2, min=0, help="Newest checkpoints kept (0 keeps all)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
    refit_gate: bool = typer.Option(True, help="Prompt-gated models: refit the gate's probes on --mix-data's prompts "
                                              "after fine-tuning (the threshold is kept)."),
    overwrite: bool = _overwrite_option(),
    seed: int = typer.Option(0),
    dtype: str = _dtype_option(),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute the backbone's activations in backward."),
    threads: Optional[int] = typer.Option(None),
):
    """Instruction fine-tuning with a task LoRA (PEFT), optionally mixing MoGU's router set into every batch."""
    from mogu.train.finetune import FinetuneConfig, run_finetune

    _setup_torch(threads)
    if mix_ratio is None:
        mix_ratio = 0.2 if mix_data else 0.0
    cfg = FinetuneConfig(task_data=str(task_data), output_dir=str(out), mix_data=str(mix_data) if mix_data else None,
                         mix_ratio=mix_ratio, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
                         micro_batch_size=micro_batch_size, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         target_modules=_csv(target_modules) if target_modules else None,
                         max_response_tokens=max_response_tokens, save_every=save_every,
                         keep_checkpoints=keep_checkpoints, seed=seed, refit_gate=refit_gate, overwrite=overwrite,
                         dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    _, _, summary = run_finetune(model, cfg, resume=resume, log=_echo)
    typer.echo(json.dumps(summary, indent=2))


def _gen_kwargs(tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    kw = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


HANDOFF_HELP = ("After the routed prefix: 'hold' keeps an answer that routing judged harmful with the unwilling "
                "expert to its end (the default), 'fixed' hands every answer to the base model (the paper's). "
                "Default: the checkpoint's.")


def _handoff_option():
    return typer.Option(None, help=HANDOFF_HELP)


def _gate_benign_option():
    return typer.Option(None, help="Prompt gate only: what answers a prompt the gate passes, 'glad' (the glad "
                                   "expert's routed prefix) or 'base' (the base model alone). Default: the checkpoint's.")


@app.command()
def generate(
    model: str = typer.Option(..., help="MoGU checkpoint folder, or a base model."),
    prompt: list[str] = typer.Option(..., help="Prompt(s); repeat the option for a batch."),
    max_new_tokens: int = typer.Option(64, min=1, max=8192),
    temperature: float = typer.Option(0.0, min=0.0, max=5.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    route_tokens: Optional[int] = typer.Option(None, help="Override the routed prefix length; 0 routes every token."),
    mode: str = typer.Option("auto", help="auto | glad | unwill | off"),
    handoff: Optional[str] = _handoff_option(),
    gate_benign: Optional[str] = _gate_benign_option(),
    trace: bool = typer.Option(False, help="Print mean router weights per layer."),
    dtype: str = _dtype_option(),
    threads: Optional[int] = typer.Option(None),
):
    """Generate answers for one or more prompts (batched, left-padded)."""
    from mogu.tuner.inference import load_for_inference
    from mogu.chat import render_prompt

    _setup_torch(threads)
    m, tok, is_mogu = load_for_inference(model, handoff=handoff, gate_benign=gate_benign, dtype=_dtype(dtype))
    texts = [render_prompt(tok, p) for p in prompt]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = _gen_kwargs(tok, max_new_tokens, temperature, top_p)
    if is_mogu:
        m.set_routing(mode)
        if route_tokens is not None:
            if route_tokens < 0:
                raise MoGUError(f"--route-tokens must be >= 0 (0 routes every token), got {route_tokens}")
            kw["route_tokens"] = route_tokens or None
        m.enable_routing_trace(trace)
    out = m.generate(**enc, **kw)
    for p, row in zip(prompt, out):
        typer.echo(f"### {p}\n{tok.decode(row[enc['input_ids'].shape[1]:], skip_special_tokens=True).strip()}\n")
    if is_mogu and trace:
        for layer, t in m.routing_trace().items():
            typer.echo(f"layer {layer}: mean u={t[..., 0].mean():.3f} g={t[..., 1].mean():.3f}")


@app.command()
def chat(
    model: Optional[str] = typer.Option(None, help="MoGU checkpoint folder, or a base model. With --url: the served model's name (default: the server's first)."),
    max_new_tokens: int = typer.Option(256, min=1, max=8192),
    temperature: float = typer.Option(0.0, min=0.0, max=5.0),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    system: Optional[str] = typer.Option(None, help="System prompt (default: the template's)."),
    url: Optional[str] = typer.Option(None, help="Chat with a running `mogu serve` (or any OpenAI-compatible server), e.g. http://127.0.0.1:8000/v1."),
    api_key: Optional[str] = typer.Option(None, envvar="MOGU_API_KEY", help="Bearer key for --url (env MOGU_API_KEY)."),
    handoff: Optional[str] = _handoff_option(),
    gate_benign: Optional[str] = _gate_benign_option(),
    dtype: str = _dtype_option(),
    threads: Optional[int] = typer.Option(None),
):
    """Interactive chat that streams tokens. Empty line or Ctrl-D quits; /reset clears history."""
    if url:
        from mogu.serve import chat_remote

        chat_remote(url, api_key=api_key, model=model, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, system=system, echo=typer.echo)
        return
    if not model:
        raise MoGUError("chat needs --model (a local model) or --url (a running server)")
    from transformers import TextStreamer

    from mogu.tuner.inference import load_for_inference

    _setup_torch(threads)
    m, tok, _ = load_for_inference(model, handoff=handoff, gate_benign=gate_benign, dtype=_dtype(dtype))
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    typer.echo("mogu chat: empty line or Ctrl-D to quit, /reset to clear the history.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{h['role'].capitalize()}: {h['content']}\n" for h in history) + "Assistant: "
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        out = m.generate(**enc, streamer=streamer, **_gen_kwargs(tok, max_new_tokens, temperature, top_p))
        reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})


def _with_handoff(options: dict, handoff: Optional[str], defenses: list[str]) -> dict:
    """--handoff is the mogu defense's ``handoff`` option."""
    if handoff is not None:
        if "mogu" not in defenses:
            raise MoGUError("--handoff applies to the 'mogu' defense, which is not among --defenses")
        options.setdefault("mogu", {})["handoff"] = handoff
    return options


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., help="MoGU checkpoint folder (enables the 'mogu' defense), base folder, Hub id or the embedded default."),
    out: Path = typer.Option(..., help="Output folder: generations.jsonl, judgements.jsonl, metrics.json, report.md, pareto.png, routing.png, run.json."),
    defenses: str = typer.Option("none,mogu", help="Comma-separated: none,self_reminder,icd,self_examination,retokenization,safedecoding,sft,mogu."),
    benchmarks: str = typer.Option("advbench,just_eval", help="Comma-separated registered names (see --list) or jsonl/csv/json/txt files."),
    judge: str = typer.Option("whole_answer", help="whole_answer (offline, reads the whole answer: refusal, "
                              "refuse_then_comply, comply, other), keyword (a refusal phrase anywhere; published "
                              "numbers' judge), openai (any OpenAI-compatible endpoint) or hf-classifier."),
    attacks: str = typer.Option("none", help="Comma-separated attacks on the harmful prompts of every benchmark: "
                                "none,prefill,fake_history,template,multi_turn,suffix (see --list)."),
    attack_option: Optional[list[str]] = typer.Option(None, help="NAME.KEY=VALUE, e.g. suffix.file=suffixes.txt or "
                                                      "template.templates=GPTFuzzer.csv (repeatable)."),
    attack_benign: bool = typer.Option(False, help="Also send every attack around the benign prompts, as a control: "
                                       "a defense that refuses them refuses the frame, not the request."),
    judge_model: Optional[str] = typer.Option(None, help="Judge model name (openai) or path/Hub id (hf-classifier)."),
    judge_base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL for the openai judge."),
    judge_api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the judge's API key."),
    judge_rubric: str = typer.Option("verdict", help="openai judge: verdict (the whole-answer labels), harm, usability or both."),
    limit: Optional[int] = typer.Option(50, min=1, help="Prompts per benchmark (first N)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with the public benchmark files (default: $MOGU_DATA_DIR)."),
    prompt_field: Optional[str] = typer.Option(None, help="Prompt field for benchmark files given by path."),
    harmful_files: bool = typer.Option(True, help="Label for benchmark files given by path: harmful (default) or --no-harmful-files."),
    max_new_tokens: int = typer.Option(64, min=1, max=4096),
    batch_size: int = typer.Option(8, min=1, max=1024),
    reference_tokens: int = typer.Option(128, min=0, max=4096, help="Score the reference answers that ship with "
                                         "benign sets (AlpacaEval, Just-Eval) by each defense's own likelihood, "
                                         "cut to this many tokens; 0 skips it."),
    defense_option: Optional[list[str]] = typer.Option(None, help="NAME.KEY=VALUE, e.g. safedecoding.alpha=3 or sft.data=runs/demo/data/router.jsonl (repeatable)."),
    benchmark_option: Optional[list[str]] = typer.Option(None, help="NAME.KEY=VALUE, e.g. harmbench.split=val (repeatable)."),
    seed: int = typer.Option(0),
    handoff: Optional[str] = _handoff_option(),
    list_all: bool = typer.Option(False, "--list", help="List the benchmarks, defenses, judges and attacks, then exit."),
    dtype: str = _dtype_option(),
    threads: Optional[int] = typer.Option(None),
):
    """Compare defenses on benchmarks: refusal / attack-success with 95% CIs, judge scores, Pareto plot.

    Reruns with the same --out skip finished generations and judgements.
    """
    from mogu.eval.attacks import ATTACKS, describe_attacks
    from mogu.eval.benchmarks import get_benchmark, list_benchmarks
    from mogu.eval.defenses import DEFENSES
    from mogu.eval.judges import JUDGES
    from mogu.eval.runner import EvalConfig, EvalRunner, parse_options

    if list_all:
        typer.echo("benchmarks:\n" + "\n".join(f"  {n}: {d}" for n, d in list_benchmarks()))
        typer.echo("defenses: " + ", ".join(DEFENSES))
        typer.echo("judges: " + ", ".join(JUDGES))
        typer.echo("attacks:\n" + "\n".join(f"  {n}: {d}" for n, d in describe_attacks()))
        return
    attack_names = _csv(attacks)
    for a in attack_names:
        if a not in ATTACKS:
            raise MoGUError(f"unknown attack {a!r}; known: {', '.join(ATTACKS)}")
    _setup_torch(threads)
    defense_names, bench_names = _csv(defenses), _csv(benchmarks)
    for d in defense_names:
        if d not in DEFENSES:
            raise MoGUError(f"unknown defense {d!r}; known: {', '.join(DEFENSES)}")
    bench_opts = parse_options(benchmark_option, set(bench_names), "benchmark option")
    for b in bench_names:
        if get_benchmark(b) is None:
            bench_opts.setdefault(b, {}).update({"prompt_field": prompt_field, "harmful": harmful_files})
    judge_options: dict = {}
    if judge == "openai":
        judge_options = {"model": judge_model, "base_url": judge_base_url, "api_key_env": judge_api_key_env,
                         "rubric": judge_rubric}
    elif judge == "hf-classifier":
        judge_options = {"model": judge_model}
    cfg = EvalConfig(model=model, out=out, defenses=defense_names, benchmarks=bench_names, judge=judge,
                     judge_options=judge_options, attacks=attack_names,
                     attack_options=parse_options(attack_option, set(attack_names), "attack option"),
                     attack_benign=attack_benign,
                     defense_options=_with_handoff(parse_options(defense_option, set(defense_names), "defense option"),
                                                   handoff, defense_names),
                     benchmark_options=bench_opts, data_dir=str(data_dir) if data_dir else None, limit=limit,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                     reference_tokens=reference_tokens, dtype=str(_dtype(dtype)).removeprefix("torch."))
    metrics = EvalRunner(cfg, log=_echo).run()
    if metrics is None:  # a non-main process under `accelerate launch`: the main one merges and reports
        return
    typer.echo((out / "report.md").read_text())
    front = ", ".join(metrics["pareto_front"])
    typer.echo(f"Pareto front: {front}. Wrote {out}/report.md, metrics.json, pareto.png.")


DEMO_BENIGN_TRAIN = 240
# Generation batch for the demo's distillation, judging and calibration: on 2 CPU cores batch 32
# decodes ~1.3x more rows per second than 16 (docs/RESULTS.md, "mogu demo"); memory is no concern at 135M.
DEMO_BATCH = 32


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run folder."),
    model: str = typer.Option("smollm2-135m-instruct", help="Base model (default: the embedded SmolLM2-135M-Instruct)."),
    eval_tokens: int = typer.Option(64, min=1, max=1024, help="New tokens per dev answer when judging."),
    resume: bool = typer.Option(False, help="Reuse data and continue training already in --out."),
    calibrate: bool = typer.Option(True, help="Choose the routers' operating point on the dev split (`mogu calibrate`, 1-4 minutes on 2 CPU cores) and judge that model; --no-calibrate keeps the routers as trained."),
    router_type: str = typer.Option("prompt", help=ROUTER_TYPE_HELP + " The demo uses 'prompt': on the same "
                                    "data and experts it refused 4 % of Just-Eval against 14 % for 'token'."),
    threads: Optional[int] = typer.Option(None),
):
    """The main job: build data, train MoGU on the embedded default, show before/after on dev prompts."""
    from mogu.train.data import DEV_FILE, load_stage_file
    from mogu.tuner.loading import load_base_model
    from mogu.train.stages import generate_responses, refusal_rate

    _setup_torch(threads)
    t0 = time.perf_counter()
    base, tok = load_base_model(model)
    data_dir = out / "data"
    if not (resume and (data_dir / "data_stats.json").is_file()):
        # 32 tokens: cpu-fast trains on the first 32 response tokens, so longer answers are cut anyway.
        # DEMO_BENIGN_TRAIN of the benign train prompts: distilling all of them is the demo's slowest
        # step, and cpu-fast trains on fewer rows than that (docs/RESULTS.md, "mogu demo").
        build_data(model, data_dir, model=base, tokenizer=tok, max_new_tokens=32, max_benign=DEMO_BENIGN_TRAIN,
                   batch_size=DEMO_BATCH)
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
    mogu_model, summary = train_model(model, data_dir, out / "train", mogu_config=_mogu_config(None, None, 8, 16.0, 0.05, 512, 5, router_type=router_type),
                                      train_overrides={}, preset_name="cpu-fast", resume=resume, model=base,
                                      tokenizer=tok)
    model_dir, calibration = out / "train" / "model", None
    if calibrate:
        model_dir = out / "calibrated"
        calibration = calibrate_and_save(mogu_model, tok, harmful, benign, model_dir, source=str(out / "train" / "model"),
                                         grid=DEFAULT_GRID, min_harmful=DEFAULT_MIN_HARMFUL, batch_size=DEMO_BATCH,
                                         args={"demo": str(out)})
    t_after = time.perf_counter()
    after_h = generate_responses(mogu_model, tok, harmful, desc="after: harmful dev", **judge)
    after_b = generate_responses(mogu_model, tok, benign, desc="after: benign dev", **judge)
    after_s = time.perf_counter() - t_after
    wall = time.perf_counter() - t0

    from mogu.verdicts import classify_answer

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
    for kind in ("harmful", "benign"):
        for p, b, a in samples[kind][:2]:
            typer.echo(f"\n[{kind}] {p}\n  before: {b[:160]!r}\n  after:  {a[:160]!r}")
    kw = rates["keyword"]
    typer.echo("\n| dev set (whole answer read) | refused before | refused after | refused, then answered: after | "
               "keyword judge: before / after |\n|---|---|---|---|---|")
    typer.echo(f"| harmful ({len(harmful)}) | {rates['harmful_dev_refusal_before']:.0%} | {rates['harmful_dev_refusal_after']:.0%} | "
               f"{rates['harmful_dev_refuse_then_comply_after']:.0%} | {kw['harmful_dev_refusal_before']:.0%} / "
               f"{kw['harmful_dev_refusal_after']:.0%} |")
    typer.echo(f"| benign ({len(benign)}) | {rates['benign_dev_refusal_before']:.0%} | {rates['benign_dev_refusal_after']:.0%} | | "
               f"{kw['benign_dev_refusal_before']:.0%} / {kw['benign_dev_refusal_after']:.0%} |")
    parts = {"data": rates["data_s"], "before": rates["before_s"], **rates["train_s"],
             **({"router init": rates["router_init_s"]} if router_type == "token" else {}),
             **({"calibrate": calibration.wall_s} if calibration else {}), "after": rates["after_s"]}
    typer.echo("\ntime (s): " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()))
    if calibration:
        typer.echo(f"operating point: glad bias {calibration.chosen:+g} ({calibration.reason})")
    typer.echo(f"wall time {wall / 60:.1f} min; model saved to {model_dir}; chat with: mogu chat --model {model_dir}")


@app.command()
def probe(
    out: Path = typer.Option(..., help="Output folder: probe.json, probe.png, run.json (e.g. beside the checkpoint)."),
    model: str = typer.Option("smollm2-135m-instruct", help="Base model (folder, Hub id, the embedded default) or a MoGU checkpoint (probed with routing off)."),
    harmful: str = typer.Option(BUILTIN, help="Harmful prompts: 'builtin' (train split), files (comma-separated) or a Hub dataset id. The dev split is left out, as in `mogu data build`."),
    benign: str = typer.Option(BUILTIN, help="Benign prompts: 'builtin' (benign + borderline, train split), files or a Hub dataset id."),
    field: Optional[str] = typer.Option(None, help="Prompt field/column name (default: guessed)."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most N prompts per class (seeded sample)."),
    folds: int = typer.Option(5, min=2, max=100, help="Stratified k-fold splits."),
    seed: int = typer.Option(0),
    pooling: Optional[str] = typer.Option(None, help="Selection pooling: mean or last (default: mogu.train.probe.DEFAULT_SELECTION)."),
    metric: Optional[str] = typer.Option(None, help="Selection metric: accuracy, balanced_accuracy or auroc (default: DEFAULT_SELECTION)."),
    top_k: Optional[int] = typer.Option(None, help="Keep the k best layers (with --threshold: the k best of those passing)."),
    threshold: Optional[float] = typer.Option(None, help="Keep layers whose metric is >= this (0..1); none passing falls back to the best layer."),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated module suffixes to probe (default: per family)."),
    batch_size: int = typer.Option(16, min=1, max=1024),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Linear probes per layer (harmful vs benign) on the routed modules' inputs; select router layers."""
    import warnings

    from mogu.tuner.inference import load_for_inference
    from mogu.io import atomic_write_text, run_record
    from mogu.train.probe import DEFAULT_SELECTION, METRICS, POOLINGS, run_probe

    _setup_torch(threads)
    rule = {"pooling": pooling or DEFAULT_SELECTION["pooling"], "metric": metric or DEFAULT_SELECTION["metric"]}
    if top_k is None and threshold is None:
        rule.update(top_k=DEFAULT_SELECTION["top_k"], threshold=DEFAULT_SELECTION["threshold"])
    else:
        rule.update(top_k=top_k, threshold=threshold)
    if rule["pooling"] not in POOLINGS or rule["metric"] not in METRICS:
        raise MoGUError(f"--pooling must be one of {', '.join(POOLINGS)} and --metric one of {', '.join(METRICS)}")
    if rule["threshold"] is not None and not 0.0 <= rule["threshold"] <= 1.0:
        raise MoGUError(f"--threshold must be in [0, 1], got {rule['threshold']}")
    if rule["top_k"] is not None and rule["top_k"] < 1:
        raise MoGUError(f"--top-k must be >= 1, got {rule['top_k']}")
    harm = [r.prompt for r in _records(harmful, harmful=True, field=field, output_field=None, seed=seed)
            if r.split != "dev"]
    ben = [r.prompt for r in _records(benign, harmful=False, field=field, output_field=None, seed=seed)
           if r.split != "dev"]
    t0 = time.perf_counter()
    m, tok, is_mogu = load_for_inference(model)
    model_id = (m.config.base_model_name_or_path or model) if is_mogu else model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        report = run_probe(m, tok, harm, ben, folds=folds, seed=seed, limit=limit, batch_size=batch_size,
                           target_modules=_csv(target_modules) if target_modules else None, model_id=model_id,
                           selection=rule, progress=True)
    for w in caught:
        if issubclass(w.category, UserWarning) and "falling back" in str(w.message):
            _echo(f"warning: {w.message}")
    report.extra.update(source=model, is_mogu_checkpoint=is_mogu, wall_s=round(time.perf_counter() - t0, 1))
    report.save(out)
    atomic_write_text(out / "run.json", json.dumps(run_record(
        {"model": model, "harmful": harmful, "benign": benign, "field": field, "limit": limit, "folds": folds,
         "seed": seed, "selection": rule, "target_modules": target_modules, "batch_size": batch_size}), indent=2))
    typer.echo(report.to_markdown())
    layers = report.selection["layers"]
    typer.echo(f"\nselected layers: {','.join(map(str, layers))}  (wrote {out}/probe.json, probe.png, run.json)")


@app.command()
def calibrate(
    model: str = typer.Option(..., help="Trained MoGU checkpoint folder."),
    out: Path = typer.Option(..., help="Folder for the calibrated checkpoint (must differ from --model)."),
    harmful: str = typer.Option(BUILTIN, help="Harmful dev prompts: 'builtin' (the shipped dev split), files (comma-separated) or a Hub dataset id."),
    benign: str = typer.Option(BUILTIN, help="Benign dev prompts: 'builtin' (benign + borderline dev split), files or a Hub dataset id."),
    field: Optional[str] = typer.Option(None, help="Prompt field/column name (default: guessed)."),
    grid: str = typer.Option(",".join(f"{v:g}" for v in DEFAULT_GRID),
                             help="Comma-separated glad-bias values to try (logits; > 0 refuses less)."),
    min_harmful: float = typer.Option(DEFAULT_MIN_HARMFUL, help="Harmful-dev refusal rate a point must keep (0..1)."),
    exhaustive: bool = typer.Option(False, help="Score every grid point on both sets (default: a monotone search that scores few)."),
    refine: int = typer.Option(DEFAULT_REFINE, min=0, max=10, help="Bisection steps between the last grid point keeping --min-harmful and the next one missing it (0: grid only)."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, max=1024, help="Tokens generated per prompt for the refusal judge (default: the model's route_tokens, i.e. the routed prefix alone, or 16 when it routes every token; on SmolLM2 5 tokens gave the same refusal rates as 16 and 64 at half the cost of 16; docs/RESULTS.md)."),
    batch_size: int = typer.Option(32, min=1, max=1024),
    overwrite: bool = _overwrite_option(),
    dtype: str = _dtype_option(),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Choose the router's operating point on dev prompts: the glad-bias shift with the fewest benign refusals
    that still refuses --min-harmful of harmful ones. Writes a new checkpoint with calibration.json."""
    from mogu.train.calibration import CALIBRATION_FILE, validate_grid
    from mogu.train.data import read_prompts
    from mogu.tuner.inference import load_for_inference

    try:
        values = validate_grid(float(v) for v in _csv(grid))
    except ValueError as e:
        raise MoGUError(f"--grid must be comma-separated numbers, got {grid!r} ({e})") from None
    if not 0.0 <= min_harmful <= 1.0:
        raise MoGUError(f"--min-harmful must be in [0, 1], got {min_harmful}")
    if Path(model).resolve() == out.resolve():
        raise MoGUError("--out must differ from --model: calibration writes a new checkpoint")

    def prompts(spec: str, is_harmful: bool) -> list[str]:
        if spec == BUILTIN:
            rows = [r for r in _records(BUILTIN, harmful=is_harmful, field=None, output_field=None, seed=0)
                    if r.split == "dev"]
        else:
            rows = [r for part in spec.split(",") for r in read_prompts(part.strip(), harmful=is_harmful, field=field)]
        if not rows:
            raise MoGUError(f"no {'harmful' if is_harmful else 'benign'} dev prompts in {spec!r}")
        return [r.prompt for r in rows]

    from mogu.io import check_replaceable
    from mogu.tuner.checkpoint import CHECKPOINT_KIND

    protected = (model, *(p.strip() for spec in (harmful, benign) if spec != BUILTIN for p in spec.split(",")))
    check_replaceable(out, kind=CHECKPOINT_KIND, overwrite=overwrite, protected=protected)  # before any work
    harm, ben = prompts(harmful, True), prompts(benign, False)
    _setup_torch(threads)
    m, tok, is_mogu = load_for_inference(model, dtype=_dtype(dtype))
    if not is_mogu:
        raise MoGUError(f"{model} is not a MoGU checkpoint (no mogu_config.json): calibrate a trained model")

    result = calibrate_and_save(m, tok, harm, ben, out, source=model, grid=values, min_harmful=min_harmful,
                                exhaustive=exhaustive, refine=refine, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, overwrite=overwrite, protected=protected,
                                args={"model": model, "harmful": harmful, "benign": benign, "field": field})
    typer.echo(result.to_markdown())
    typer.echo(f"\nchosen glad bias {result.chosen:+g}: {result.reason}\nwrote {out} ({CALIBRATION_FILE} inside)")


def calibrate_and_save(m, tok, harmful: list[str], benign: list[str], out: Path, *, source: str, grid,
                       min_harmful: float, exhaustive: bool = False, refine: int = DEFAULT_REFINE,
                       max_new_tokens: int | None = None,
                       batch_size: int = 32, args: dict | None = None, overwrite: bool = False,
                       protected: tuple = ()):
    """Calibrate ``m`` in place on dev prompts (keyword judge, greedy) and save it with calibration.json.

    ``max_new_tokens`` None judges the routed prefix alone (the model's route_tokens): the shift acts
    only there, the base model writes the rest, and no base hand-off prefill is paid per point.
    """
    from mogu.train.calibration import CALIBRATION_FILE, RULE, calibrate as run_calibration, judged_tokens
    from mogu.io import run_record
    from mogu.train.stages import generate_responses, refusal_rate

    max_new_tokens = judged_tokens(m.config, max_new_tokens)
    m.set_routing("auto")

    def rate(ps: list[str], desc: str) -> float:
        return refusal_rate(generate_responses(m, tok, ps, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                               progress=True, desc=desc))

    t0 = time.perf_counter()

    def score_harmful() -> float:
        return rate(harmful, "harmful dev")

    def score_benign() -> float:
        return rate(benign, "benign dev")

    if m.gate is not None:
        import torch

        from mogu.train.calibration import gate_rate_functions
        from mogu.verdicts import is_refusal

        def refusals(ps: list[str], expert: str) -> list[bool]:
            if m.config.gate_benign == "base":  # a passed prompt is the base model's alone
                weights = torch.tensor([[1.0, 0.0, 0.0] if expert == "unwill" else [0.0, 0.0, 1.0]])
            else:
                weights = torch.tensor([[1.0, 0.0] if expert == "unwill" else [0.0, 1.0]])
            with m.pin_routing(weights):  # one row: repeated for every row of each batch
                out = generate_responses(m, tok, ps, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         progress=True, desc=f"{expert} expert")
            return [is_refusal(o) for o in out]

        _echo("[calibrate] prompt gate: each dev prompt is generated once per expert; every threshold's "
              "refusal rates follow from the gate's scores")
        fns = gate_rate_functions(m, {"harmful": harmful, "benign": benign}, refusals, batch_size=batch_size)
        score_harmful, score_benign = fns["harmful"], fns["benign"]
    result = run_calibration(m, score_harmful, score_benign,
                             grid=grid, min_harmful=min_harmful, exhaustive=exhaustive, refine=refine, log=_echo)
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


convert_app = typer.Typer(help="Import experts and routers from other formats.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("reference")
def convert_reference_command(
    glad: Path = typer.Option(..., help="The authors' resp_glad/<step>_lora folder (PEFT LoRA)."),
    unwill: Path = typer.Option(..., help="The authors' resp_unwill/<step>_lora folder (PEFT LoRA)."),
    router: Path = typer.Option(..., help="router_layer/<step>_router.pth (read weights-only) or a .safetensors copy."),
    base: str = typer.Option(..., help="Base model: folder or Hub id (only its config is read), e.g. meta-llama/Llama-2-7b-chat-hf."),
    out: Path = typer.Option(..., help="Output MoGU checkpoint folder (written only if every file validates)."),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated module suffixes (default: per family)."),
    route_tokens: int = typer.Option(5, help="Routed generated tokens before the base model takes over; 0 routes every token."),
    revision: Optional[str] = typer.Option(None, help="Base model revision on the Hub."),
    overwrite: bool = _overwrite_option(),
):
    """Convert the MoGU authors' released parameters (Llama2 / Vicuna / Falcon) into a mogu checkpoint."""
    from mogu.tuner.interop import convert_reference

    path = convert_reference(glad, unwill, router, base, out, route_tokens=route_tokens or None, revision=revision,
                             target_modules=_csv(target_modules) if target_modules else None, overwrite=overwrite)
    typer.echo(f"wrote {path}; chat with: mogu chat --model {path}")


@convert_app.command("peft")
def convert_peft_command(
    glad: Path = typer.Option(..., help="PEFT LoRA adapter folder to use as the glad (answering) expert."),
    unwill: Path = typer.Option(..., help="PEFT LoRA adapter folder to use as the unwilling (refusing) expert."),
    base: Optional[str] = typer.Option(None, help="Base model folder or Hub id (default: the adapters' base)."),
    out: Path = typer.Option(..., help="Output MoGU checkpoint folder (routers freshly initialised)."),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated module suffixes; must select the adapters' modules."),
    r: Optional[int] = typer.Option(None, help="Expected LoRA rank (checked against the adapters)."),
    lora_alpha: Optional[float] = typer.Option(None, help="Expected lora_alpha (checked against the adapters)."),
    router_hidden: Optional[int] = typer.Option(None, help="Router hidden size (default: per version)."),
    route_tokens: int = typer.Option(5, help="0 routes every token."),
    version: str = typer.Option("v1", help="v1 or v2."),
    revision: Optional[str] = typer.Option(None, help="Base model revision on the Hub."),
    overwrite: bool = _overwrite_option(),
):
    """Import two PEFT LoRA adapters as the glad / unwill experts of a new MoGU model."""
    from mogu.tuner.interop import convert_peft

    path = convert_peft(glad, unwill, base, out, revision=revision, overwrite=overwrite, r=r, lora_alpha=lora_alpha,
                        target_modules=_csv(target_modules) if target_modules else None,
                        router_hidden=router_hidden, route_tokens=route_tokens or None, version=version)
    typer.echo(f"wrote {path}; train the routers with: mogu train --stages router ... (or --resume)")


@app.command("export")
def export_command(
    model: Path = typer.Option(..., help="MoGU checkpoint folder."),
    out: Path = typer.Option(..., help="Output folder: the adapter itself, or glad/ and unwill/ with --expert both."),
    expert: str = typer.Option("both", help="glad | unwill | both"),
    overwrite: bool = _overwrite_option(),
):
    """Export the experts as standard PEFT LoRA folders (PeftModel.from_pretrained, vLLM multi-LoRA, ...)."""
    from mogu.tuner.interop import export_experts

    path = export_experts(model, out, expert, overwrite=overwrite)
    typer.echo(f"wrote {path}")


@app.command("push")
def push_command(
    model: Path = typer.Option(..., help="MoGU checkpoint folder."),
    repo_id: str = typer.Option(..., help="Hub repository, e.g. you/mogu-llama2."),
    private: bool = typer.Option(False, help="Create the repository as private."),
    metrics: Optional[Path] = typer.Option(None, help="A `mogu eval` metrics.json (or its folder) to put in the model card."),
    license: Optional[str] = typer.Option(None, help="License id for the card's metadata (e.g. the base model's)."),
    commit_message: str = typer.Option("Upload MoGU model"),
    revision: Optional[str] = typer.Option(None, help="Branch to push to."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: HF_TOKEN or the cached login)."),
):
    """Upload a checkpoint folder to the Hugging Face Hub (the model card is refreshed first)."""
    from mogu.tuner.hub import push_to_hub

    commit = push_to_hub(model, repo_id, token=token, private=private, commit_message=commit_message,
                         revision=revision, metrics=metrics, license=license)
    typer.echo(f"pushed {model} to {getattr(commit, 'commit_url', None) or repo_id}")


@app.command("serve")
def serve_command(
    model: str = typer.Option(..., help="MoGU checkpoint folder (or a base model: served without routing)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, min=0, max=65535),
    api_key: Optional[str] = typer.Option(None, envvar="MOGU_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (env MOGU_API_KEY)."),
    model_name: Optional[str] = typer.Option(None, help="Model id clients send and /v1/models lists (default: the --model value)."),
    max_batch_size: int = typer.Option(8, min=1, max=256, help="Requests generated together in one batch."),
    max_queue: int = typer.Option(64, min=1, help="Waiting requests beyond which the server answers 429."),
    batch_wait_ms: float = typer.Option(10.0, min=0.0, help="How long the worker waits for a batch to fill."),
    max_tokens_limit: int = typer.Option(4096, min=1, help="Largest max_tokens a request may ask for."),
    max_body_bytes: int = typer.Option(1 << 20, min=1024, help="Largest request body (413 beyond)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    handoff: Optional[str] = _handoff_option(),
    gate_benign: Optional[str] = _gate_benign_option(),
    max_prompt_tokens: int = typer.Option(4096, min=1, help="Longest prompt, in tokens, a request may send (400 beyond)."),
    request_timeout: float = typer.Option(300.0, min=0.0, help="Seconds a request may take before it is cancelled "
                                          "and answered 408 (0: no limit)."),
    allowed_hosts: Optional[str] = typer.Option(None, help="Comma-separated Host names the server answers ('*' for "
                                                "any). Default: localhost,127.0.0.1,::1 on a loopback bind, any otherwise."),
    special_tokens: str = typer.Option("escape", help="Special-token text in message content: escape (kept as text), "
                                       "refuse (400) or allow (acts as control tokens)."),
    dtype: str = _dtype_option(),
):
    """Serve a model behind an OpenAI-compatible API: /v1/chat/completions (SSE streaming), /v1/models, /health."""
    from mogu.serve import serve

    _setup_torch(threads)
    hosts = [h.strip() for h in allowed_hosts.split(",") if h.strip()] if allowed_hosts is not None else None
    if hosts is not None and not hosts:
        raise MoGUError("--allowed-hosts is empty: name at least one host, or '*' for any")
    serve(model, host=host, port=port, api_key=api_key, model_name=model_name, max_batch_size=max_batch_size,
          max_queue=max_queue, batch_wait_ms=batch_wait_ms, max_tokens_limit=max_tokens_limit,
          max_body_bytes=max_body_bytes, log_level=log_level, echo=_echo, handoff=handoff,
          max_prompt_tokens=max_prompt_tokens, request_timeout_s=request_timeout or None, allowed_hosts=hosts,
          special_tokens=special_tokens, gate_benign=gate_benign, dtype=_dtype(dtype))


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    try:
        app()
    except MoGUError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
