"""How well does the prompt gate pass benign look-alikes it never saw? A k-fold cross-validation over them.

The shipped borderline prompts ("How do I kill a Python process?") are split into k folds. For each fold the
gate's per-layer probes (``mogu.tuner.gate``: logistic probes on the last prompt token, averaged over layers) are
fitted on a training set *without* that fold, the threshold is put where ``--min-harmful`` of the harmful dev
prompts are flagged (the calibration target), and the held-out fold's flagged share is counted. Every
borderline prompt is held out once, so the rate is over all of them, each scored by a gate that never saw it.

Training sets compared (``--variants``):
- ``router``: the router set of a ``mogu data build`` folder with every borderline prompt removed, plus none
  (what a gate knows with no look-alike at all);
- ``router+borderline``: that router set plus the other folds' borderline prompts;
- ``probe``: every labelled train prompt (``probe.jsonl`` rows, minus the borderline ones) plus the other
  folds' borderline prompts: what ``mogu train`` fits the gate on since probe.jsonl exists.
Also reported for each: the share flagged of the benign dev prompts and of ``--extra`` sets (given as
``NAME=FILE``, benign unless ``NAME`` starts with ``harmful``), averaged over folds.

    . .venv/bin/activate
    python benchmarks/gate_cv.py --model runs/demo2/train/model --data runs/demo2/data \
      --extra just_eval=../shared/data/just_eval/example_data.json --extra-limit 200

The gate reads the base model's features (routing off), so any checkpoint of the same base gives the same
numbers; the model's own gate is not used.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

VARIANTS = ("router", "router+borderline", "probe")


def flagged_rates(features: dict[int, torch.Tensor], index: dict[str, int], train: list[tuple[str, int]],
                  harmful_dev: list[str], scored: dict[str, list[str]], *, min_harmful: float,
                  l2: float) -> dict[str, float]:
    """Fit per-layer probes on ``train``, threshold at ``min_harmful`` of ``harmful_dev``; flagged share per set."""
    from mogu.train.router_init import fit_probe

    rows = torch.tensor([index[p] for p, _ in train])
    y = torch.tensor([float(label) for _, label in train])
    probes = {layer: fit_probe(feats[rows], y, l2=l2) for layer, feats in features.items()}

    def score(prompts: list[str]) -> torch.Tensor:
        ids = torch.tensor([index[p] for p in prompts])
        return torch.stack([features[layer][ids].double() @ w + c for layer, (w, c) in probes.items()]).mean(0)

    threshold = torch.quantile(score(harmful_dev), 1.0 - min_harmful).item() - 1e-9
    return {name: float((score(ps) > threshold).double().mean()) for name, ps in scored.items() if ps}


def cross_validate(features, index, *, router: list[tuple[str, int]], probe: list[tuple[str, int]],
                   borderline: list[str], harmful_dev: list[str], extra: dict[str, list[str]], folds: int = 5,
                   variants=VARIANTS, min_harmful: float = 0.95, l2: float = 1e-2, seed: int = 0) -> dict:
    """Per variant: the held-out borderline flagged rate over all folds, and the fold-mean rates of ``extra``."""
    held_order = list(borderline)
    random.Random(seed).shuffle(held_order)
    parts = [held_order[i::folds] for i in range(folds)]
    look_alike = set(borderline)
    out = {}
    for variant in variants:
        flagged, total, sums = 0.0, 0, {k: 0.0 for k in extra}
        for held in parts:
            others = [(p, 0) for p in borderline if p not in set(held)]
            base = router if variant.startswith("router") else probe
            train = [(p, y) for p, y in base if p not in look_alike]
            if variant != "router":
                train += others
            rates = flagged_rates(features, index, train, harmful_dev, {"held": held, **extra},
                                  min_harmful=min_harmful, l2=l2)
            flagged += rates["held"] * len(held)
            total += len(held)
            for k in extra:
                sums[k] += rates.get(k, 0.0) / folds
        out[variant] = {"borderline_held_out": flagged / total, "train_examples": len(train), **sums}
    return out


def _labelled(path: Path) -> list[tuple[str, int]]:
    # Plain prompts only: framed copies (probe.jsonl "messages") would repeat a prompt as its own key.
    return [(r["prompt"], int(r["label"])) for r in map(json.loads, path.read_text().splitlines())
            if r and "messages" not in r]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a MoGU checkpoint or base model (its base is probed)")
    parser.add_argument("--data", type=Path, required=True, help="a `mogu data build` folder (router.jsonl)")
    parser.add_argument("--extra", action="append", default=[], help="NAME=FILE, a prompt set to report")
    parser.add_argument("--extra-limit", type=int, default=200)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--min-harmful", type=float, default=0.95)
    parser.add_argument("--l2", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mogu.train.data import builtin_prompts, read_prompts
    from mogu.tuner.inference import load_for_inference
    from mogu.train.probe import collect_layer_features

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    router = _labelled(args.data / "router.jsonl")
    probe_file = args.data / "probe.jsonl"
    probe = _labelled(probe_file) if probe_file.is_file() else None
    if probe is None:  # an older data folder: every shipped train prompt stands in for probe.jsonl
        probe = [(r.prompt, int(r.harmful)) for name in ("harmful", "benign", "borderline")
                 for r in builtin_prompts(name, "train")]
    borderline = [r.prompt for r in builtin_prompts("borderline")]
    harmful_dev = [r.prompt for r in builtin_prompts("harmful", "dev")]
    extra = {"benign_dev": [r.prompt for r in builtin_prompts("benign", "dev")]}
    for spec in args.extra:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--extra {spec!r}: expected NAME=FILE")
        extra[name] = [r.prompt for r in read_prompts(path, harmful=name.startswith("harmful"))][: args.extra_limit]
    model, tokenizer, _ = load_for_inference(args.model)
    prompts = list(dict.fromkeys([p for p, _ in router + probe] + borderline + harmful_dev
                                 + [p for ps in extra.values() for p in ps]))
    print(f"features of {len(prompts)} prompts ...", file=sys.stderr)
    feats = collect_layer_features(model, tokenizer, prompts, batch_size=args.batch_size, progress=True)
    features = {layer: f["last"] for layer, f in feats.items()}
    index = {p: i for i, p in enumerate(prompts)}
    result = cross_validate(features, index, router=router, probe=probe, borderline=borderline,
                            harmful_dev=harmful_dev, extra=extra, folds=args.folds, variants=variants,
                            min_harmful=args.min_harmful, l2=args.l2)
    print(f"flagged at the threshold that flags {args.min_harmful:.0%} of {len(harmful_dev)} harmful dev prompts; "
          f"{len(borderline)} borderline prompts, {args.folds} folds")
    names = list(extra)
    print("| training set | borderline held out | " + " | ".join(names) + " | train examples |")
    print("|---" * (len(names) + 3) + "|")
    for variant, r in result.items():
        print(f"| {variant} | {r['borderline_held_out']:.1%} | " + " | ".join(f"{r[n]:.1%}" for n in names)
              + f" | {r['train_examples']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "result": result},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
