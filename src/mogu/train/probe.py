"""Per-layer linear probes: which layers' routed-module inputs separate harmful from benign prompts.

``mogu probe`` (MoGU v2, §1). For every decoder layer, the input of the module MoGU routes (the
attention output projection: ``o_proj``, ``self_attention.dense``, ``attn.c_proj`` ...) is
collected on harmful and benign prompts with routing off, pooled two ways per prompt:

- ``last``: the last prompt token (the chat template's assistant header, where generation starts);
- ``mean``: the mean over the prompt's tokens (padding excluded).

A standardised, L2-regularised logistic regression is fitted per layer and pooling, and scored by
stratified k-fold held-out accuracy, balanced accuracy and AUROC. ``select_layers`` turns the report
into the layers a v2 model embeds routers in; ``DEFAULT_SELECTION`` is the one default rule.

Outputs (``ProbeReport.save``): ``probe.json`` (the report, readable by ``ProbeReport.load``) and
``probe.png`` (held-out accuracy by layer, one line per pooling, selected layers marked).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from mogu.errors import ConfigError, DataError, MoGUError
from mogu.tuner.features import probe_modules, stop_after
from mogu.tuner.families import resolve_target_modules
from mogu.io import atomic_write_text

POOLINGS = ("last", "mean")
METRICS = ("accuracy", "balanced_accuracy", "auroc")
PROBE_FILE = "probe.json"
PLOT_FILE = "probe.png"
PROBE_FORMAT = "mogu-probe"
PROBE_FORMAT_VERSION = 1

# The one default layer-selection rule (CLI, v2 config, ablations). Set by the §4 ablation.
DEFAULT_SELECTION: dict[str, Any] = {"pooling": "mean", "metric": "accuracy", "top_k": 4, "threshold": None}


# -- feature collection ----------------------------------------------------------------------

FEATURE_READS = ("module_input", "residual")


@torch.no_grad()
def collect_layer_features(model, tokenizer, prompts: Sequence[str], *, target_modules: list[str] | None = None,
                           batch_size: int = 16, progress: bool = False,
                           read: str = "module_input") -> dict[int, dict[str, torch.Tensor]]:
    """Per decoder layer, {"last": [N, d], "mean": [N, d]} float32 CPU inputs of the routed module
    (``read="module_input"``), or the residual stream each decoder layer outputs (``read="residual"``).

    ``model`` is a plain Hugging Face causal LM or a MoGUModel; a MoGUModel runs with routing
    ``off`` so that the features are the base model's. Prompts are rendered with the chat template
    and left-padded; position ids follow the attention mask (as in ``generate``), so a prompt's
    features do not depend on the batch it is in. The hooks are removed afterwards.
    """
    from mogu.tuner.model import MoGUModel
    from mogu.chat import context_length, render_prompt

    prompts = list(prompts)
    if not prompts:
        raise DataError("no prompts to collect probe features from")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    is_mogu = isinstance(model, MoGUModel)
    base = model.base_model if is_mogu else model
    if target_modules is None and is_mogu:
        target_modules = model.config.target_modules
    if read not in FEATURE_READS:
        raise ConfigError(f"read must be one of {', '.join(FEATURE_READS)}, got {read!r}")
    targets = resolve_target_modules(base, target_modules)
    modules = probe_modules(base, targets)
    if read == "residual":
        from mogu.train.sharding import decoder_layers

        blocks = decoder_layers(base)
        if len(blocks) < len(modules):
            raise ConfigError(f"found {len(blocks)} decoder layers for {len(modules)} routed modules")
        modules = {i: (f"layers.{i}", blocks[i]) for i in modules}

    feats: dict[int, dict[str, list[torch.Tensor]]] = {i: {p: [] for p in POOLINGS} for i in modules}
    mask_holder: dict[str, torch.Tensor] = {}

    def record(idx: int, x: torch.Tensor) -> None:
        x = x.detach().float()
        mask = mask_holder["mask"].to(device=x.device, dtype=x.dtype).unsqueeze(-1)  # [B, T, 1]
        # clone(): on CPU, .cpu() returns the same tensor, and a view of x[:, -1] would keep the whole
        # [B, T, d] activation alive (a run over ~2,300 long prompts grew past 22 GiB).
        feats[idx]["last"].append(x[:, -1].cpu().clone())
        feats[idx]["mean"].append(((x * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu())

    def input_hook(idx: int):
        def pre_hook(_module, args, kwargs=None):
            record(idx, args[0] if args else next(iter(kwargs.values())))
        return pre_hook

    def output_hook(idx: int):
        def forward_hook(_module, _args, output):
            record(idx, output[0] if isinstance(output, tuple) else output)
        return forward_hook

    device = next(base.parameters()).device
    limit = context_length(base)
    old_side = tokenizer.padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    handles = [m.register_forward_hook(output_hook(i)) if read == "residual"
               else m.register_forward_pre_hook(input_hook(i), with_kwargs=True) for i, (_, m) in modules.items()]
    routing = model.routing("off") if is_mogu else contextlib.nullcontext()
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="probe features", unit="batch")
    try:
        tokenizer.padding_side = "left"
        model.eval()
        # The pass ends after the deepest probed module (features.py: the LM head is not needed).
        with routing, stop_after(modules[max(modules)][1]) as run:
            for start in starts:
                texts = [render_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                attention_mask = enc["attention_mask"].to(device)
                if limit is not None and attention_mask.shape[1] > limit:
                    # Past the position table a model fails with an opaque index error, or reads garbage.
                    lengths = attention_mask.sum(1).tolist()
                    worst = max(range(len(lengths)), key=lengths.__getitem__)
                    raise DataError(f"prompt {start + worst} is {int(lengths[worst])} tokens with its chat "
                                    f"template, past the model's context of {limit}; shorten or drop it")
                if not bool(attention_mask[:, -1].all()):
                    raise MoGUError("the tokenizer did not left-pad the batch")
                mask_holder["mask"] = attention_mask
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                run(model, input_ids=enc["input_ids"].to(device), attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        tokenizer.padding_side = old_side
        model.train(was_training)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for idx, by_pool in feats.items():
        if len(by_pool["last"]) != len(starts):
            raise MoGUError(f"layer {idx}'s target module ran {len(by_pool['last'])} times for "
                            f"{len(starts)} batches; the probe expects one call per forward pass")
        out[idx] = {p: torch.cat(chunks) for p, chunks in by_pool.items()}
    return out


# -- the report ------------------------------------------------------------------------------
@dataclass
class ProbeReport:
    """Held-out probe scores per layer: ``layers[i] = {"layer": L, "last": {...}, "mean": {...}}``.

    Each pooling maps to ``accuracy``, ``accuracy_std``, ``balanced_accuracy``,
    ``balanced_accuracy_std``, ``auroc`` and ``auroc_std`` (mean and std over the folds).
    ``selection`` is the rule applied and the layers it picked (set by ``mogu probe``).
    """

    layers: list[dict[str, Any]]
    n_harmful: int
    n_benign: int
    folds: int
    seed: int
    model: str | None = None
    target_modules: list[str] | None = None
    dim: int | None = None
    C: float = 1.0
    selection: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- lookups ---------------------------------------------------------------------------
    @property
    def layer_indices(self) -> list[int]:
        return [int(row["layer"]) for row in self.layers]

    @property
    def chance(self) -> float:
        """Majority-class accuracy: what a probe that learnt nothing would score."""
        n = self.n_harmful + self.n_benign
        return max(self.n_harmful, self.n_benign) / n if n else float("nan")

    def scores(self, pooling: str = "mean", metric: str = "accuracy") -> dict[int, float]:
        _check_choice("pooling", pooling, POOLINGS)
        _check_choice("metric", metric, METRICS)
        return {int(row["layer"]): float(row[pooling][metric]) for row in self.layers}

    @property
    def selected_layers(self) -> list[int]:
        """The recorded selection, else the layers ``DEFAULT_SELECTION`` picks."""
        if self.selection and self.selection.get("layers") is not None:
            return [int(i) for i in self.selection["layers"]]
        return select_layers(self, **DEFAULT_SELECTION)

    def select(self, **rule: Any) -> list[int]:
        """Apply a selection rule (``DEFAULT_SELECTION`` for missing keys) and record it in ``selection``."""
        full = {**DEFAULT_SELECTION, **rule}
        layers = select_layers(self, **full)
        self.selection = {**full, "layers": layers}
        return layers

    # -- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": PROBE_FORMAT, "format_version": PROBE_FORMAT_VERSION, **asdict(self)}

    def save(self, directory: str | Path) -> Path:
        """Write ``probe.json`` (atomically) and ``probe.png`` into ``directory``; returns the json path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / PROBE_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")
        from mogu.extras import has_extra

        if has_extra("plots"):  # the plot is a view of probe.json; training must not need matplotlib
            self.plot(directory / PLOT_FILE)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ProbeReport":
        """Read ``probe.json`` (a file, or a folder holding one, e.g. a checkpoint's)."""
        path = Path(path)
        if path.is_dir():
            path = path / PROBE_FILE
        if not path.is_file():
            raise DataError(f"{path}: no such probe file (run `mogu probe` first)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object")
        if data.get("format", PROBE_FORMAT) != PROBE_FORMAT:
            raise DataError(f"{path}: not a probe report (format {data.get('format')!r})")
        version = data.get("format_version", PROBE_FORMAT_VERSION)
        if not isinstance(version, int) or version > PROBE_FORMAT_VERSION:
            raise DataError(f"{path}: probe format version {version!r} is newer than this mogu reads "
                            f"({PROBE_FORMAT_VERSION}); upgrade mogu")
        for key in ("layers", "n_harmful", "n_benign", "folds", "seed"):
            if key not in data:
                raise DataError(f"{path}: missing field {key!r}")
        layers = data["layers"]
        if not isinstance(layers, list) or not layers:
            raise DataError(f"{path}: 'layers' must be a non-empty list")
        for i, row in enumerate(layers):
            problem = _check_layer_row(row)
            if problem:
                raise DataError(f"{path}: layers[{i}] {problem}")
        for key in ("n_harmful", "n_benign", "folds", "seed"):
            if not isinstance(data[key], int) or isinstance(data[key], bool):
                raise DataError(f"{path}: {key!r} must be an integer")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        return cls(**kwargs)

    def to_markdown(self) -> str:
        selected = set(self.selected_layers)
        head = ["layer"] + [f"{p} {m}" for p in POOLINGS for m in ("accuracy", "auroc")] + ["selected"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.layers:
            cells = [str(row["layer"])]
            for p in POOLINGS:
                s = row[p]
                cells += [f"{s['accuracy']:.3f} ± {s['accuracy_std']:.3f}", f"{s['auroc']:.3f} ± {s['auroc_std']:.3f}"]
            cells.append("✓" if int(row["layer"]) in selected else "")
            lines.append("| " + " | ".join(cells) + " |")
        rule = self.selection or {**DEFAULT_SELECTION, "layers": sorted(selected)}
        lines += ["", f"{self.n_harmful} harmful / {self.n_benign} benign prompts, {self.folds}-fold held-out "
                  f"(seed {self.seed}); chance (majority class) accuracy {self.chance:.3f}.",
                  f"Selected layers {sorted(selected)}: {_describe_rule(rule)}."]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Held-out accuracy by layer (one line per pooling, ± std band), selected layers marked."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        xs = self.layer_indices
        rule = self.selection or DEFAULT_SELECTION
        selected = set(self.selected_layers)
        for pooling, color in zip(POOLINGS, ("tab:blue", "tab:orange")):
            acc = [row[pooling]["accuracy"] for row in self.layers]
            std = [row[pooling]["accuracy_std"] for row in self.layers]
            ax.plot(xs, acc, "-o", ms=3, color=color, label=f"{pooling} pooling")
            ax.fill_between(xs, [a - s for a, s in zip(acc, std)], [a + s for a, s in zip(acc, std)],
                            color=color, alpha=0.15, lw=0)
            if pooling == rule.get("pooling"):
                sel = [(x, a) for x, a in zip(xs, acc) if x in selected]
                if sel:
                    ax.scatter([x for x, _ in sel], [a for _, a in sel], s=110, marker="*", color="tab:red",
                               zorder=4, label="selected")
        ax.axhline(self.chance, ls="--", lw=1, color="tab:gray", label="chance (majority class)")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"held-out accuracy ({self.folds}-fold)")
        ax.set_ylim(min(0.45, self.chance - 0.05), 1.02)
        title = f"{self.model or 'model'}: {self.n_harmful} harmful / {self.n_benign} benign"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
        try:
            fig.savefig(tmp, dpi=120)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path


