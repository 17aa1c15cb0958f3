"""The ``mogu`` command line. Errors print one line and exit 2 (``--debug`` shows the traceback)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import MoGUError

app = typer.Typer(help="MoGU: safer open LLMs without over-refusal.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Build the stage datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

BUILTIN = "builtin"


def _echo(msg: str) -> None:
    typer.echo(msg, err=True)


def _setup_torch(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _records(spec: str, *, harmful: bool, field: Optional[str], output_field: Optional[str], seed: int):
    from .data import builtin_prompts, read_prompts, split_dev

    if spec == BUILTIN:
        if harmful:
            return builtin_prompts("harmful")
        return builtin_prompts("benign") + builtin_prompts("borderline")
    records = []
    for part in spec.split(","):
        records += read_prompts(part.strip(), harmful=harmful, field=field, output_field=output_field)
    return split_dev(records, 0.15, seed)


def build_data(model_name: str, out: Path, *, harmful: str = BUILTIN, benign: str = BUILTIN,
               field: Optional[str] = None, output_field: Optional[str] = None, seed: int = 0,
               max_new_tokens: int = 48, batch_size: int = 16, model=None, tokenizer=None) -> dict:
    from .data import build_stage_datasets
    from .io import atomic_write_text, run_record
    from .loading import load_base_model
    from .training import generate_responses

    harm = _records(harmful, harmful=True, field=field, output_field=None, seed=seed)
    ben = _records(benign, harmful=False, field=field, output_field=output_field, seed=seed)
    holder: dict = {"model": model, "tokenizer": tokenizer}

    def answer(prompts: list[str], sample: bool = False) -> list[str]:
        if holder["model"] is None:
            holder["model"], holder["tokenizer"] = load_base_model(model_name)
        from .model import MoGUModel

        base = holder["model"]
        if isinstance(base, MoGUModel):
            base = base.base_model
        wrapper = _PlainGenerator(base)
        return generate_responses(wrapper, holder["tokenizer"], prompts, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, do_sample=sample, progress=True,
                                  desc="self-distilling benign answers")

    stats = build_stage_datasets(harm, ben, out, answer_fn=answer, seed=seed, log=_echo)
    atomic_write_text(out / "run.json", json.dumps(run_record(
        {"model": model_name, "harmful": harmful, "benign": benign, "field": field, "seed": seed,
         "max_new_tokens": max_new_tokens}), indent=2))
    return stats


class _PlainGenerator:
    """Gives a plain HF model the small interface generate_responses uses."""

    def __init__(self, model):
        self.model = model
        self.training = model.training

    def eval(self):
        self.model.eval()

    def train(self, mode=True):
        self.model.train(mode)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def routing(self, mode):
        import contextlib

        return contextlib.nullcontext()

    def generate(self, *args, route_tokens=None, **kwargs):
        return self.model.generate(*args, **kwargs)


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
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Build the three stage datasets (glad pairs, unwill pairs, router set) plus a dev split."""
    _setup_torch(threads)
    stats = build_data(model, out, harmful=harmful, benign=benign, field=field, output_field=output_field,
                       seed=seed, max_new_tokens=max_new_tokens)
    typer.echo(json.dumps({k: v for k, v in stats.items() if k != "sha256"}, indent=2))


def _mogu_config(target_modules, routed_layers, r, lora_alpha, lora_dropout, router_hidden, route_tokens):
    from .config import MoGUConfig

    return MoGUConfig(target_modules=target_modules.split(",") if target_modules else None,
                      routed_layers=[int(x) for x in routed_layers.split(",")] if routed_layers else None,
                      r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, router_hidden=router_hidden,
                      route_tokens=route_tokens or None)


