"""``mogu serve``: an OpenAI-compatible chat server for MoGU checkpoints (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions`` (non-streaming and SSE streaming), ``GET /v1/models``,
``GET /v1/models/{id}`` and ``GET /health``.

Batching. Handlers validate and tokenize a request, then put it on a *bounded* queue (a full
queue answers 429). One worker thread owns the model: it takes the oldest waiting request, waits
``batch_wait_ms`` for company, and runs up to ``max_batch_size`` requests with the same sampling
settings (greedy, or the same temperature / top_p) as one left-padded ``model.generate`` call --
MoGU's routed generation with the checkpoint's ``route_tokens``. Per-request ``max_tokens``,
``stop`` strings and cancellation are applied per row by a stopping criterion that also streams
each row's new tokens to its request as they are produced; a row that is done is finished (and
its answer delivered) at once while the rest of the batch goes on. Sampled requests with a
``seed`` run in a batch of their own so that the seed reproduces the answer.

Batches are grouped by prompt length as well (a row pads by at most max(64 tokens, its own length)),
so one long prompt runs with prompts like it and short ones are not padded to it. Sampling uses a
``torch.Generator`` per request (seeded requests) or the server's own, seeded from the OS: no request
can reseed or predict another's sampling.

Limits and hardening (the defaults are safe for a loopback server):
``--max-prompt-tokens`` (400 beyond), ``--request-timeout`` (a request still running at its
deadline is cancelled and answered 408), an allowed-hosts check on the ``Host`` header (on by
default for loopback binds: a web page cannot reach the server through DNS rebinding), JSON bodies
only (415 otherwise, so a browser cannot send a "simple" cross-site request), and special-token text
in message content (``<|im_end|>`` typed by a user) is escaped by default so that it stays text and
cannot fake a turn (``--special-tokens refuse`` answers 400, ``allow`` passes it through). Rendering
and tokenisation run in worker threads, off the event loop, so ``/health`` stays responsive.

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}`` with 400 (schema,
ranges, bad JSON, invalid Unicode, context length, Host header), 401 (``--api-key``), 404 (unknown
model or route), 408 (deadline), 413 (body size, from Content-Length and from the bytes actually
read), 415 (not JSON), 429 (queue full) and 500 (an exception while generating: it goes to the
requests of that batch, the worker carries on).

Extension: ``"mogu": {"return_routing": true}`` in the body (or the header
``X-MoGU-Return-Routing: true``) adds ``mogu_routing`` to the response (to the last chunk when
streaming): per routed layer, the mean router weights (u = unwilling, g = glad) over the
positions that chose the routed tokens.
"""

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

from mogu.extras import require_extra

require_extra("serve")  # before pydantic: the request schema below is built at import

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from mogu.chat import context_length
from mogu.errors import MoGUError

log = logging.getLogger("mogu.serve")

ROUTING_HEADER = "x-mogu-return-routing"
# Below this a float32 logit / temperature can overflow to inf; such a temperature is greedy in all but name.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 2.0  # OpenAI's bound
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)  # what torch.Generator.manual_seed takes as a signed 64-bit seed
SPECIAL_TOKEN_POLICIES = ("escape", "refuse", "allow")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


# -- errors --------------------------------------------------------------------------------------
class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(err: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# -- request schema ------------------------------------------------------------------------------
class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[_TextPart]]
    name: Optional[StrictStr] = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Optional[StrictBool] = None


class _MoGUOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    return_routing: StrictBool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_tokens: Optional[Annotated[int, Field(strict=True, ge=1)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(strict=True, ge=1)]] = None
    temperature: Optional[Annotated[float, Field(strict=True, ge=0.0, le=MAX_TEMPERATURE)]] = None
    top_p: Optional[Annotated[float, Field(strict=True, gt=0.0, le=1.0)]] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[_StreamOptions] = None
    stop: Union[StrictStr, Annotated[list[Annotated[str, Field(strict=True, min_length=1)]],
                                     Field(max_length=4)], None] = None
    n: Optional[StrictInt] = 1
    seed: Optional[Annotated[int, Field(strict=True, ge=SEED_RANGE[0], le=SEED_RANGE[1])]] = None
    logprobs: Optional[StrictBool] = None
    tools: Optional[list] = None
    functions: Optional[list] = None
    response_format: Optional[dict] = None
    mogu: Optional[_MoGUOptions] = None


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


_UNION_MESSAGES = {
    "content": "content must be a string or a list of {'type': 'text', 'text': ...} parts",
    "stop": "stop must be a string or a list of at most 4 non-empty strings",
}


