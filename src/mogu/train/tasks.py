"""Seeded downstream tasks with exact-match scoring (``mogu data task``, ``mogu finetune``).

A task is a generator of ``(key, prompt, answer)`` triples from a ``random.Random``; ``key`` names the
underlying item (the date, or the arithmetic template and its numbers) so that the test split never
repeats a training item in another wording. Rows are ``{"task", "key", "prompt", "response", "answer"}``
where ``response`` (the training target) is exactly the answer and nothing else.

Registered tasks:

``date-iso``  a date in one of several unambiguous human styles ("March 5, 2021", "5th of March 2021",
              "the fifth of March, 2021", "03/05/2021 (US style, month first)", ...) under varied
              instructions; the answer is ``YYYY-MM-DD``. Two-digit years are never used (ambiguous).
``arith``     one- or two-step word problems with small numbers ("Tom has 7 apples and buys 5 more...");
              the answer is a non-negative integer.

Scoring (``score_exact``): surrounding whitespace and one trailing period are stripped, then
``date-iso`` must equal the ISO date exactly, and ``arith`` must be a bare integer (optional minus
sign, digits only) whose value equals the answer: "12", " 12.\\n" and "012" pass; "12 apples",
"The answer is 12" and "12.0" fail. The rule is strict on purpose: following the output format is
part of the task.

``score_final`` is the lenient reading beside it, for a chat model that answers in a sentence: the last
integer (``arith``) or ISO date (``date-iso``) in the answer is taken as its final answer and scored by the
same rule ("Noah has 11 stickers... so 11 - 10 = 1" gives 1).
"""

from __future__ import annotations

import datetime
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mogu.errors import DataError, MoGUError

TRAIN_FILE, TEST_FILE = "train.jsonl", "test.jsonl"


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    sample: Callable[[random.Random], tuple[str, str, Any]]  # rng -> (key, prompt, answer)
    score: Callable[[str, Any], bool]  # (cleaned response, answer) -> correct
    final: "re.Pattern[str]"  # a final-answer candidate in free text; the last match is scored (score_final)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise MoGUError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


# -- date-iso -----------------------------------------------------------------------------------
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
_UNITS = ("", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
          "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
          "eighteenth", "nineteenth")
_FIRST_DAY = datetime.date(1950, 1, 1).toordinal()
_LAST_DAY = datetime.date(2049, 12, 31).toordinal()


