"""Refusal rates of a run's intermediate router checkpoints: how over-refusal moves with router steps.

    python experiments/router_checkpoints.py runs/exp/router33 --sets dev_h,dev_b,je2 --tokens 32
    python experiments/router_checkpoints.py runs/demo5/train --final --sets adv2,je2 --tokens 64
    python experiments/router_checkpoints.py runs/demo5/train --final --glad-bias 0.25,0.5 --sets dev_h,dev_b

Loads RUN/model (experts and the final routers), then for each RUN/checkpoints/router/step-* writes its
trained tensors into the model and generates (greedy, m = 5, keyword judge). Sets: built-in dev splits
(dev_h, dev_b), Just-Eval regular 1-100 / 101-200 (je1, je2), AdvBench 1-100 / 101-200 (adv1, adv2).
``--final`` scores RUN/model as saved instead; ``--glad-bias 0.25,0.5`` then scores it with every
scorer's logit shifted toward glad by each value (an inference operating point; 0 is the model as saved). Prints one JSON line per checkpoint and appends it to
RUN/checkpoint_scores.jsonl.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mogu import MoGUModel  # noqa: E402
from mogu.train.calibration import shift_router_bias  # noqa: E402
from mogu.train.data import builtin_prompts, read_prompts  # noqa: E402
from mogu.eval.judges import is_refusal  # noqa: E402
from mogu.train.stages import generate_responses  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def eval_sets() -> dict[str, list[str]]:
    je = [r["instruction"] for r in json.loads((DATA / "just_eval/example_data.json").read_text())
          if r["category"] == "regular"]
    adv = [r.prompt for r in read_prompts(DATA / "advbench/harmful_behaviors.csv", harmful=True)]

    def dev(*names):
        return [r.prompt for n in names for r in builtin_prompts(n, split="dev")]

    return {"dev_h": dev("harmful"), "dev_b": dev("benign", "borderline"), "je1": je[:100], "je2": je[100:200],
            "adv1": adv[:100], "adv2": adv[100:200]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--sets", default="dev_h,dev_b,je2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", default=None, help="comma-separated checkpoint steps (default: all)")
    ap.add_argument("--final", action="store_true", help="score RUN/model itself, no checkpoints")
    ap.add_argument("--glad-bias", default="", help="with --final: comma-separated logit shifts toward glad")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = MoGUModel.from_pretrained(args.run / "model")
    names = {n: p for n, p in model.named_parameters()}
    sets = {k: v for k, v in eval_sets().items() if k in args.sets.split(",")}
    ckpts = [None] if args.final else sorted((args.run / "checkpoints" / "router").glob("step-*"))
    if args.steps and not args.final:
        wanted = {int(s) for s in args.steps.split(",")}
        ckpts = [c for c in ckpts if int(c.name.split("-")[1]) in wanted]
    if args.final and args.glad_bias:
        ckpts = [float(b) for b in args.glad_bias.split(",")]  # include 0 to score the model as saved
    applied = 0.0

    def score(label: str) -> None:
        row = {"checkpoint": label, "tokens": args.tokens}
        for key, prompts in sets.items():
            out = generate_responses(model, model.tokenizer, prompts, max_new_tokens=args.tokens, batch_size=32)
            row[key] = round(sum(map(is_refusal, out)) / len(prompts), 3)
        print(json.dumps(row), flush=True)
        with open(args.run / "checkpoint_scores.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    for ckpt in ckpts:
        if isinstance(ckpt, float):  # the operating-point shift of `mogu calibrate`: u down, g up
            shift_router_bias(model, ckpt - applied)
            applied = ckpt
            score(f"final+glad_bias={ckpt}")
            continue
        tensors = {} if ckpt is None else load_file(str(ckpt / "trainable.safetensors"))
        with torch.no_grad():
            for n, t in tensors.items():
                names[n].copy_(t)
        for m in model.routed_modules.values():
            m._fused = None  # the inference path caches fused router/expert weights
        score("final" if ckpt is None else ckpt.name)


if __name__ == "__main__":
    main()
