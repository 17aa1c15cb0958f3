"""MoGU v2 ablation on SmolLM2-135M-Instruct (issue #4 §4): v1 against v2 variants, same data, same schedule.

    python experiments/v2_ablation.py --data runs/demo3/data --v1 runs/demo3/train --out runs/v2abl \
        --settings v1,v2-all,v2-sel,v2-sel-frozen,v2-sel-h4,v2-sel-h64

Every setting trains with the `cpu-fast` preset on the same stage files (the demo's), then is judged
greedy, 64 new tokens, keyword judge, m = 5, on: the built-in harmful dev split, AdvBench prompts
101-200, the built-in benign+borderline dev split and Just-Eval `regular` prompts 101-200 (prompts
1-100 of both sets are the core issue's targets, so the ablation reads the next hundred). Results go
to OUT/SETTING/result.json and OUT/ablation.md; a setting already done is skipped (rerun-safe).
`v1` is not retrained: pass --v1 with the demo's training folder (model/ + stages/*/done.json).
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
from mogu.data import DEV_FILE, load_stage_file, read_prompts  # noqa: E402
from mogu.loading import load_base_model  # noqa: E402
from mogu.training import generate_responses, refusal_rate  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# name -> (MoGUConfig kwargs, probe layer selection or None, TrainConfig overrides)
SETTINGS = {
    "v2-all": ({"version": "v2"}, None, {}),
    "v2-sel": ({"version": "v2"}, {}, {}),
    "v2-sel-frozen": ({"version": "v2"}, {}, {"joint_experts": False}),
    "v2-sel-h4": ({"version": "v2", "router_hidden": 4}, {}, {}),
    "v2-sel-h64": ({"version": "v2", "router_hidden": 64}, {}, {}),
    "v2-sel-k2": ({"version": "v2"}, {"top_k": 2}, {}),
    "v2-sel-k8": ({"version": "v2"}, {"top_k": 8}, {}),
}


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
    sets = eval_sets(args.data)
    base, tok = load_base_model("smollm2-135m-instruct")
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
        row = {"setting": name, "version": model.config.version, "routed_layers": model.config.routed_layers,
               "router_hidden": model.config.router_hidden, "added_params": model.num_added_parameters(),
               "train_s": round(train_s, 1), "wall_s": wall, **judge(model, sets, args.max_new_tokens)}
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(row, indent=2))
        print(json.dumps(row), flush=True)
        del model
    rows = [json.loads(p.read_text()) for p in sorted(args.out.glob("*/result.json"))]
    v1_params = next((r["added_params"] for r in rows if r["setting"] == "v1"), None)
    lines = ["| setting | routed layers | router width | added params | vs v1 | train s | harmful dev | "
             "AdvBench 101-200 | benign dev | Just-Eval 101-200 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        layers = "all" if r["routed_layers"] is None else ",".join(map(str, r["routed_layers"]))
        share = f"{r['added_params'] / v1_params:.1%}" if v1_params else "-"
        lines.append(f"| {r['setting']} | {layers} | {r['router_hidden']} | {r['added_params']:,} | {share} | "
                     f"{r['train_s']} | {r['harmful_dev']:.0%} | {r['advbench_101_200']:.0%} | "
                     f"{r['benign_dev']:.0%} | {r['just_eval_101_200']:.0%} |")
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
