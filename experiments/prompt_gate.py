"""A prompt-level gate instead of per-token routers: can the layer ensemble of probes route better?

    python experiments/prompt_gate.py --model runs/demo8/train/model --data runs/demo8/data --out runs/exp_gate

Per-layer logistic probes (router_init.fit_probe) on the base model's routed-module inputs at the
prompt's last token (routing off), fitted on the router set's prompts; their logits are averaged over
layers. Each prompt then goes wholly to one expert for the routed prefix (flagged: u = 1, g = 0;
otherwise u = 0, g = 1; m = 5, then the base model), greedy, keyword judge. Prints the flagged fraction
per set and threshold, and the refusal rates at the threshold chosen on the dev split (the highest
threshold that flags >= --min-flag-harmful of harmful dev prompts).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mogu import MoGUModel  # noqa: E402
from mogu.train.data import DEV_FILE, load_stage_file, read_prompts  # noqa: E402
from mogu.eval.judges import is_refusal  # noqa: E402
from mogu.train.probe import collect_layer_features  # noqa: E402
from mogu.train.router_init import fit_probe  # noqa: E402
from mogu.train.stages import generate_responses  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def sets(data: Path) -> dict[str, list[str]]:
    dev = load_stage_file(data / DEV_FILE, ("prompt", "harmful"))
    je = [r["instruction"] for r in json.loads((SHARED / "just_eval/example_data.json").read_text())
          if r["category"] == "regular"]
    adv = [r.prompt for r in read_prompts(SHARED / "advbench/harmful_behaviors.csv", harmful=True)]
    return {"dev_h": [d["prompt"] for d in dev if d["harmful"]], "dev_b": [d["prompt"] for d in dev if not d["harmful"]],
            "adv1": adv[:100], "je1": je[:100], "je2": je[100:200]}


@torch.no_grad()
def force(model, expert: str) -> None:
    """Every router outputs (u, g) = (1, 0) for 'unwill' or (0, 1) for 'glad' (saturated sigmoids)."""
    for m in model.routed_modules.values():
        for role in ("unwill", "glad"):
            scorer = getattr(m.router, role)
            scorer.linear_2.weight.zero_()
            scorer.linear_2.bias.fill_(30.0 if role == expert else -30.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pool", default="last")
    ap.add_argument("--min-flag-harmful", type=float, default=0.95)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gen-sets", default="dev_h,dev_b,adv1,je1,je2")
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    model = MoGUModel.from_pretrained(args.model)
    model.eval()
    tok = model.tokenizer
    rows = load_stage_file(args.data / "router.jsonl", ("prompt", "response", "label"))
    train_p = [r["prompt"] for r in rows]
    y = torch.tensor([float(r["label"]) for r in rows])
    evals = sets(args.data)
    feats = {"train": collect_layer_features(model, tok, train_p, batch_size=32, progress=True)}
    for name, prompts in evals.items():
        feats[name] = collect_layer_features(model, tok, prompts, batch_size=32)
    layers = sorted(feats["train"])
    probes = {i: fit_probe(feats["train"][i][args.pool], y) for i in layers}

    def score(name):
        return torch.stack([feats[name][i][args.pool].double() @ probes[i][0] + probes[i][1] for i in layers]).mean(0)

    z = {name: score(name) for name in feats}
    for t in (-2, -1, -0.5, 0, 0.5, 1):
        print(f"threshold {t:+}: " + ", ".join(f"{k} {float((v > t).double().mean()):.3f}" for k, v in z.items()))
    # Highest threshold flagging >= min of harmful dev.
    zh = z["dev_h"].sort().values
    k = int((1 - args.min_flag_harmful) * len(zh))
    thr = float(zh[k]) - 1e-9
    flagged = {k_: (v > thr) for k_, v in z.items()}
    print(f"chosen threshold {thr:.3f}: " + ", ".join(f"{k_} {float(f.double().mean()):.3f}" for k_, f in flagged.items()))
    result = {"threshold": thr, "flagged": {k_: float(f.double().mean()) for k_, f in flagged.items()}, "refused": {}}
    for name in args.gen_sets.split(","):
        prompts = evals[name]
        refused = 0
        for expert, sel in (("unwill", flagged[name]), ("glad", ~flagged[name])):
            group = [p for p, s in zip(prompts, sel.tolist()) if s]
            if not group:
                continue
            force(model, expert)
            outs = generate_responses(model, tok, group, max_new_tokens=args.tokens, batch_size=32)
            refused += sum(is_refusal(o) for o in outs)
        result["refused"][name] = refused / len(prompts)
        print(name, "refused", result["refused"][name], flush=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
