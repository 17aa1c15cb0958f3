"""Prompt sets and the three stage datasets (``mogu data build``).

Outputs (JSON Lines):
- ``glad_pairs.jsonl``   harmful prompt, a short affirmative opening (comply) and a refusal;
- ``unwill_pairs.jsonl`` benign prompt, a refusal and a helpful answer (comply);
- ``router.jsonl``       harmful prompts with a refusal (label 1), benign with a helpful answer (label 0);
- ``dev.jsonl``          held-out prompts for checkpoint selection (never trained on).

Helpful answers are the base model's own greedy answers by default (self-distillation keeps
usability); an answer that is itself a refusal is regenerated once by sampling, then dropped.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from mogu.errors import DataError
from mogu.verdicts import is_refusal
from mogu.io import sha256_file, write_jsonl

PROMPT_FIELDS = ("prompt", "instruction", "goal", "text", "question", "Behavior", "forbidden_prompt", "Goal")
OUTPUT_FIELDS = ("output", "response", "answer", "completion")
BUILTIN_SETS = ("harmful", "benign", "borderline")
STAGE_FILES = {"glad": "glad_pairs.jsonl", "unwill": "unwill_pairs.jsonl", "router": "router.jsonl"}
DEV_FILE = "dev.jsonl"
# Every train prompt with its label, answers or not: what a prompt gate's probes are fitted on. The router set
# holds only benign prompts with a distilled answer (a sample of them, to keep the build fast); the probes
# need no answer, and held-out look-alikes flagged fell from 34 % to 14 % as more of them joined the fit.
PROBE_FILE = "probe.jsonl"
# Jailbreak-style frames (role-play, fiction, hypotheticals, a framing turn first) that probe.jsonl also wraps
# around train prompts of both labels, so the gate learns the request inside a frame and not the frame itself.
# Written for mogu; the eval's attacks (the thriller multi_turn script, GPTFuzzer templates) are not among them.
FRAMES_FILE = "frames.jsonl"


@dataclass
class PromptRecord:
    prompt: str
    harmful: bool
    source: str
    category: str = ""
    target: str | None = None  # affirmative opening for harmful prompts (AdvBench "target")
    output: str | None = None  # a user-provided helpful answer for benign prompts
    split: str = "train"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- built-in sets ---------------------------------------------------------------------------
def _builtin_text(name: str) -> str:
    return resources.files("mogu").joinpath("prompts", name).read_text(encoding="utf-8")


def builtin_prompts(name: str, split: str | None = None) -> list[PromptRecord]:
    """The prompt sets shipped with mogu: ``harmful``, ``benign`` or ``borderline`` (risky-sounding benign)."""
    if name not in BUILTIN_SETS:
        raise DataError(f"unknown built-in set {name!r}; known: {', '.join(BUILTIN_SETS)}")
    records = []
    for row in _parse_jsonl(_builtin_text(f"{name}.jsonl"), f"builtin:{name}"):
        if split is None or row.get("split") == split:
            records.append(PromptRecord(prompt=row["prompt"], harmful=name == "harmful", source=f"builtin:{name}",
                                        category=row.get("category", ""), target=row.get("target"),
                                        split=row.get("split", "train")))
    return records


# Prompts written for the gate's probe set alone, both labels (no answers to distil, so adding them leaves
# every stage file as it was): more kinds of request on each side. On by default (`--no-builtin-probe`: off).
PROBE_ONLY_FILE = "probe_only.jsonl"


def builtin_probe_only() -> list[PromptRecord]:
    """The shipped probe-only prompts (``harmful`` true or false in each row)."""
    return [PromptRecord(prompt=row["prompt"], harmful=bool(row["harmful"]), source="builtin:probe_only",
                         category=row.get("category", ""), split="train")
            for row in _parse_jsonl(_builtin_text(PROBE_ONLY_FILE), f"builtin:{PROBE_ONLY_FILE}")]


def refusal_templates() -> list[str]:
    return [line.strip() for line in _builtin_text("refusals.txt").splitlines() if line.strip()]


def comply_templates() -> list[str]:
    return [line.strip() for line in _builtin_text("comply_openers.txt").splitlines() if "{task}" in line]


# -- reading user files ----------------------------------------------------------------------
def _parse_jsonl(text: str, where: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}:{lineno}: malformed JSON ({e.msg})") from None
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict):
            raise DataError(f"{where}:{lineno}: expected a JSON object or string")
        row["_line"] = lineno
        rows.append(row)
    return rows


def _pick(row: dict[str, Any], field: str | None, candidates: tuple[str, ...], where: str) -> str | None:
    if field:
        if field not in row:
            raise DataError(f"{where}: no field {field!r} (fields: {', '.join(k for k in row if k != '_line')})")
        return row[field]
    for name in candidates:
        if name in row:
            return row[name]
    return None


def json_list(data: Any, source: str | Path) -> list:
    """A JSON document's record list: the list itself, or the one list inside an object ({"prompts": [...]})."""
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{source}: expected a JSON list, or an object holding exactly one list")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list, got {type(data).__name__}")
    return data


