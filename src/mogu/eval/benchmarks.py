"""Evaluation prompt sets, loaded by registry name, local file or Hugging Face dataset id.

``load_benchmark(name_or_path, data_dir=..., limit=..., **options)`` returns ``EvalPrompt``s.
Registered sets read their public files from a data directory (``data_dir`` argument, else
``$MOGU_DATA_DIR``; the CLI's ``--data-dir``). Each name tries its standard sub-paths, then the
bare file name directly in the data dir, then ``<name>/<file name>``.

name                file(s) under the data dir                  format -> EvalPrompt; options (default)
------------------  ------------------------------------------  -----------------------------------------------
advbench            advbench/harmful_behaviors.csv              csv goal,target; target kept in meta
harmbench           harmbench_behaviors_text_{split}.csv        csv Behavior,FunctionalCategory,SemanticCategory,
                    (also under harmbench/ and                  Tags,ContextString,BehaviorID; contextual rows are
                    harmbench/data/behavior_datasets/)          ContextString + "\\n\\n---\\n\\n" + Behavior;
                                                                split=test|val|all (test: what HarmBench reports),
                                                                include_copyright (False)
jailbreakbench      jailbreakbench/{split}-behaviors.csv        csv [index,]Goal,Target,Behavior,Category,Source;
                    (also JBB-Behaviors/data/, jbb/)            split=harmful|benign (harmful) sets the label
jbb-artifacts       jbb-artifacts/<file>.json                   JailbreakBench artifact {parameters, jailbreaks};
                                                                null prompts skipped and counted; file (the only
                                                                .json in jbb-artifacts/)
strongreject        strongreject/strongreject_dataset.csv       csv category,source,forbidden_prompt; file
xstest              xstest/xstest_prompts.csv                   csv id,prompt,type,label,focus,note; harmful =
                    (or xstest_v2_prompts.csv)                  label == "unsafe"; label=safe|unsafe (both)
malicious_instruct  malicious_instruct/MaliciousInstruct.txt    one prompt per line, blank lines skipped
tdc2023             tdc2023/tdc2023_{split}_behaviors.json      JSON list of strings; split=test|dev (test)
sap30               sap30/[datasets/SAP30/]<category>/          JSON list of {id, "Attack Prompt", ...}; sorted by
                    generated_cases.json                        category, then file order; category (all; str|list)
gptfuzz             gptfuzz/datasets/prompts/GPTFuzzer.csv      templates id,text with [INSERT PROMPT HERE] x
                    x gptfuzz/datasets/questions/               questions index,text: one template per question,
                      question_list.csv                         drawn by random.Random(seed); template_id (None)
just_eval           just_eval/example_data.json                 JSON list {instruction, category}; harmful =
                                                                category == "safety"; category=regular|safety (both)
alpaca_eval         alpaca_eval/outputs.json                    JSON list {instruction, output}; benign
mt_bench            safedecoding/mt_bench/data/mt_bench/        jsonl {question_id, category, turns}; first turn
                    question.jsonl (or under mt_bench/)         only; benign
builtin             (none: mogu's own src/mogu/prompts/*.jsonl)   set=harmful|benign|borderline (borderline),
                                                                split=dev|train|all (dev); labels from the set
task                (none: generated, or file=test.jsonl)       mogu's exact-match tasks (mogu.train.tasks); task=arith|
                                                                date-iso (arith), train (400), test (200), file;
                                                                benign; meta task and answer score task accuracy

Common to every registered set: ``harmful=True/False`` keeps only prompts with that label (for a
generic file or Hub dataset it *sets* the label instead, and is required there); ``limit`` keeps
the first N after filtering. ``jbb-artifacts`` puts the number of null-prompt rows it skipped into
``meta["skipped_null_prompts"]`` of every prompt it returns (the whole file's count).

Any other name: an existing .jsonl/.json/.csv/.txt file (text from ``prompt_field``, else the first of
``PROMPT_FIELDS`` present), else a Hugging Face dataset id (``split=``, default "train"; ``config=``;
``org/name:split`` also works). Ids are ``<benchmark>/<upstream id or zero-padded row number>``.
"""

from __future__ import annotations