def train_model(model_name: str, data: Path, out: Path, *, mogu_config, train_overrides: dict,
                preset_name: str = "paper", resume: bool = False, model=None, tokenizer=None,
                progress: bool = True):
    from .model import MoGUModel
    from .training import TrainConfig, preset

    schedule = preset(preset_name)
    stages = schedule.pop("stages")
    top = dict(schedule)
    for key, value in train_overrides.items():
        if value is None:
            continue
        stage, _, attr = key.partition(".")
        if attr:
            if stage in stages:
                setattr(stages[stage], attr, value)
        else:
            top[key] = value
    only = top.pop("stages", None)
    if only:
        stages = {k: v for k, v in stages.items() if k in only}
    cfg = TrainConfig(data_dir=str(data), output_dir=str(out), stages=stages, **top)
    cfg.validate()
    if model is None:
        model = MoGUModel.from_base(model_name, mogu_config)
    elif not isinstance(model, MoGUModel):
        model = MoGUModel.from_base(model, mogu_config, tokenizer=tokenizer)
    from .training import Trainer

    trainer = Trainer(model, tokenizer or model.tokenizer, cfg, log=_echo, progress=progress)
    summary = trainer.train(resume=resume)
    final = model.save_pretrained(out / "model", extra_card=_training_card(summary))
    _echo(f"saved MoGU model to {final}")
    return model, summary


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
    preset: str = typer.Option("paper", help="Training schedule: 'paper' (reference recipe, GPU) or 'cpu-fast' (the demo's)."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated subset of glad,unwill,router (others load from --resume)."),
    responder_loss: Optional[str] = typer.Option(None, help="'ratio' (paper) or 'sft' (CE on the target)."),
    router_init: Optional[str] = typer.Option(None, help="'default' (paper) or 'probe' (start from per-layer linear probes)."),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated module suffixes to wrap (default: per family)."),
    routed_layers: Optional[str] = typer.Option(None, help="Comma-separated layer indices (default: all)."),
    r: int = typer.Option(8), lora_alpha: float = typer.Option(16.0), lora_dropout: float = typer.Option(0.05),
    router_hidden: int = typer.Option(512), route_tokens: int = typer.Option(5, help="0 routes every token."),
    glad_epochs: Optional[float] = typer.Option(None), unwill_epochs: Optional[float] = typer.Option(None),
    router_epochs: Optional[float] = typer.Option(None),
    glad_lr: Optional[float] = typer.Option(None), unwill_lr: Optional[float] = typer.Option(None),
    router_lr: Optional[float] = typer.Option(None),
    router_loss_weight: Optional[float] = typer.Option(None, help="Lambda of the router weight loss (2.0)."),
    router_init_refits: Optional[int] = typer.Option(None, help="Probe init: refit rounds under routing (1)."),
    router_init_glad_bias: Optional[float] = typer.Option(None, help="Probe init: logit shift toward glad; raise it to cut over-refusal (0)."),
    max_response_tokens: Optional[int] = typer.Option(None, help="Response tokens trained on (48)."),
    save_every: Optional[int] = typer.Option(None, help="Optimizer steps between checkpoints (50)."),
    seed: Optional[int] = typer.Option(None),
    threads: Optional[int] = typer.Option(None),
):
    """Train glad -> unwill -> router on a frozen base model."""
    _setup_torch(threads)
    cfg = _mogu_config(target_modules, routed_layers, r, lora_alpha, lora_dropout, router_hidden, route_tokens)
    overrides = {"glad.epochs": glad_epochs, "unwill.epochs": unwill_epochs, "router.epochs": router_epochs,
                 "glad.lr": glad_lr, "unwill.lr": unwill_lr, "router.lr": router_lr,
                 "router_loss_weight": router_loss_weight, "max_response_tokens": max_response_tokens,
                 "save_every": save_every, "seed": seed, "responder_loss": responder_loss, "router_init": router_init,
                 "router_init_refits": router_init_refits, "router_init_glad_bias": router_init_glad_bias,
                 "stages": stages.split(",") if stages else None}
    train_model(model, data, out, mogu_config=cfg, train_overrides=overrides, preset_name=preset, resume=resume)


