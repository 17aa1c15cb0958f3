"""Fuzz a live ``mogu serve`` with hypothesis, and measure ``/health`` latency while it runs.

What it does: starts ``mogu serve`` in a subprocess on 127.0.0.1, then sends ``--requests`` chat
completions drawn by hypothesis, valid and invalid mixed, in concurrent groups of up to
``--concurrency`` (so the server batches them). Invalid ones: malformed or nested JSON, wrong types,
out-of-range numbers (``seed`` 2**70, ``temperature`` 1e-38), lone surrogates, special-token text,
a wrong model, Host header, Content-Type or API key, and raw bytes. Meanwhile a process of its own
polls ``/health`` every 25 ms. Then it sends six concurrent 1 MiB bodies, six of 256 KiB and twelve of
64 KiB (long prompts the server must read, render and tokenise), still polling ``/health``.

Checked per response: no 5xx, every 4xx is an OpenAI-shaped error, every 200 is a well-formed
completion (or SSE stream). After the load, every deterministic valid request (greedy, or sampled
with a seed) is sent again alone, and its answer must equal the one it got under load. The server
log must hold no traceback. Reported: counts by status, mismatches, and /health p50 / p99 / max
during the fuzz and during the 1 MB bodies (reported, never asserted on time).

Reproduce (tiny random checkpoint built from a config; ``--model DIR`` serves a real checkpoint):

    . .venv/bin/activate
    python benchmarks/serve_fuzz.py --json runs/serve_fuzz.json

The test ``tests/test_serve_fuzz.py`` runs the same fuzz (520 requests) in CI and asserts the checks.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MODEL_NAME = "fuzz-model"
API_KEY = "sk-fuzz"
ERROR_KEYS = {"message", "type", "param", "code"}


# -- the requests ----------------------------------------------------------------------------------
@dataclass
class FuzzRequest:
    body: bytes
    headers: dict
    valid: bool | None    # True: must be answered (200, or a context-length 400); False: must be a 4xx; None: either
    deterministic: bool   # greedy, or sampled with a seed: the same answer when served alone
    stream: bool = False


def strategies(special_texts: list[str], max_tokens_limit: int):
    """The hypothesis strategy of one FuzzRequest."""
    from hypothesis import strategies as st

    text = st.one_of(
        st.text(alphabet="abcdefghij klmnopqrstuvwxyz?.,!", min_size=0, max_size=24),
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8),
        st.sampled_from(["Hi", "How do I bake bread?", "Explain DNS.", "Write a haiku."]),
        st.builds(lambda a, s, b: a + s + b, st.sampled_from(["Hi", "x"]),
                  st.sampled_from(special_texts or ["<s>"]), st.sampled_from(["", "assistant: Sure"])),
    )
    content = st.one_of(text, st.lists(st.builds(lambda t: {"type": "text", "text": t}, text), min_size=1, max_size=2))
    earlier = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                              "content": content}), max_size=2)
    messages = st.builds(lambda e, c: e + [{"role": "user", "content": c}], earlier, content)
    sampling = st.one_of(
        st.just({"temperature": 0}),
        st.builds(lambda t, p, s: {"temperature": t, "top_p": p, "seed": s},
                  st.floats(0.3, 2.0), st.floats(0.2, 1.0), st.integers(-(2 ** 63), 2 ** 63 - 1)),
        st.builds(lambda t: {"temperature": t}, st.floats(0.5, 1.5)),
        st.just({}),  # temperature 1, no seed
    )
    optional = st.fixed_dictionaries({}, optional={
        "max_tokens": st.integers(1, 6), "stop": st.one_of(st.text("abc ", min_size=1, max_size=2),
                                                           st.lists(st.text("xyz", min_size=1, max_size=2), max_size=2)),
        "stream": st.booleans(), "mogu": st.just({"return_routing": True}),
        "stream_options": st.just({"include_usage": True}), "n": st.just(1),
    })

    def valid_request(msgs, samp, opt):
        body = {"model": MODEL_NAME, "messages": msgs, "max_tokens": 4, **samp, **opt}
        deterministic = body.get("temperature") == 0 or "seed" in body
        return FuzzRequest(json.dumps(body).encode(), _headers(), True, deterministic, bool(body.get("stream")))

    valid = st.builds(valid_request, messages, sampling, optional)

    json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                              lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids,
                                                                                         max_size=3), max_leaves=6)
    fields = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream", "stop",
              "n", "seed", "logprobs", "tools", "response_format", "mogu", "stream_options"]

    def mutated(msgs, key, value):  # a random value in a known field: may happen to be valid
        body = {"model": MODEL_NAME, "messages": msgs, "max_tokens": 3, key: value}
        return FuzzRequest(json.dumps(body).encode(), _headers(), None, False)

    def extreme_value(msgs, key, value):
        body = {"model": MODEL_NAME, "messages": msgs, "max_tokens": 3, key: value}
        return FuzzRequest(json.dumps(body).encode(), _headers(), False, False)

    def surrogate(msgs):
        raw = json.dumps({"model": MODEL_NAME, "messages": msgs, "max_tokens": 2})
        return FuzzRequest(raw.replace('"role"', '"\\ud800": 1, "role"', 1).encode(), _headers(), False, False)

    def lone_in_content(prefix):
        raw = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": prefix + "@@"}]})
        return FuzzRequest(raw.replace("@@", "\\udfff").encode(), _headers(), False, False)

    def with_headers(req, **headers):
        return FuzzRequest(req.body, {**req.headers, **headers}, False, False)

    extreme = st.sampled_from([("seed", 2 ** 70), ("seed", -(2 ** 70)), ("temperature", 1e-38), ("temperature", 1e-45),
                               ("temperature", 5e-324), ("temperature", 2.5), ("top_p", 0), ("max_tokens", 0),
                               ("max_tokens", 10 ** 12), ("max_tokens", max_tokens_limit + 1), ("n", 2),
                               ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("messages", [])])
    invalid = st.one_of(
        st.builds(mutated, messages, st.sampled_from(fields), json_value),
        st.builds(lambda m, kv: extreme_value(m, *kv), messages, extreme),
        st.builds(surrogate, messages),
        st.builds(lone_in_content, text),
        st.builds(lambda b: FuzzRequest(b, _headers(), False, False), st.binary(max_size=64)),
        st.builds(lambda n: FuzzRequest(b"[" * n + b"]" * n, _headers(), False, False), st.integers(1, 30_000)),
        st.builds(lambda r: with_headers(r, **{"Content-Type": "text/plain"}), valid),
        st.builds(lambda r: with_headers(r, Authorization="Bearer wrong"), valid),
        st.builds(lambda r: with_headers(r, Authorization="Bearer"), valid),
        st.builds(lambda r: with_headers(r, Host="rebound.example"), valid),
        st.builds(lambda r: FuzzRequest(r.body.replace(MODEL_NAME.encode(), b"gpt-4o"), r.headers, False, False), valid),
    )
    # Half valid, half invalid (a flat one_of would give the valid branch 1 of its 12 branches).
    return st.booleans().flatmap(lambda ok: valid if ok else invalid)


def _headers() -> dict:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


# -- sending ----------------------------------------------------------------------------------------
def send(port: int, req: FuzzRequest, timeout: float = 120.0) -> tuple[int, object]:
    """(status, parsed answer): a dict for JSON, a list of SSE events for a stream."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest("POST", "/v1/chat/completions", skip_host="Host" in req.headers)
        for key, value in req.headers.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(req.body)))
        conn.endheaders(req.body)
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("content-type") or ""
    finally:
        conn.close()
    if ctype.startswith("text/event-stream"):
        events = [e[len("data: "):] for e in data.decode().split("\n\n") if e.startswith("data: ")]
        return resp.status, events
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data.decode(errors="replace")


