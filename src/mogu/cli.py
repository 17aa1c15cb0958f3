"""The ``mogu`` command line. Errors print one line and exit 2 (``--debug`` shows the traceback)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from mogu.train.calibration import DEFAULT_GRID, DEFAULT_MIN_HARMFUL, DEFAULT_REFINE
from mogu.train.recipes import BUILTIN
from mogu.errors import MoGUError

app = typer.Typer(help="MoGU: safer open LLMs without over-refusal.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Build the stage datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def _setup_torch(threads: Optional[int]) -> None:
    import torch

    if threads is not None and threads < 1:
        raise MoGUError(f"--threads must be >= 1, got {threads}")
    if threads:
        torch.set_num_threads(threads)


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
    max_benign: Optional[int] = typer.Option(None, min=1, help="Keep a seeded sample of N benign train prompts (fewer answers to distil; the dev split is kept whole)."),
    frame_fraction: float = typer.Option(1.0, min=0.0, max=1.0, help="Share of harmful train prompts (and as many benign "
                                         "ones) that probe.jsonl also wraps in a jailbreak frame: the gate reads the request."),
    batch_size: int = typer.Option(16, min=1, help="Distillation batch (the demo's is 32: padding moves greedy answers a little)."),
    probe_benign: Optional[str] = typer.Option(None, help="More benign prompts (files, Hub ids) for the gate's probe set only: your traffic."),
    probe_harmful: Optional[str] = typer.Option(None, help="More harmful prompts (files, Hub ids) for the gate's probe set only: your red team."),
    builtin_probe: bool = typer.Option(True, help="mogu's own probe-only prompts, both labels, in the gate's probe set (RESULTS: demo14)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Build the three stage datasets (glad pairs, unwill pairs, router set) plus a dev split."""
    from mogu.train.recipes import build_data

    _setup_torch(threads)
    stats = build_data(model, out, harmful=harmful, benign=benign, field=field, output_field=output_field, seed=seed,
                       max_new_tokens=max_new_tokens, max_benign=max_benign, frame_fraction=frame_fraction, probe_benign=probe_benign,
                       probe_harmful=probe_harmful, builtin_probe=builtin_probe, batch_size=batch_size)
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


ROUTER_TYPE_HELP = ("'token' (the paper's per-layer, per-token routers, trained) or 'prompt' (one decision per prompt "
                    "from layer probes: every layer's for v1, v2's probe-selected ones; docs/RESULTS.md \"Prompt gate\").")


OVERWRITE_HELP = ("Replace --out even if mogu did not write it (never /, home, the current folder, or a "
                  "folder holding this command's inputs).")


def _dtype_option():
    return typer.Option("auto", help="Backbone dtype: auto (bfloat16 on a CUDA GPU that supports it, float32 "
                                     "otherwise), bfloat16, float16 or float32. Experts and routers stay float32.")


def _dtype(value: str):
    from mogu.tuner.loading import resolve_dtype

    return resolve_dtype(value)  # a one-line error for an unknown name, before any model loads


def _load_in_4bit_option():
    return typer.Option(False, "--load-in-4bit", help="Quantise the frozen backbone to 4-bit NF4 (bitsandbytes, "
                        "`pip install 'mogu\\[quant]'`); experts and routers stay float32.")


def _load_in_8bit_option():
    return typer.Option(False, "--load-in-8bit", help="Quantise the frozen backbone to 8-bit (LLM.int8()).")


def _quantization(load_in_4bit: bool, load_in_8bit: bool) -> str | None:
    from mogu.tuner.loading import quantization_from_flags
    return quantization_from_flags(load_in_4bit, load_in_8bit)


