"""The generated model card (README.md) of a MoGU checkpoint.

It opens with the YAML metadata header the Hugging Face Hub reads (library, base model, tags,
license) and carries the config, the base model, the training-data hashes (from the ``run.json``
that ``mogu train`` writes beside or above the checkpoint) and the eval results (a ``mogu eval``
``metrics.json``) when they exist. The recorded part sits between two HTML comments so that
``refresh_card`` can update it (e.g. before ``push_to_hub``) and keep everything else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

RECORDS_START = "<!-- mogu:records -->"
RECORDS_END = "<!-- /mogu:records -->"
RUN_RECORD = "run.json"
METRICS_FILE = "metrics.json"
TAGS = ("mogu", "lora", "peft", "safety")
_HEADER = re.compile(r"\A---\n.*?\n---\n", re.S)


def model_card(model, extra: str | None = None, *, directory: str | Path | None = None,
               run: dict | None = None, metrics: dict | None = None, license: str | None = None) -> str:
    """The card for ``model``; ``directory`` (where it is saved) is searched for run.json / metrics.json."""
    run = run if run is not None else find_run_record(directory)
    metrics = metrics if metrics is not None else find_metrics(directory)
    return render_card(model.config, model.num_added_parameters(), extra=extra, run=run, metrics=metrics,
                       license=license)


def render_card(config, num_params: int | None, *, extra: str | None = None, run: dict | None = None,
                metrics: dict | None = None, license: str | None = None) -> str:
    base = config.base_model_name_or_path or "unknown"
    layers = "all" if config.routed_layers is None else ", ".join(map(str, config.routed_layers))
    params = f"{num_params:,}" if num_params is not None else "?"
    from mogu.tuner.routing import strategy_class

    strategy = strategy_class(config.router_type)
    router = strategy.description
    body = f"""
# MoGU model on `{base}`