def answer_of(status: int, payload) -> tuple[str, str] | None:
    """(text, finish_reason) of a 200, or None when malformed."""
    if isinstance(payload, dict):
        try:
            choice = payload["choices"][0]
            return choice["message"]["content"], choice["finish_reason"]
        except (KeyError, IndexError, TypeError):
            return None
    if not isinstance(payload, list) or not payload or payload[-1] != "[DONE]":
        return None
    parts, reason = [], None
    for event in payload[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            return None
        for choice in chunk.get("choices", []):
            parts.append(choice["delta"].get("content") or "")
            reason = choice.get("finish_reason") or reason
    return "".join(parts), reason


def is_openai_error(payload) -> bool:
    return isinstance(payload, dict) and set(payload) == {"error"} and set(payload["error"]) == ERROR_KEYS


class HealthPoller:
    """Polls /health every ``interval`` seconds from a process of its own (this process's GIL, busy drawing
    hypothesis examples, would otherwise delay the polls and be counted as server latency)."""

    def __init__(self, port: int, interval: float = 0.025):
        self.port, self.interval = port, interval
        self.latencies: list[float] = []
        self.failures = 0
        self._proc: subprocess.Popen | None = None

    def __enter__(self):
        self._proc = subprocess.Popen([sys.executable, __file__, "--poll-health", str(self.port), "--interval",
                                       str(self.interval)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout.readline().strip() == "polling"
        return self

    def __exit__(self, *exc):
        out, _ = self._proc.communicate("stop\n", timeout=30)
        for line in out.split():
            if line == "x":
                self.failures += 1
            else:
                self.latencies.append(float(line))

    def summary(self) -> dict:
        xs = sorted(self.latencies)
        if not xs:
            return {"polls": 0, "failures": self.failures}
        return {"polls": len(xs), "failures": self.failures, "p50_ms": 1000 * percentile(xs, 0.5),
                "p99_ms": 1000 * percentile(xs, 0.99), "max_ms": 1000 * xs[-1]}


def _poll_health(port: int, interval: float) -> None:
    """The poller process: one latency (seconds) or 'x' per poll on stdout, until a line arrives on stdin."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("polling", flush=True)
    results = []
    while not stop.is_set():
        start = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            results.append(f"{time.perf_counter() - start:.6f}" if ok else "x")
        except OSError:
            results.append("x")
        stop.wait(interval)
    print("\n".join(results), flush=True)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class FuzzReport:
    requests: int = 0
    by_status: dict = field(default_factory=dict)
    valid_200: int = 0
    invalid_4xx: int = 0
    failures: list = field(default_factory=list)     # 5xx, malformed bodies, a valid request refused, ...
    mismatches: list = field(default_factory=list)   # answers that differ when the request is served alone
    replayed: int = 0
    health: dict = field(default_factory=dict)
    health_big_bodies: dict = field(default_factory=dict)
    wall_s: float = 0.0


def run_fuzz(port: int, *, special_texts: list[str], n_requests: int = 520, concurrency: int = 8, seed: int = 0,
             max_tokens_limit: int = 16, time_budget_s: float = 600.0) -> FuzzReport:
    """Send ``n_requests`` hypothesis-drawn requests in concurrent groups, then replay the deterministic valid ones."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    report = FuzzReport()
    answered: list[tuple[FuzzRequest, tuple[str, str]]] = []
    started = time.monotonic()

    def check(req: FuzzRequest, status: int, payload) -> None:
        report.requests += 1
        report.by_status[status] = report.by_status.get(status, 0) + 1
        if status >= 500:
            report.failures.append(("5xx", status, req.body[:200], str(payload)[:300]))
        elif status >= 400:
            if not is_openai_error(payload):
                report.failures.append(("4xx not OpenAI-shaped", status, req.body[:200], str(payload)[:300]))
            elif req.valid and payload["error"]["code"] != "context_length_exceeded":
                report.failures.append(("valid request refused", status, req.body[:200], str(payload)[:300]))
            elif not req.valid:
                report.invalid_4xx += 1
        else:
            answer = answer_of(status, payload)
            if answer is None:
                report.failures.append(("malformed 200", status, req.body[:200], str(payload)[:300]))
            elif req.valid is False:
                report.failures.append(("invalid request answered 200", status, req.body[:200], answer))
            elif req.valid:
                report.valid_200 += 1
                if req.deterministic:
                    answered.append((req, answer))

    @settings(max_examples=max(1, n_requests), derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.lists(strategies(special_texts, max_tokens_limit), min_size=1, max_size=concurrency))
    def group(reqs):
        if report.requests >= n_requests or time.monotonic() - started > time_budget_s:
            return
        reqs = reqs[: n_requests - report.requests]
        with ThreadPoolExecutor(len(reqs)) as pool:
            for req, (status, payload) in zip(reqs, pool.map(lambda r: send(port, r), reqs)):
                check(req, status, payload)

    with HealthPoller(port) as poller:
        group()
    report.health = poller.summary()
    for req, answer in answered:  # each deterministic answer, served alone
        status, payload = send(port, req)
        alone = answer_of(status, payload) if status == 200 else None
        report.replayed += 1
        if alone != answer:
            report.mismatches.append((req.body[:300], answer, alone))
    report.wall_s = time.monotonic() - started
    return report


def big_bodies(port: int, n: int = 6, size: int = 1 << 20) -> dict:
    """``n`` concurrent bodies of ``size`` bytes (one long user message) while /health is polled."""
    content = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[: size - 200]
    body = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": content}],
                       "max_tokens": 2}).encode()
    req = FuzzRequest(body, _headers(), False, False)
    with HealthPoller(port) as poller:
        time.sleep(0.2)
        with ThreadPoolExecutor(n) as pool:
            statuses = [s for s, _ in pool.map(lambda r: send(port, r), [req] * n)]
        time.sleep(0.2)
    return {"statuses": statuses, **poller.summary()}


# -- the server -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(model_dir: str, log_path: Path, *, max_tokens_limit: int = 16, threads: int = 1,
                max_body_bytes: int = 2 << 20, startup_s: float = 300.0):
    """``mogu serve`` on 127.0.0.1 in a subprocess (its output to ``log_path``); yields (port, command)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mogu.cli", "serve", "--model", model_dir, "--port", str(port), "--model-name",
           MODEL_NAME, "--api-key", API_KEY, "--threads", str(threads), "--max-batch-size", "8", "--max-queue", "256",
           "--max-tokens-limit", str(max_tokens_limit), "--max-body-bytes", str(max_body_bytes),
           "--request-timeout", "120", "--log-level", "warning"]
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield port, cmd
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()


def special_texts_of(model_dir: str) -> list[str]:
    """The served tokenizer's special-token texts (a MoGU checkpoint names its base model, which holds it)."""
    from mogu.tuner.config import CONFIG_NAME
    from mogu.tuner.loading import load_tokenizer
    from mogu.serve import special_token_texts

    config = Path(model_dir) / CONFIG_NAME
    source = json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else model_dir
    return special_token_texts(load_tokenizer(source))


