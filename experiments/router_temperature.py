"""Routing sharpness at inference: divide every scorer's logit by T (T < 1 sharpens, T -> 0 is hard routing).

    MOGU_EXPERTS=runs/demo3/train/model python experiments/router_temperature.py 1 0.5 0.25 0.1

Greedy, 32 new tokens, m = 5, keyword judge; Just-Eval regular 1-100, AdvBench 1-100, built-in dev splits.
"""
import json, os, sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mogu import MoGUModel
from mogu.train.data import builtin_prompts, read_prompts
from mogu.train.stages import generate_responses
from mogu.eval.judges import is_refusal
torch.set_num_threads(2)
D = Path(__file__).resolve().parents[2] / "shared" / "data"
model = MoGUModel.from_pretrained(os.environ.get("MOGU_EXPERTS", "runs/demo3/train/model"))
tok = model.tokenizer
def P(name, split): return [r.prompt for r in builtin_prompts(name, split=split)]
evals = {"je": [r["instruction"] for r in json.loads((D/"just_eval/example_data.json").read_text()) if r["category"]=="regular"][:100],
         "adv": [r.prompt for r in read_prompts(D/"advbench/harmful_behaviors.csv", harmful=True)[:100]],
         "dev_h": P("harmful", "dev"), "dev_b": P("benign", "dev") + P("borderline", "dev")}
prev = 1.0
for temp in map(float, sys.argv[1:]):
    with torch.no_grad():
        for m in model.routed_modules.values():
            for s in (m.router.unwill, m.router.glad):
                s.linear_2.weight.mul_(prev / temp); s.linear_2.bias.mul_(prev / temp)
            m._fused = None
    prev = temp
    res = {}
    for k, ps in evals.items():
        out = generate_responses(model, tok, ps, max_new_tokens=32, batch_size=16)
        res[k] = round(sum(map(is_refusal, out)) / len(ps), 3)
    print("T", temp, res, flush=True)