def _validation_error(e: ValidationError) -> APIError:
    """The first schema error as a 400, its location in OpenAI's style (``messages.[0].role``)."""
    err = e.errors()[0]
    loc = list(err.get("loc", ()))
    cut = next((i for i, part in enumerate(loc) if _is_union_tag(part)), None)
    path = loc[:cut] if cut is not None else loc
    param = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path) or None
    last = next((p for p in reversed(path) if isinstance(p, str)), None)
    if cut is not None and last in _UNION_MESSAGES:
        msg = _UNION_MESSAGES[last]
    elif err.get("type") == "missing":
        msg = "Missing required parameter"
    else:
        msg = err.get("msg", "invalid value")
    return APIError(400, f"Invalid '{param}': {msg}" if param else msg, param=param, code="invalid_value")


# -- jobs ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One chat completion request on its way through the worker."""

    prompt_ids: list[int]
    max_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    return_routing: bool
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() by which the answer is due (None: no limit)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    key: tuple = ()
    tokens: list[int] = field(default_factory=list)     # every generated token (usage)
    content: list[int] = field(default_factory=list)    # tokens of the answer (no EOS)
    emitted: str = ""
    text: str | None = None
    done: bool = False
    cancelled: bool = False

    def post(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled = True

    def cancel(self) -> None:
        self.cancelled = True

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (time.monotonic() if now is None else now) > self.deadline


def _timeout_error(job: Job) -> APIError:
    return APIError(408, "the request ran past the server's --request-timeout and was cancelled; ask for fewer "
                         "max_tokens or retry later", code="request_timeout")


def _length_fits(anchor: int, n: int) -> bool:
    """Whether prompts of ``anchor`` and ``n`` tokens share a batch: each row pads by at most max(64, its length)."""
    return abs(anchor - n) <= max(64, min(anchor, n))


class _Sampler:
    """Multinomial sampling with a given ``torch.Generator`` (HF ``generate`` takes no generator).

    A logits processor: temperature and top-p (transformers' own warpers) shape the scores, one token
    per row is drawn with the generator, and every other token gets -inf, so greedy decoding emits the
    drawn token. Scores are warped in float32; a row whose probabilities are not finite takes its argmax.
    """

    def __init__(self, temperature: float, top_p: float, generator_for):
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.generator_for = generator_for

    def __call__(self, input_ids, scores):
        import torch

        warped = scores.float()
        for warper in self.warpers:
            warped = warper(input_ids, warped)
        probs = torch.softmax(warped, dim=-1)
        broken = ~torch.isfinite(probs).all(dim=-1) | (probs.sum(dim=-1) <= 0)
        if bool(broken.any()):
            probs[broken] = torch.nn.functional.one_hot(scores[broken].float().nan_to_num(-1e30).argmax(-1),
                                                        probs.shape[-1]).to(probs.dtype)
        chosen = torch.multinomial(probs, 1, generator=self.generator_for(probs.device))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen, 0.0)


class QueueFull(Exception):
    pass


class _RowTracker:
    """A stopping criterion that feeds each batch row's new token to its job.

    ``routed_generate`` runs the routed prefix over the batch, then continues the rows still alive in
    up to two ``generate`` calls (rows held by the unwilling expert, then rows handed to the base
    model), so a continuation's rows are matched back to their jobs by content (it starts with the
    exact prompt + routed prefix). A re-check of the finished prefix (no new column) emits nothing.
    """

    def __init__(self, engine: "BatchEngine", jobs: list[Job], width: int):
        self.engine, self.jobs, self.width = engine, jobs, width
        self.rows = list(range(len(jobs)))
        self.seen = None  # the last full batch of sequences (a tensor)
        self.last_len = width
        self.last_ids = None  # the sequences of the last step

    def _match(self, ids) -> list[int]:
        import torch

        n_cols = ids.shape[1]
        if self.seen is None or self.seen.shape[1] < n_cols:
            raise RuntimeError("generate continued rows the server never saw")
        rows, j = [], 0
        for i in range(ids.shape[0]):
            while j < len(self.jobs) and not torch.equal(self.seen[j, :n_cols], ids[i]):
                j += 1
            if j == len(self.jobs):
                raise RuntimeError("could not match the continued rows to their requests")
            rows.append(j)
            j += 1
        self.engine.stats["partial_continuations"] += 1
        return rows

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch

        n, length = input_ids.shape
        ids = input_ids.detach().cpu()
        # The hand-off re-checks the finished routed prefix: exactly the tensor of the last step. (Shape and
        # length alone cannot tell it from the held rows' continuation, which starts shorter than the base
        # rows' continuation ended: read as a re-check, it stopped the held rows after the prefix.)
        recheck = torch.equal(ids, self.last_ids) if self.last_ids is not None and ids.shape == self.last_ids.shape \
            else self.last_ids is None and n == len(self.rows) and length <= self.last_len
        if recheck:
            return self._mask(input_ids.device)
        if n != len(self.rows) or length != self.last_len + 1:
            # A continuation call over some rows (the held ones, then those handed to the base model).
            self.rows = self._match(ids[:, :-1])
        if n == len(self.jobs):
            self.seen = ids
        self.last_len = length
        self.last_ids = ids
        for i, token in enumerate(ids[:, -1].tolist()):
            self.engine._step(self.jobs[self.rows[i]], token, self)
        return self._mask(input_ids.device)

    def _mask(self, device):
        import torch

        return torch.tensor([self.jobs[r].done for r in self.rows], dtype=torch.bool, device=device)