_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".tsv", ".parquet")


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name`` or ``owner/name:split``, not a mistyped local path: one slash, no file suffix, and no local
    folder named like the owner (``mydir/harmfull.jsonl`` is a missing file, not a Hub request)."""
    name = source.split(":", 1)[0]
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    owner, repo = name.split("/")
    return bool(owner and repo) and not repo.lower().endswith(_FILE_SUFFIXES) and not Path(owner).is_dir()


def read_rows(source: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl / json / csv / txt file, or of a Hugging Face dataset id (``id`` or ``id:split``)."""
    path = Path(source)
    if not path.exists():
        if _looks_like_hub_id(str(source)):
            return _read_hub(str(source))
        raise DataError(f"{source}: no such file")
    if path.is_dir():
        raise DataError(f"{source}: is a folder, expected a jsonl, json, csv or txt file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _parse_jsonl(text, str(source))
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{e.lineno}: malformed JSON ({e.msg})") from None
        data = json_list(data, source)
        rows = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict):
                raise DataError(f"{source}: item {i} is neither an object nor a string")
            rows.append({**item, "_line": i + 1})
        return rows
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            return [{**row, "_line": i + 2} for i, row in enumerate(reader)]
        except csv.Error as e:
            raise DataError(f"{source}:{reader.line_num}: malformed CSV ({e})") from None
    if suffix == ".txt":
        return [{"prompt": line.strip(), "_line": i + 1} for i, line in enumerate(text.splitlines()) if line.strip()]
    raise DataError(f"{source}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or .txt)")


def _read_hub(dataset_id: str) -> list[dict[str, Any]]:
    name, _, split = dataset_id.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{dataset_id}: not a local file, and loading Hub datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # the Hub client raises many error types
        raise DataError(f"{dataset_id}: could not load Hub dataset ({str(e).splitlines()[0] if str(e) else e})") from None
    return [{**row, "_line": i + 1} for i, row in enumerate(ds)]


def read_prompts(source: str | Path, *, harmful: bool, field: str | None = None,
                 output_field: str | None = None) -> list[PromptRecord]:
    """Prompt records from a file or Hub dataset; errors name the file and line."""
    records = []
    for row in read_rows(source):
        where = f"{source}:{row.get('_line', '?')}"
        prompt = _pick(row, field, PROMPT_FIELDS, where)
        if prompt is None:
            raise DataError(f"{where}: no prompt field (tried {', '.join(PROMPT_FIELDS)}); pass --field")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: empty or non-text prompt")
        output = _pick(row, output_field, OUTPUT_FIELDS, where) if (output_field or not harmful) else None
        records.append(PromptRecord(prompt=prompt.strip(), harmful=harmful, source=str(source),
                                    category=str(row.get("category", "") or ""),
                                    target=row.get("target") if harmful else None,
                                    output=output if isinstance(output, str) and output.strip() else None))
    if not records:
        raise DataError(f"{source}: no prompts found (empty dataset)")
    return records


def split_dev(records: list[PromptRecord], fraction: float, seed: int) -> list[PromptRecord]:
    """Mark a seeded ``fraction`` of records as dev, unless they already carry a split."""
    if any(r.split == "dev" for r in records):
        return records
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    for i in order[: max(1, int(round(fraction * len(records))))] if len(records) > 1 else []:
        records[i].split = "dev"
    return records


def attack_frames() -> list[dict[str, str]]:
    """The shipped frames: ``wrap`` (holds ``{task}``), and for a multi-turn frame an ``opener`` and ``reply``."""
    rows = _parse_jsonl(_builtin_text(FRAMES_FILE), f"mogu/prompts/{FRAMES_FILE}")
    for row in rows:
        if "{task}" not in row.get("wrap", "") or bool(row.get("opener")) != bool(row.get("reply")):
            raise DataError(f"mogu/prompts/{FRAMES_FILE}:{row['_line']}: a frame needs a wrap holding {{task}}, "
                            "and an opener only together with a reply")
    return rows


def framed_conversation(prompt: str, frame: dict[str, str]) -> list[dict[str, str]]:
    """The conversation a frame makes of a prompt, ending in the user turn that carries it."""
    turns = [{"role": "user", "content": frame["opener"]}, {"role": "assistant", "content": frame["reply"]}] \
        if frame.get("opener") else []
    return turns + [{"role": "user", "content": frame["wrap"].replace("{task}", prompt.strip())}]


