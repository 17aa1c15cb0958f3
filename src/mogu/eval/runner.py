"""`mogu eval`: defenses x benchmarks -> generations, judgements, metrics, report and plots.

Work is keyed by (defense, benchmark, prompt id) and appended to ``generations.jsonl`` one
chunk at a time, so an interrupted run resumes where it stopped; judgements are cached the
same way in ``judgements.jsonl`` per judge. A corrupt trailing line (a crash mid-write) is
dropped and counted rather than failing the rerun.

Under ``accelerate launch --num_processes N`` (or torchrun) the generation chunks, in their
canonical order, go round-robin to the processes; each appends to its own
``generations.shard-RANK.jsonl`` and the main process merges them into ``generations.jsonl`` in
canonical order (defense, benchmark, prompt), then judges and reports alone. Chunks are the ones a
single process would generate, so the files match a one-process run's (bar the ``seconds`` timings).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mogu.errors import ConfigError
from mogu.io import atomic_write_text, run_record

GENERATIONS_FILE = "generations.jsonl"
SHARD_GLOB = "generations.shard-*.jsonl"
JUDGEMENTS_FILE = "judgements.jsonl"
LIKELIHOOD_FILE = "likelihood.jsonl"
METRICS_FILE = "metrics.json"
# Each defense's parameters and its counters summed over every run that generated into this folder, so a
# rerun that finds its rows cached still reports them (a kill mid-run loses only that run's counters).
DEFENSE_RECORD_FILE = "defense_params.json"
# Judges that take a reasoning model's trace markers and judge the trace apart from the answer.
TRACE_AWARE_JUDGES = ("whole_answer", "openai", "hf-classifier")


@dataclass
class EvalConfig:
    model: str
    out: Path
    defenses: list[str] = field(default_factory=lambda: ["none", "mogu"])
    benchmarks: list[str] = field(default_factory=lambda: ["advbench", "just_eval"])
    judge: str = "whole_answer"
    judge_options: dict[str, Any] = field(default_factory=dict)
    # Applied to the harmful prompts of every benchmark; "none" asks every prompt plainly.
    attacks: list[str] = field(default_factory=lambda: ["none"])
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Also wrap each attack around the benign prompts (task prompts excepted): a control, since a defense that
    # refuses them is refusing the frame (fiction, role-play, a prefill), not the request inside it.
    attack_benign: bool = False
    defense_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    benchmark_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_dir: str | None = None
    limit: int | None = 50
    offset: int = 0  # skip the first N prompts of each benchmark (offset 100, limit 100: prompts 101-200)
    max_new_tokens: int = 64
    batch_size: int = 8
    chunk_size: int = 32  # prompts per appended chunk: the resume granularity
    seed: int = 0
    routing_examples: int = 3  # per class, for routing.png
    # Reference answers (AlpacaEval, Just-Eval) scored by each defense's own likelihood, cut to this many
    # tokens; 0 skips the stage.
    reference_tokens: int = 128
    dtype: str = "auto"  # the model's backbone dtype (mogu.tuner.loading.resolve_dtype)
    quantization: str | None = None  # "4bit" / "8bit": a bitsandbytes-quantised backbone
    # A reasoning model's thinking-trace markers for the whole_answer judge: "auto" reads them from the
    # model's tokenizer (mogu.chat.thinking_markers), "none" judges every output as one answer, or "OPEN,CLOSE".
    thinking: str = "auto"

    def validate(self) -> None:
        if self.thinking not in ("auto", "none"):
            from mogu.chat import parse_thinking_markers

            parse_thinking_markers(self.thinking)  # a one-line error before any generation
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a file; give a folder for the evaluation's outputs")
        if not self.defenses:
            raise ConfigError("no defenses given")
        if not self.benchmarks:
            raise ConfigError("no benchmarks given")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        if self.offset < 0:
            raise ConfigError(f"--offset must be >= 0, got {self.offset}")
        if not 1 <= self.max_new_tokens <= 4096:
            raise ConfigError(f"--max-new-tokens must be in [1, 4096], got {self.max_new_tokens}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ConfigError("batch and chunk sizes must be >= 1")
        if len(set(self.defenses)) != len(self.defenses) or len(set(self.benchmarks)) != len(self.benchmarks):
            raise ConfigError("defenses and benchmarks must not repeat")
        if not self.attacks or len(set(self.attacks)) != len(self.attacks):
            raise ConfigError("--attacks must name at least one attack, without repeats")
        from mogu.tuner.loading import check_quantization, resolve_dtype

        resolve_dtype(self.dtype)
        check_quantization(self.quantization)
        if not 0 <= self.reference_tokens <= 4096:
            raise ConfigError(f"--reference-tokens must be in [0, 4096], got {self.reference_tokens}")


def parse_options(specs: list[str] | None, known: set[str] | None = None, what: str = "option") -> dict[str, dict]:
    """``["safedecoding.alpha=2", "sft.steps=20"]`` -> ``{"safedecoding": {"alpha": 2.0}, ...}``.

    Values are parsed as JSON when they parse (numbers, booleans, lists), else kept as strings.
    """
    out: dict[str, dict[str, Any]] = {}
    for spec in specs or []:
        key, sep, value = spec.partition("=")
        owner, dot, name = key.partition(".")
        if not sep or not dot or not owner or not name:
            raise ConfigError(f"bad {what} {spec!r}: expected NAME.KEY=VALUE")
        if known is not None and owner not in known:
            raise ConfigError(f"{what} {spec!r} names {owner!r}, which is not selected ({', '.join(sorted(known))})")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(owner, {})[name] = parsed
    return out


def read_jsonl_tolerant(path: Path) -> tuple[list[dict], int]:
    """Rows of a jsonl file written by this module; unreadable lines are counted, not fatal."""
    rows, bad = [], 0
    if not path.is_file():
        return rows, bad
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    import os

    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _repair_tail(path: Path) -> None:
    """Cut a trailing partial line left by a crash, so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)