class BatchEngine:
    """The model's only user: a worker thread that drains a bounded queue in batches."""

    def __init__(self, model, tokenizer, *, is_mogu: bool, max_batch_size: int = 8, max_queue: int = 64,
                 batch_wait_ms: float = 10.0):
        if max_batch_size < 1 or max_queue < 1:
            raise MoGUError("max_batch_size and max_queue must be >= 1")
        self.model, self.tokenizer, self.is_mogu = model, tokenizer, is_mogu
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.batch_wait_s = max(0.0, batch_wait_ms) / 1000.0
        base = model.base_model if is_mogu else model
        gen_cfg = base.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else base.config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.eos_set = set(eos_ids)
        # pad = EOS for generate: a generated pad id is then never mistaken for a finished row.
        self.gen_pad_id = eos_ids[0] if eos_ids else (tokenizer.pad_token_id or 0)
        self.input_pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.gen_pad_id
        self.route_tokens = getattr(model.config, "route_tokens", None) if is_mogu else None
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = threading.Event()
        self._running.set()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._unique = itertools.count()
        self.busy = False
        self._current: list[Job] = []
        self.stats = collections.Counter()
        # The server's own sampling stream, seeded from the OS: seeded requests use generators of their own, so
        # nothing a client sends reseeds it (the global torch seed is a fixed number at process start).
        self._entropy = int.from_bytes(os.urandom(8), "little") >> 1
        self._generators: dict[str, Any] = {}

    def _server_generator(self, device):
        import torch

        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._entropy)
        return self._generators[key]

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="mogu-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._running.set()
        shutting = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        for job in list(self._current):  # end the running batch early
            if not job.done:
                job.post("error", shutting)
                job.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for job in self._waiting:
                job.post("error", shutting)
            self._waiting.clear()

    def pause(self) -> None:
        """Stop taking new batches (queued requests wait; the running batch finishes)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        with self._cond:
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        if job.do_sample:
            job.key = ("sample", job.temperature, job.top_p) if job.seed is None else ("seed", next(self._unique))
        else:
            job.key = ("greedy",)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull()
            self._waiting.append(job)
            self.stats["submitted"] += 1
            self._cond.notify_all()

    # -- the worker ------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while not self._stop:
            try:
                batch = self._next_batch()
                if batch:
                    self._run_batch(batch)
            except Exception:  # never let the worker die
                log.exception("worker error outside a batch")
            finally:
                self.busy = False

    def _next_batch(self) -> list[Job]:
        self._running.wait()
        with self._cond:
            while not self._waiting and not self._stop:
                self._cond.wait(0.5)
            if self._stop or not self._running.is_set():
                return []
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._waiting) < self.max_batch_size and not self._stop:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[Job] = []
            keep: collections.deque[Job] = collections.deque()
            key = anchor = None
            now = time.monotonic()
            for job in self._waiting:
                if job.cancelled:
                    self.stats["cancelled"] += 1
                    continue
                if job.expired(now):  # waited past its deadline: answer it now, never start it
                    job.done = True
                    self.stats["timed_out"] += 1
                    job.post("error", _timeout_error(job))
                    continue
                if key is None:
                    key, anchor = job.key, len(job.prompt_ids)
                if job.key == key and len(batch) < self.max_batch_size and _length_fits(anchor, len(job.prompt_ids)):
                    batch.append(job)
                else:
                    keep.append(job)
            self._waiting = keep
            if batch:
                self.busy = True
            return batch

    def _generate(self, input_ids, attention_mask, **kwargs):
        """The model call (its own method so tests can make it fail)."""
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _run_batch(self, jobs: list[Job]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        self.stats["batches"] += 1
        self.stats["batched_requests"] += len(jobs)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(jobs))
        width = max(len(j.prompt_ids) for j in jobs)
        input_ids = torch.full((len(jobs), width), self.input_pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            input_ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids, dtype=torch.long)
            attention_mask[row, width - len(job.prompt_ids):] = 1
        tracker = _RowTracker(self, jobs, width)
        self._current = jobs
        first = jobs[0]
        kwargs: dict[str, Any] = {"max_new_tokens": max(j.max_tokens for j in jobs), "min_new_tokens": None,
                                  "pad_token_id": self.gen_pad_id, "eos_token_id": self.eos_ids or None,
                                  "stopping_criteria": StoppingCriteriaList([tracker]), "num_beams": 1,
                                  "num_return_sequences": 1, "top_k": None}
        kwargs.update(do_sample=False, temperature=None, top_p=None)
        if first.do_sample:  # drawn by _Sampler with this batch's generator; generate itself decodes greedily
            if first.seed is not None:  # a seeded request runs alone, with a generator of its own
                own: dict[str, Any] = {}

                def generator_for(device, own=own, seed=first.seed):
                    if str(device) not in own:
                        own[str(device)] = torch.Generator(device=device).manual_seed(seed)
                    return own[str(device)]
            else:
                generator_for = self._server_generator
            kwargs["logits_processor"] = LogitsProcessorList([_Sampler(first.temperature, first.top_p,
                                                                       generator_for)])
        trace = self.is_mogu and any(j.return_routing for j in jobs)
        device = self.model.device
        try:
            if trace:
                self.model.clear_routing_trace()
                self.model.enable_routing_trace(True)
            with torch.no_grad():
                self._generate(input_ids.to(device), attention_mask.to(device), **kwargs)
            for job in jobs:
                if not job.done:
                    self._finish(job, "length" if len(job.tokens) >= job.max_tokens else "stop", tracker)
        except Exception as e:  # the batch's requests get a 500; the worker goes on
            log.exception("generation failed")
            self.stats["errors"] += 1
            for job in jobs:
                if not job.done:
                    job.done = True
                    job.post("error", APIError(500, f"generation failed: {type(e).__name__}: {e}",
                                               type="server_error", code="internal_error"))
        finally:
            self._current = []
            if trace:
                self.model.enable_routing_trace(False)
                self.model.clear_routing_trace()

    # -- per-row bookkeeping (worker thread) -------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _find_stop(text: str, stops: list[str]) -> int:
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        return min(hits) if hits else -1

    def _step(self, job: Job, token: int, tracker: _RowTracker) -> None:
        if job.done:
            return
        if job.cancelled:
            job.done = True
            self.stats["cancelled"] += 1
            return
        if job.expired():
            job.done = True
            self.stats["timed_out"] += 1
            job.post("error", _timeout_error(job))
            return
        job.tokens.append(token)
        if token in self.eos_set:
            self._finish(job, "stop", tracker)
            return
        job.content.append(token)
        if job.stream or job.stop:
            text = self._decode(job.content)
            if job.stop:
                cut = self._find_stop(text, job.stop)
                if cut >= 0:
                    job.text = text[:cut]
                    self._finish(job, "stop", tracker)
                    return
            if job.stream:
                safe = len(text) - (max(map(len, job.stop)) - 1 if job.stop else 0)
                while safe > 0 and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 character
                    safe -= 1
                if safe > len(job.emitted) and text.startswith(job.emitted):
                    job.post("delta", text[len(job.emitted):safe])
                    job.emitted = text[:safe]
        if len(job.tokens) >= job.max_tokens:
            self._finish(job, "length", tracker)

    def _finish(self, job: Job, reason: str, tracker: _RowTracker) -> None:
        job.done = True
        if job.cancelled:
            self.stats["cancelled"] += 1
            return
        if job.text is None:
            text = self._decode(job.content)
            cut = self._find_stop(text, job.stop) if job.stop else -1
            if cut >= 0:
                text, reason = text[:cut], "stop"
            job.text = text
        if job.stream and len(job.text) > len(job.emitted) and job.text.startswith(job.emitted):
            job.post("delta", job.text[len(job.emitted):])
            job.emitted = job.text
        routing = self._routing(job, tracker) if job.return_routing and self.is_mogu else None
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(job.tokens),
                 "total_tokens": len(job.prompt_ids) + len(job.tokens)}
        self.stats["completed"] += 1
        job.post("done", {"text": job.text, "finish_reason": reason, "usage": usage, "routing": routing})

    def _routing(self, job: Job, tracker: _RowTracker) -> dict:
        import torch

        """Mean (u, g) per layer over the positions whose outputs were the routed tokens."""
        row = tracker.jobs.index(job)
        m = self.route_tokens
        n = len(job.tokens) if m is None else min(m, len(job.tokens))
        start = tracker.width - 1
        layers = []
        for layer, t in self.model.routing_trace().items():
            if not isinstance(t, torch.Tensor):
                continue
            w = t[row, start:start + n]
            if w.shape[0] == 0:
                continue
            layers.append({"layer": int(layer), "u": round(float(w[:, 0].mean()), 6),
                           "g": round(float(w[:, 1].mean()), 6)})
        return {"route_tokens": m, "routed_tokens": n, "layers": layers}


# -- the app -------------------------------------------------------------------------------------
def _content_text(content) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def render_messages(tokenizer, messages: list[dict]) -> str:
    from mogu.chat import render_prompt

    return render_prompt(tokenizer, messages)


def special_token_texts(tokenizer) -> list[str]:
    """The text of every special token the tokenizer would turn into a control token, longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token.content))
    return sorted((t for t in texts if len(t) > 1), key=len, reverse=True)