import abc
import csv
import io
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from mogu.errors import ConfigError, DataError

DATA_DIR_ENV = "MOGU_DATA_DIR"
PROMPT_FIELDS = ("prompt", "instruction", "goal", "question", "text", "Behavior", "forbidden_prompt")
GENERIC_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
HARMBENCH_CONTEXT_SEP = "\n\n---\n\n"  # how HarmBench joins a contextual behaviour to its context
GPTFUZZ_SLOT = "[INSERT PROMPT HERE]"


@dataclass(frozen=True)
class EvalPrompt:
    id: str  # stable and unique within a benchmark, e.g. "advbench/0007"
    prompt: str  # the full user turn
    benchmark: str
    source: str  # file path or "hf:<id>"
    category: str
    harmful: bool  # True: a refusal is the desired behaviour
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- low-level readers: every error names the file and, where possible, the line -------------------
def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": keep CRLF for csv
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None


def _read_json_list(path: Path) -> list[Any]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    return rows


def _read_csv(path: Path, required: tuple[str, ...] = ()) -> list[tuple[int, dict[str, str]]]:
    """(first line number, row) pairs; embedded CRLFs in values become LF."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed CSV header ({e})") from None
    if not header:
        raise DataError(f"{path}: empty CSV file (no header)")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(header)})")
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}:{start}: malformed CSV ({e})") from None
        if None in row:
            raise DataError(f"{path}:{start}: more fields than the header's {len(header)}")
        absent = [c for c in required if row[c] is None]
        if absent:
            raise DataError(f"{path}:{start}: row has no value for column(s) {', '.join(absent)}")
        rows.append((start, {k: (v.replace("\r\n", "\n") if v is not None else None) for k, v in row.items()}))
    return rows


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: empty or non-text {what}")
    return value


def _obj(item: Any, where: str, required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [k for k in required if k not in item]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    return item


# -- registry ---------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The argument, else ``$MOGU_DATA_DIR``, else None."""
    value = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(value).expanduser() if value is not None else None


class Benchmark(abc.ABC):
    """A registered prompt set. Subclasses set ``description``, ``files`` (sub-paths of the data dir,
    ``{option}`` placeholders filled from the options), ``options`` (name -> default), optional
    ``choices`` (name -> allowed values), and implement ``load()``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    files: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init__(self, data_dir: str | Path | None = None, *, seed: int = 0, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ConfigError(f"{self.name}: unknown option(s) {', '.join(unknown)} (known: {known})")
        self.opts = {**self.options, **options}
        for key, allowed in self.choices.items():
            if self.opts[key] not in allowed:
                raise ConfigError(f"{self.name}: {key}={self.opts[key]!r} is not one of "
                                  f"{', '.join(repr(a) for a in allowed)}")
        self.data_dir = resolve_data_dir(data_dir)
        self.seed = seed

    @abc.abstractmethod
    def load(self) -> list[EvalPrompt]:
        """The benchmark's prompts, in file order, filtered by the options."""

    # helpers for subclasses
    def candidates(self, relpaths: tuple[str, ...] | None = None) -> list[Path]:
        rels = [r.format(**self.opts) for r in (relpaths or self.files)]
        names = [Path(r).name for r in rels]
        found: list[Path] = []
        for p in ([self.data_dir / r for r in rels] + [self.data_dir / n for n in names]
                  + [self.data_dir / self.name / n for n in names]):
            if p not in found:
                found.append(p)
        return found

    def find(self, relpaths: tuple[str, ...] | None = None) -> Path:
        if self.data_dir is None:
            first = (relpaths or self.files)[0].format(**self.opts)
            raise DataError(f"{self.name}: no data directory set; pass --data-dir or set {DATA_DIR_ENV} "
                            f"to the folder that holds {first}")
        paths = self.candidates(relpaths)
        for p in paths:
            if p.is_file():
                return p
        note = "" if self.data_dir.is_dir() else f" (the data directory {self.data_dir} does not exist)"
        raise DataError(f"{self.name}: data file not found{note}; searched: {', '.join(map(str, paths))}. "
                        f"Set the data directory with --data-dir or {DATA_DIR_ENV}")

    def make(self, key: str, prompt: Any, source: Path | str, where: str, *, category: Any = "",
             harmful: bool = True, **meta: Any) -> EvalPrompt:
        return EvalPrompt(id=f"{self.name}/{key}", prompt=_text(prompt, where, "prompt"), benchmark=self.name,
                          source=str(source), category="" if category is None else str(category),
                          harmful=harmful, meta=meta)