def _gen_kwargs(tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    kw = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


@app.command()
def generate(
    model: str = typer.Option(..., help="MoGU checkpoint folder, or a base model."),
    prompt: list[str] = typer.Option(..., help="Prompt(s); repeat the option for a batch."),
    max_new_tokens: int = typer.Option(64, min=1, max=8192),
    temperature: float = typer.Option(0.0, min=0.0, max=5.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    route_tokens: Optional[int] = typer.Option(None, help="Override the routed prefix length; 0 routes every token."),
    mode: str = typer.Option("auto", help="auto | glad | unwill | off"),
    trace: bool = typer.Option(False, help="Print mean router weights per layer."),
    threads: Optional[int] = typer.Option(None),
):
    """Generate answers for one or more prompts (batched, left-padded)."""
    from .inference import load_for_inference
    from .training import render_prompt

    _setup_torch(threads)
    m, tok, is_mogu = load_for_inference(model)
    texts = [render_prompt(tok, p) for p in prompt]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = _gen_kwargs(tok, max_new_tokens, temperature, top_p)
    if is_mogu:
        m.set_routing(mode)
        if route_tokens is not None:
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
    model: str = typer.Option(..., help="MoGU checkpoint folder, or a base model."),
    max_new_tokens: int = typer.Option(256, min=1, max=8192),
    temperature: float = typer.Option(0.0, min=0.0, max=5.0),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    system: Optional[str] = typer.Option(None, help="System prompt (default: the template's)."),
    threads: Optional[int] = typer.Option(None),
):
    """Interactive chat that streams tokens. Empty line or Ctrl-D quits; /reset clears history."""
    from transformers import TextStreamer

    from .inference import load_for_inference

    _setup_torch(threads)
    m, tok, _ = load_for_inference(model)
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


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., help="MoGU checkpoint folder (enables the 'mogu' defense), base folder, Hub id or the embedded default."),
    out: Path = typer.Option(..., help="Output folder: generations.jsonl, judgements.jsonl, metrics.json, report.md, pareto.png, routing.png, run.json."),
    defenses: str = typer.Option("none,mogu", help="Comma-separated: none,self_reminder,icd,self_examination,retokenization,safedecoding,sft,mogu."),
    benchmarks: str = typer.Option("advbench,just_eval", help="Comma-separated registered names (see --list) or jsonl/csv/json/txt files."),
    judge: str = typer.Option("keyword", help="keyword (offline), openai (any OpenAI-compatible endpoint) or hf-classifier."),
    judge_model: Optional[str] = typer.Option(None, help="Judge model name (openai) or path/Hub id (hf-classifier)."),
    judge_base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL for the openai judge."),
    judge_api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the judge's API key."),
    judge_rubric: str = typer.Option("harm", help="openai judge: harm, usability or both."),
    limit: Optional[int] = typer.Option(50, min=1, help="Prompts per benchmark (first N)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with the public benchmark files (default: $MOGU_DATA_DIR)."),
    prompt_field: Optional[str] = typer.Option(None, help="Prompt field for benchmark files given by path."),
    harmful_files: bool = typer.Option(True, help="Label for benchmark files given by path: harmful (default) or --no-harmful-files."),
    max_new_tokens: int = typer.Option(64, min=1, max=4096),
    batch_size: int = typer.Option(8, min=1, max=1024),
    defense_option: Optional[list[str]] = typer.Option(None, help="NAME.KEY=VALUE, e.g. safedecoding.alpha=3 or sft.data=runs/demo/data/router.jsonl (repeatable)."),
    benchmark_option: Optional[list[str]] = typer.Option(None, help="NAME.KEY=VALUE, e.g. harmbench.split=val (repeatable)."),
    seed: int = typer.Option(0),
    list_all: bool = typer.Option(False, "--list", help="List the benchmarks, defenses and judges, then exit."),
    threads: Optional[int] = typer.Option(None),
):
    """Compare defenses on benchmarks: refusal / attack-success with 95% CIs, judge scores, Pareto plot.

    Reruns with the same --out skip finished generations and judgements.
    """
    from .eval.benchmarks import get_benchmark, list_benchmarks
    from .eval.defenses import DEFENSES
    from .eval.judges import JUDGES
    from .eval.runner import EvalConfig, EvalRunner, parse_options

    if list_all:
        typer.echo("benchmarks:\n" + "\n".join(f"  {n}: {d}" for n, d in list_benchmarks()))
        typer.echo("defenses: " + ", ".join(DEFENSES))
        typer.echo("judges: " + ", ".join(JUDGES))
        return
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
                     judge_options=judge_options,
                     defense_options=parse_options(defense_option, set(defense_names), "defense option"),
                     benchmark_options=bench_opts, data_dir=str(data_dir) if data_dir else None, limit=limit,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    metrics = EvalRunner(cfg, log=_echo).run()
    typer.echo((out / "report.md").read_text())
    front = ", ".join(metrics["pareto_front"])
    typer.echo(f"Pareto front: {front}. Wrote {out}/report.md, metrics.json, pareto.png.")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run folder."),
    model: str = typer.Option("smollm2-135m-instruct", help="Base model (default: the embedded SmolLM2-135M-Instruct)."),
    eval_tokens: int = typer.Option(64, min=1, max=1024, help="New tokens per dev answer when judging."),
    resume: bool = typer.Option(False, help="Reuse data and continue training already in --out."),
    threads: Optional[int] = typer.Option(None),
):
    """The main job: build data, train MoGU on the embedded default, show before/after on dev prompts."""
    from .data import DEV_FILE, load_stage_file
    from .loading import load_base_model
    from .training import generate_responses, refusal_rate

    _setup_torch(threads)
    t0 = time.perf_counter()
    base, tok = load_base_model(model)
    data_dir = out / "data"
    if not (resume and (data_dir / "data_stats.json").is_file()):
        build_data(model, data_dir, model=base, tokenizer=tok, max_new_tokens=40)
    dev = load_stage_file(data_dir / DEV_FILE, ("prompt", "harmful"))
    harmful = [d["prompt"] for d in dev if d["harmful"]]
    benign = [d["prompt"] for d in dev if not d["harmful"]]
    t_data = time.perf_counter() - t0

    plain = _PlainGenerator(base)
    before_h = generate_responses(plain, tok, harmful, max_new_tokens=eval_tokens, progress=True, desc="before: harmful dev")
    before_b = generate_responses(plain, tok, benign, max_new_tokens=eval_tokens, progress=True, desc="before: benign dev")
    mogu_model, summary = train_model(model, data_dir, out / "train", mogu_config=_mogu_config(None, None, 8, 16.0, 0.05, 512, 5),
                                      train_overrides={}, preset_name="cpu-fast", resume=resume, model=base,
                                      tokenizer=tok)
    after_h = generate_responses(mogu_model, tok, harmful, max_new_tokens=eval_tokens, progress=True, desc="after: harmful dev")
    after_b = generate_responses(mogu_model, tok, benign, max_new_tokens=eval_tokens, progress=True, desc="after: benign dev")
    wall = time.perf_counter() - t0

    rates = {"harmful_dev_refusal_before": refusal_rate(before_h), "harmful_dev_refusal_after": refusal_rate(after_h),
             "benign_dev_refusal_before": refusal_rate(before_b), "benign_dev_refusal_after": refusal_rate(after_b),
             "n_harmful_dev": len(harmful), "n_benign_dev": len(benign), "eval_tokens": eval_tokens,
             "data_s": round(t_data, 1), "train_s": {k: v["train_s"] for k, v in summary.items()},
             "wall_s": round(wall, 1), "model_dir": str(out / "train" / "model")}
    (out / "demo_results.json").write_text(json.dumps(rates, indent=2))
    samples = {"harmful": list(zip(harmful, before_h, after_h)), "benign": list(zip(benign, before_b, after_b))}
    (out / "demo_answers.json").write_text(json.dumps(samples, indent=2))
    for kind in ("harmful", "benign"):
        for p, b, a in samples[kind][:2]:
            typer.echo(f"\n[{kind}] {p}\n  before: {b[:160]!r}\n  after:  {a[:160]!r}")
    typer.echo("\n| dev set | refused before | refused after |\n|---|---|---|")
    typer.echo(f"| harmful ({len(harmful)}) | {rates['harmful_dev_refusal_before']:.0%} | {rates['harmful_dev_refusal_after']:.0%} |")
    typer.echo(f"| benign ({len(benign)}) | {rates['benign_dev_refusal_before']:.0%} | {rates['benign_dev_refusal_after']:.0%} |")
    typer.echo(f"\nwall time {wall / 60:.1f} min; model saved to {out / 'train' / 'model'}; "
               f"chat with: mogu chat --model {out / 'train' / 'model'}")


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