def _key(row: dict) -> tuple[str, str, str]:
    return (row["defense"], row["benchmark"], row["id"])


def _add_counters(into: dict, other: dict) -> dict:
    """``into``'s counters plus ``other``'s (numbers summed; anything else kept from ``into``, else taken)."""
    out = dict(into)
    for k, v in (other or {}).items():
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        if numeric and isinstance(out.get(k), (int, float)) and not isinstance(out.get(k), bool):
            out[k] += v
        else:
            out.setdefault(k, v)
    return out


def _jsonable_options(options: dict) -> dict:
    """``--defense-option`` values as they read back from JSON (tuples as lists, keys sorted)."""
    return json.loads(json.dumps(options, sort_keys=True, default=str))


def _settings(record: dict) -> str:
    """A defense record's parameters without its counters, canonical (a record read back from JSON has
    lists where a fresh one has tuples)."""
    return json.dumps({k: v for k, v in record.items() if k not in ("stats", "stats_generations")},
                      sort_keys=True, default=str)


def _fold_defense_record(previous: dict[str, dict], this_run: dict[str, dict], generated: dict[str, int]
                         ) -> dict[str, dict]:
    """The folder's defense record after this run: a defense built now takes this run's parameters and
    adds its counters to those recorded before (when the parameters are the same ones); a defense with
    every row cached keeps its earlier record. ``stats_generations`` counts the answers the counters cover."""
    out = {d: dict(r) for d, r in previous.items()}
    for d, now in this_run.items():
        before = previous.get(d, {})
        same = _settings(before) == _settings(now)
        row = dict(now)
        if same:
            row["stats"] = _add_counters(before.get("stats") or {}, now.get("stats") or {})
            row["stats_generations"] = int(before.get("stats_generations", 0)) + generated.get(d, 0)
        else:
            row["stats_generations"] = generated.get(d, 0)
        out[d] = row
    return out