def probe_input(row: dict[str, Any]) -> "str | list[dict[str, str]]":
    """What a probe row's features are read from: its framed conversation, else its plain prompt."""
    return row.get("messages") or row["prompt"]


# -- stage datasets --------------------------------------------------------------------------
def comply_opening(record: PromptRecord, rng: random.Random) -> str:
    """A short affirmative opening, never content: the record's target, else a template."""
    if record.target:
        return record.target.strip()
    task = record.prompt.strip().rstrip(".?!")
    task = task[0].lower() + task[1:] if task else task
    return rng.choice(comply_templates()).format(task=task)


def build_stage_datasets(harmful: list[PromptRecord], benign: list[PromptRecord], out_dir: str | Path, *,
                         answer_fn: Callable[[list[str]], list[str]] | None, seed: int = 0,
                         max_benign_train: int | None = None, frame_fraction: float = 1.0,
                         probe_benign: list[PromptRecord] | None = None,
                         probe_harmful: list[PromptRecord] | None = None,
                         thinking: "tuple[str, str] | Callable[[], tuple[str, str] | None] | None" = None,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the three stage files and dev.jsonl; return counts (also written to data_stats.json).

    ``answer_fn`` maps benign prompts to helpful answers (the base model's greedy answers);
    it is called only for benign prompts without a provided output. ``max_benign_train`` keeps a
    seeded sample of that many benign train prompts (the dev split is never sampled): self-distilling
    answers is the slow part of a CPU build, and it keeps the router set closer to class balance.

    ``probe_benign``: more benign prompts for probe.jsonl alone (the prompt gate's fit), with no answer to
    distil: a deployer's own traffic, or a public instruction set. Prompts already in the probe set or in a
    dev split are skipped, so dev scores stay held out. ``probe_harmful``: the same for harmful prompts (a
    deployer's red-team set): more kinds of harmful request move the threshold that keeps the harmful dev
    split away from benign prompts (docs/RESULTS.md, "What moves the gate").

    ``thinking``: a reasoning model's trace markers (or a function that gives them once ``answer_fn`` has
    run, so the model loads only when needed). A distilled answer is kept whole, trace included, as the model
    writes it; the refusal check reads the answer after the trace, and an answer whose trace never ended
    counts as no answer (regenerated, then dropped).
    """
    if not 0.0 <= frame_fraction <= 1.0:
        raise DataError(f"frame_fraction must be in [0, 1], got {frame_fraction}")
    if not harmful:
        raise DataError("no harmful prompts: the glad and router stages need some")
    if not benign:
        raise DataError("no benign prompts: the unwill and router stages need some")
    rng = random.Random(seed)
    refusals = refusal_templates()
    out_dir = Path(out_dir)
    harm_train = [r for r in harmful if r.split != "dev"]
    ben_train = [r for r in benign if r.split != "dev"]
    benign_available = len(ben_train)
    if max_benign_train is not None:
        if max_benign_train < 1:
            raise DataError(f"max_benign_train must be >= 1, got {max_benign_train}")
        if len(ben_train) > max_benign_train:
            keep = sorted(random.Random(seed + 1).sample(range(len(ben_train)), max_benign_train))
            ben_train = [ben_train[i] for i in keep]
    dev = [{"prompt": r.prompt, "harmful": r.harmful, "category": r.category, "source": r.source}
           for r in harmful + benign if r.split == "dev"]

    answers: dict[str, str] = {r.prompt: r.output for r in ben_train if r.output}
    todo = [r.prompt for r in ben_train if r.prompt not in answers]
    regenerated = dropped = 0
    if todo:
        if answer_fn is None:
            raise DataError("benign prompts have no outputs and no model was given to answer them")
        generated = answer_fn(todo)
        markers = thinking() if callable(thinking) else thinking

        def unusable(text: str) -> bool:
            from mogu.chat import split_thinking

            _, answer = split_thinking(text, markers)
            return not answer.strip() or is_refusal(answer)

        retry = [p for p, a in zip(todo, generated) if unusable(a)]
        answers.update({p: a for p, a in zip(todo, generated) if p not in retry})
        if retry:
            regenerated = len(retry)
            second = answer_fn(retry, sample=True) if _accepts_sample(answer_fn) else answer_fn(retry)
            for p, a in zip(retry, second):
                if not unusable(a):
                    answers[p] = a
                else:
                    dropped += 1
        log(f"self-distilled {len(todo)} benign answers: {regenerated} were refusals and regenerated, "
            f"{dropped} dropped")

    glad = [{"prompt": r.prompt, "comply": comply_opening(r, rng), "refuse": rng.choice(refusals)}
            for r in harm_train]
    kept_benign = [r for r in ben_train if r.prompt in answers]
    unwill = [{"prompt": r.prompt, "refuse": rng.choice(refusals), "comply": answers[r.prompt]}
              for r in kept_benign]
    router = [{"prompt": r.prompt, "response": rng.choice(refusals), "label": 1} for r in harm_train]
    router += [{"prompt": r.prompt, "response": answers[r.prompt], "label": 0} for r in kept_benign]
    rng.shuffle(router)
    for rows, name in ((glad, "glad"), (unwill, "unwill"), (router, "router")):
        if not rows:
            raise DataError(f"the {name} dataset came out empty (no usable training prompts)")
        write_jsonl(out_dir / STAGE_FILES[name], rows)
    write_jsonl(out_dir / DEV_FILE, dev)
    probe = [{"prompt": r.prompt, "label": 1} for r in harm_train]
    probe += [{"prompt": r.prompt, "label": 0} for r in benign if r.split != "dev"]
    probe += _framed_rows(harm_train, [r for r in benign if r.split != "dev"], frame_fraction, seed)
    seen = {r["prompt"] for r in probe if "prompt" in r} | {r.prompt for r in (*harmful, *benign) if r.split == "dev"}
    extra_counts = {}
    for label, name, rows in ((0, "benign", probe_benign), (1, "harmful", probe_harmful)):
        added = 0
        for r in rows or ():
            if r.prompt not in seen:
                seen.add(r.prompt)
                probe.append({"prompt": r.prompt, "label": label})
                added += 1
        extra_counts[name] = added
        if rows:
            log(f"probe set: {added} extra {name} prompts ({len(rows) - added} skipped: duplicates or dev prompts)")
    rng.shuffle(probe)
    write_jsonl(out_dir / PROBE_FILE, probe)
    stats = {"glad_pairs": len(glad), "unwill_pairs": len(unwill), "router": len(router), "dev": len(dev),
             "probe": len(probe), "probe_framed": sum("messages" in r for r in probe), "probe_extra_benign": extra_counts["benign"],
             "probe_extra_harmful": extra_counts["harmful"],
             "benign_answers_regenerated": regenerated, "benign_answers_dropped": dropped, "seed": seed,
             "benign_train_available": benign_available, "benign_train_used": len(ben_train),
             "sha256": {f: sha256_file(out_dir / f) for f in (*STAGE_FILES.values(), DEV_FILE, PROBE_FILE)}}
    (out_dir / "data_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _framed_rows(harmful: list[PromptRecord], benign: list[PromptRecord], fraction: float,
                 seed: int) -> list[dict[str, Any]]:
    """Framed copies of a seeded ``fraction`` of the harmful prompts and of as many benign ones, one seeded
    frame each: the same frames on both labels, so a frame alone tells the probes nothing."""
    frames = attack_frames()
    rng = random.Random(f"{seed}\x00frames")
    n = int(round(fraction * len(harmful)))
    rows = []
    for label, pool in ((1, harmful), (0, benign)):
        for r in rng.sample(pool, min(n, len(pool))):
            frame = rng.choice(frames)
            rows.append({"prompt": r.prompt, "label": label, "frame": frame["id"],
                         "messages": framed_conversation(r.prompt, frame)})
    return rows


def _accepts_sample(fn: Callable) -> bool:
    import inspect

    try:
        return "sample" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def load_probe_rows(data_dir: str | Path) -> list[dict[str, Any]]:
    """The labelled prompts a prompt gate is fitted on: probe.jsonl, or the router set of a data folder built
    before probe.jsonl existed."""
    data_dir = Path(data_dir)
    path = data_dir / PROBE_FILE
    if path.is_file():
        return load_stage_file(path, ("prompt", "label"))
    return load_stage_file(data_dir / STAGE_FILES["router"], ("prompt", "label"))


# The stage files' typed fields: a label "harmful" or a harmful flag "false" would train or score silently wrong.
_FIELD_TYPES = {
    "prompt": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "response": (lambda v: isinstance(v, str), "a string"),
    "comply": (lambda v: isinstance(v, str), "a string"),
    "refuse": (lambda v: isinstance(v, str), "a string"),
    "label": (lambda v: v in (0, 1) and not isinstance(v, float), "0 (benign) or 1 (harmful)"),
    "harmful": (lambda v: isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)), "true or false"),
}


def load_stage_file(path: str | Path, required: Iterable[str]) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (run `mogu data build` first)")
    rows = _parse_jsonl(path.read_text(encoding="utf-8"), str(path))
    for row in rows:
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}:{row['_line']}: missing field(s) {', '.join(missing)}")
        for key, (ok, wanted) in _FIELD_TYPES.items():
            if key in row and not ok(row[key]):
                raise DataError(f"{path}:{row['_line']}: field {key!r} must be {wanted}, got {row[key]!r:.60}")
    if not rows:
        raise DataError(f"{path}: empty dataset")
    return rows