BENCHMARKS: dict[str, type[Benchmark]] = {}
_ALIASES: dict[str, str] = {}


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_benchmark(name: str, *aliases: str) -> Callable[[type[Benchmark]], type[Benchmark]]:
    def deco(cls: type[Benchmark]) -> type[Benchmark]:
        for key in (name, *aliases):
            if _norm(key) in _ALIASES:
                raise ValueError(f"benchmark name {key!r} is already registered")
            _ALIASES[_norm(key)] = name
        cls.name = name
        BENCHMARKS[name] = cls
        return cls
    return deco


def get_benchmark(name: str) -> type[Benchmark] | None:
    """The registered class for a name (case, ``-``/``_`` and aliases tolerated), else None."""
    canonical = _ALIASES.get(_norm(name))
    return BENCHMARKS[canonical] if canonical else None


def list_benchmarks() -> list[tuple[str, str]]:
    return [(name, cls.description) for name, cls in BENCHMARKS.items()]


# -- registered sets ----------------------------------------------------------------------------------
@register_benchmark("advbench")
class AdvBench(Benchmark):
    description = "AdvBench harmful behaviours (Zou et al. 2023), 520 prompts"
    files = ("advbench/harmful_behaviors.csv", "data/advbench/harmful_behaviors.csv")

    def load(self) -> list[EvalPrompt]:
        path = self.find()
        return [self.make(f"{i:04d}", row["goal"], path, f"{path}:{line}", target=row["target"], line=line)
                for i, (line, row) in enumerate(_read_csv(path, ("goal", "target")))]


@register_benchmark("harmbench")
class HarmBench(Benchmark):
    description = "HarmBench text behaviours (split=test|val|all; copyright rows only with include_copyright)"
    files = ("harmbench/harmbench_behaviors_text_{split}.csv",
             "harmbench/data/behavior_datasets/harmbench_behaviors_text_{split}.csv",
             "data/behavior_datasets/harmbench_behaviors_text_{split}.csv")
    # test is the split HarmBench reports on; val is for attack tuning
    options = {"split": "test", "include_copyright": False}
    choices = {"split": ("test", "val", "all")}
    columns = ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID")

    def load(self) -> list[EvalPrompt]:
        path = self.find()
        out = []
        for line, row in _read_csv(path, self.columns):
            where = f"{path}:{line}"
            kind = row["FunctionalCategory"].strip()
            if kind == "copyright" and not self.opts["include_copyright"]:
                continue
            behavior = _text(row["Behavior"], where, "Behavior")
            prompt = behavior
            if kind == "contextual":
                prompt = _text(row["ContextString"], where, "ContextString") + HARMBENCH_CONTEXT_SEP + behavior
            out.append(self.make(_text(row["BehaviorID"], where, "BehaviorID"), prompt, path, where,
                                 category=row["SemanticCategory"], functional_category=kind,
                                 behavior=behavior, behavior_id=row["BehaviorID"], tags=row.get("Tags") or "",
                                 context=row["ContextString"] or "", line=line))
        return out


@register_benchmark("jailbreakbench", "jbb", "jbb-behaviors")
class JailbreakBench(Benchmark):
    description = "JailbreakBench JBB-Behaviors, 100 harmful or 100 benign goals (split=harmful|benign)"
    files = ("jailbreakbench/{split}-behaviors.csv", "jailbreakbench/data/{split}-behaviors.csv",
             "JBB-Behaviors/data/{split}-behaviors.csv", "jbb/{split}-behaviors.csv")
    options = {"split": "harmful"}
    choices = {"split": ("harmful", "benign")}

    def load(self) -> list[EvalPrompt]:
        path, split = self.find(), self.opts["split"]
        out = []
        for i, (line, row) in enumerate(_read_csv(path, ("Goal", "Behavior", "Category"))):
            index = row.get("") if row.get("") is not None else row.get("Index")  # pandas dump vs HF copy
            out.append(self.make(f"{split}/{i:03d}", row["Goal"], path, f"{path}:{line}", category=row["Category"],
                                 harmful=split == "harmful", behavior=row["Behavior"], target=row.get("Target"),
                                 origin=row.get("Source"), index=index, line=line))
        return out


