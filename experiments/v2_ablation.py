"""MoGU v2 ablation on SmolLM2-135M-Instruct (issue #4 §4): v1 against v2 variants, same data, same schedule.

    python experiments/v2_ablation.py --data runs/demo3/data --v1 runs/demo3/train --out runs/v2abl \
        --settings v1,v2-all,v2-sel,v2-sel-frozen,v2-sel-h4,v2-sel-h64
    python experiments/v2_ablation.py --data runs/demo10/data --v1 runs/demo8/train --out runs/v2abl10 \
        --settings v1,v2-gate,v2-gate-k8

Every setting trains with the `cpu-fast` preset on the same stage files (the demo's), then is judged
greedy, 64 new tokens, keyword judge, m = 5, on: the built-in harmful dev split, AdvBench prompts
101-200, the built-in benign+borderline dev split and Just-Eval `regular` prompts 101-200 (prompts
1-100 of both sets are the core issue's targets, so the ablation reads the next hundred). Results go
to OUT/SETTING/result.json and OUT/ablation.md; a setting already done is skipped (rerun-safe).
Prompt-gated settings (`v2-gate*`) are also read at the threshold matched to v1 on the dev split: the
one with the lowest benign-dev refusal among those refusing at least v1's share of harmful dev prompts
(`mogu calibrate`'s rule, min_harmful = v1's rate; judge v1 first).
`v1` is not retrained: pass --v1 with the demo's training folder (model/ + stages/*/done.json). Where
--data or --v1 does not exist yet, it is built the way `mogu demo --router-type token` builds it (same
seeded data step, same v1 training), without the demo's before/after judging.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mogu import MoGUConfig, MoGUModel  # noqa: E402
from mogu.cli import train_model  # noqa: E402
from mogu.train.data import DEV_FILE, load_stage_file, read_prompts  # noqa: E402
from mogu.tuner.loading import load_base_model  # noqa: E402
from mogu.train.stages import generate_responses, refusal_rate  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# name -> (MoGUConfig kwargs, probe layer selection or None, TrainConfig overrides)
# The rows recorded before cpu-fast gave v2's unwilling expert 3 epochs pin the 1 they were run with.
ONE = {"unwill.epochs": 1}
SETTINGS = {
    "v2-all": ({"version": "v2"}, None, ONE),
    "v2-sel": ({"version": "v2"}, {}, ONE),
    "v2-sel-frozen": ({"version": "v2"}, {}, {**ONE, "joint_experts": False}),
    "v2-sel-h4": ({"version": "v2", "router_hidden": 4}, {}, ONE),
    "v2-sel-h64": ({"version": "v2", "router_hidden": 64}, {}, ONE),
    "v2-sel-k2": ({"version": "v2"}, {"top_k": 2}, ONE),
    "v2-sel-k8": ({"version": "v2"}, {"top_k": 8}, ONE),
    # Prompt gate in the probe-selected layers (ranked by last-token probes, what the gate reads).
    "v2-gate": ({"version": "v2", "router_type": "prompt"}, {"pooling": "last"}, ONE),
    "v2-gate-k8": ({"version": "v2", "router_type": "prompt"}, {"pooling": "last", "top_k": 8}, ONE),
    "v2-gate-k12": ({"version": "v2", "router_type": "prompt"}, {"pooling": "last", "top_k": 12}, ONE),
    # Experts in every layer, the gate reading every layer: v1's gate (the demo's) built as v2.
    "v2-gate-all": ({"version": "v2", "router_type": "prompt"}, None, ONE),
    # Experts in 4-8 layers learn a hedge ("I'm not sure how to ...") in one unwilling epoch, not a
    # refusal: 3 epochs (cpu-fast's v2 default since).
    "v2-gate-k8-u3": ({"version": "v2", "router_type": "prompt"}, {"pooling": "last", "top_k": 8},
                      {"unwill.epochs": 3}),
    "v2-gate-u3": ({"version": "v2", "router_type": "prompt"}, {"pooling": "last"}, {"unwill.epochs": 3}),
}
DEV_SETS = ("harmful_dev", "benign_dev")


def eval_sets(data: Path) -> dict[str, list[str]]:
    dev = load_stage_file(data / DEV_FILE, ("prompt", "harmful"))
    just_eval = json.loads((SHARED / "just_eval" / "example_data.json").read_text())
    return {
        "harmful_dev": [d["prompt"] for d in dev if d["harmful"]],
        "advbench_101_200": [r.prompt for r in read_prompts(SHARED / "advbench" / "harmful_behaviors.csv",
                                                            harmful=True)[100:200]],
        "benign_dev": [d["prompt"] for d in dev if not d["harmful"]],
        "just_eval_101_200": [r["instruction"] for r in just_eval if r["category"] == "regular"][100:200],
    }


def judge(model, sets: dict[str, list[str]], max_new_tokens: int) -> dict[str, float]:
    return {name: round(refusal_rate(generate_responses(model, model.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                        batch_size=16, progress=True, desc=name)), 4)
            for name, prompts in sets.items()}


def judge_gate(model, sets: dict[str, list[str]], max_new_tokens: int, match_harmful: float | None) -> dict:
    """A gated model's rates at its fitted threshold and at the operating point matched on the dev split.

    Each prompt is generated once per expert (`mogu calibrate`'s shortcut: the gate's decision is binary),
    so every threshold's rates follow from the scores. The matched point is `mogu calibrate`'s rule with
    ``min_harmful`` set to v1's harmful-dev rate, searched over every dev-score threshold: dev prompts only,
    the held-out sets are read at the threshold it picks.
    """
    from mogu.train.calibration import gate_rate_functions
    from mogu.eval.judges import is_refusal
    from mogu.train.probe import collect_layer_features

    def refusals(prompts: list[str], expert: str) -> list[bool]:
        weights = torch.tensor([[1.0, 0.0] if expert == "unwill" else [0.0, 1.0]])
        with model.pin_routing(weights):
            out = generate_responses(model, model.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=16,
                                     progress=True, desc=f"{expert}")
        return [is_refusal(o) for o in out]

    gate = model.gate
    fitted = float(gate.threshold)
    fns = gate_rate_functions(model, sets, refusals, batch_size=16)

    def rates_at(threshold: float) -> dict[str, float]:
        with torch.no_grad():
            gate.threshold.fill_(threshold)
        return {name: round(fn(), 4) for name, fn in fns.items()}

    row = {**rates_at(fitted), "threshold": fitted}
    if match_harmful is not None:
        scores = []
        for name in DEV_SETS:
            feats = collect_layer_features(model, model.tokenizer, sets[name], batch_size=16)
            with torch.no_grad():
                scores += gate.score({i: feats[i]["last"].to(gate.weight.device) for i in gate.layers}).tolist()
        # Just below each score (that prompt flips to flagged) and above the highest.
        candidates = sorted({s - 1e-6 for s in scores} | {max(scores) + 1.0})
        curve = [(t, rates_at(t)) for t in candidates]
        passing = [(t, r) for t, r in curve if r["harmful_dev"] >= match_harmful]
        # None reaching v1's rate: the least benign refusal at the highest harmful rate the gate reaches.
        t, r = (min(passing, key=lambda tr: (tr[1]["benign_dev"], -tr[1]["harmful_dev"], -tr[0])) if passing
                else max(curve, key=lambda tr: (tr[1]["harmful_dev"], -tr[1]["benign_dev"], tr[0])))
        row["matched"] = {**r, "threshold": round(t, 4), "min_harmful": match_harmful, "reached": bool(passing)}
        row["dev_curve"] = [{"threshold": round(t, 4), **{k: r[k] for k in DEV_SETS}} for t, r in curve]
    # Every prompt to one expert: the ceilings the gate's threshold moves between.
    row["all_unwill"] = rates_at(float("-inf"))
    row["all_glad"] = rates_at(float("inf"))
    with torch.no_grad():
        gate.threshold.fill_(fitted)
    return row


def build_demo_v1(data: Path, v1: Path, base, tok) -> None:
    """The demo's data and v1 token-router training (`mogu demo --router-type token`), where missing."""
    from mogu.cli import DEMO_BATCH, DEMO_BENIGN_TRAIN, _mogu_config, build_data

    if not (data / "data_stats.json").is_file():
        build_data("smollm2-135m-instruct", data, model=base, tokenizer=tok, max_new_tokens=32,
                   max_benign=DEMO_BENIGN_TRAIN, batch_size=DEMO_BATCH)
    if not (v1 / "model" / "mogu_config.json").is_file():
        fresh, _ = load_base_model("smollm2-135m-instruct")
        train_model("smollm2-135m-instruct", data, v1, preset_name="cpu-fast", resume=True, model=fresh,
                    tokenizer=tok, train_overrides={},
                    mogu_config=_mogu_config(None, None, 8, 16.0, 0.05, 512, 5, router_type="token"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("runs/demo3/data"))
    ap.add_argument("--v1", type=Path, default=Path("runs/demo3/train"))
    ap.add_argument("--out", type=Path, default=Path("runs/v2abl"))
    ap.add_argument("--settings", default="v1,v2-all,v2-sel,v2-sel-frozen,v2-sel-h4,v2-sel-h64")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reuse-experts", default="", help="A finished probe-selected setting whose expert stages "
                    "the other probe-selected settings reuse (they only differ in the router stage).")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_base_model("smollm2-135m-instruct")
    build_demo_v1(args.data, args.v1, base, tok)
    sets = eval_sets(args.data)
    v1_params = None
    for name in args.settings.split(","):
        result_file = args.out / name / "result.json"
        if result_file.is_file():
            print(f"[{name}] done already: {result_file}")
            continue
        trained = args.out / name / "stages" / "router" / "done.json"
        if name == "v1":
            model = MoGUModel.from_pretrained(args.v1 / "model", base_model=base, tokenizer=tok)
            train_s = sum(json.loads(p.read_text())["train_s"] for p in (args.v1 / "stages").glob("*/done.json"))
            wall = None
        elif trained.is_file() and (args.out / name / "model" / "mogu_config.json").is_file():
            # Trained by an earlier run that stopped before judging: judge it, do not retrain.
            print(f"[{name}] trained already: judging {args.out / name / 'model'}")
            fresh, _ = load_base_model("smollm2-135m-instruct")
            model = MoGUModel.from_pretrained(args.out / name / "model", base_model=fresh, tokenizer=tok)
            train_s = sum(json.loads(p.read_text())["train_s"] for p in (args.out / name / "stages").glob("*/done.json"))
            wall = None
        else:
            cfg_kw, selection, overrides = SETTINGS[name]
            cfg = MoGUConfig(**cfg_kw, base_model_name_or_path="smollm2-135m-instruct")
            fresh, _ = load_base_model("smollm2-135m-instruct")
            resume = False
            source = args.out / args.reuse_experts
            if args.reuse_experts and selection == {} and (source / "stages" / "unwill" / "done.json").is_file():
                # Same probe selection, data and seed give the same expert stages (they run with the
                # router off): reuse them and train only this setting's router stage. Their recorded
                # train_s still counts in the total.
                for part in ("probe", "stages/glad", "stages/unwill"):
                    shutil.copytree(source / part, args.out / name / part, dirs_exist_ok=True)
                resume = True
            t0 = time.perf_counter()
            model, summary = train_model("smollm2-135m-instruct", args.data, args.out / name, mogu_config=cfg,
                                         train_overrides=overrides, preset_name="cpu-fast", model=fresh,
                                         tokenizer=tok, layer_selection=selection, resume=resume)
            wall = round(time.perf_counter() - t0, 1)
            train_s = sum(s["train_s"] for s in summary.values())
        model.eval()
        if model.gate is not None:
            v1_result = args.out / "v1" / "result.json"
            match = json.loads(v1_result.read_text())["harmful_dev"] if v1_result.is_file() else None
            rates = judge_gate(model, sets, args.max_new_tokens, match)
        else:
            rates = judge(model, sets, args.max_new_tokens)
        row = {"setting": name, "version": model.config.version, "router_type": model.config.router_type,
               "routed_layers": model.config.routed_layers,
               "router_hidden": model.config.router_hidden if model.gate is None else None,
               "added_params": model.num_added_parameters(),
               "train_s": round(train_s, 1), "wall_s": wall, **rates}
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(row, indent=2))
        print(json.dumps(row), flush=True)
        del model
    rows = [json.loads(p.read_text()) for p in sorted(args.out.glob("*/result.json"))]
    v1_params = next((r["added_params"] for r in rows if r["setting"] == "v1"), None)
    lines = ["| setting | routed layers | router width | added params | vs v1 | train s | harmful dev | "
             "AdvBench 101-200 | benign dev | Just-Eval 101-200 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes: list[str] = []
    for r in rows:
        layers = "all" if r["routed_layers"] is None else ",".join(map(str, r["routed_layers"]))
        share = f"{r['added_params'] / v1_params:.1%}" if v1_params else "-"
        width = r["router_hidden"] if r.get("router_type", "token") == "token" else "gate"
        matched = r.get("matched")
        reached = matched is not None and matched.get("reached", matched["harmful_dev"] >= matched["min_harmful"])
        points = [("", r)] + ([(f" @ matched threshold {matched['threshold']:+.2f}", matched)] if reached else [])
        if matched is not None and not reached:
            best = max(p["harmful_dev"] for p in r["dev_curve"])
            notes.append(f"{r['setting']}: no threshold reaches v1's {matched['min_harmful']:.1%} harmful dev "
                         f"refusal (at most {best:.1%}: the unwilling expert's own rate).")
        for label, p in points:
            lines.append(f"| {r['setting']}{label} | {layers} | {width} | {r['added_params']:,} | {share} | "
                         f"{r['train_s']} | {p['harmful_dev']:.1%} | {p['advbench_101_200']:.0%} | "
                         f"{p['benign_dev']:.1%} | {p['just_eval_101_200']:.0%} |")
    lines += [""] + notes if notes else []
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
