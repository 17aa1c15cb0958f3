"""Throughput and latency of ``mogu serve`` at 1, 8 and 32 concurrent clients (official ``openai`` client).

What it does: starts ``mogu serve`` in a subprocess on 127.0.0.1 (dynamic batching, ``--max-batch-size``
8 by default), waits for ``/health``, sends one warm-up request, then for each concurrency level C runs
C client threads that each send ``--requests-per-client`` chat completions back to back (fixed prompts,
greedy, ``max_tokens`` 32 by default, non-streaming). Reported per level: requests/s (all requests /
wall time of the level), p50 / p95 / max latency of single requests, completion tokens/s, and the
server's mean batch size over the level (from ``/health`` statistics). The same numbers go to a JSON
file together with the command line, the machine and the load average before and after.

The model: ``--model DIR`` serves a trained MoGU checkpoint; without it the script builds a MoGU
model on the embedded SmolLM2-135M-Instruct with random, non-zero experts (LoRA B random as in
``benchmarks/speed.py``; routers freshly initialised), saves it to a temporary folder and serves that.
Speed does not depend on training; answers do (an untrained router may stop early or run to the limit).

Reproduce (2 server threads; other jobs on the same cores make the numbers slower and noisier):

    . .venv/bin/activate
    python benchmarks/serve_bench.py --json runs/serve_bench.json

Options: ``--levels 1,8,32``, ``--requests-per-client``, ``--max-tokens``, ``--threads`` (server torch
threads), ``--max-batch-size``, ``--stream`` (streaming requests; adds time-to-first-token), ``--port``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
MODEL_NAME = "mogu-bench"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="MoGU checkpoint folder (default: random experts on SmolLM2-135M)")
    p.add_argument("--base", default="smollm2-135m-instruct", help="base model for the random-expert MoGU model")
    p.add_argument("--levels", default="1,8,32", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests-per-client", default=None,
                   help="requests each client sends, per level (comma-separated; default 16,8,4)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="server torch threads")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--port", type=int, default=0, help="0 = a free port")
    p.add_argument("--stream", action="store_true", help="streaming requests (also reports time to first token)")
    p.add_argument("--json", type=Path, default=Path("runs/serve_bench.json"))
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    per = args.requests_per_client or ",".join({1: "16", 8: "8", 32: "4"}.get(c, "4") for c in args.levels)
    args.requests_per_client = [int(x) for x in per.split(",")]
    if len(args.requests_per_client) != len(args.levels) or min(args.levels + args.requests_per_client) < 1:
        p.error("--requests-per-client needs one positive number per level")
    return args


def build_random_mogu(base: str, out: Path) -> Path:
    """MoGU on ``base`` with random non-zero experts (as benchmarks/speed.py), saved to ``out``."""
    import torch

    from mogu import MoGUConfig, MoGUModel

    model = MoGUModel.from_base(base, MoGUConfig(r=8, lora_alpha=16, lora_dropout=0.0, route_tokens=5))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.routed_modules.values():
            for expert in ("glad", "unwill"):
                w = m.lora_B[expert].weight
                w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32).to(w.dtype) * 0.02)
    model.save_pretrained(out)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(base_url: str) -> dict | None:
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default)."""
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_level(client, concurrency: int, per_client: int, max_tokens: int, stream: bool) -> dict:
    latencies, ttfts, tokens, errors = [], [], [], []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def worker(cid: int) -> None:
        barrier.wait()
        for i in range(per_client):
            prompt = PROMPTS[(cid * per_client + i) % len(PROMPTS)]
            start = time.perf_counter()
            try:
                kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                          temperature=0)
                if stream:
                    first, n = None, 0
                    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                                **kw):
                        if chunk.choices and chunk.choices[0].delta.content and first is None:
                            first = time.perf_counter() - start
                        if chunk.usage is not None:
                            n = chunk.usage.completion_tokens
                else:
                    resp = client.chat.completions.create(**kw)
                    first, n = None, resp.usage.completion_tokens
            except Exception as e:  # recorded, the level goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                tokens.append(n)
                if first is not None:
                    ttfts.append(first)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    out = {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
           "requests_per_s": len(latencies) / wall, "completion_tokens_per_s": sum(tokens) / wall,
           "mean_completion_tokens": statistics.mean(tokens) if tokens else 0.0,
           "latency_p50_s": percentile(latencies, 0.5) if latencies else None,
           "latency_p95_s": percentile(latencies, 0.95) if latencies else None,
           "latency_max_s": max(latencies) if latencies else None, "latencies_s": latencies}
    if ttfts:
        out.update(ttft_p50_s=percentile(ttfts, 0.5), ttft_p95_s=percentile(ttfts, 0.95))
    if errors:
        out["error_samples"] = errors[:5]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import openai

    tmp = tempfile.TemporaryDirectory(prefix="mogu-serve-bench-")
    if args.model:
        model_dir, model_desc = args.model, f"MoGU checkpoint {args.model}"
    else:
        t0 = time.perf_counter()
        model_dir = str(build_random_mogu(args.base, Path(tmp.name) / "ckpt"))
        model_desc = f"MoGU on {args.base} with random non-zero experts (r=8, route_tokens=5)"
        print(f"built {model_desc} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, "-m", "mogu.cli", "serve", "--model", model_dir, "--port", str(port), "--model-name",
           MODEL_NAME, "--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
           "--max-queue", str(max(64, max(args.levels))), "--log-level", "warning"]
    print("server: " + shlex.join(cmd), file=sys.stderr)
    log_path = Path(tmp.name) / "server.log"
    log_file = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    results: dict = {}
    try:
        deadline = time.monotonic() + 600
        while health(url) is None:
            if server.poll() is not None:
                raise SystemExit(f"the server exited:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up within 600 s")
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        load_before = os.getloadavg()
        client.chat.completions.create(model=MODEL_NAME, max_tokens=args.max_tokens, temperature=0,
                                       messages=[{"role": "user", "content": PROMPTS[0]}])  # warm-up
        levels = []
        for concurrency, per_client in zip(args.levels, args.requests_per_client):
            stats_before = health(url)["stats"]
            level = run_level(client, concurrency, per_client, args.max_tokens, args.stream)
            stats_after = health(url)["stats"]
            batches = stats_after.get("batches", 0) - stats_before.get("batches", 0)
            batched = stats_after.get("batched_requests", 0) - stats_before.get("batched_requests", 0)
            level["server_batches"] = batches
            level["server_mean_batch_size"] = batched / batches if batches else None
            levels.append(level)
            print(f"  {concurrency:>3} clients: {level['requests_per_s']:.2f} req/s, p50 {level['latency_p50_s']:.2f}s, "
                  f"p95 {level['latency_p95_s']:.2f}s, mean batch {level['server_mean_batch_size'] or 0:.1f}, "
                  f"errors {level['errors']}", file=sys.stderr)
        final_health = health(url)
        results = {
            "command": shlex.join([sys.executable, *sys.argv]), "server_command": shlex.join(cmd),
            "model": model_desc, "max_tokens": args.max_tokens, "stream": args.stream,
            "server_threads": args.threads, "max_batch_size": args.max_batch_size, "levels": levels,
            "server_healthy_after": bool(final_health and final_health["status"] == "ok"),
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_name(), "python": platform.python_version(),
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        }
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log_file.close()
        server_log = log_path.read_text()
        if results:
            results["server_log_tail"] = server_log[-2000:]
        tmp.cleanup()

    print(f"\nmodel: {results['model']}; greedy, max_tokens {args.max_tokens}, "
          f"{'streaming' if args.stream else 'non-streaming'}, server: {args.threads} torch threads, "
          f"batch <= {args.max_batch_size}; load average before/after "
          f"{results['machine']['loadavg_before'][0]:.1f}/{results['machine']['loadavg_after'][0]:.1f}")
    ttft = args.stream
    print("\n| clients | requests | req/s | p50 latency s | p95 latency s | completion tok/s | mean batch |"
          + (" p50 TTFT s |" if ttft else ""))
    print("|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if ttft else ""))
    for lv in results["levels"]:
        row = (f"| {lv['concurrency']} | {lv['requests']} | {lv['requests_per_s']:.2f} | {lv['latency_p50_s']:.2f} | "
               f"{lv['latency_p95_s']:.2f} | {lv['completion_tokens_per_s']:.1f} | "
               f"{lv['server_mean_batch_size'] or 0:.1f} |")
        if ttft:
            row += f" {lv.get('ttft_p50_s', float('nan')):.2f} |"
        print(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 1 if any(lv["errors"] for lv in results["levels"]) or not results["server_healthy_after"] else 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