def escape_special_tokens(text: str, specials: list[str]) -> str:
    """Breaks each special-token string with a zero-width space, so it is tokenised as the text it is."""
    while True:
        hit = next((t for t in specials if t in text), None)
        if hit is None:
            return text
        text = text.replace(hit, hit[0] + "\u200b" + hit[1:])


def _invalid_unicode_at(data) -> str | None:
    """The path of the first string that is not valid Unicode (a lone surrogate), or None. Iterative: a deep
    structure cannot exhaust the stack."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, path or "body"))
                stack.append((v, f"{path}.{k}" if path else str(k)))
        elif isinstance(value, list):
            stack.extend((v, f"{path}.[{i}]") for i, v in enumerate(value))
    return None


def host_of(header: str) -> str:
    """The host name in a Host header, without the port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AllowedHostsMiddleware:
    """Answers 400 (OpenAI-shaped) to a request whose Host header is not allowed: the defence against DNS rebinding.
    starlette's TrustedHostMiddleware answers in plain text and splits "[::1]:8000" at the first colon."""

    def __init__(self, app, hosts: list[str]):
        self.app = app
        self.hosts = {h.strip().lower().strip("[]") for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.hosts:
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_of(header) not in self.hosts:
                err = APIError(400, f"the Host header {header!r} is not allowed here; start the server with "
                                    f"--allowed-hosts to add it", param="Host", code="invalid_host")
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model, tokenizer, *, model_name: str, api_key: str | None = None, max_batch_size: int = 8,
               max_queue: int = 64, batch_wait_ms: float = 10.0, max_body_bytes: int = 1 << 20,
               max_tokens_limit: int = 4096, default_max_tokens: int = 256, is_mogu: bool | None = None,
               max_prompt_tokens: int | None = None, request_timeout_s: float | None = 300.0,
               allowed_hosts: list[str] | None = None, special_tokens: str = "escape"):
    """The FastAPI app serving ``model``; ``app.state.engine`` is its BatchEngine.

    ``allowed_hosts`` None accepts any Host header (``serve`` passes the loopback names for a loopback bind);
    ``max_prompt_tokens`` None allows up to the model's context; ``request_timeout_s`` None has no deadline."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from mogu.tuner.model import MoGUModel

    if is_mogu is None:
        is_mogu = isinstance(model, MoGUModel)
    check_api_key(api_key)
    if special_tokens not in SPECIAL_TOKEN_POLICIES:
        raise MoGUError(f"special_tokens must be one of {', '.join(SPECIAL_TOKEN_POLICIES)}, got {special_tokens!r}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise MoGUError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if request_timeout_s is not None and not request_timeout_s > 0:
        raise MoGUError(f"request_timeout must be > 0 seconds, got {request_timeout_s}")
    specials = special_token_texts(tokenizer)
    # Rendering and tokenising a 1 MB body takes a while: worker threads do it, never the event loop, and no more
    # of them than leaves a core to the event loop and the model.
    parse_limiter = anyio.CapacityLimiter(max(1, min(4, (os.cpu_count() or 2) // 2)))
    # A prompt of more characters than this cannot fit max_prompt_tokens (no token is longer than the longest
    # vocabulary entry; the factor 2 allows for normalisers), so it is refused without being tokenised.
    longest_piece = max((len(t) for t in tokenizer.get_vocab()), default=1) if max_prompt_tokens else 0
    max_prompt_chars = 2 * max_prompt_tokens * max(1, longest_piece) if max_prompt_tokens else None
    model.eval()
    engine = BatchEngine(model, tokenizer, is_mogu=is_mogu, max_batch_size=max_batch_size, max_queue=max_queue,
                         batch_wait_ms=batch_wait_ms)
    context = context_length(model.base_model if is_mogu else model)
    created = int(time.time())
    drain_cap = max(4 * max_body_bytes, 4 << 20)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="mogu serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:
        app.add_middleware(AllowedHostsMiddleware, hosts=list(allowed_hosts))
    app.state.engine = engine
    app.state.model_name = model_name

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(APIError(exc.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        err = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        return _error_response(APIError(400, err.get("msg", "invalid request"), param=param, code="invalid_value"))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                        code="internal_error"))

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                raise APIError(400, "invalid Content-Length header", code="invalid_request") from None
            if declared_n > drain_cap:
                raise APIError(413, f"request body of {declared_n} bytes exceeds the limit of {max_body_bytes}",
                               code="request_too_large")
        from starlette.requests import ClientDisconnect

        chunks, total = [], 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total <= max_body_bytes:
                    chunks.append(chunk)
                elif total > drain_cap:
                    break
        except ClientDisconnect:  # gone mid-upload: nobody reads the answer, and it is not a server error
            raise APIError(400, "the client disconnected before sending the whole body",
                           code="client_disconnected") from None
        if total > max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes", code="request_too_large")
        return b"".join(chunks)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "mogu"}

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.alive else "error", "model": model_name, "mogu": is_mogu,
                "route_tokens": engine.route_tokens, "queued": engine.queued, "max_queue": engine.max_queue,
                "max_batch_size": engine.max_batch_size, "busy": engine.busy, "stats": dict(engine.stats)}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        check_auth(request)
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")
        return model_card()

    def parse(raw: bytes, routing_header: bool, loop) -> tuple[ChatRequest, Job]:
        """Body -> (request, job), tokenised (runs in a worker thread)."""
        try:
            data = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and an integer of over 4,300 digits
            raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        where = _invalid_unicode_at(data)
        if where is not None:
            raise APIError(400, f"Invalid '{where}': the text is not valid Unicode (a lone surrogate such as \\ud800)",
                           param=where, code="invalid_value")
        try:
            req = ChatRequest.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")
        if req.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
        for name in ("tools", "functions"):
            if getattr(req, name):
                raise APIError(400, f"{name} are not supported", param=name, code="unsupported_parameter")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format",
                           code="unsupported_value")
        return_routing = routing_header or bool(req.mogu and req.mogu.return_routing)
        if return_routing and not is_mogu:
            raise APIError(400, "routing weights need a MoGU checkpoint; this server runs a plain model",
                           param="mogu.return_routing", code="unsupported_value")
        if req.temperature is not None and 0 < req.temperature < MIN_TEMPERATURE:
            raise APIError(400, f"temperature {req.temperature!r} is too small to sample with: use 0 for greedy "
                                f"decoding or at least {MIN_TEMPERATURE}", param="temperature", code="invalid_value")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _content_text(m.content)}
                    for m in req.messages]
        if special_tokens != "allow" and specials:
            for i, message in enumerate(messages):
                hit = next((t for t in specials if t in message["content"]), None)
                if hit is None:
                    continue
                if special_tokens == "refuse":
                    raise APIError(400, f"the content holds the special token {hit!r}, which would act as a control "
                                        f"token; this server refuses it (--special-tokens)",
                                   param=f"messages.[{i}].content", code="special_token_in_content")
                message["content"] = escape_special_tokens(message["content"], specials)
        try:
            text = render_messages(tokenizer, messages)
        except Exception as e:  # chat templates raise for unsupported role orders
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages",
                           code="invalid_value") from None
        if max_prompt_chars is not None and len(text) > max_prompt_chars:
            raise APIError(400, f"the prompt is {len(text)} characters, far more than the {max_prompt_tokens} tokens "
                                f"this server takes (--max-prompt-tokens)", param="messages", code="context_length_exceeded")
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens is not None and len(prompt_ids) > max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this server takes at most {max_prompt_tokens} "
                                f"(--max-prompt-tokens)", param="messages", code="context_length_exceeded")
        room = (context - len(prompt_ids)) if context else None
        if room is not None and room < 1:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}",
                           param="messages", code="context_length_exceeded")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree", param="max_tokens",
                           code="invalid_value")
        requested = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if requested is not None:
            if requested > max_tokens_limit:
                raise APIError(400, f"{param} is {requested}; the maximum is {max_tokens_limit}", param=param,
                               code="invalid_value")
            if room is not None and requested > room:
                raise APIError(400, f"{len(prompt_ids)} prompt tokens + {param}={requested} exceed the model's "
                                    f"context of {context} tokens", param=param, code="context_length_exceeded")
            max_tokens = requested
        else:
            max_tokens = min(default_max_tokens, max_tokens_limit, room if room is not None else default_max_tokens)
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop", code="invalid_value")
        job = Job(prompt_ids=prompt_ids, max_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                  top_p=top_p, seed=req.seed, stop=stop, stream=bool(req.stream), return_routing=return_routing,
                  loop=loop)
        return req, job

    async def next_event(job: Job, request: Request):
        """The job's next event; None when the client went away (the job is then cancelled). Past the deadline
        (plus a second for the worker to say so itself, e.g. while a long batch is prefilling) the job is
        cancelled and answered with a 408 here."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return None
                if job.deadline is not None and time.monotonic() > job.deadline + 1.0:
                    job.cancel()
                    engine.stats["timed_out"] += 1
                    return "error", _timeout_error(job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise APIError(415, f"the body must be JSON, sent with 'Content-Type: application/json' (got "
                                f"{media or 'no Content-Type'!r})", param="Content-Type", code="unsupported_media_type")
        raw = await read_body(request)
        routing_header = request.headers.get(ROUTING_HEADER, "").strip().lower() in ("1", "true", "yes")
        req, job = await anyio.to_thread.run_sync(parse, raw, routing_header, asyncio.get_running_loop(),
                                                  limiter=parse_limiter)
        if request_timeout_s is not None:
            job.deadline = time.monotonic() + request_timeout_s
        if not engine.alive:
            raise APIError(503, "the generation worker is not running", type="server_error", code="worker_down")
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy: {engine.max_queue} requests are already waiting; retry later",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())

        if not job.stream:
            try:
                event = await next_event(job, request)
            finally:
                if not job.done:
                    job.cancel()
            if event is None:
                return Response(status_code=499)
            kind, payload = event
            if kind == "error":
                raise payload
            body = {"id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": payload["text"]},
                                 "logprobs": None, "finish_reason": payload["finish_reason"]}],
                    "usage": payload["usage"]}
            if job.return_routing:
                body["mogu_routing"] = payload["routing"]
            return JSONResponse(body)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish_reason=None, **extra) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if include_usage:
                body["usage"] = None
            body.update(extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    event = await next_event(job, request)
                    if event is None:
                        return
                    kind, payload = event
                    if kind == "delta":
                        yield chunk({"content": payload})
                    elif kind == "error":
                        yield f"data: {json.dumps(payload.body())}\n\n"
                        return
                    else:
                        extra = {"mogu_routing": payload["routing"]} if job.return_routing else {}
                        yield chunk({}, payload["finish_reason"], **extra)
                        if include_usage:
                            usage = {"id": completion_id, "object": "chat.completion.chunk", "created": now,
                                     "model": model_name, "system_fingerprint": None, "choices": [],
                                     "usage": payload["usage"]}
                            yield f"data: {json.dumps(usage)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:  # the client went away (or we are done): stop generating for it
                if not job.done:
                    job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# -- running it ----------------------------------------------------------------------------------
def check_api_key(api_key: str | None) -> None:
    """An empty key would turn auth on and let 'Authorization: Bearer' with nothing after it in."""
    if api_key is not None and not api_key.strip():
        raise MoGUError("--api-key is empty: give a real key, or leave the option (and MOGU_API_KEY) out to serve "
                        "without one")


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MoGUError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          model_name: str | None = None, max_batch_size: int = 8, max_queue: int = 64, batch_wait_ms: float = 10.0,
          max_body_bytes: int = 1 << 20, max_tokens_limit: int = 4096, default_max_tokens: int = 256,
          log_level: str = "info", echo=print, handoff: str | None = None, max_prompt_tokens: int | None = 4096,
          request_timeout_s: float | None = 300.0, allowed_hosts: list[str] | None = None,
          special_tokens: str = "escape", gate_benign: str | None = None, dtype=None,
          quantization: str | None = None) -> None:
    """Load ``model_dir`` (a MoGU checkpoint, or any base model mogu can load) and serve it until interrupted.
    ``handoff`` overrides the checkpoint's hand-off policy ("hold" keeps refusals, "fixed" is the paper's).
    ``allowed_hosts`` None: the loopback names for a loopback bind, any host otherwise."""
    import uvicorn

    from mogu.tuner.inference import load_for_inference

    check_api_key(api_key)
    if log_level not in LOG_LEVELS:  # uvicorn would raise a KeyError only after the model has loaded
        raise MoGUError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    if special_tokens not in SPECIAL_TOKEN_POLICIES:
        raise MoGUError(f"--special-tokens must be one of {', '.join(SPECIAL_TOKEN_POLICIES)}, got {special_tokens!r}")
    if allowed_hosts is None:
        allowed_hosts = list(LOOPBACK_HOSTS) if is_loopback(host) else ["*"]
    sock = bind_socket(host, port)  # fail fast, before loading the model, when the port is taken
    model, tokenizer, is_mogu = load_for_inference(model_dir, handoff=handoff, gate_benign=gate_benign, dtype=dtype,
                                                   quantization=quantization)
    name = model_name or model_dir
    app = create_app(model, tokenizer, model_name=name, api_key=api_key, max_batch_size=max_batch_size,
                     max_queue=max_queue, batch_wait_ms=batch_wait_ms, max_body_bytes=max_body_bytes,
                     max_tokens_limit=max_tokens_limit, default_max_tokens=default_max_tokens, is_mogu=is_mogu,
                     max_prompt_tokens=max_prompt_tokens, request_timeout_s=request_timeout_s,
                     allowed_hosts=allowed_hosts, special_tokens=special_tokens)
    shown = f"[{host}]" if ":" in host else host
    kind = f"MoGU checkpoint (route_tokens={app.state.engine.route_tokens})" if is_mogu else "plain model (no routing)"
    echo(f"mogu serve: {model_dir} ({kind}) as model '{name}' on http://{shown}:{sock.getsockname()[1]}/v1 "
         f"(batch <= {max_batch_size}, queue <= {max_queue}, prompt <= {max_prompt_tokens or 'context'} tokens, "
         f"timeout {request_timeout_s or 'none'} s, hosts {','.join(allowed_hosts)}"
         f"{', API key required' if api_key else ''})")
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])



