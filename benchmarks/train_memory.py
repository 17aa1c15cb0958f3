"""Peak accelerator memory and seconds per optimizer step of MoGU's training stages on a real-shape model.

What it measures: a randomly initialised model of a published architecture (``--shape``, as in
``benchmarks/speed.py``; memory and step time depend on shapes, not on weights), frozen backbone in
``--dtype``, wrapped by MoGU (v1: experts and routers of width 512 on every layer; v2: width 16 on
``--v2-layers`` layers, joint router stage). For each stage it runs ``--steps`` optimizer steps of one
micro-batch each with mogu's own stage losses (``mogu.train.stages``: the glad stage's CE ratio over
``--pairs`` (comply, refuse) pairs, i.e. 2 x pairs sequences in one forward; the router stage's CE +
weight loss over ``--rows`` rows), forward, backward and AdamW, and reports:

* ``resident_gib``: memory allocated before the stage (backbone + experts + routers);
* ``peak_gib``: ``torch.cuda.max_memory_allocated`` over the stage's steps (activations, gradients, AdamW
  moments included);
* ``step_s``: the median seconds per step after the first (CUDA synchronised).

The defaults are the ``paper`` schedule's micro-batch (8 pairs / 16 router rows) at 450 tokens, the
assumption behind the README's VRAM table, which this checks. Reproduce on one GPU:

    python benchmarks/train_memory.py --shape llama-3-8b --device cuda --json runs/train_memory.json

``--tiny`` is a seconds-long CPU smoke test (tiny random Llama; memory columns are then blank).

``--gradient-checkpointing`` recomputes the backbone's activations in backward (``mogu train
--gradient-checkpointing``). ``--load-in-4bit`` quantises every decoder-layer projection of the random backbone
to NF4 with double quantisation and ``--dtype`` compute, in place and layer by layer (what ``mogu train
--load-in-4bit`` gets from transformers' bitsandbytes integration for a checkpoint on disk; a random model has
none). Issue 21's three rows on one GPU:

    python benchmarks/train_memory.py --shape llama-3-8b --device cuda --json runs/mem-bf16.json
    python benchmarks/train_memory.py --shape llama-3-8b --device cuda --gradient-checkpointing --json runs/mem-bf16-gc.json
    python benchmarks/train_memory.py --shape llama-3-8b --device cuda --load-in-4bit --gradient-checkpointing \
        --json runs/mem-4bit-gc.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _speed_module():
    spec = importlib.util.spec_from_file_location("mogu_speed_benchmark", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPEED = _speed_module()  # shared with the decode benchmark: model shapes, random models, CUDA sync
synchronize = SPEED.synchronize


def parse_args(argv=None) -> argparse.Namespace:
    shapes = sorted(SPEED.SHAPES)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=shapes, default="llama-3-8b")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama on CPU (smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--seq-len", type=int, default=450, help="tokens per sequence (prompt + response)")
    p.add_argument("--response-tokens", type=int, default=64, help="response tokens per sequence (the loss's)")
    p.add_argument("--pairs", type=int, default=8, help="glad stage: (comply, refuse) pairs per micro-batch")
    p.add_argument("--rows", type=int, default=16, help="router stage: rows per micro-batch")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per stage (the first is warm-up)")
    p.add_argument("--versions", default="v1,v2", help="comma-separated: v1, v2")
    p.add_argument("--v2-layers", type=int, default=4, help="v2: routed layers (the deepest ones are taken)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute the backbone's activations")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 backbone projections (bitsandbytes)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.device, args.dtype = "cpu", "float32"
        args.seq_len, args.response_tokens = min(args.seq_len, 24), min(args.response_tokens, 8)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if not 0 < args.response_tokens < args.seq_len:
        p.error("--response-tokens must be between 1 and --seq-len - 1")
    if min(args.pairs, args.rows, args.v2_layers) < 1 or args.steps < 2:
        p.error("--pairs, --rows and --v2-layers must be >= 1, --steps >= 2")
    args.versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    if not args.versions or set(args.versions) - {"v1", "v2"}:
        p.error("--versions takes v1 and/or v2")
    return args


def quantize_4bit_in_place(model, compute_dtype: torch.dtype, device: str) -> int:
    """Replace every nn.Linear inside the decoder layers by a bitsandbytes NF4 Linear4bit (double quantisation)
    on ``device``, one at a time, then move the rest of ``model`` there; returns how many were replaced. Built
    on the CPU, a model whose full-precision weights would not fit the device is quantised as it moves."""
    import bitsandbytes as bnb
    from torch import nn

    from mogu.tuner.families import layer_index
    from mogu.tuner.loading import keep_4bit_layers_differentiable

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and layer_index(n) is not None]
    for name in names:  # names only: a held reference would keep each full-precision weight alive
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        quantised = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                      device="meta")
        quantised.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
        if linear.bias is not None:
            quantised.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        del linear
        setattr(parent, child, quantised.to(device))  # .to() quantises
    model.to(device)  # embeddings, norms and head, left in full precision as transformers leaves them
    keep_4bit_layers_differentiable(model)
    return len(names)


def random_batch(n: int, seq_len: int, response_tokens: int, vocab: int, device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -response_tokens:] = ids[:, -response_tokens:]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**30, 2)


def run_stage(model, stage: str, args, vocab: int, on_cuda: bool) -> dict:
    from mogu.train.stages import STAGE_MODES
    from mogu.train.losses import ratio_terms, router_terms

    joint = model.config.version == "v2" and stage == "router"
    params = model.router_parameters() if stage == "router" else model.expert_parameters(stage)
    if joint:
        params = params + model.expert_parameters("glad") + model.expert_parameters("unwill")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.set_routing(STAGE_MODES[stage])
    model.train()
    device = args.device
    synchronize()
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if on_cuda else None
    times = []
    for step in range(args.steps):
        synchronize()
        start = time.perf_counter()
        if stage == "router":
            batch = random_batch(args.rows, args.seq_len, args.response_tokens, vocab, device, step)
            labels = (torch.arange(args.rows, device=device) % 2)
            ce, err_u, err_g, layers = router_terms(model, batch, labels)
            denom = batch["attention_mask"].sum() * layers
            loss = ce.mean() + 2.0 * (err_u + err_g) / denom
        else:
            num = random_batch(args.pairs, args.seq_len, args.response_tokens, vocab, device, 2 * step)
            den = random_batch(args.pairs, args.seq_len, args.response_tokens, vocab, device, 2 * step + 1)
            ce_num, ce_den = ratio_terms(model, num, den)
            loss = (ce_num / ce_den.clamp(min=1e-6)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if on_cuda else None
    del optimizer
    for p in params:
        p.grad = None
    return {"stage": "joint router" if joint else stage, "trained_params": sum(p.numel() for p in params),
            "sequences": args.rows if stage == "router" else 2 * args.pairs, "resident_gib": gib(resident),
            "peak_gib": gib(peak), "step_s": round(statistics.median(times[1:]), 3), "times_s": times}


def main(argv=None) -> int:
    args = parse_args(argv)
    speed = SPEED
    from mogu import MoGUConfig, MoGUModel

    dtype = getattr(torch, args.dtype)
    on_cuda = args.device.startswith("cuda")
    if args.tiny:
        pristine, name = speed.tiny_base(), "tiny random llama (hidden 32, 2 layers)"
    else:
        # 4-bit: built on the CPU and quantised layer by layer on its way to the device.
        build_on = "cpu" if args.load_in_4bit else args.device
        pristine, name = speed.shape_base(args.shape, dtype, build_on), f"{args.shape} shapes, random weights"
    backbone_params = sum(p.numel() for p in pristine.parameters())
    if args.load_in_4bit:
        pristine.to(dtype=dtype)
        quantised = quantize_4bit_in_place(pristine, dtype, args.device)
        if on_cuda:
            torch.cuda.empty_cache()
    else:
        pristine.to(device=args.device, dtype=dtype)
        quantised = 0
    n_layers = pristine.config.num_hidden_layers
    vocab = pristine.config.vocab_size
    results = []
    for version in args.versions:
        if version == "v1":
            cfg = MoGUConfig(r=8, lora_alpha=16, lora_dropout=0.0)
        else:
            layers = list(range(n_layers - min(args.v2_layers, n_layers), n_layers))
            cfg = MoGUConfig(version="v2", r=8, lora_alpha=16, lora_dropout=0.0, routed_layers=layers)
        model = MoGUModel.from_base(speed.shared_weights_copy(pristine), cfg)
        model.to(device=args.device)
        if args.gradient_checkpointing:
            from mogu.train.stages import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        added = sum(p.numel() for p in model.router_parameters()) + sum(
            p.numel() for e in ("glad", "unwill") for p in model.expert_parameters(e))
        for stage in ("glad", "router"):
            head = {"version": version, "router_hidden": cfg.router_hidden, "routed_layers": len(model.routed_modules),
                    "added_params": added}
            try:
                row = {**head, **run_stage(model, stage, args, vocab, on_cuda)}
            except torch.cuda.OutOfMemoryError as e:  # a result, not a crash: the other rows still run
                row = {**head, "stage": stage, "trained_params": 0, "resident_gib": None, "peak_gib": None,
                       "step_s": None, "error": f"out of memory: {str(e).splitlines()[0]}"}
                for p in model.parameters():
                    p.grad = None
                torch.cuda.empty_cache()
            results.append(row)
            if "error" in row:
                print(f"{version} {stage}: {row['error']}", flush=True)
                continue
            print(f"{version} {row['stage']}: peak {row['peak_gib']} GiB (resident {row['resident_gib']} GiB), "
                  f"{row['step_s']} s/step, {row['trained_params']:,} trained params", flush=True)
        del model
        if on_cuda:
            torch.cuda.empty_cache()

    setting = ", ".join(x for x in (f"NF4 projections ({quantised} layers)" if quantised else "",
                                   "gradient checkpointing" if args.gradient_checkpointing else "") if x)
    print(f"\nmodel: {name}, {args.dtype} backbone ({backbone_params / 1e9:.2f} B params){'; ' + setting if setting else ''}; "
          f"{args.seq_len} tokens/sequence, {args.response_tokens} response tokens; "
          f"glad {2 * args.pairs} sequences, router {args.rows} sequences per step; AdamW")
    print("\n| version | stage | added params | trained params | resident GiB | peak GiB | s/step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['version']} | {r['stage']} | {r['added_params'] / 1e6:.1f} M | - | - | {r['error']} | - |")
            continue
        print(f"| {r['version']} | {r['stage']} | {r['added_params'] / 1e6:.1f} M | {r['trained_params'] / 1e6:.1f} M | "
              f"{r['resident_gib'] if r['resident_gib'] is not None else '-'} | "
              f"{r['peak_gib'] if r['peak_gib'] is not None else '-'} | {r['step_s']} |")
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if on_cuda else None
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python benchmarks/train_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": name, "dtype": args.dtype, "device": args.device, "gpu": gpu, "seq_len": args.seq_len,
            "load_in_4bit": args.load_in_4bit, "gradient_checkpointing": args.gradient_checkpointing,
            "response_tokens": args.response_tokens, "backbone_params": backbone_params,
            "torch": torch.__version__, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
