"""Decode speed of MoGU against the plain base model and PEFT's X-LoRA, in one run.

What it measures (CPU, wall clock, ``torch.inference_mode``, greedy decoding, ``min_new_tokens =
max_new_tokens`` so every row of every batch generates exactly N new tokens and EOS never stops early):

* ``base``            -- the plain base model's ``generate`` (an unwrapped copy, KV-cached);
* ``mogu m=5``        -- ``MoGUModel.generate(route_tokens=5, handoff="fixed")`` in ``auto`` mode: 5 routed
                         tokens, then the hand-off (one base prefill of prompt + 5 tokens) and the plain base
                         model (the paper's inference);
* ``mogu hold m=5, benign`` -- the default ``handoff="hold"`` with routers that lean to glad on every row: the
                         rule is scored on the 5 routed tokens, then the same hand-off (what a benign prompt costs);
* ``mogu hold m=5, harmful`` -- ``handoff="hold"`` with routers that lean to unwill: every row stays with the
                         unwilling expert to the end, on its own routed KV cache (no second prefill);
* ``mogu all tokens`` -- ``route_tokens=None`` in ``auto`` mode: every token routed (KV-cached);
* ``mogu prompt gate m=5`` -- ``router_type="prompt"`` (mogu.tuner.gate): one routing-off pass over the prompt
                         (up to the deepest probed projection) decides the expert, then as ``mogu m=5``;
                         its random probes send some rows to each expert;
* ``x-lora (peft)``   -- PEFT's X-LoRA with two rank-8 LoRA experts on the same projection as MoGU
                         (X-LoRA needs ``use_cache=False``, so it recomputes the whole sequence twice
                         per step; it runs ``--xlora-new-tokens`` tokens, default 64, at most N).

Experts and routers are randomly initialised (LoRA B non-zero, so no zero-adapter shortcut is timed);
speed does not depend on training. Throughput is new tokens per second summed over the batch
(batch x N / median seconds); ``x base`` is the ratio to ``base`` at the same batch size. One warm-up
run per setting, then ``--repeats`` timed runs (median); the settings are interleaved within each
repeat so that drift in a shared machine hits them alike.

The hand-off cost is reported twice: from ``model.last_generate_timing`` of the m=5 runs (``routed_s``
for the 5 routed tokens, ``base_s`` for the base continuation including its prefill, ``total_s``), and
as the separately timed base prefill of (prompt + 5 tokens), in ms and as a fraction of the m=5 total.

Reproduce (embedded SmolLM2-135M-Instruct, 2 threads, batch 1 and 8, 128 new tokens, 3 repeats):

    . .venv/bin/activate
    python benchmarks/speed.py

Other options: ``--model PATH`` (any base model mogu can load), ``--batch-sizes 1,8``, ``--new-tokens``,
``--xlora-new-tokens``, ``--repeats``, ``--threads``, ``--no-xlora``, ``--no-gate``, ``--json PATH``;
``--tiny`` is a seconds-long smoke test on a tiny random Llama (hidden 32, 2 layers, random prompt ids).

On a GPU, ``--shape llama-3-8b`` (or ``qwen2.5-7b``, ``llama-3.2-1b``) builds a randomly initialised model of
that published architecture (no download; speed depends on shapes, not weights) and feeds random prompt ids of
chat-prompt lengths; ``--device cuda --dtype bfloat16`` puts it there (CUDA is synchronised around every timed
call). All rows share one copy of the base weights, so an 8B model fits four settings on one 80 GB card:

    python benchmarks/speed.py --shape llama-3-8b --device cuda --dtype bfloat16 --batch-sizes 1,8,32

Run it on otherwise idle cores: with more busy threads than cores, OpenMP's spin-waits make multi-thread
timings meaningless (a ``--tiny`` run went from ~10 s to 4 min); ``--threads 1`` is the safe choice there.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

PROMPTS = [
    "What are three tips for getting better sleep?",
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the ocean at sunrise.",
    "How do I reverse a list in Python?",
    "What is the difference between weather and climate?",
    "Give me a simple recipe for vegetable soup.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are some good ways to practice a new language every day?",
]

ROUTE_TOKENS = 5
BASE, MOGU_M, MOGU_ALL, XLORA = "base", f"mogu m={ROUTE_TOKENS}", "mogu all tokens", "x-lora (peft)"
MOGU_GATE = f"mogu prompt gate m={ROUTE_TOKENS}"
GATE_BASE = "mogu prompt gate, gate_benign=base (one pass)"
HOLD_BENIGN = f"mogu hold m={ROUTE_TOKENS}, benign (hand-off)"
HOLD_HARMFUL = f"mogu hold m={ROUTE_TOKENS}, harmful (held)"
HOLD_BIAS = 12.0  # router logit shift: every row's routed prefix leans to one expert


# Published architectures, random weights: (transformers config class, its arguments).
SHAPES = {
    "llama-3-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)),
    "llama-3.2-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                         rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                         tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                       rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6)),
}
MAX_RANDOM_BATCH = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (folder, Hub id or the default alias)")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama and random prompt ids (smoke test)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="random-weight model of a published architecture (random prompt ids); for GPUs")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--batch-sizes", default="1,8",
                   help=f"comma-separated batch sizes (at most {len(PROMPTS)} with chat prompts, "
                        f"{MAX_RANDOM_BATCH} with --tiny/--shape)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per row (base and MoGU rows)")
    p.add_argument("--xlora-new-tokens", type=int, default=64,
                   help="new tokens per row for X-LoRA (capped at --new-tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (the median is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no-xlora", action="store_true", help="skip the PEFT X-LoRA peer")
    p.add_argument("--no-gate", action="store_true", help="skip the prompt-gate MoGU row")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.tiny and args.shape:
        p.error("--tiny and --shape are exclusive")
    max_batch = MAX_RANDOM_BATCH if (args.tiny or args.shape) else len(PROMPTS)
    if not args.batch_sizes or any(b < 1 or b > max_batch for b in args.batch_sizes):
        p.error(f"--batch-sizes must be between 1 and {max_batch}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.new_tokens <= ROUTE_TOKENS:
        p.error(f"--new-tokens must exceed {ROUTE_TOKENS} so that the m={ROUTE_TOKENS} run hands off")
    if args.repeats < 1 or args.xlora_new_tokens < 1 or args.threads < 1:
        p.error("--repeats, --xlora-new-tokens and --threads must be positive")
    args.xlora_new_tokens = min(args.xlora_new_tokens, args.new_tokens)
    return args


# -- models and inputs ---------------------------------------------------------------------------
def tiny_base():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


def shape_base(name: str, dtype: torch.dtype, device: str):
    """A randomly initialised model of a published architecture, built directly on ``device``."""
    import transformers as tf

    cls_name, kwargs = SHAPES[name]
    config = getattr(tf, cls_name)(bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def random_inputs(batch: int, vocab: int, base_length: int = 12, step: int = 2) -> dict[str, torch.Tensor]:
    """Random prompt ids of varied lengths (base_length, +step, ...), left-padded with pad id 0."""
    g = torch.Generator().manual_seed(1234)
    lengths = [base_length + step * (i % 8) for i in range(batch)]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def tiny_inputs(batch: int) -> dict[str, torch.Tensor]:
    return random_inputs(batch, 128)


def shared_weights_copy(model):
    """A structural copy that shares every parameter and buffer with ``model`` (no second copy of the weights).

    MoGU wraps target modules of its copy in place and never writes the base weights, so the unwrapped
    original stays the plain base model."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def chat_inputs(tokenizer, batch: int) -> dict[str, torch.Tensor]:
    from mogu.chat import render_prompt

    texts = [render_prompt(tokenizer, prompt) for prompt in PROMPTS[:batch]]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def generation_config(base, new_tokens: int):
    from transformers import GenerationConfig

    eos = base.generation_config.eos_token_id
    if eos is None:
        eos = base.config.eos_token_id
    first_eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    # pad = EOS: the routed phase then never mistakes a generated pad id for a finished row.
    pad = first_eos if first_eos is not None else base.generation_config.pad_token_id
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            num_beams=1, eos_token_id=eos, pad_token_id=pad,
                            bos_token_id=base.generation_config.bos_token_id)