def _overwrite_option():
    return typer.Option(False, "--overwrite", help=OVERWRITE_HELP)


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
    router_backbone: str = typer.Option("experts", help="Token routers' router stage also trains: experts, lora or o_proj."),
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
    append_eos: Optional[bool] = typer.Option(None, help="End every target with EOS (mogu's default; the authors: no)."),
    router_weight_average: Optional[str] = typer.Option(None, help="Router weight loss mean: token (mogu) or example (the authors)."),
    save_every: Optional[int] = typer.Option(None, help="Optimizer steps between checkpoints (50)."),
    keep_checkpoints: Optional[int] = typer.Option(None, min=0, help="Newest step checkpoints kept per stage (2; 0 keeps all)."),
    seed: Optional[int] = typer.Option(None),
    dtype: str = _dtype_option(),
    load_in_4bit: bool = _load_in_4bit_option(), load_in_8bit: bool = _load_in_8bit_option(),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute the backbone's activations in backward "
                                                "(less memory, about a third more step time)."),
    mixed_precision: Optional[str] = typer.Option(None, help="Autocast: no, fp16 or bf16 (default: the launcher's "
                                                  "mixed_precision, e.g. from configs/accelerate)."),
    shard_backbone: str = typer.Option("auto", help="Several processes: fsdp2 (torch) or zero3 (DeepSpeed) shard the "
                                       "frozen backbone, none replicates it, auto shards under fsdp/deepspeed_zero3.yaml."),
    overwrite: bool = _overwrite_option(),
    threads: Optional[int] = typer.Option(None),
):
    """Train glad -> unwill -> router on a frozen base model."""
    from mogu.train.recipes import make_mogu_config, selection_pooling, train_model

    _setup_torch(threads)
    cfg = make_mogu_config(target_modules, routed_layers, r, lora_alpha, lora_dropout, router_hidden, route_tokens,
                       version=version, router_type=router_type, router_backbone=router_backbone)
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
                 "gradient_checkpointing": gradient_checkpointing or None, "mixed_precision": mixed_precision,
                 "backbone_sharding": shard_backbone, "append_eos": append_eos,
                 "router_weight_average": router_weight_average}
    train_model(model, data, out, mogu_config=cfg, train_overrides=overrides, preset_name=preset, resume=resume,
                layer_selection=selection, overwrite=overwrite, dtype=_dtype(dtype),
                quantization=_quantization(load_in_4bit, load_in_8bit))


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
    load_in_4bit: bool = _load_in_4bit_option(), load_in_8bit: bool = _load_in_8bit_option(),
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
                         dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                         quantization=_quantization(load_in_4bit, load_in_8bit))
    _, _, summary = run_finetune(model, cfg, resume=resume, log=_echo)
    typer.echo(json.dumps(summary, indent=2))


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
    load_in_4bit: bool = _load_in_4bit_option(), load_in_8bit: bool = _load_in_8bit_option(),
    threads: Optional[int] = typer.Option(None),
):
    """Generate answers for one or more prompts (batched, left-padded)."""
    from mogu.tuner.inference import generate_answers, load_for_inference

    _setup_torch(threads)
    m, tok, is_mogu = load_for_inference(model, handoff=handoff, gate_benign=gate_benign, dtype=_dtype(dtype),
                                         quantization=_quantization(load_in_4bit, load_in_8bit))
    answers, weights = generate_answers(m, tok, prompt, is_mogu=is_mogu, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, route_tokens=route_tokens, mode=mode,
                                        trace=trace)
    for p, answer in zip(prompt, answers):
        typer.echo(f"### {p}\n{answer}\n")
    for layer, (u, g) in weights.items():
        typer.echo(f"layer {layer}: mean u={u:.3f} g={g:.3f}")


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
    load_in_4bit: bool = _load_in_4bit_option(), load_in_8bit: bool = _load_in_8bit_option(),
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

    from mogu.tuner.inference import ChatSession, load_for_inference

    _setup_torch(threads)
    m, tok, _ = load_for_inference(model, handoff=handoff, gate_benign=gate_benign, dtype=_dtype(dtype),
                                   quantization=_quantization(load_in_4bit, load_in_8bit))
    session = ChatSession(m, tok, system=system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
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
            session.reset()
            continue
        session.reply(line, streamer=streamer)


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
    thinking: str = typer.Option("auto", help="Reasoning models: the thinking trace's markers, so the judge (whole_answer, "
                                 "openai or hf-classifier) reads trace and answer apart (a trace that carries the request out is unsafe): "
                                 "auto (read from the model's tokenizer), none, or OPEN,CLOSE."),
    limit: Optional[int] = typer.Option(50, min=1, help="Prompts per benchmark (first N after --offset)."),
    offset: int = typer.Option(0, min=0, help="Skip the first N prompts of each benchmark (100 with --limit 100: 101-200)."),
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
    load_in_4bit: bool = _load_in_4bit_option(), load_in_8bit: bool = _load_in_8bit_option(),
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
                     benchmark_options=bench_opts, data_dir=str(data_dir) if data_dir else None, limit=limit, offset=offset,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                     reference_tokens=reference_tokens, dtype=str(_dtype(dtype)).removeprefix("torch."),
                     quantization=_quantization(load_in_4bit, load_in_8bit),
                     thinking=thinking)
    metrics = EvalRunner(cfg, log=_echo).run()
    if metrics is None:  # a non-main process under `accelerate launch`: the main one merges and reports
        return
    typer.echo((out / "report.md").read_text())
    front = ", ".join(metrics["pareto_front"])
    typer.echo(f"Pareto front: {front}. Wrote {out}/report.md, metrics.json, pareto.png.")


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
    from mogu.train.recipes import run_demo

    _setup_torch(threads)
    result = run_demo(out, model=model, eval_tokens=eval_tokens, resume=resume, calibrate=calibrate,
                      router_type=router_type, log=_echo)
    typer.echo(result.to_markdown())


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
    from mogu.train.probe import DEFAULT_SELECTION
    from mogu.train.recipes import probe_model

    _setup_torch(threads)
    rule = {"pooling": pooling or DEFAULT_SELECTION["pooling"], "metric": metric or DEFAULT_SELECTION["metric"]}
    if top_k is None and threshold is None:
        rule.update(top_k=DEFAULT_SELECTION["top_k"], threshold=DEFAULT_SELECTION["threshold"])
    else:
        rule.update(top_k=top_k, threshold=threshold)
    report = probe_model(model, out, harmful=harmful, benign=benign, field=field, limit=limit, folds=folds, seed=seed,
                         rule=rule, target_modules=_csv(target_modules) if target_modules else None,
                         batch_size=batch_size, log=_echo)
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
    load_in_4bit: bool = _load_in_4bit_option(), load_in_8bit: bool = _load_in_8bit_option(),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Choose the router's operating point on dev prompts: the glad-bias shift with the fewest benign refusals
    that still refuses --min-harmful of harmful ones. Writes a new checkpoint with calibration.json."""
    from mogu.train.calibration import CALIBRATION_FILE, validate_grid
    from mogu.train.recipes import calibrate_checkpoint

    try:
        values = validate_grid(float(v) for v in _csv(grid))
    except ValueError as e:
        raise MoGUError(f"--grid must be comma-separated numbers, got {grid!r} ({e})") from None
    _setup_torch(threads)
    result = calibrate_checkpoint(model, out, harmful=harmful, benign=benign, field=field, grid=values,
                                  min_harmful=min_harmful, exhaustive=exhaustive, refine=refine,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, overwrite=overwrite,
                                  dtype=_dtype(dtype), quantization=_quantization(load_in_4bit, load_in_8bit),
                                  log=_echo)
    typer.echo(result.to_markdown())
    typer.echo(f"\nchosen glad bias {result.chosen:+g}: {result.reason}\nwrote {out} ({CALIBRATION_FILE} inside)")


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
    load_in_4bit: bool = _load_in_4bit_option(), load_in_8bit: bool = _load_in_8bit_option(),
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
          special_tokens=special_tokens, gate_benign=gate_benign, dtype=_dtype(dtype),
          quantization=_quantization(load_in_4bit, load_in_8bit))


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
