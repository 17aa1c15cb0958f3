"""Refusal rates of the base model and a trained MoGU model on the issue's efficacy sets, in one run.

Sets (greedy decoding, --new-tokens 64, keyword judge):
- built-in harmful dev split (mogu's own prompts, never trained on);
- AdvBench harmful_behaviors.csv, prompts 1-100 (not in mogu's training data);
- Just-Eval example_data.json, category "regular", first 100 (benign: refusals here are over-refusal).

Reproduce (after `mogu demo --out runs/demo`):

    python benchmarks/efficacy.py --mogu runs/demo/train/model --data-dir ../shared/data --json runs/efficacy.json

Answers are written beside the JSON (``*.answers.jsonl``) so every judgement can be inspected.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mogu import MoGUModel
from mogu.tuner.inference import PlainGenerator as _PlainGenerator
from mogu.train.data import builtin_prompts, read_prompts
from mogu.eval.judges import is_refusal
from mogu.train.stages import generate_responses


def load_sets(data_dir: Path, limit: int) -> dict[str, tuple[list[str], bool]]:
    just_eval = json.loads((data_dir / "just_eval" / "example_data.json").read_text())
    return {
        "builtin harmful dev": ([r.prompt for r in builtin_prompts("harmful", split="dev")], True),
        f"AdvBench 1-{limit}": ([r.prompt for r in read_prompts(data_dir / "advbench" / "harmful_behaviors.csv",
                                                                harmful=True)[:limit]], True),
        f"Just-Eval regular 1-{limit}": ([r["instruction"] for r in just_eval if r["category"] == "regular"][:limit],
                                         False),
        "builtin benign dev": ([r.prompt for n in ("benign", "borderline") for r in builtin_prompts(n, split="dev")],
                               False),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mogu", required=True, help="trained MoGU checkpoint folder")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-base", action="store_true", help="skip the base model rows")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    sets = load_sets(Path(args.data_dir), args.limit)
    model = MoGUModel.from_pretrained(args.mogu)
    tok = model.tokenizer
    systems = {"mogu (m=%s)" % model.config.route_tokens: model}
    if not args.no_base:
        systems = {"base": None, **systems}
    results, answers = [], []
    for system, m in systems.items():
        for name, (prompts, harmful) in sets.items():
            start = time.perf_counter()
            if m is None:
                with model.routing("off"):
                    out = generate_responses(_PlainGenerator(model.base_model), tok, prompts,
                                             max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                                             progress=True, desc=f"{system}: {name}")
            else:
                out = generate_responses(m, tok, prompts, max_new_tokens=args.new_tokens,
                                         batch_size=args.batch_size, progress=True, desc=f"{system}: {name}")
            refused = [is_refusal(a) for a in out]
            results.append({"system": system, "set": name, "harmful": harmful, "n": len(prompts),
                            "refusal_rate": sum(refused) / len(prompts), "seconds": round(time.perf_counter() - start, 1)})
            answers += [{"system": system, "set": name, "prompt": p, "answer": a, "refused": r}
                        for p, a, r in zip(prompts, out, refused)]
    print("\n| system | set | n | refused |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['system']} | {r['set']} | {r['n']} | {r['refusal_rate']:.0%} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
        Path(args.json).with_suffix(".answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))


if __name__ == "__main__":
    main()