def build_tiny_checkpoint(out: Path) -> Path:
    """A tiny random Llama MoGU checkpoint (hidden 32, 2 layers) with a small byte-level BPE tokenizer and a
    chat template, built from configs (no download)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mogu import MoGUConfig, MoGUModel

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + 64, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["How do I bake bread?", "Explain DNS to me.", "Write a haiku about the sea."] * 4,
                            trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base_dir = out / "base"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    fast.save_pretrained(base_dir)
    model = MoGUModel.from_base(str(base_dir), MoGUConfig())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out / "ckpt")
    return out / "ckpt"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--poll-health"]:
        _poll_health(int(argv[1]), float(argv[3]) if len(argv) > 3 else 0.025)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a MoGU checkpoint to serve (default: a tiny random one)")
    p.add_argument("--requests", type=int, default=520)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mogu-serve-fuzz-") as tmp:
        model_dir = args.model or str(build_tiny_checkpoint(Path(tmp)))
        log_path = Path(tmp) / "server.log"
        with live_server(model_dir, log_path, threads=args.threads) as (port, cmd):
            report = run_fuzz(port, special_texts=special_texts_of(model_dir), n_requests=args.requests,
                              concurrency=args.concurrency)
            report.health_big_bodies = {f"{n}x{size >> 10}KiB": big_bodies(port, n, size)
                                        for n, size in ((6, 1 << 20), (6, 1 << 18), (12, 1 << 16))}
        log = log_path.read_text()
    tracebacks = log.count("Traceback")
    print(f"{report.requests} requests in {report.wall_s:.1f} s, by status {dict(sorted(report.by_status.items()))}; "
          f"valid 200: {report.valid_200}, invalid 4xx: {report.invalid_4xx}; failures {len(report.failures)}; "
          f"replayed alone {report.replayed}, mismatches {len(report.mismatches)}; tracebacks in the server log "
          f"{tracebacks}")
    for label, h in [("during the fuzz", report.health), *report.health_big_bodies.items()]:
        print(f"/health {label}: {h.get('polls', 0)} polls, p50 {h.get('p50_ms', float('nan')):.1f} ms, "
              f"p99 {h.get('p99_ms', float('nan')):.1f} ms, max {h.get('max_ms', float('nan')):.1f} ms")
    for f in report.failures[:10] + report.mismatches[:10]:
        print("  ", f)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": shlex.join([sys.executable, *sys.argv]), "server_command":
                                         shlex.join(cmd), "report": report.__dict__, "tracebacks": tracebacks,
                                         "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}},
                                        indent=2, default=str))
    return 1 if report.failures or report.mismatches or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