def _check_layer_row(row: Any) -> str | None:
    """What is wrong with one ``layers`` entry (None if fine); fills balanced accuracy in old reports."""
    if not isinstance(row, dict):
        return "is not an object"
    if not isinstance(row.get("layer"), int) or isinstance(row.get("layer"), bool):
        return "has no integer 'layer'"
    for p in POOLINGS:
        scores = row.get(p)
        if not isinstance(scores, dict):
            return f"has no {p!r} scores"
        for m in ("accuracy", "accuracy_std", "auroc", "auroc_std"):
            if not isinstance(scores.get(m), (int, float)) or isinstance(scores.get(m), bool):
                return f"{p}.{m} is missing or not a number"
        for m in ("balanced_accuracy", "balanced_accuracy_std"):
            if m not in scores:  # older or hand-written reports: fall back to plain accuracy
                scores[m] = scores[m.replace("balanced_", "")]
    return None


def _describe_rule(rule: dict[str, Any]) -> str:
    parts = [f"{rule['pooling']} pooling, {rule['metric']}"]
    if rule.get("threshold") is not None:
        parts.append(f">= {rule['threshold']}")
    if rule.get("top_k") is not None:
        parts.append(f"top {rule['top_k']}")
    return ", ".join(parts)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


# -- probing ---------------------------------------------------------------------------------
def probe_layers(features: dict[int, dict[str, torch.Tensor]], labels: Sequence[int] | torch.Tensor, *,
                 folds: int = 5, seed: int = 0, C: float = 1.0, progress: bool = False,
                 model: str | None = None, target_modules: list[str] | None = None) -> ProbeReport:
    """Stratified ``folds``-fold held-out scores of a standardised L2 logistic regression per layer and pooling.

    ``labels``: 1 (or True) for harmful, 0 for benign, one per feature row. ``C`` is the inverse
    L2 strength (scikit-learn's). Fold assignment depends only on ``seed`` and the labels, so every
    layer and pooling is scored on the same splits.
    """
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not features:
        raise DataError("no layer features to probe")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds must be an integer >= 2, got {folds!r}")
    if not (isinstance(C, (int, float)) and C > 0 and math.isfinite(C)):
        raise ConfigError(f"C must be a positive number, got {C!r}")
    y = np.asarray(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else list(labels)).astype(float)
    if y.ndim != 1 or not np.isin(y, (0.0, 1.0)).all():
        raise DataError("labels must be a flat sequence of 0 (benign) and 1 (harmful)")
    y = y.astype(int)
    n_harmful, n_benign = int(y.sum()), int(len(y) - y.sum())
    if n_harmful == 0 or n_benign == 0:
        raise DataError(f"the probe needs both classes; got {n_harmful} harmful and {n_benign} benign prompts")
    if min(n_harmful, n_benign) < folds:
        raise DataError(f"{folds}-fold probing needs at least {folds} prompts per class; got {n_harmful} harmful "
                        f"and {n_benign} benign (lower --folds or give more prompts)")

    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    rows: list[dict[str, Any]] = []
    dim = None
    items = sorted(features.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="probing layers", unit="layer")
    for layer, by_pool in items:
        row: dict[str, Any] = {"layer": int(layer)}
        for pooling in POOLINGS:
            if pooling not in by_pool:
                raise DataError(f"layer {layer}: no {pooling!r} features")
            x = by_pool[pooling]
            x = (x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32))
            if x.ndim != 2 or x.shape[0] != len(y):
                raise DataError(f"layer {layer} {pooling}: features of shape {tuple(x.shape)} do not match "
                                f"{len(y)} labels (expected [N, d])")
            if not np.isfinite(x).all():
                raise MoGUError(f"layer {layer} {pooling}: features contain NaN or inf (try a float32 model)")
            dim = int(x.shape[1])
            acc, bal, auc = [], [], []
            for train, test in splits:
                clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    clf.fit(x[train], y[train])
                pred = clf.predict(x[test])
                score = clf.decision_function(x[test])
                acc.append(float((pred == y[test]).mean()))
                # Mean per-class recall (sklearn's balanced_accuracy_score, without its validation overhead).
                bal.append(float(np.mean([(pred[y[test] == k] == k).mean() for k in (0, 1)])))
                auc.append(float(roc_auc_score(y[test], score)))
            row[pooling] = {"accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
                            "balanced_accuracy": float(np.mean(bal)), "balanced_accuracy_std": float(np.std(bal)),
                            "auroc": float(np.mean(auc)), "auroc_std": float(np.std(auc))}
        rows.append(row)
    return ProbeReport(layers=rows, n_harmful=n_harmful, n_benign=n_benign, folds=folds, seed=seed, model=model,
                       target_modules=list(target_modules) if target_modules else None, dim=dim, C=float(C))


