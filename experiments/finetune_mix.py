"""Does task fine-tuning erode MoGU's safety, and does mixing in the router set restore it? (issue #4 §3)

    python experiments/finetune_mix.py --mogu runs/demo3/train/model --data runs/demo3/data --out runs/ftmix

Generates a seeded exact-match task (``--task``, default date-iso: 400 train / 100 test rows), then for
each row of the table builds the model, fine-tunes it where the row says so (task LoRA, ``mogu.train.finetune``)
and measures:
- task exact match on the test rows (greedy, ``--task-tokens`` new tokens);
- harmful refusal on the built-in harmful dev split and AdvBench 101-200;
- benign refusal on the built-in benign + borderline dev split and Just-Eval regular 101-200;
  (greedy, ``--tokens`` new tokens, m = 5 routed tokens for MoGU rows, keyword judge).

Rows: base; base + FT; MoGU; MoGU + FT (mix 0); MoGU + FT (mix r) for each r in ``--mix-ratios``.
Each row writes OUT/rows/<row>.json (and its answers to <row>.answers.json) and is skipped when that
file exists; fine-tunes live in OUT/ft/<row>/ and resume if interrupted. OUT/table.md is rewritten
from every finished row at the end. ``--limit N`` keeps the first N prompts of every eval set.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mogu import MoGUModel  # noqa: E402
from mogu.tuner.inference import PlainGenerator as _PlainGenerator  # noqa: E402
from mogu.train.data import builtin_prompts, read_prompts  # noqa: E402
from mogu.eval.judges import is_refusal  # noqa: E402
from mogu.train.finetune import FinetuneConfig, load_finetuned_base, run_finetune, task_predictions  # noqa: E402
from mogu.tuner.loading import load_base_model  # noqa: E402
from mogu.tuner.checkpoint import read_config  # noqa: E402
from mogu.train.tasks import TEST_FILE, load_task_rows, write_task_data  # noqa: E402
from mogu.train.stages import generate_responses  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"dev_h": "harmful: built-in dev", "adv2": "harmful: AdvBench 101-200",
        "dev_b": "benign: built-in dev", "je2": "benign: Just-Eval 101-200"}


def eval_sets(shared: Path, limit: int | None) -> dict[str, list[str]]:
    je = [r["instruction"] for r in json.loads((shared / "just_eval/example_data.json").read_text())
          if r["category"] == "regular"]
    adv = [r.prompt for r in read_prompts(shared / "advbench/harmful_behaviors.csv", harmful=True)]
    sets = {"dev_h": [r.prompt for r in builtin_prompts("harmful", split="dev")],
            "adv2": adv[100:200],
            "dev_b": [r.prompt for n in ("benign", "borderline") for r in builtin_prompts(n, split="dev")],
            "je2": je[100:200]}
    return {k: v[:limit] for k, v in sets.items()}


def row_plan(mix_ratios: list[float]) -> list[tuple[str, str, float | None]]:
    """(row name, model kind, mix ratio or None for no fine-tuning)."""
    rows = [("base", "base", None), ("base-ft", "base", 0.0), ("mogu", "mogu", None), ("mogu-ft-mix0", "mogu", 0.0)]
    return rows + [(f"mogu-ft-mix{r:g}", "mogu", r) for r in mix_ratios if r > 0]


def build(name: str, kind: str, mix: float | None, args, base_id: str, task_dir: Path):
    """(model, tokenizer, fine-tuning summary or None) for one row."""
    if mix is None:
        if kind == "mogu":
            model = MoGUModel.from_pretrained(args.mogu)
            return model, model.tokenizer, None
        model, tok = load_base_model(base_id)
        return model, tok, None
    run = args.out / "ft" / name
    if (run / "summary.json").is_file():  # finished earlier: load what it saved
        summary = json.loads((run / "summary.json").read_text())
        if kind == "mogu":
            model = MoGUModel.from_pretrained(run / "model")
            return model, model.tokenizer, summary
        model, tok = load_finetuned_base(run / "model", base=base_id)
        return model, tok, summary
    cfg = FinetuneConfig(task_data=str(task_dir), output_dir=str(run), mix_data=str(args.data) if mix > 0 else None,
                         mix_ratio=mix, steps=args.steps, lr=args.lr, batch_size=args.batch_size, r=args.r,
                         seed=args.seed, save_every=25)
    source = str(args.mogu) if kind == "mogu" else base_id
    model, tok, summary = run_finetune(source, cfg, resume=True, log=lambda m: print(m, flush=True))
    return model, tok, summary


def measure(model, tok, kind: str, task_rows: list[dict], task: str, sets: dict[str, list[str]],
            args) -> tuple[dict, dict]:
    gen = model if kind == "mogu" else _PlainGenerator(model)
    kw = {"route_tokens": 5} if kind == "mogu" else {}
    preds = task_predictions(model, tok, task_rows, task, max_new_tokens=args.task_tokens, batch_size=16)
    result = {"task_em": sum(p["correct"] for p in preds) / len(preds), "task_n": len(preds), "refusal": {}}
    answers = {"task": preds}
    for key, prompts in sets.items():
        out = generate_responses(gen, tok, prompts, max_new_tokens=args.tokens, batch_size=16, **kw)
        result["refusal"][key] = {"rate": sum(map(is_refusal, out)) / max(1, len(out)), "n": len(out)}
        answers[key] = [{"prompt": p, "response": r, "refused": is_refusal(r)} for p, r in zip(prompts, out)]
    return result, answers


def table(results: list[dict]) -> str:
    lines = ["| row | task EM | " + " | ".join(SETS.values()) + " | FT steps | FT s |",
             "|---|---|" + "---|" * len(SETS) + "---|---|"]
    for res in results:
        cells = [f"{res['refusal'][k]['rate']:.0%} (n={res['refusal'][k]['n']})" for k in SETS]
        ft = res.get("finetune") or {}
        lines.append(f"| {res['row']} | {res['task_em']:.0%} (n={res['task_n']}) | " + " | ".join(cells)
                     + f" | {ft.get('steps', '-')} | {ft.get('train_s', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mogu", type=Path, required=True, help="MoGU checkpoint (its base model is the 'base' row)")
    ap.add_argument("--data", type=Path, required=True, help="`mogu data build` folder: router.jsonl is the mix set")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--task", default="date-iso")
    ap.add_argument("--task-train", type=int, default=400)
    ap.add_argument("--task-test", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--mix-ratios", default="0.2", help="comma-separated mix ratios for the MoGU + FT rows")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts of every eval set (task test too)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per refusal-eval answer")
    ap.add_argument("--task-tokens", type=int, default=16, help="new tokens per task answer")
    ap.add_argument("--shared-data", type=Path, default=SHARED)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base_id = read_config(args.mogu).base_model_name_or_path
    task_dir = args.out / "task"
    if not (task_dir / TEST_FILE).is_file():
        write_task_data(args.task, task_dir, n_train=args.task_train, n_test=args.task_test, seed=args.seed)
    task_rows = load_task_rows(task_dir, TEST_FILE)[: args.limit]
    sets = eval_sets(args.shared_data, args.limit)
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    plan = row_plan([float(r) for r in args.mix_ratios.split(",") if r.strip()])
    for name, kind, mix in plan:
        path = rows_dir / f"{name}.json"
        if path.is_file():
            print(f"[{name}] done earlier: {path}", flush=True)
            continue
        t0 = time.perf_counter()
        model, tok, summary = build(name, kind, mix, args, base_id, task_dir)
        result, answers = measure(model, tok, kind, task_rows, args.task, sets, args)
        result.update(row=name, kind=kind, mix_ratio=mix, finetune=summary, wall_s=round(time.perf_counter() - t0, 1),
                      args={k: str(v) for k, v in vars(args).items()})
        (rows_dir / f"{name}.answers.json").write_text(json.dumps(answers, indent=1))
        path.write_text(json.dumps(result, indent=2))  # written last: it marks the row finished
        print(f"[{name}] task EM {result['task_em']:.2f}; refusal "
              + ", ".join(f"{k}={v['rate']:.2f}" for k, v in result["refusal"].items()), flush=True)
        del model
    done = [json.loads((rows_dir / f"{name}.json").read_text()) for name, _, _ in plan
            if (rows_dir / f"{name}.json").is_file()]
    (args.out / "table.md").write_text(table(done))
    print(table(done))


if __name__ == "__main__":
    main()