# -- the client side: `mogu chat --url` ----------------------------------------------------------
def chat_remote(url: str, *, api_key: str | None = None, model: str | None = None, max_new_tokens: int = 256,
                temperature: float = 0.0, top_p: float = 1.0, system: str | None = None, echo=print,
                read_line=input) -> None:
    """Interactive streaming chat with an OpenAI-compatible server (the official ``openai`` client).

    Same controls as the local ``mogu chat``: an empty line or Ctrl-D quits, ``/reset`` clears the history.
    """
    import sys
    from urllib.parse import urlsplit

    import openai

    if not 0.0 <= temperature <= MAX_TEMPERATURE:  # the server's bound: every turn would be a 400
        raise MoGUError(f"--temperature {temperature} is outside the server's range [0, {MAX_TEMPERATURE}]")
    try:
        parts_of_url = urlsplit(url)
        parts_of_url.port  # noqa: B018 -- raises on a malformed port or IPv6 literal
        if parts_of_url.scheme not in ("http", "https") or not parts_of_url.hostname:
            raise ValueError("expected http(s)://host[:port]/v1")
        # No retries while finding the model (an unreachable URL fails at once); a turn retries a 429 or a
        # dropped connection twice, waiting as the server's Retry-After says.
        client = openai.OpenAI(base_url=url.rstrip("/"), api_key=api_key or "none", max_retries=0)
        turns = client.with_options(max_retries=2)
    except Exception as e:  # the HTTP library's own URL error type varies between its versions
        raise MoGUError(f"invalid --url {url!r}: {e}") from None

    def failure(e: Exception) -> MoGUError:
        if isinstance(e, openai.APIStatusError):
            try:
                detail = e.response.json()["error"]["message"]
            except Exception:
                detail = e.message
            return MoGUError(f"{url}: HTTP {e.status_code}: {detail}")
        if isinstance(e, openai.APIConnectionError):
            return MoGUError(f"cannot reach {url}: {e.__cause__ or e}")
        return MoGUError(f"{url}: {e}")

    try:
        if model is None:
            served = client.models.list().data
            if not served:
                raise MoGUError(f"{url} serves no models")
            model = served[0].id
    except openai.OpenAIError as e:
        raise failure(e) from None
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    echo(f"mogu chat: {model} at {url}; empty line or Ctrl-D to quit, /reset to clear the history.")
    while True:
        try:
            line = read_line("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        kwargs: dict[str, Any] = {"temperature": temperature}
        if top_p < 1.0:
            kwargs["top_p"] = top_p
        parts: list[str] = []
        try:
            stream = turns.chat.completions.create(model=model, messages=history, max_tokens=max_new_tokens,
                                                   stream=True, **kwargs)
            for chunk in stream:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    parts.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except openai.OpenAIError as e:
            # One failed turn (a 429 after its retries, a timeout, a full context) does not end the session:
            # the unanswered turn is dropped and the history kept.
            history.pop()
            if parts:
                sys.stdout.write("\n")
            hint = (" (the conversation is past the model's context: /reset clears it)"
                    if getattr(e, "code", None) == "context_length_exceeded" else "")
            echo(f"error: {failure(e)}{hint}")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(parts).strip()})