# -- selection -------------------------------------------------------------------------------
def select_layers(report: ProbeReport, *, pooling: str = DEFAULT_SELECTION["pooling"],
                  metric: str = DEFAULT_SELECTION["metric"], top_k: int | None = None,
                  threshold: float | None = None) -> list[int]:
    """Layers to embed routers in, sorted ascending.

    ``threshold``: layers whose ``metric`` (under ``pooling``) is >= it. ``top_k``: the k best
    (ties go to the lower layer index). Both: the top k among those passing the threshold. If the
    threshold leaves no layer, the single best layer is returned with a warning. At least one of
    ``top_k`` and ``threshold`` must be given.
    """
    _check_choice("pooling", pooling, POOLINGS)
    _check_choice("metric", metric, METRICS)
    if top_k is None and threshold is None:
        raise ConfigError("select layers by top_k and/or threshold (both are None)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must be a number in [0, 1], got {threshold!r}")
    scores = report.scores(pooling, metric)
    if not scores:
        raise DataError("the probe report has no layers")
    # Best first; ties go to the lower layer; NaN scores rank last.
    ranked = sorted(scores, key=lambda i: (-(scores[i] if math.isfinite(scores[i]) else -math.inf), i))
    if threshold is not None:
        passing = [i for i in ranked if math.isfinite(scores[i]) and scores[i] >= threshold]
        if not passing:
            best = ranked[0]
            warnings.warn(f"no layer reaches {metric} >= {threshold} ({pooling} pooling; best is layer {best} "
                          f"at {scores[best]:.3f}); falling back to that single best layer", UserWarning,
                          stacklevel=2)
            return [best]
        ranked = passing
    if top_k is not None:
        ranked = ranked[:top_k]
    return sorted(ranked)