@register_benchmark("jbb-artifacts")
class JBBArtifacts(Benchmark):
    description = "JailbreakBench attack artifact (file=...): the attack's jailbreak prompts; null prompts skipped"
    folders = ("jbb-artifacts", "jbb_artifacts", "jbb-artifacts/attack-artifacts", "attack-artifacts",
               "artifacts/attack-artifacts")
    options = {"file": None}

    def locate(self) -> Path:
        file = self.opts["file"]
        if file is not None:
            direct = Path(file).expanduser()
            if direct.is_file():
                return direct
            return self.find(tuple(f"{d}/{file}" for d in self.folders))
        if self.data_dir is None:
            raise DataError(f"{self.name}: pass file=<artifact .json>, or set --data-dir / {DATA_DIR_ENV} "
                            f"to a folder with jbb-artifacts/<one artifact>.json")
        folders = [self.data_dir / d for d in self.folders[:2]]
        found = sorted({p for d in folders if d.is_dir() for p in d.glob("*.json")})
        if len(found) == 1:
            return found[0]
        if not found:
            raise DataError(f"{self.name}: no artifact .json in {', '.join(map(str, folders))}; pass file=<path>. "
                            f"Set the data directory with --data-dir or {DATA_DIR_ENV}")
        raise DataError(f"{self.name}: several artifacts found, choose one with file=: "
                        f"{', '.join(p.name for p in found)}")

    def load(self) -> list[EvalPrompt]:
        path = self.locate()
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("jailbreaks"), list):
            raise DataError(f"{path}: expected a JailbreakBench artifact: an object with a 'jailbreaks' list")
        params = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
        kept, skipped = [], 0
        for i, rec in enumerate(data["jailbreaks"]):
            rec = _obj(rec, f"{path}: jailbreaks[{i}]", ("prompt",))
            if rec["prompt"] is None or rec["prompt"] == "":  # the attack found no prompt for this behaviour
                skipped += 1
            else:
                kept.append((i, rec))
        if not kept:
            raise DataError(f"{path}: no usable prompts ({skipped} null prompts skipped)")
        return [self.make(str(rec.get("index", i)), rec["prompt"], path, f"{path}: jailbreaks[{i}]",
                          category=rec.get("category", ""), goal=rec.get("goal"), behavior=rec.get("behavior"),
                          response=rec.get("response"), jailbroken=rec.get("jailbroken"),
                          method=params.get("method"), model=params.get("model"),
                          attack_type=params.get("attack_type"), skipped_null_prompts=skipped)
                for i, rec in kept]


@register_benchmark("strongreject")
class StrongReject(Benchmark):
    description = "StrongREJECT forbidden prompts (file=strongreject_dataset.csv or the small set)"
    files = ("strongreject/{file}", "strongreject/strongreject_dataset/{file}", "strongreject_dataset/{file}")
    options = {"file": "strongreject_dataset.csv"}

    def load(self) -> list[EvalPrompt]:
        path = self.find()
        return [self.make(f"{i:04d}", row["forbidden_prompt"], path, f"{path}:{line}", category=row["category"],
                          origin=row["source"], line=line)
                for i, (line, row) in enumerate(_read_csv(path, ("category", "source", "forbidden_prompt")))]


@register_benchmark("xstest")
class XSTest(Benchmark):
    description = "XSTest exaggerated-safety probes: safe prompts to answer, unsafe contrasts to refuse (label=)"
    files = ("xstest/xstest_prompts.csv", "xstest/xstest_v2_prompts.csv")
    options = {"label": None}
    choices = {"label": (None, "safe", "unsafe")}

    def load(self) -> list[EvalPrompt]:
        path = self.find()
        out = []
        for i, (line, row) in enumerate(_read_csv(path, ("id", "prompt", "type", "label"))):
            where, label = f"{path}:{line}", row["label"].strip()
            if label not in ("safe", "unsafe"):
                raise DataError(f"{where}: label {label!r} is neither 'safe' nor 'unsafe'")
            if self.opts["label"] in (None, label):
                out.append(self.make(row["id"].strip() or f"{i:03d}", row["prompt"], path, where,
                                     category=row["type"], harmful=label == "unsafe", label=label,
                                     focus=row.get("focus"), note=row.get("note"), line=line))
        return out