def randomize_mogu(model, seed: int = 1) -> None:
    """LoRA B is zero at init: give it small random values (A and the routers are already random)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.routed_modules.values():
            for expert in ("glad", "unwill"):
                w = m.lora_B[expert].weight
                w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32).to(device=w.device, dtype=w.dtype) * 0.02)


def build_xlora(pristine, targets: list[str], workdir: Path):
    """Two random rank-8 LoRA adapters saved with PEFT, then X-LoRA over a weight-sharing copy of the base."""
    from peft import LoraConfig, XLoraConfig, get_peft_model

    adapters = {}
    for i, name in enumerate(("glad", "unwill")):
        torch.manual_seed(100 + i)
        lora_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets),
                              bias="none", task_type="CAUSAL_LM", init_lora_weights=False)  # B non-zero
        peft_model = get_peft_model(shared_weights_copy(pristine), lora_cfg)
        peft_model.save_pretrained(str(workdir / name))
        adapters[str(i)] = str(workdir / name)  # peft loads them as "0", "1": keys must match
        del peft_model
    xbase = shared_weights_copy(pristine)
    xbase.config.use_cache = False
    hidden = getattr(xbase.config, "hidden_size", None) or getattr(xbase.config, "n_embd")
    xcfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden, adapters=adapters, xlora_depth=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xmodel = get_peft_model(xbase, xcfg)
    xmodel.eval()
    return xmodel


# -- timing --------------------------------------------------------------------------------------
def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_generate(fn, inputs, gen_cfg, **kw) -> tuple[float, torch.Tensor]:
    synchronize()
    start = time.perf_counter()
    out = fn(**inputs, generation_config=gen_cfg, **kw)
    synchronize()
    return time.perf_counter() - start, out


def check_length(out: torch.Tensor, inputs, n: int, name: str) -> None:
    got = out.shape[1] - inputs["input_ids"].shape[1]
    if got != n:
        raise RuntimeError(f"{name}: generated {got} tokens, expected {n}")


def time_prefill(base, inputs, prefix_out: torch.Tensor, repeats: int) -> list[float]:
    """One base prefill of (prompt + m tokens) with a fresh KV cache, as the hand-off does."""
    n_prompt = inputs["input_ids"].shape[1]
    ids = prefix_out[:, : n_prompt + ROUTE_TOKENS]
    mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(ids.shape[0], ROUTE_TOKENS)], 1)
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        synchronize()
        start = time.perf_counter()
        base(input_ids=ids, attention_mask=mask, use_cache=True)
        synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return times


def reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def environment(threads: int, device: str = "cpu", dtype: str = "float32") -> dict:
    import peft
    import transformers

    import mogu

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"torch_threads": torch.get_num_threads(), "requested_threads": threads, "cpu": cpu,
            "device": device, "gpu": gpu, "dtype": dtype,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "mogu": getattr(mogu, "__version__", "?")}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from mogu import MoGUConfig, MoGUModel
    from mogu.tuner.families import resolve_target_modules

    # Base model and inputs.
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        base, tokenizer, model_name = tiny_base(), None, "tiny random llama (hidden 32, 2 layers, vocab 128)"
        inputs = {b: tiny_inputs(b) for b in args.batch_sizes}
    elif args.shape:
        base, tokenizer = shape_base(args.shape, dtype, args.device), None
        model_name = f"{args.shape} shapes, random weights, {args.dtype}"
        # chat-prompt lengths: a system-less chat template around a one-sentence question (~40-55 tokens)
        inputs = {b: random_inputs(b, base.config.vocab_size, base_length=40, step=2) for b in args.batch_sizes}
    else:
        from mogu.tuner.loading import load_base_model

        base, tokenizer = load_base_model(args.model)
        model_name = args.model
        inputs = {b: chat_inputs(tokenizer, b) for b in args.batch_sizes}
    base.to(device=args.device, dtype=dtype)
    base.eval()
    inputs = {b: {k: v.to(args.device) for k, v in enc.items()} for b, enc in inputs.items()}
    targets = resolve_target_modules(base, None)
    pristine = base                          # kept unwrapped: the `base` row, X-LoRA and the prefill
    base = shared_weights_copy(pristine)
    model = MoGUModel.from_base(base, MoGUConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 route_tokens=ROUTE_TOKENS), tokenizer=tokenizer)
    model.eval()
    model.set_routing("auto")
    randomize_mogu(model)

    gated = None
    if not args.no_gate:
        gated = MoGUModel.from_base(shared_weights_copy(pristine), MoGUConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                        route_tokens=ROUTE_TOKENS, router_type="prompt"),
                                    tokenizer=tokenizer)
        gated.eval()
        randomize_mogu(gated)
        with torch.no_grad():  # random probes, so a batch mixes both experts
            g = torch.Generator().manual_seed(2)
            gated.gate.weight.copy_(torch.randn(gated.gate.weight.shape, generator=g).to(gated.gate.weight.device) * 0.05)
        # The same gate, experts and probes, but a passed prompt is the base model's (one generate, no hand-off).
        gate_base = MoGUModel.from_base(shared_weights_copy(pristine), MoGUConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, route_tokens=ROUTE_TOKENS, router_type="prompt",
            gate_benign="base"), tokenizer=tokenizer)
        gate_base.eval()
        gate_base.load_state_dict(gated.state_dict())

    hold_models = {}
    for name, sign in ((HOLD_BENIGN, -1.0), (HOLD_HARMFUL, 1.0)):
        held = MoGUModel.from_base(shared_weights_copy(pristine), MoGUConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                         route_tokens=ROUTE_TOKENS), tokenizer=tokenizer)
        held.eval()
        randomize_mogu(held)
        with torch.no_grad():
            for m in held.routed_modules.values():
                m.router.unwill.linear_2.bias.add_(sign * HOLD_BIAS)
                m.router.glad.linear_2.bias.add_(-sign * HOLD_BIAS)
        hold_models[name] = held

    gen = generation_config(pristine, args.new_tokens)
    xgen = generation_config(pristine, args.xlora_new_tokens)
    settings = {  # name -> (callable, generation config, extra kwargs, new tokens)
        BASE: (pristine.generate, gen, {}, args.new_tokens),
        MOGU_M: (model.generate, gen, {"route_tokens": ROUTE_TOKENS, "handoff": "fixed"}, args.new_tokens),
        MOGU_ALL: (model.generate, gen, {"route_tokens": None}, args.new_tokens),
        **{name: (m.generate, gen, {"route_tokens": ROUTE_TOKENS, "handoff": "hold"}, args.new_tokens)
           for name, m in hold_models.items()},
    }
    if gated is not None:
        settings[MOGU_GATE] = (gated.generate, gen, {"route_tokens": ROUTE_TOKENS}, args.new_tokens)
        settings[GATE_BASE] = (gate_base.generate, gen, {"route_tokens": ROUTE_TOKENS}, args.new_tokens)
    unavailable: dict[str, str] = {}
    tmp = tempfile.TemporaryDirectory(prefix="mogu-speed-")
    if not args.no_xlora:
        try:
            xmodel = build_xlora(pristine, targets, Path(tmp.name))
            settings[XLORA] = (xmodel.generate, xgen, {}, args.xlora_new_tokens)
        except Exception as e:  # any peft/transformers incompatibility: report and go on
            unavailable[XLORA] = reason(e)

    results, handoff = [], []
    with torch.inference_mode():
        for batch in args.batch_sizes:
            enc = inputs[batch]
            times: dict[str, list[float]] = {name: [] for name in settings}
            timings: list[dict] = []
            m_out = None
            # Warm-up, one run per setting (also checks the token count).
            for name, (fn, cfg, kw, n) in list(settings.items()):
                try:
                    _, out = timed_generate(fn, enc, cfg, **kw)
                    check_length(out, enc, n, name)
                    if name == MOGU_M:
                        m_out = out
                except Exception as e:
                    if name != XLORA:
                        raise
                    unavailable[XLORA] = reason(e)
                    del settings[XLORA], times[XLORA]
            for _ in range(args.repeats):
                for name, (fn, cfg, kw, n) in settings.items():
                    seconds, out = timed_generate(fn, enc, cfg, **kw)
                    check_length(out, enc, n, name)
                    times[name].append(seconds)
                    if name == MOGU_M:
                        timing = dict(model.last_generate_timing)
                        if "base_s" not in timing:
                            raise RuntimeError("mogu m=5 did not hand off to the base model")
                        timings.append(timing)
                    if name in hold_models:
                        held_rows = hold_models[name].last_generate_timing["held_rows"]
                        if held_rows != (batch if name == HOLD_HARMFUL else 0):
                            raise RuntimeError(f"{name}: {held_rows} of {batch} rows held")
            prefill = time_prefill(pristine, enc, m_out, args.repeats)

            for name, (_, _, _, n) in settings.items():
                med = statistics.median(times[name])
                results.append({"setting": name, "batch": batch, "new_tokens": n, "seconds": times[name],
                                "median_s": med, "tokens_per_s": batch * n / med})
            for name, why in unavailable.items():
                results.append({"setting": name, "batch": batch, "unavailable": why})
            med_timing = {k: statistics.median(t[k] for t in timings) for k in ("routed_s", "base_s", "total_s")}
            handoff.append({"batch": batch, **med_timing, "prefill_s": statistics.median(prefill),
                            "prefill_times_s": prefill,
                            "prefill_fraction_of_total": statistics.median(prefill) / med_timing["total_s"]})
    tmp.cleanup()

    base_tps = {r["batch"]: r["tokens_per_s"] for r in results if r["setting"] == BASE}
    for r in results:
        if "tokens_per_s" in r:
            r["x_base"] = r["tokens_per_s"] / base_tps[r["batch"]]
    env = environment(args.threads, args.device, args.dtype)

    order = [BASE, MOGU_M, HOLD_BENIGN, HOLD_HARMFUL, MOGU_ALL, MOGU_GATE, GATE_BASE, XLORA]
    print(f"\nmodel: {model_name}; greedy, every row exactly N new tokens; tokens/s summed over the batch; "
          f"median of {args.repeats}")
    print("\n| setting | batch | new tokens | tokens/s | × base |")
    print("|---|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        for r in sorted((r for r in results if r["batch"] == batch), key=lambda r: order.index(r["setting"])):
            if "unavailable" in r:
                print(f"| {r['setting']} | {batch} | – | unavailable: {r['unavailable']} | – |")
            else:
                print(f"| {r['setting']} | {batch} | {r['new_tokens']} | {r['tokens_per_s']:.1f} | "
                      f"{r['x_base']:.2f} |")
    print(f"\nhand-off (mogu m={ROUTE_TOKENS}, medians; routed/base/total from model.last_generate_timing)")
    print(f"\n| batch | routed {ROUTE_TOKENS} tok ms | base continuation ms | total ms | "
          f"base prefill (prompt+{ROUTE_TOKENS}) ms | prefill / total |")
    print("|---:|---:|---:|---:|---:|---:|")
    for h in handoff:
        print(f"| {h['batch']} | {h['routed_s'] * 1e3:.1f} | {h['base_s'] * 1e3:.1f} | {h['total_s'] * 1e3:.1f} | "
              f"{h['prefill_s'] * 1e3:.1f} | {h['prefill_fraction_of_total']:.1%} |")
    print(f"\ndevice {env['device']} ({env['gpu'] or 'cpu'}), {env['dtype']}; "
          f"torch threads {env['torch_threads']}; CPU {env['cpu']}; python {env['python']}, "
          f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, mogu {env['mogu']}")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "model": model_name, "target_modules": targets, "route_tokens": ROUTE_TOKENS,
                   "batch_sizes": args.batch_sizes, "new_tokens": args.new_tokens,
                   "xlora_new_tokens": args.xlora_new_tokens, "repeats": args.repeats,
                   "environment": env, "results": results, "handoff": handoff}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