# -- one call for the CLI and scripts ----------------------------------------------------------
def subsample(prompts: Sequence[str], limit: int | None, seed: int) -> list[str]:
    """A seeded sample of at most ``limit`` prompts, in their original order (all of them if None)."""
    import random

    prompts = list(prompts)
    if limit is None or len(prompts) <= limit:
        return prompts
    if limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[i] for i in keep]


def run_probe(model, tokenizer, harmful: Sequence[str], benign: Sequence[str], *, folds: int = 5, seed: int = 0,
              limit: int | None = None, batch_size: int = 16, target_modules: list[str] | None = None,
              C: float = 1.0, model_id: str | None = None, selection: dict[str, Any] | None = None,
              progress: bool = False) -> ProbeReport:
    """Collect features on ``harmful`` and ``benign`` prompts, probe every layer, apply a selection rule.

    ``limit`` caps each class (seeded sample). ``selection`` is a partial rule (missing keys from
    ``DEFAULT_SELECTION``); the result is recorded in ``report.selection``.
    """
    from mogu.tuner.model import MoGUModel

    harmful = subsample(harmful, limit, seed)
    benign = subsample(benign, limit, seed + 1)
    if not harmful or not benign:
        raise DataError(f"the probe needs both classes; got {len(harmful)} harmful and {len(benign)} benign prompts")
    # Check the class sizes before the (slow) forward passes.
    if min(len(harmful), len(benign)) < folds:
        raise DataError(f"{folds}-fold probing needs at least {folds} prompts per class; got {len(harmful)} harmful "
                        f"and {len(benign)} benign (lower --folds or give more prompts)")
    features = collect_layer_features(model, tokenizer, list(harmful) + list(benign), target_modules=target_modules,
                                      batch_size=batch_size, progress=progress)
    base = model.base_model if isinstance(model, MoGUModel) else model
    if target_modules is None and isinstance(model, MoGUModel):
        target_modules = model.config.target_modules
    targets = resolve_target_modules(base, target_modules)
    if model_id is None:
        model_id = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    labels = [1] * len(harmful) + [0] * len(benign)
    report = probe_layers(features, labels, folds=folds, seed=seed, C=C, progress=progress, model=model_id,
                          target_modules=targets)
    report.select(**(selection or {}))
    return report