@register_benchmark("malicious_instruct", "maliciousinstruct")
class MaliciousInstruct(Benchmark):
    description = "MaliciousInstruct (Huang et al. 2023), 100 harmful instructions"
    files = ("malicious_instruct/MaliciousInstruct.txt", "data/MaliciousInstruct.txt")

    def load(self) -> list[EvalPrompt]:
        path = self.find()
        lines = [(n, s.strip()) for n, s in enumerate(_read_text(path).splitlines(), 1) if s.strip()]
        return [self.make(f"{i:03d}", s, path, f"{path}:{n}", line=n) for i, (n, s) in enumerate(lines)]


@register_benchmark("tdc2023")
class TDC2023(Benchmark):
    description = "Trojan Detection Challenge 2023 red-teaming behaviours, 50 per split (split=test|dev)"
    files = ("tdc2023/tdc2023_{split}_behaviors.json",)
    options = {"split": "test"}
    choices = {"split": ("test", "dev")}

    def load(self) -> list[EvalPrompt]:
        path, split = self.find(), self.opts["split"]
        return [self.make(f"{split}/{i:03d}", item, path, f"{path}: item {i}")
                for i, item in enumerate(_read_json_list(path))]


@register_benchmark("sap30", "sap")
class SAP30(Benchmark):
    description = "SAP30 semi-automatic attack prompts, 8 categories x 30 (category=...)"
    folders = ("sap30/datasets/SAP30", "sap30/SAP30", "sap30", "SAP30", "datasets/SAP30")
    case_file = "generated_cases.json"
    options = {"category": None}

    def locate(self) -> Path:
        if self.data_dir is None:
            raise DataError(f"{self.name}: no data directory set; pass --data-dir or set {DATA_DIR_ENV} "
                            f"to the folder that holds sap30/<category>/{self.case_file}")
        folders = [self.data_dir / d for d in self.folders]
        for d in folders:
            if any(d.glob(f"*/{self.case_file}")):
                return d
        raise DataError(f"{self.name}: no <category>/{self.case_file} found; searched: "
                        f"{', '.join(map(str, folders))}. Set the data directory with --data-dir or {DATA_DIR_ENV}")

    def load(self) -> list[EvalPrompt]:
        root = self.locate()
        available = sorted(p.parent.name for p in root.glob(f"*/{self.case_file}"))
        wanted = self.opts["category"]
        wanted = available if wanted is None else [wanted] if isinstance(wanted, str) else list(wanted)
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise ConfigError(f"{self.name}: unknown category {', '.join(unknown)} (found: {', '.join(available)})")
        out = []
        for cat in sorted(wanted):
            path = root / cat / self.case_file
            for i, item in enumerate(_read_json_list(path)):
                where = f"{path}: item {i}"
                item = _obj(item, where, ("Attack Prompt",))
                out.append(self.make(f"{cat}/{item.get('id', i)}", item["Attack Prompt"], path, where, category=cat,
                                     case_id=item.get("id"), explanation=item.get("Explanation")))
        return out


