"""Operating-point sweep: shift every scorer's logit toward glad by DELTA and measure refusal rates.

    python experiments/router_bias_sweep.py runs/experiments/router_logreg-accum-refit1_400.safetensors 1 2 3.5
"""
import json, os, sys, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mogu import MoGUModel
from mogu.train.data import builtin_prompts, read_prompts
from mogu.train.stages import generate_responses
from mogu.eval.judges import is_refusal
from safetensors.torch import load_file
torch.set_num_threads(2)
D = Path(__file__).resolve().parents[2] / "shared" / "data"
model = MoGUModel.from_pretrained(os.environ.get("MOGU_EXPERTS", "runs/demo2/train/model"))
model.load_router_state_dict(load_file(sys.argv[1]))
tok = model.tokenizer
def P(name, split): return [r.prompt for r in builtin_prompts(name, split=split)]
evals = {"je": [r["instruction"] for r in json.loads((D/"just_eval/example_data.json").read_text()) if r["category"]=="regular"][:50],
         "dev_h": P("harmful", "dev"), "adv": [r.prompt for r in read_prompts(D/"advbench/harmful_behaviors.csv", harmful=True)[:40]],
         "dev_b": P("benign", "dev") + P("borderline", "dev")}
prev = 0.0
for delta in map(float, sys.argv[2:]):
    with torch.no_grad():
        for m in model.routed_modules.values():
            m.router.unwill.linear_2.bias -= (delta - prev); m.router.glad.linear_2.bias += (delta - prev)
    prev = delta
    res = {}
    for k, ps in evals.items():
        out = generate_responses(model, tok, ps, max_new_tokens=24, batch_size=16)
        res[k] = round(sum(map(is_refusal, out)) / len(ps), 3)
    print("delta", delta, res, flush=True)