def _merge_params(per_rank: list[dict[str, dict]], defenses: list[str]) -> dict[str, dict]:
    """Defense parameters from the processes that built each defense: the lowest rank's values,
    with the numeric ``stats`` counters summed over processes."""
    merged: dict[str, dict] = {}
    for d in defenses:
        found = [r[d] for r in per_rank if d in r]
        if not found:
            continue
        out = dict(found[0])
        if isinstance(out.get("stats"), dict):
            stats = dict(out["stats"])
            for other in found[1:]:
                stats = _add_counters(stats, other.get("stats") or {})
            out["stats"] = stats
        merged[d] = out
    return merged


class EvalRunner:
    def __init__(self, cfg: EvalConfig, *, log: Callable[[str], None] = print,
                 model=None, tokenizer=None):
        cfg.validate()
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.out)
        self._model, self._tokenizer = model, tokenizer
        self.mogu = None
        from mogu.train.stages import process_state

        self.state = process_state()
        if self.state.process_index:
            self.log = lambda m, _log=log, _rank=self.state.process_index: _log(f"[rank {_rank}] {m}")

    # -- inputs ---------------------------------------------------------------------------
    def load_prompts(self) -> dict[str, list]:
        from mogu.eval.benchmarks import load_benchmark

        sets = {}
        for name in self.cfg.benchmarks:
            opts = dict(self.cfg.benchmark_options.get(name, {}))
            sets[name] = load_benchmark(name, data_dir=self.cfg.data_dir, limit=self.cfg.limit,
                                        offset=self.cfg.offset, seed=self.cfg.seed, **opts)
            harmful = sum(p.harmful for p in sets[name])
            self.log(f"benchmark {name}: {len(sets[name])} prompts ({harmful} harmful)")
        return sets

    def attacked(self, sets: dict[str, list]) -> dict[str, list]:
        """Per benchmark, the work items: every prompt plainly (attack ``none``, when selected), then each
        other attack's conversation for every harmful prompt (and every benign one with ``attack_benign``)."""
        from mogu.eval.attacks import AttackedPrompt, build_attacks

        attacks = build_attacks(self.cfg.attacks, options=self.cfg.attack_options, data_dir=self._data_dir(),
                                seed=self.cfg.seed)
        self.attack_params = {n: a.describe() for n, a in attacks.items()}
        work = {}
        for bname, prompts in sets.items():
            items = []
            for name, attack in attacks.items():
                for p in prompts:
                    if name == "none" or p.harmful or (self.cfg.attack_benign and "task" not in p.meta):
                        items.append(AttackedPrompt(p, name, attack.apply(p.prompt, p.id, p.meta)))
            work[bname] = items
        return work

    def _data_dir(self):
        from mogu.eval.benchmarks import resolve_data_dir

        return resolve_data_dir(self.cfg.data_dir)

    def load_model(self):
        from mogu.tuner.inference import load_for_inference
        from mogu.tuner.model import MoGUModel

        if self._model is None:
            # Several processes: each its own device (one GPU per rank); one process keeps the default.
            device = str(self.state.device) if self.state.num_processes > 1 else None
            self._model, self._tokenizer, _ = load_for_inference(self.cfg.model, device=device, dtype=self.cfg.dtype,
                                                                        quantization=self.cfg.quantization)
        if isinstance(self._model, MoGUModel):
            self.mogu = self._model
            self._tokenizer = self._tokenizer or self._model.tokenizer
        if "mogu" in self.cfg.defenses and self.mogu is None:
            raise ConfigError(f"defense 'mogu' needs a MoGU checkpoint folder as --model; {self.cfg.model!r} is a base model")
        return self._model, self._tokenizer

    def build_defense(self, name: str):
        from mogu.eval.defenses import build_defense

        model, tok = self.load_model()
        base = self.mogu.base_model if self.mogu is not None else model
        opts = dict(self.cfg.defense_options.get(name, {}))
        if name == "sft" and not ({"data", "adapter"} & set(opts)):
            found = self._training_router_set()
            if found is not None:
                self.log(f"sft: training on {found} (the router set this MoGU checkpoint was trained on)")
                opts["data"] = str(found)
        return build_defense(name, model=base, tokenizer=tok, mogu_model=self.mogu, **opts)

    def _training_router_set(self) -> Path | None:
        """router.jsonl of the `mogu train` run that wrote --model, when it can be found (its run.json).

        A `mogu calibrate` output (the demo's `calibrated/`) is followed back to the checkpoint it was calibrated
        from, recorded as calibration.json's ``source``."""
        model = Path(self.cfg.model)
        try:
            source = json.loads((model / "calibration.json").read_text())["source"]
            model = Path(source) if Path(source).is_absolute() or Path(source).exists() else model.parent / source
        except (OSError, ValueError, KeyError, TypeError):
            pass
        run = model.parent / "run.json"
        try:
            data_dir = json.loads(run.read_text())["args"]["train_config"]["data_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for candidate in (Path(data_dir), run.parent / data_dir, Path.cwd() / data_dir):
            if (candidate / "router.jsonl").is_file():
                return candidate / "router.jsonl"
        return None

    # -- stages ---------------------------------------------------------------------------
    def generate(self, sets: dict[str, list]) -> list[dict] | None:
        """``sets``: per benchmark, the AttackedPrompt work items of :meth:`attacked`."""
        """Generate what is not cached; every wanted row in canonical order (None on a non-main process)."""
        state = self.state
        world, rank, main = state.num_processes, state.process_index, state.is_main_process
        path = self.out / GENERATIONS_FILE
        if main:
            _repair_tail(path)
            self._merge_generations(sets)  # folds in shards an interrupted multi-process run left
        state.wait_for_everyone()
        done_rows, bad = read_jsonl_tolerant(path)
        if bad and main:
            self.log(f"{GENERATIONS_FILE}: {bad} unreadable line(s) skipped; those prompts are regenerated")
        done = {_key(r): r for r in done_rows}
        record_path = self.out / DEFENSE_RECORD_FILE
        previous = self._defense_record(record_path, done)  # every process: each raises alike
        self._check_cached_settings(sets, done)
        # The chunks one process would generate, in canonical order; process r of N takes every N-th one.
        chunks = []
        for dname in self.cfg.defenses:
            for bname, prompts in sets.items():
                todo = [p for p in prompts if (dname, bname, p.key) not in done]
                if not todo:
                    continue
                if main:
                    self.log(f"{dname} x {bname}: {len(todo)} to generate ({len(prompts) - len(todo)} cached)")
                for i in range(0, len(todo), self.cfg.chunk_size):
                    chunk = todo[i:i + self.cfg.chunk_size]
                    chunks.append((dname, bname, chunk, f"{i + len(chunk)}/{len(todo)}"))
        out_path = path if world == 1 else self.out / f"generations.shard-{rank:05d}.jsonl"
        params: dict[str, dict] = {}
        generated: dict[str, int] = {}
        defense, current = None, None
        for dname, bname, chunk, progress in chunks[rank::world]:
            generated[dname] = generated.get(dname, 0) + len(chunk)
            if dname != current:
                if defense is not None and hasattr(defense, "stats"):
                    params.setdefault(current, {})["stats"] = getattr(defense, "stats")
                defense, current = self.build_defense(dname), dname
                params[dname] = defense.params()
            start = time.perf_counter()
            answers = defense.generate([item.conversation for item in chunk], max_new_tokens=self.cfg.max_new_tokens,
                                       batch_size=self.cfg.batch_size, progress=True)
            per = (time.perf_counter() - start) / len(chunk)
            rows = [_generation_row(dname, bname, item, a, per, self.cfg.max_new_tokens)
                    for item, a in zip(chunk, answers)]
            _append_jsonl(out_path, rows)
            self.log(f"  {dname} x {bname}: {progress}")
        if defense is not None and hasattr(defense, "stats"):
            params.setdefault(current, {})["stats"] = getattr(defense, "stats")
        if world > 1:
            from accelerate.utils import gather_object

            per_rank = gather_object([(params, generated)])  # returns once every process has finished its shard
            if not main:
                return None
            params = _merge_params([p for p, _ in per_rank], self.cfg.defenses)
            generated = {d: sum(g.get(d, 0) for _, g in per_rank) for d in self.cfg.defenses}
        for d in params:
            params[d]["options"] = _jsonable_options(self.cfg.defense_options.get(d, {}))
            params[d]["model"] = _model_identity(self.cfg.model)
        record = _fold_defense_record(previous, params, generated)
        atomic_write_text(record_path, json.dumps(record, indent=2, default=str))
        self.defense_params = {d: record[d] for d in self.cfg.defenses if d in record}
        rows_by_key = self._merge_generations(sets)
        wanted = {(d, b, p.key) for d in self.cfg.defenses for b, ps in sets.items() for p in ps}
        return [rows_by_key[k] for k in sorted(wanted, key=lambda k: (self.cfg.defenses.index(k[0]),
                                                                      self.cfg.benchmarks.index(k[1]), k[2]))]

    def _check_cached_settings(self, sets: dict[str, list], done: dict[tuple, dict]) -> None:
        """A ConfigError when cached answers were generated with another ``--max-new-tokens`` or sent another
        conversation (other attack options or seed): they would be reported as this run's. Rows written before
        these fields were recorded are taken as they are."""
        for dname in self.cfg.defenses:
            for bname, prompts in sets.items():
                for item in prompts:
                    row = done.get((dname, bname, item.key))
                    if row is None:
                        continue
                    then = row.get("max_new_tokens")
                    if then is not None and then != self.cfg.max_new_tokens:
                        raise ConfigError(f"{self.out} holds {dname} answers generated with --max-new-tokens {then}, "
                                          f"and this run asks for {self.cfg.max_new_tokens}: those answers would be "
                                          "reported as this run's. Pass a new --out (or the same value)")
                    sent = row.get("sent_sha256")
                    if sent is not None and sent != _sent_sha(item):
                        raise ConfigError(f"{self.out} holds a {dname} answer to {bname} {item.key} that was sent "
                                          "another conversation (other --attack-option values or --seed): it would "
                                          "be reported as this run's. Pass a new --out (or the same options)")

    def _defense_record(self, path: Path, done: dict[tuple, dict]) -> dict[str, dict]:
        """The folder's defense record; a ConfigError when a defense with cached answers here was run with
        other ``--defense-option`` values than this run's (the cached answers would be reported as this
        run's)."""
        try:
            record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except ValueError:
            record = {}  # a hand-damaged record: start the counters again rather than fail the run
        if not isinstance(record, dict):
            record = {}
        cached = {k[0] for k in done}
        model = _model_identity(self.cfg.model)
        for d in self.cfg.defenses:
            then_model = record.get(d, {}).get("model") if isinstance(record.get(d), dict) else None
            if d in cached and then_model is not None and then_model != model:
                raise ConfigError(f"{self.out} holds {d} answers generated by --model {then_model}, and this run "
                                  f"asks for {model}: those answers would be reported as this model's. Pass a new "
                                  f"--out (or the same --model)")
            then = record.get(d, {}).get("options") if isinstance(record.get(d), dict) else None
            now = _jsonable_options(self.cfg.defense_options.get(d, {}))
            if d in cached and then is not None and then != now:
                raise ConfigError(
                    f"{self.out} holds {d} answers generated with --defense-option {json.dumps(then, sort_keys=True)}, "
                    f"and this run asks for {json.dumps(now, sort_keys=True)}: those answers would be reported as "
                    f"this run's. Pass a new --out (or the same options)")
        return record

    def _merge_generations(self, sets: dict[str, list]) -> dict[tuple, dict]:
        """Fold the per-process shards into ``generations.jsonl`` and write it in canonical order
        (rows of other runs first, as they were; then defense, benchmark, prompt order), which is
        the order one process appends in. Main process only; returns the rows by key."""
        path = self.out / GENERATIONS_FILE
        shards = sorted(self.out.glob(SHARD_GLOB))
        rows, _ = read_jsonl_tolerant(path)
        for shard in shards:
            rows += read_jsonl_tolerant(shard)[0]
        by_key = {_key(r): r for r in rows}
        position: dict[tuple, tuple[int, int, int]] = {}
        for di, d in enumerate(self.cfg.defenses):
            for bi, (b, prompts) in enumerate(sets.items()):
                for pi, p in enumerate(prompts):
                    position.setdefault((d, b, p.key), (di, bi, pi))
        others = [r for k, r in by_key.items() if k not in position]
        ours = [by_key[k] for k in sorted((k for k in by_key if k in position), key=position.__getitem__)]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in others + ours)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
        for shard in shards:  # only once their rows are in generations.jsonl
            shard.unlink(missing_ok=True)
        return by_key

    def likelihood(self, sets: dict[str, list]) -> list[dict]:
        """Each defense's mean token NLL of the reference answers that ship with benign prompts (meta
        ``reference_output``: AlpacaEval, Just-Eval), cut to ``reference_tokens``; cached in likelihood.jsonl.

        Main process only (one teacher-forced pass per answer: cheap next to generation). A defense without a
        likelihood (SafeDecoding, self-examination) gets one row saying why."""
        from mogu.eval.defenses import DEFENSES

        if self.cfg.reference_tokens == 0:
            return []
        refs = [(b, p) for b, ps in sets.items() for p in ps
                if not p.harmful and isinstance(p.meta.get("reference_output"), str) and p.meta["reference_output"].strip()]
        if not refs:
            return []
        path = self.out / LIKELIHOOD_FILE
        _repair_tail(path)
        cached_rows, bad = read_jsonl_tolerant(path)
        if bad:
            self.log(f"{LIKELIHOOD_FILE}: {bad} unreadable line(s) skipped; those answers are re-scored")
        out: list[dict] = []
        for dname in self.cfg.defenses:
            tag = json.dumps({"model": self.cfg.model, "options": self.cfg.defense_options.get(dname, {}),
                              "reference_tokens": self.cfg.reference_tokens}, sort_keys=True, default=str)
            cached = {(r["benchmark"], r["id"]): r for r in cached_rows
                      if r.get("defense") == dname and r.get("tag") == tag}
            reason = DEFENSES[dname].NLL_UNAVAILABLE if dname in DEFENSES else None
            if reason is not None:
                out.append({"defense": dname, "unavailable": reason})
                continue
            todo = [(b, p) for b, p in refs if (b, p.id) not in cached]
            if todo:
                self.log(f"{dname}: reference-answer NLL of {len(todo)} answers ({len(refs) - len(todo)} cached)")
                defense = self.build_defense(dname)
                for i in range(0, len(todo), self.cfg.chunk_size):
                    chunk = todo[i:i + self.cfg.chunk_size]
                    scores = defense.reference_nll([p.prompt for _, p in chunk],
                                                   [p.meta["reference_output"] for _, p in chunk],
                                                   max_answer_tokens=self.cfg.reference_tokens, progress=True)
                    rows = [{"defense": dname, "benchmark": b, "id": p.id, "tag": tag, "nll": s.nll,
                             "tokens": s.tokens, "held": s.held} for (b, p), s in zip(chunk, scores)]
                    _append_jsonl(path, rows)
                    cached.update({(r["benchmark"], r["id"]): r for r in rows})
            out += [cached[(b, p.id)] for b, p in refs]
        return out

    def thinking_markers(self) -> tuple[str, str] | None:
        from mogu.chat import parse_thinking_markers, thinking_markers

        if self.cfg.thinking == "none":
            return None
        if self.cfg.thinking == "auto":  # a judge-only rerun reads the tokenizer, not the weights
            if self._tokenizer is None:
                from mogu.tuner.inference import load_tokenizer_for

                self._tokenizer = load_tokenizer_for(self.cfg.model)  # left padding and a pad token set
            return thinking_markers(self._tokenizer)
        return parse_thinking_markers(self.cfg.thinking)

    def judge(self, generations: list[dict]):
        from mogu.eval.judges import get_judge

        options = dict(self.cfg.judge_options)
        if self.cfg.judge in TRACE_AWARE_JUDGES and "thinking" not in options:
            markers = self.thinking_markers()
            if markers is not None:  # the trace and the answer are judged apart
                self.log(f"[eval] thinking trace between {markers[0]!r} and {markers[1]!r}: judged apart from the answer")
                options["thinking"] = markers
        judge = get_judge(self.cfg.judge, **options)
        path = self.out / JUDGEMENTS_FILE
        _repair_tail(path)
        cached_rows, bad = read_jsonl_tolerant(path)
        if bad:
            self.log(f"{JUDGEMENTS_FILE}: {bad} unreadable line(s) skipped; those answers are re-judged")
        # A cached verdict counts only for the same judge, judge parameters and response text.
        params = judge.params()
        tag = json.dumps(params, sort_keys=True, default=str)
        cached = {(_key(r), r.get("response")): r for r in cached_rows if r.get("judge_params") == tag}
        todo = [g for g in generations if (_key(g), g["response"]) not in cached]
        if todo:
            self.log(f"judging {len(todo)} answers with {self.cfg.judge} ({len(generations) - len(todo)} cached)")
            for i in range(0, len(todo), 64):
                chunk = todo[i:i + 64]
                verdicts = judge.judge([g["prompt"] for g in chunk], [g["response"] for g in chunk])
                rows = [{"defense": g["defense"], "benchmark": g["benchmark"], "id": g["id"],
                         "response": g["response"], "judge_params": tag, **v} for g, v in zip(chunk, verdicts)]
                _append_jsonl(path, rows)
                cached.update({(_key(r), r["response"]): r for r in rows})
        return [cached[(_key(g), g["response"])] for g in generations], params, dict(getattr(judge, "stats", {}))

    def run(self) -> dict[str, Any] | None:
        from mogu.eval.report import compute_metrics, plot_pareto, plot_routing, write_report
        from mogu.extras import has_extra, require_extra

        require_extra("eval", "sacrebleu")  # before any generation, not after an hour of it
        plots = has_extra("plots")
        if not plots:
            self.log("[eval] matplotlib is not installed: no pareto.png or routing.png (pip install 'mogu[plots]')")
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        sets = self.load_prompts()
        work = self.attacked(sets)
        args = asdict(self.cfg)
        earlier_plot = _earlier_record(self.out / "run.json").get("routing_plot")
        record = run_record(args, data_files=[])
        record["benchmark_sha256"] = _prompt_hashes(sets)
        record["attacks"] = self.attack_params
        if self.state.is_main_process:
            atomic_write_text(self.out / "run.json", json.dumps(record, indent=2, default=str))
        generations = self.generate(work)
        if generations is None:  # not the main process: it merged the shards and reports alone
            return None
        verdicts, judge_params, judge_stats = self.judge(generations)
        likelihood = self.likelihood(sets)
        metrics = compute_metrics(generations, verdicts, self.cfg.defenses, self.cfg.benchmarks, self.cfg.attacks,
                                  likelihood=likelihood)
        metrics["attack_params"] = self.attack_params
        metrics["judge"] = {"name": self.cfg.judge, "params": judge_params, "stats": judge_stats}
        metrics["defense_params"] = getattr(self, "defense_params", {})
        metrics["wall_s"] = round(time.perf_counter() - t0, 1)
        atomic_write_text(self.out / METRICS_FILE, json.dumps(metrics, indent=2, default=str))
        if plots:
            plot_pareto(metrics, self.out / "pareto.png")
        stamp = _routing_plot_stamp(record)
        if plots and self._model is None and (self.out / "routing.png").is_file() and earlier_plot == stamp:
            # Every answer, verdict and likelihood was cached: loading a 7B only to redraw the same plot costs
            # minutes and its memory, so the plot an earlier run drew of the same model files and prompts stands.
            self.log("[eval] routing.png kept from the earlier run of this model (nothing here needed the model)")
            record["routing_plot"] = stamp
        elif plots and (self.mogu is not None or "mogu" in self.cfg.defenses):
            model, tok = self.load_model()
            if self.mogu is not None:
                harmful = [p.prompt for ps in sets.values() for p in ps if p.harmful][:self.cfg.routing_examples]
                benign = [p.prompt for ps in sets.values() for p in ps if not p.harmful][:self.cfg.routing_examples]
                if plot_routing(self.mogu, tok, harmful, benign, self.out / "routing.png") is not None:
                    record["routing_plot"] = stamp
        write_report(metrics, self.cfg, self.out / "report.md")
        record["wall_s"] = metrics["wall_s"]
        record["defense_params"] = metrics["defense_params"]
        record["judge"] = metrics["judge"]
        atomic_write_text(self.out / "run.json", json.dumps(record, indent=2, default=str))
        return metrics