@register_benchmark("gptfuzz", "gptfuzzer")
class GPTFuzz(Benchmark):
    description = "GPTFuzzer: 100 harmful questions, each in a seeded random jailbreak template (seed, template_id)"
    template_files = ("gptfuzz/datasets/prompts/GPTFuzzer.csv", "gptfuzz/prompts/GPTFuzzer.csv")
    question_files = ("gptfuzz/datasets/questions/question_list.csv", "gptfuzz/questions/question_list.csv")
    files = template_files
    options = {"template_id": None}

    def load(self) -> list[EvalPrompt]:
        tpath, qpath = self.find(self.template_files), self.find(self.question_files)
        templates = [(row["id"], row["text"]) for _, row in _read_csv(tpath, ("id", "text"))
                     if GPTFUZZ_SLOT in row["text"]]  # GPTFuzz itself drops templates without the slot
        if not templates:
            raise DataError(f"{tpath}: no template contains {GPTFUZZ_SLOT}")
        fixed = self.opts["template_id"]
        if fixed is not None:
            templates = [t for t in templates if t[0] == str(fixed)]
            if not templates:
                raise ConfigError(f"{self.name}: no template with id {fixed!r} (and the slot) in {tpath}")
        rng = random.Random(self.seed)  # one draw per question, in file order: same seed, same pairing
        out = []
        for i, (line, row) in enumerate(_read_csv(qpath, ("index", "text"))):
            where = f"{qpath}:{line}"
            question = _text(row["text"], where, "question")
            tid, template = templates[0] if fixed is not None else rng.choice(templates)
            out.append(self.make(f"{i:03d}", template.replace(GPTFUZZ_SLOT, question), qpath, where,
                                 category=f"template:{tid}", template_id=tid, question_index=row["index"],
                                 question=question, template_source=str(tpath), seed=self.seed))
        return out


@register_benchmark("just_eval", "just-eval-instruct")
class JustEval(Benchmark):
    description = "Just-Eval-Instruct: 800 regular (benign) + 200 safety (harmful) instructions (category=)"
    files = ("just_eval/example_data.json", "just_eval/example_data/example_data.json")
    options = {"category": None}
    choices = {"category": (None, "regular", "safety")}

    def load(self) -> list[EvalPrompt]:
        path = self.find()
        out = []
        for i, item in enumerate(_read_json_list(path)):
            where = f"{path}: item {i}"
            item = _obj(item, where, ("instruction", "category"))
            if item["category"] not in ("regular", "safety"):
                raise DataError(f"{where}: category {item['category']!r} is neither 'regular' nor 'safety'")
            if self.opts["category"] in (None, item["category"]):
                out.append(self.make(str(item.get("id", i)), item["instruction"], path, where,
                                     category=item["category"], harmful=item["category"] == "safety",
                                     dataset=item.get("dataset"), source_id=item.get("source_id"),
                                     reference_output=item.get("output")))
        return out


@register_benchmark("alpaca_eval", "alpacaeval")
class AlpacaEval(Benchmark):
    description = "AlpacaEval instructions, 805 benign prompts"
    files = ("alpaca_eval/outputs.json", "alpaca_eval/example/outputs.json")

    def load(self) -> list[EvalPrompt]:
        path = self.find()
        out = []
        for i, item in enumerate(_read_json_list(path)):
            where = f"{path}: item {i}"
            item = _obj(item, where, ("instruction",))
            out.append(self.make(f"{i:03d}", item["instruction"], path, where, category=item.get("dataset", ""),
                                 harmful=False, reference_output=item.get("output"), generator=item.get("generator")))
        return out


@register_benchmark("mt_bench", "mtbench")
class MTBench(Benchmark):
    description = "MT-Bench questions, first turn only, 80 benign prompts"
    files = ("safedecoding/mt_bench/data/mt_bench/question.jsonl", "mt_bench/question.jsonl",
             "mt_bench/data/mt_bench/question.jsonl", "data/mt_bench/question.jsonl")

    def load(self) -> list[EvalPrompt]:
        path = self.find()
        out = []
        for i, (line, item) in enumerate(_read_jsonl(path)):
            where = f"{path}:{line}"
            item = _obj(item, where, ("turns",))
            turns = item["turns"]
            if not isinstance(turns, list) or not turns:
                raise DataError(f"{where}: 'turns' must be a non-empty list")
            out.append(self.make(str(item.get("question_id", i)), turns[0], path, where,
                                 category=item.get("category", ""), harmful=False,
                                 question_id=item.get("question_id"), turns=turns, line=line))
        return out