@torch.no_grad()
def fit_gate(model, prompts: Sequence[str], labels: Sequence[int], *, batch_size: int = 16, l2: float = 1e-3,
             progress: bool = False) -> dict[str, float]:
    """Fit every layer's probe on the prompts (label 1 harmful, 0 benign); returns training accuracies.

    The threshold is reset to 0 (the balanced probes' decision boundary); calibration moves it.
    """
    from mogu.train.router_init import fit_probe

    strategy = getattr(model, "routing_strategy", None)
    if strategy is None or strategy.name != "prompt":
        raise MoGUError("fit_gate needs a model with router_type='prompt'")
    gate = strategy.gate
    prompts, y = list(prompts), torch.tensor([float(v) for v in labels])
    if len(prompts) != len(y):
        raise MoGUError(f"fit_gate: {len(prompts)} prompts but {len(y)} labels")
    if not (y > 0.5).any() or not (y <= 0.5).any():
        raise MoGUError("fit_gate needs both harmful (1) and benign (0) prompts")
    feats = collect_layer_features(model, model.tokenizer, prompts, batch_size=batch_size, progress=progress)
    probes = {i: fit_probe(feats[i]["last"], y, l2=l2) for i in gate.layers}
    gate.set_probes(probes)
    gate.threshold.zero_()
    scores = gate.score({i: feats[i]["last"].to(gate.weight.device) for i in gate.layers}).cpu()
    flagged = scores > 0
    per_layer = [float((((feats[i]["last"].double() @ w + c) > 0) == (y > 0.5)).double().mean())
                 for i, (w, c) in probes.items()]
    return {"accuracy": float((flagged == (y > 0.5)).double().mean()),
            "layer_accuracy_min": min(per_layer), "layer_accuracy_mean": sum(per_layer) / len(per_layer),
            "examples": len(prompts)}