def ordinal_suffix(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, 22nd, 23rd, 31st."""
    if 11 <= n % 100 <= 13:
        return f"{n}th"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def ordinal_words(n: int) -> str:
    """Day numbers 1-31 as words: "fifth", "twenty-first", "thirtieth"."""
    if n < 20:
        return _UNITS[n]
    tens = {2: "twenty", 3: "thirty"}[n // 10]
    if n % 10 == 0:
        return tens[:-1] + "ieth"
    return f"{tens}-{_UNITS[n % 10]}"


# Every style names the month or says which number is the month: none is ambiguous.
DATE_STYLES: dict[str, Callable[[datetime.date], str]] = {
    "month-day-year": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "day-month-year": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "ordinal-of": lambda d: f"{ordinal_suffix(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    "month-ordinal": lambda d: f"{MONTHS[d.month - 1]} {ordinal_suffix(d.day)}, {d.year}",
    "words": lambda d: f"the {ordinal_words(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    "abbreviated": lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    "weekday": lambda d: f"{d.strftime('%A')}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    "us-numeric": lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (US style, month first)",
    "day-first-numeric": lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day first, then month)",
}

DATE_INSTRUCTIONS = (
    "Convert {date} to ISO 8601 format (YYYY-MM-DD). Reply with the date only.",
    "Write the date {date} as YYYY-MM-DD.",
    "What is {date} in YYYY-MM-DD format? Answer with only the date.",
    "Rewrite this date in ISO format (YYYY-MM-DD): {date}",
    "Date: {date}\nGive it in the form YYYY-MM-DD, nothing else.",
    "Please express {date} as an ISO date (YYYY-MM-DD).",
    "Format {date} as YYYY-MM-DD and reply with just that.",
    "I need {date} in ISO 8601 (YYYY-MM-DD). Only the date, please.",
)


def _sample_date(rng: random.Random) -> tuple[str, str, str]:
    day = datetime.date.fromordinal(rng.randint(_FIRST_DAY, _LAST_DAY))
    style = rng.choice(sorted(DATE_STYLES))
    prompt = rng.choice(DATE_INSTRUCTIONS).format(date=DATE_STYLES[style](day))
    iso = day.isoformat()
    return iso, prompt, iso


register_task(Task("date-iso", "convert a human-written date to YYYY-MM-DD", _sample_date,
                   lambda response, answer: response == str(answer), re.compile(r"(?<!\d)\d{4}-\d{2}-\d{2}(?!\d)")))


# -- arith --------------------------------------------------------------------------------------
_NAMES = ("Tom", "Ann", "Maria", "Ben", "Li", "Sara", "Omar", "Priya", "Jack", "Emma", "Noah", "Yuki")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "cards", "coins", "shells", "stamps")
ARITH_SUFFIXES = ("Answer with just the number.", "Reply with only the final number.",
                  "Give only the integer answer, nothing else.", "Respond with a single number.")


def _add(rng, n, m, it):
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return (a, b), f"{n} has {a} {it} and buys {b} more. How many {it} does {n} have now?", a + b


def _sub(rng, n, m, it):
    a = rng.randint(5, 30)
    b = rng.randint(1, a - 1)
    return (a, b), f"{n} has {a} {it} and gives {b} to {m}. How many {it} does {n} have left?", a - b


def _mul(rng, n, m, it):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return (a, b), f"{n} buys {a} packs of {it}. Each pack holds {b} {it}. How many {it} does {n} buy in total?", a * b


def _div(rng, n, m, it):
    a, b = rng.randint(2, 10), rng.randint(2, 6)
    return (a, b), f"{n} shares {a * b} {it} equally among {b} friends. How many {it} does each friend get?", a


def _add_sub(rng, n, m, it):
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    return (a, b, c), (f"{n} has {a} {it}, buys {b} more, then gives {c} to {m}. "
                       f"How many {it} does {n} have now?"), a + b - c


def _mul_add(rng, n, m, it):
    a, b, c = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 20)
    return (a, b, c), (f"{n} has {c} {it} and buys {a} packs with {b} {it} in each. "
                       f"How many {it} does {n} have now?"), c + a * b


def _mul_sub(rng, n, m, it):
    a, b = rng.randint(2, 6), rng.randint(2, 9)
    c = rng.randint(1, a * b - 1)
    return (a, b, c), (f"{n} buys {a} boxes with {b} {it} in each and gives {c} {it} to {m}. "
                       f"How many {it} does {n} keep?"), a * b - c


ARITH_TEMPLATES = {"add": _add, "sub": _sub, "mul": _mul, "div": _div, "add-sub": _add_sub,
                   "mul-add": _mul_add, "mul-sub": _mul_sub}


def _sample_arith(rng: random.Random) -> tuple[str, str, int]:
    template = rng.choice(sorted(ARITH_TEMPLATES))
    name, other = rng.sample(_NAMES, 2)
    numbers, question, answer = ARITH_TEMPLATES[template](rng, name, other, rng.choice(_ITEMS))
    # The key ignores names, items and phrasing: the test split never reuses a training problem.
    return f"{template}:{','.join(map(str, numbers))}", f"{question} {rng.choice(ARITH_SUFFIXES)}", answer


_INTEGER = re.compile(r"-?\d+")
register_task(Task("arith", "one- or two-step small-number word problems; the answer is an integer", _sample_arith,
                   lambda response, answer: bool(_INTEGER.fullmatch(response)) and int(response) == int(answer),
                   # a decimal or a thousands-separated number is one candidate, which the exact rule rejects
                   re.compile(r"(?<![\d.,])-?\d+(?:[.,]\d+)*")))


# -- generation, splits and scoring ---------------------------------------------------------------
def make_task(name: str, n: int, seed: int = 0, *, split: str = "train", exclude=()) -> list[dict[str, Any]]:
    """``n`` rows of task ``name`` with distinct keys, none in ``exclude``; a function of (name, split, seed).

    Each split draws from its own seeded stream, so the test rows are not a prefix of the train rows.
    """
    task = get_task(name)
    if n < 0:
        raise MoGUError(f"the number of rows must be >= 0, got {n}")
    rng = random.Random(f"mogu-task:{name}:{split}:{seed}")  # str seeds hash with sha512: stable across runs
    seen = set(exclude)
    rows: list[dict[str, Any]] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise DataError(f"task {name!r}: could not draw {n} distinct rows (got {len(rows)}); ask for fewer")
        key, prompt, answer = task.sample(rng)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"task": name, "key": key, "prompt": prompt, "response": str(answer), "answer": answer})
    return rows


def make_split(name: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test): test rows come from another seed stream and never share a key with train."""
    train = make_task(name, n_train, seed, split="train")
    test = make_task(name, n_test, seed, split="test", exclude={r["key"] for r in train})
    return train, test


def clean_response(response: str) -> str:
    """Whitespace stripped, then one trailing period (and the whitespace before it)."""
    text = response.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def score_exact(name: str, response: str, answer: Any) -> bool:
    """Exact match under the task's rule (module docstring)."""
    return get_task(name).score(clean_response(response), answer)


def final_answer(name: str, response: str) -> str | None:
    """The last final-answer candidate in ``response`` under the task's pattern, or None."""
    found = get_task(name).final.findall(response)
    return found[-1] if found else None


def score_final(name: str, response: str, answer: Any) -> bool:
    """Lenient match: the response's last integer or ISO date, scored by the task's exact rule."""
    found = final_answer(name, response)
    return found is not None and get_task(name).score(found, answer)


def write_task_data(name: str, out: str | Path, *, n_train: int, n_test: int, seed: int = 0) -> dict[str, Any]:
    """Write ``train.jsonl``, ``test.jsonl`` and ``run.json`` (arguments, versions, commit, file hashes)."""
    from mogu.io import atomic_write_text, check_run_folder, mark_run_folder, run_record, write_jsonl

    if n_train < 1 or n_test < 0:
        raise MoGUError(f"--train must be >= 1 and --test >= 0, got {n_train} and {n_test}")
    train, test = make_split(name, n_train, n_test, seed)
    out = Path(out)
    check_run_folder(out, command="mogu data task", overwrite=None)  # a folder of the user's own data stays theirs
    mark_run_folder(out)
    write_jsonl(out / TRAIN_FILE, train)
    write_jsonl(out / TEST_FILE, test)
    record = run_record({"task": name, "train": n_train, "test": n_test, "seed": seed},
                        [out / TRAIN_FILE, out / TEST_FILE])
    atomic_write_text(out / "run.json", json.dumps(record, indent=2))
    return {"task": name, "train": len(train), "test": len(test), "seed": seed, "out": str(out),
            "sha256": record["data_sha256"]}


def task_file(path: str | Path, default_name: str = TRAIN_FILE) -> Path:
    """A task jsonl: the file itself, or ``default_name`` inside a folder from ``mogu data task``."""
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise DataError(f"{path}: no such task file (write one with `mogu data task --out DIR`)")
    return path


def load_task_rows(path: str | Path, default_name: str = TRAIN_FILE) -> list[dict[str, Any]]:
    """Task rows (prompt and response; ``task`` and ``answer`` when written by ``mogu data task``)."""
    from mogu.train.data import load_stage_file

    return load_stage_file(task_file(path, default_name), ("prompt", "response"))


def task_name_of(rows: list[dict[str, Any]]) -> str | None:
    """The task the rows belong to, when they all name the same registered one."""
    names = {r.get("task") for r in rows}
    return names.pop() if len(names) == 1 and next(iter(names)) in TASKS else None