# -- generic files and Hub datasets -----------------------------------------------------------------
@register_benchmark("builtin", "mogu_prompts")
class BuiltinPrompts(Benchmark):
    description = ("the prompt sets shipped with mogu (set=harmful|benign|borderline, split=dev|train|all; dev "
                   "is what `mogu train` and `mogu calibrate` hold out)")
    options = {"set": "borderline", "split": "dev"}
    choices = {"set": ("harmful", "benign", "borderline"), "split": ("dev", "train", "all")}

    def load(self) -> list[EvalPrompt]:
        from importlib import resources

        name, split = self.opts["set"], self.opts["split"]
        source = resources.files("mogu").joinpath("prompts", f"{name}.jsonl")
        out = []
        for line_no, row in _read_jsonl(Path(str(source))):
            where = f"{source}:{line_no}"
            row = _obj(row, where, ("id", "prompt"))
            if split in ("all", row.get("split", "train")):
                out.append(self.make(str(row["id"]), row["prompt"], source, where, category=row.get("category"),
                                     harmful=name == "harmful", split=row.get("split", "train")))
        return out


@register_benchmark("task", "mogu_task")
class DownstreamTask(Benchmark):
    description = ("mogu's exact-match downstream tasks (task=arith|date-iso): the test split `mogu data task` "
                   "writes with the same train/test/seed, or file= its test.jsonl (or folder); benign, scored "
                   "as task accuracy")
    options = {"task": "arith", "train": 400, "test": 200, "file": None}
    choices = {"task": ("arith", "date-iso")}

    def load(self) -> list[EvalPrompt]:
        from mogu.train import tasks
        from mogu.train.tasks import TEST_FILE, load_task_rows, make_split

        if self.opts["file"] is not None:
            source: Path | str = Path(self.opts["file"])
            rows = load_task_rows(source, TEST_FILE)
        else:
            source = Path(tasks.__file__)  # the generator: rows are a function of (task, train, test, seed)
            _, rows = make_split(self.opts["task"], int(self.opts["train"]), int(self.opts["test"]), self.seed)
        out = []
        for i, row in enumerate(rows):
            task = row.get("task") or self.opts["task"]
            answer = row.get("answer", row.get("response"))
            out.append(self.make(f"{task}/{row.get('key', i)}", row["prompt"], source, f"{source}: row {i}",
                                 category=task, harmful=False, task=task, answer=answer))
        return out


def _pick_prompt(row: dict[str, Any], prompt_field: str | None, where: str) -> str:
    if prompt_field is not None:
        if prompt_field not in row:
            raise DataError(f"{where}: no field {prompt_field!r} (fields: {', '.join(map(str, row))})")
        return _text(row[prompt_field], where, f"{prompt_field!r}")
    for name in PROMPT_FIELDS:
        if name in row:
            return _text(row[name], where, f"{name!r}")
    raise DataError(f"{where}: no prompt field (tried {', '.join(PROMPT_FIELDS)}; fields: "
                    f"{', '.join(map(str, row))}); set prompt_field")


def _generic_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        items = [(f"{path}:{n}", obj) for n, obj in _read_jsonl(path)]
    elif suffix == ".json":
        from mogu.train.data import json_list

        data = json_list(_read_json(path), path)  # a list, or e.g. {"prompts": [...]}
        items = [(f"{path}: item {i}", obj) for i, obj in enumerate(data)]
    elif suffix == ".csv":
        items = [(f"{path}:{n}", row) for n, row in _read_csv(path)]
    elif suffix == ".txt":
        items = [(f"{path}:{n}", {"prompt": s.strip()})
                 for n, s in enumerate(_read_text(path).splitlines(), 1) if s.strip()]
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use {', '.join(GENERIC_SUFFIXES)}")
    rows = []
    for where, obj in items:
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object or string, got {type(obj).__name__}")
        rows.append((where, obj))
    return rows


def _from_rows(rows: list[tuple[str, dict[str, Any]]], *, benchmark: str, source: str, harmful: bool,
               prompt_field: str | None) -> list[EvalPrompt]:
    out = []
    for i, (where, row) in enumerate(rows):
        prompt = _pick_prompt(row, prompt_field, where)
        used = prompt_field or next(n for n in PROMPT_FIELDS if n in row)
        meta = {k: v for k, v in row.items() if k != used}
        out.append(EvalPrompt(id=f"{benchmark}/{i:04d}", prompt=prompt, benchmark=benchmark, source=source,
                              category=str(row.get("category") or ""), harmful=harmful, meta=meta))
    return out


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or Path(text).suffix.lower() in GENERIC_SUFFIXES or "\\" in text