A [MoGU](https://arxiv.org/abs/2405.14488) safety wrapper made with `mogu`: two LoRA experts
(glad: answers; unwill: refuses) on `{', '.join(config.target_modules or [])}` and {router}.

| setting | value |
|---|---|
| version | {config.version} |
| routed layers | {layers} |
| LoRA r / alpha / dropout | {config.r} / {config.lora_alpha} / {config.lora_dropout} |
| router | {strategy.card_setting(config)} |
| routed generated tokens (m) | {config.route_tokens if config.route_tokens is not None else 'all'} |
| added parameters | {params} |

## Use

```python
from mogu import MoGUModel
model = MoGUModel.from_pretrained("path/to/this/folder")
```

`glad/` and `unwill/` are standard PEFT LoRA adapters (`PeftModel.from_pretrained(base, "glad")`).
"""
    return card_header(config, license) + body + "\n" + records_section(config, run, metrics) + "\n" + \
        (f"\n{extra}\n" if extra else "")


def card_header(config, license: str | None = None) -> str:
    lines = ["---", "library_name: mogu"]
    base = config.base_model_name_or_path or ""
    if _is_hub_id(base):
        lines += [f"base_model: {base}", "base_model_relation: adapter"]
    if license:
        lines.append(f"license: {_yaml_scalar(license)}")
    lines += ["pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in TAGS] + ["---"]
    return "\n".join(lines) + "\n"


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith((".", "/")) \
        and not Path(name).exists()


def _yaml_scalar(value: str) -> str:
    return value if re.fullmatch(r"[\w.-]+", value) else json.dumps(value)


def records_section(config, run: dict | None, metrics: dict | None, keep: dict[str, str] | None = None) -> str:
    """The recorded part of the card; ``keep`` holds old sub-sections to reuse when there is no new data."""
    keep = keep or {}
    sections = {"Base model": _base_section(config)}
    data = _data_section(run) or keep.get("Training data")
    if data:
        sections["Training data"] = data
    evaluation = _metrics_table(metrics) if metrics and metrics.get("summary") else keep.get("Evaluation")
    if evaluation:
        sections["Evaluation"] = evaluation
    sections["Configuration"] = "```json\n" + config.to_json() + "\n```"
    body = "\n\n".join(f"## {title}\n\n{text.strip()}" for title, text in sections.items())
    return f"{RECORDS_START}\n{body}\n{RECORDS_END}\n"


def _base_section(config) -> str:
    base = config.base_model_name_or_path or "unknown"
    details = [f"model type `{config.base_model_type}`" if config.base_model_type else None,
               f"hidden size {config.base_hidden_size}" if config.base_hidden_size else None,
               f"revision `{config.base_model_revision}`" if config.base_model_revision else None]
    details = [d for d in details if d]
    return f"`{base}`" + (f" ({', '.join(details)})" if details else "") + "."


def _data_section(run: dict | None) -> str | None:
    hashes = (run or {}).get("data_sha256") or {}
    if not isinstance(hashes, dict) or not hashes:
        return None
    lines = ["| file | sha256 |", "|---|---|"] + [f"| `{Path(f).name}` | `{h}` |" for f, h in hashes.items()]
    versions = run.get("versions") or {}
    made = [f"mogu {versions['mogu']}" if versions.get("mogu") else None,
            f"commit `{run['git_commit']}`" if run.get("git_commit") else None,
            f"torch {versions['torch']}" if versions.get("torch") else None,
            f"transformers {versions['transformers']}" if versions.get("transformers") else None,
            run.get("time")]
    made = [m for m in made if m]
    if made:
        lines += ["", "Trained with " + ", ".join(made) + "."]
    return "\n".join(lines)


def _subsections(section: str) -> dict[str, str]:
    """{title: body} of the ``## `` sub-sections of an old recorded section."""
    out = {}
    for chunk in re.split(r"^## ", section, flags=re.M)[1:]:
        title, _, body = chunk.partition("\n")
        out[title.strip()] = body.replace(RECORDS_END, "").strip()
    return out


def _rate(cell: Any) -> str:
    if not isinstance(cell, dict) or cell.get("rate") is None:
        return "–"
    text = f"{cell['rate']:.0%} ({cell.get('k')}/{cell.get('n')}"
    ci = cell.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        text += f", 95% CI {ci[0]:.0%}–{ci[1]:.0%}"
    return text + ")"


def _metrics_table(metrics: dict) -> str:
    rows = ["Refusal rates from `mogu eval`" + (f" (judge: {metrics['judge']['name']})"
                                                 if isinstance(metrics.get("judge"), dict) else "") + ".", "",
            "| defense | harmful prompts refused | benign prompts refused | usability |", "|---|---|---|---|"]
    for defense, s in metrics["summary"].items():
        usability = s.get("usability") if isinstance(s, dict) else None
        rows.append(f"| {defense} | {_rate(s.get('harmful_refusal'))} | {_rate(s.get('benign_refusal'))} | "
                    f"{f'{usability:.2f}' if isinstance(usability, (int, float)) else '–'} |")
    cells = metrics.get("cells")
    if isinstance(cells, dict) and cells:
        benches = list(dict.fromkeys(b for per in cells.values() if isinstance(per, dict) for b in per))
        rows += ["", "| defense | " + " | ".join(benches) + " |", "|---|" + "---|" * len(benches)]
        for defense, per in cells.items():
            rows.append(f"| {defense} | " + " | ".join(_rate((per.get(b) or {}).get("refusal")) for b in benches) + " |")
    return "\n".join(rows)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _candidates(directory: str | Path | None, name: str) -> list[Path]:
    if directory is None:
        return []
    directory = Path(directory)
    return [directory / name, directory.parent / name]


def find_run_record(directory: str | Path | None) -> dict | None:
    """The run record (``mogu.io.run_record``) in ``directory`` or its parent, if one is there."""
    for path in _candidates(directory, RUN_RECORD):
        data = _read_json(path) if path.is_file() else None
        if data and "data_sha256" in data:
            return data
    return None


def find_metrics(directory: str | Path | None) -> dict | None:
    """A ``mogu eval`` metrics.json in ``directory`` or its parent, if one is there."""
    for path in _candidates(directory, METRICS_FILE):
        data = load_metrics(path) if path.is_file() else None
        if data:
            return data
    return None


def load_metrics(source: str | Path | dict) -> dict | None:
    """A metrics dict from a dict, a metrics.json, or a folder holding one (None if it is not one)."""
    if isinstance(source, dict):
        return source if isinstance(source.get("summary"), dict) else None
    path = Path(source)
    if path.is_dir():
        path = path / METRICS_FILE
    data = _read_json(path) if path.is_file() else None
    return data if data and isinstance(data.get("summary"), dict) else None


def folder_card(directory: str | Path, *, extra: str | None = None, run: dict | None = None,
                metrics: dict | None = None, license: str | None = None) -> str:
    """A card for a saved checkpoint folder, without loading the base model."""
    from mogu.tuner.checkpoint import read_config

    directory = Path(directory)
    config = read_config(directory)
    run = run if run is not None else find_run_record(directory)
    metrics = metrics if metrics is not None else find_metrics(directory)
    return render_card(config, _count_parameters(directory), extra=extra, run=run, metrics=metrics, license=license)


def _count_parameters(directory: Path) -> int | None:
    from safetensors import safe_open

    total = 0
    for path in (directory / "glad" / "adapter_model.safetensors", directory / "unwill" / "adapter_model.safetensors",
                 directory / "router.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    n = 1
                    for dim in f.get_slice(key).get_shape():
                        n *= dim
                    total += n
        except Exception:  # noqa: BLE001 - a card never fails a save or a push
            return None
    return total


def refresh_card(directory: str | Path, *, metrics: str | Path | dict | None = None, run: dict | None = None,
                 license: str | None = None) -> Path:
    """Rewrite the header and the recorded section of ``directory/README.md``; keep the rest.

    Old training-data and evaluation sub-sections stay when nothing newer is found or given.
    """
    from mogu.errors import MoGUError
    from mogu.io import atomic_write_text
    from mogu.tuner.checkpoint import read_config

    directory = Path(directory)
    path = directory / "README.md"
    if metrics is not None:
        loaded = load_metrics(metrics)
        if loaded is None:
            raise MoGUError(f"{metrics}: not a mogu eval metrics.json (no 'summary')")
        metrics = loaded
    if not path.is_file():
        atomic_write_text(path, folder_card(directory, run=run, metrics=metrics, license=license))
        return path
    text = path.read_text()
    config = read_config(directory)
    run = run if run is not None else find_run_record(directory)
    metrics = metrics if metrics is not None else find_metrics(directory)
    header_match = _HEADER.match(text)
    old_license = re.search(r"^license:\s*(.+)$", header_match.group(0), re.M) if header_match else None
    header = card_header(config, license or (old_license.group(1).strip().strip('"') if old_license else None))
    text = text[header_match.end():] if header_match else "\n" + text
    start, end = text.find(RECORDS_START), text.find(RECORDS_END)
    if start != -1 and end > start:
        keep = _subsections(text[start + len(RECORDS_START):end])
        section = records_section(config, run, metrics, keep)
        text = text[:start] + section.rstrip("\n") + text[end + len(RECORDS_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + records_section(config, run, metrics)
    atomic_write_text(path, header + text)
    return path
