"""Seconds per training step: 1 process against 2 processes (gloo), same global batch, SmolLM2-135M; the 2
processes with the frozen backbone replicated, sharded by FSDP2 and partitioned by DeepSpeed ZeRO-3.

What it times: mogu's Trainer on the router stage (the expensive one: gradients flow back through
every layer to the routers in each of them) of a v1 MoGU model on the embedded SmolLM2-135M-Instruct,
``--steps`` optimizer steps of a ``--batch`` global batch cut into micro-batches of ``--micro``. Both
runs see exactly the same micro-batches: one process runs all of them (batch / micro accumulation
steps), two processes run half each and sum the routers' gradients with an all-reduce (gloo). The
step time is read from ``metrics.jsonl`` (``elapsed_s`` deltas); the first step is warm-up and left out.
The defaults (global batch 8 in micro-batches of 4, 16 response tokens, 4 steps) are smaller than the
``paper`` schedule's batch of 16 so that both runs finish in a few minutes on 2 CPU cores.

Threads: the single process gets ``--cores`` torch threads, each of the two processes ``cores / 2``,
so both configurations use the same cores (the default 2 cores: 2 threads against 1 + 1). On cores
that other jobs also use, a multi-threaded process loses much more than single-threaded ones (its
threads wait for each other at every parallel region), which inflates the ratio; ``--single-threads 1``
times the single process on one thread instead (2 processes against 1 process, one core each).

``--shardings`` picks the 2-process configurations (default ``none,fsdp2,zero3``; zero3 needs the ``zero3``
extra): each is the same Trainer run with ``backbone_sharding`` set, so the extra seconds are what
gathering the backbone's layers costs over gloo on the same host.

The data: router rows from mogu's built-in prompts with short synthetic responses (the speed does not
depend on what the responses say), no dev split, so no generation is timed.

Reproduce:

    . .venv/bin/activate
    python benchmarks/distributed_step.py --json runs/distributed_step.json

Prints seconds/step for each configuration and the ratio, and writes them with the command line, the
machine and the load average before and after into the JSON file. Other jobs on the same cores make
the numbers slower and noisier: compare the load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (first is warm-up)")
    p.add_argument("--batch", type=int, default=8, help="global batch (router rows per optimizer step)")
    p.add_argument("--micro", type=int, default=4, help="micro-batch size (both configurations)")
    p.add_argument("--response-tokens", type=int, default=16, help="response tokens trained on")
    p.add_argument("--router-hidden", type=int, default=512, help="router width (v1 default 512)")
    p.add_argument("--cores", type=int, default=2, help="cores shared by the configuration's processes")
    p.add_argument("--single-threads", type=int, default=None,
                   help="torch threads of the single process (default: --cores); 1 compares against one core")
    p.add_argument("--shardings", default="none,fsdp2,zero3",
                   help="backbone sharding of the 2-process runs, comma-separated: none, fsdp2, zero3")
    p.add_argument("--shard", default="none", help=argparse.SUPPRESS)  # internal: this worker's sharding
    p.add_argument("--json", default="runs/distributed_step.json", help="where to write the results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run folder of one configuration
    return p.parse_args(argv)


# -- worker: one configuration, launched as 1 process or under `accelerate launch` ----------------
def worker(args: argparse.Namespace) -> None:
    import torch

    from mogu import MoGUConfig, MoGUModel
    from mogu.tuner.loading import load_base_model
    from mogu.train.stages import StageConfig, TrainConfig, Trainer

    run = Path(args.worker)
    torch.manual_seed(0)
    base, tok = load_base_model(args.model)
    model = MoGUModel.from_base(base, MoGUConfig(router_hidden=args.router_hidden, lora_dropout=0.0), tokenizer=tok)
    stages = {"router": StageConfig(epochs=1, lr=5e-4, batch_size=args.batch, micro_batch_size=args.micro,
                                    max_examples=args.batch * args.steps)}
    cfg = TrainConfig(data_dir=str(run.parent / "data"), output_dir=str(run), stages=stages,
                      max_response_tokens=args.response_tokens, save_every=10_000, backbone_sharding=args.shard)
    trainer = Trainer(model, tok, cfg, log=lambda m: print(m, file=sys.stderr, flush=True), progress=False)
    trainer.train()


def make_data(folder: Path, rows: int, response_tokens: int) -> None:
    from mogu.train.data import builtin_prompts

    harmful = builtin_prompts("harmful")
    benign = builtin_prompts("benign") + builtin_prompts("borderline")
    filler = " ".join(["and then some more words about it"] * (response_tokens // 6 + 1))
    out = []
    for i in range(rows):
        harm = i % 2 == 0
        src = harmful if harm else benign
        p = src[(i // 2) % len(src)].prompt
        r = ("I'm sorry, but I can't help with that. " if harm else "Sure, here is an answer. ") + filler
        out.append({"prompt": p, "response": r, "label": int(harm)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "router.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))


def step_times(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows if r.get("stage") == "router" and "loss" in r]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]  # drops step 1 (warm-up) by construction


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.batch % args.micro or (args.batch // args.micro) % 2:
        raise SystemExit("--batch must be an even multiple of --micro (both processes get whole micro-batches)")
    shardings = [x.strip() for x in args.shardings.split(",") if x.strip()]
    if not shardings or set(shardings) - {"none", "fsdp2", "zero3"}:
        raise SystemExit(f"--shardings takes none, fsdp2 and zero3, got {args.shardings!r}")
    own = list(argv if argv is not None else sys.argv[1:])
    tmp = Path(tempfile.mkdtemp(prefix="mogu-dist-step-"))
    make_data(tmp / "data", args.batch * args.steps, args.response_tokens)
    script = str(Path(__file__).resolve())
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--micro", str(args.micro),
              "--response-tokens", str(args.response_tokens), "--router-hidden", str(args.router_hidden),
              "--model", args.model]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).with_name("accelerate")
    configs = {"1 process": ([sys.executable, script, *common, "--worker", str(tmp / "one")],
                             args.single_threads or args.cores)}
    for shard in shardings:
        name = "2 processes" + ("" if shard == "none" else f", {shard}")
        configs[name] = ([str(launcher), "launch", "--config_file", str(CPU_2PROC), "--main_process_port", str(port),
                          script, *common, "--shard", shard, "--worker", str(tmp / f"two-{shard}")],
                         max(1, args.cores // 2))
    load_before = os.getloadavg()
    results = {}
    for name, (cmd, threads) in configs.items():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
        run = Path(cmd[cmd.index("--worker") + 1])
        times = step_times(run)
        results[name] = {"threads_per_process": threads, "step_s": [round(t, 3) for t in times],
                         "mean_step_s": round(statistics.mean(times), 3),
                         "median_step_s": round(statistics.median(times), 3), "wall_s": round(wall, 1),
                         "load_after": [round(x, 2) for x in os.getloadavg()]}
        print(f"{name:24s} ({threads} thread(s) each): {results[name]['mean_step_s']:.2f} s/step "
              f"(median {results[name]['median_step_s']:.2f}; steps {results[name]['step_s']})", flush=True)
    one = results["1 process"]["mean_step_s"]
    ratios = {name: round(one / r["mean_step_s"], 3) for name, r in results.items() if name != "1 process"}
    report = {
        "command": "python benchmarks/distributed_step.py " + shlex.join(own),
        "what": "router stage, v1 MoGU, seconds per optimizer step (first step left out)",
        "model": args.model, "global_batch": args.batch, "micro_batch": args.micro,
        "response_tokens": args.response_tokens, "router_hidden": args.router_hidden, "steps": args.steps,
        "cores": args.cores, "results": results, "speedup_over_1_process": ratios,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    if "2 processes" in ratios:  # the key earlier reports used
        report["ratio_1proc_over_2proc"] = ratios["2 processes"]
    for name, ratio in ratios.items():
        print(f"1 process / {name}: {ratio:.2f}×")
    print(f"(load average before {report['load_before']}, after {report['load_after']})")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