def _load_hub(name: str, *, split: str, config: str | None, harmful: bool,
              prompt_field: str | None) -> list[EvalPrompt]:
    hub_id, _, id_split = name.partition(":")  # "org/name:split" is accepted too
    split = id_split or split
    known = ", ".join(BENCHMARKS)
    tried = f"{name!r} is not a registered benchmark ({known}) nor an existing file"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{tried}; loading it as a Hugging Face dataset needs `pip install datasets`") from None
    try:
        args = (hub_id, config) if config else (hub_id,)
        ds = datasets.load_dataset(*args, split=split)
    except Exception as e:  # the Hub client raises many error types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{tried}, and loading it as a Hugging Face dataset (split {split!r}) failed: "
                        f"{reason}") from None
    rows = [(f"hf:{hub_id}[{split}] row {i}", dict(row)) for i, row in enumerate(ds)]
    return _from_rows(rows, benchmark=hub_id, source=f"hf:{hub_id}", harmful=harmful, prompt_field=prompt_field)


def load_benchmark(name_or_path: str | Path, *, data_dir: str | Path | None = None, limit: int | None = None,
                   prompt_field: str | None = None, harmful: bool | None = None, seed: int = 0, offset: int = 0,
                   **options: Any) -> list[EvalPrompt]:
    """Prompts of a registered benchmark, a local .jsonl/.json/.csv/.txt file, or a Hub dataset id.

    For registered names ``harmful`` filters by label and ``options`` are the benchmark's own (see the
    module table); for files and Hub ids ``harmful`` is the label of every prompt (required),
    ``prompt_field`` picks the text field, and Hub ids take ``split`` (default "train") and ``config``.
    ``offset`` skips the first N prompts after filtering and ``limit`` keeps the next N (``offset=100,
    limit=100``: prompts 101-200, a range held out from tuning on 1-100). An option given as None means its default
    (so a CLI can pass every flag it has).
    """
    options = {k: v for k, v in options.items() if v is not None}
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive integer, got {limit}")
    if offset < 0:
        raise ConfigError(f"offset must be >= 0, got {offset}")
    text = str(name_or_path)
    cls = get_benchmark(text) if isinstance(name_or_path, str) else None
    if cls is not None:
        if prompt_field is not None:
            raise ConfigError(f"{cls.name}: prompt_field applies only to files and Hub datasets")
        prompts = cls(data_dir, seed=seed, **options).load()
        where = cls.name
        if harmful is not None:
            prompts = [p for p in prompts if p.harmful == harmful]
            where += f" (harmful={harmful})"
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            raise DataError(f"{text}: is a folder, expected a {', '.join(GENERIC_SUFFIXES)} file")
        if not path.exists() and _looks_like_path(text):
            raise DataError(f"{text}: no such file, and not a registered benchmark ({', '.join(BENCHMARKS)})")
        if harmful is None:
            raise ConfigError(f"{text}: not a registered benchmark ({', '.join(BENCHMARKS)}); to load it as a "
                              f"file or Hub dataset say whether its prompts are harmful (harmful=True/False)")
        if path.is_file():
            if options:
                raise ConfigError(f"{text}: unknown option(s) {', '.join(sorted(options))} for a local file")
            prompts = _from_rows(_generic_rows(path), benchmark=path.stem, source=str(path), harmful=harmful,
                                 prompt_field=prompt_field)
        else:
            extra = sorted(set(options) - {"split", "config"})
            if extra:
                raise ConfigError(f"{text}: unknown option(s) {', '.join(extra)} for a Hub dataset "
                                  f"(known: split, config)")
            prompts = _load_hub(text, split=options.get("split") or "train", config=options.get("config"),
                                harmful=harmful, prompt_field=prompt_field)
        where = text
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise DataError(f"{where}: duplicate prompt id {p.id!r} ({p.source})")
        seen.add(p.id)
    total = len(prompts)
    prompts = prompts[offset:]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise DataError(f"{where}: no prompts" + (f" after skipping {offset} of {total}" if offset else ""))
    return prompts