def _model_identity(name_or_path: str) -> str:
    """A local --model as its absolute path (``runs/x`` and ``./runs/x`` are one model), a Hub name as given."""
    path = Path(str(name_or_path)).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


# What routing.png depends on: the model as loaded and the prompts it routes (the first of each class).
ROUTING_PLOT_ARGS = ("model", "dtype", "quantization", "routing_examples", "benchmarks", "benchmark_options",
                     "offset", "limit", "seed", "data_dir")


def _routing_plot_stamp(record: dict[str, Any]) -> str:
    """What the routing plot was drawn from, as one string: the arguments above, the prompts' hashes, mogu's
    commit and the model folder's files (name, size, modification time), so a checkpoint retrained in place
    does not keep an old plot. Written to run.json only once the plot is drawn."""
    args = record["args"]
    path = Path(str(args.get("model"))).expanduser()
    files = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in path.rglob("*") if f.is_file()) if path.is_dir() else []
    stamp = {"args": {k: args.get(k) for k in ROUTING_PLOT_ARGS}, "prompts": record.get("benchmark_sha256"),
             "git_commit": record.get("git_commit"), "model": _model_identity(str(args.get("model"))),
             "model_files": files}
    return json.dumps(stamp, sort_keys=True, default=str)


def _earlier_record(path: Path) -> dict[str, Any]:
    """The run record an earlier run left in this folder ({} when none can be read)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _sent_sha(item) -> str:
    """sha256 of the conversation a work item sends (the attack's rendering of the prompt, with its seeded draws)."""
    import hashlib

    return hashlib.sha256(json.dumps(item.conversation.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def _generation_row(defense: str, benchmark: str, item, response: str, seconds: float, max_new_tokens: int) -> dict:
    p = item.prompt
    row = {"defense": defense, "benchmark": benchmark, "id": item.key, "prompt": p.prompt, "category": p.category,
           "harmful": p.harmful, "attack": item.attack, "response": response, "seconds": round(seconds, 3),
           "max_new_tokens": max_new_tokens, "sent_sha256": _sent_sha(item)}
    if "task" in p.meta and "answer" in p.meta:  # an exact-match task prompt: scored as task accuracy
        row["task"], row["answer"] = p.meta["task"], p.meta["answer"]
    if item.attack != "none":  # what was actually sent; the judge reads the behaviour in "prompt"
        row["conversation"] = item.conversation.to_dict()
    return row


def _prompt_hashes(sets: dict[str, list]) -> dict[str, str]:
    """sha256 of each benchmark's loaded prompts (ids + text): pins exactly what was evaluated."""
    import hashlib

    out = {}
    for name, prompts in sets.items():
        h = hashlib.sha256()
        for p in prompts:
            h.update(p.id.encode() + b"\0" + p.prompt.encode() + b"\0")
        out[name] = h.hexdigest()
    return out
