"""Router initialisation ablation on trained experts (no router training): per-layer logistic probes written
into the v1 scorers, then greedy generation judged by the keyword judge.

    python experiments/router_probe_ablation.py VARIANT TAIL [NEW_TOKENS]

VARIANT: 'logreg' (fit with routing off), '-refitK' (K refits under routing), '-accum' (refit on the union
of all rounds), '-notgen' (fit only), 'l2=X'. TAIL: prompt tokens per example used as samples (400 = all).
Routers are saved to $MOGU_EXP_OUT for router_bias_sweep.py.
"""
import json, os, sys, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mogu import MoGUModel
from mogu.train.data import builtin_prompts, read_prompts
from mogu.chat import render_prompt
from mogu.train.stages import generate_responses
from mogu.eval.judges import is_refusal
from mogu.train.router_init import write_affine
torch.set_num_threads(2)
os.makedirs(os.environ.get("MOGU_EXP_OUT", "runs/experiments"), exist_ok=True)
D = Path(__file__).resolve().parents[2] / "shared" / "data"
variant = sys.argv[1]; TAIL = int(sys.argv[2]); NT = int(sys.argv[3]) if len(sys.argv) > 3 else 32
model = MoGUModel.from_pretrained(os.environ.get("MOGU_EXPERTS", "runs/demo2/train/model"))
tok = model.tokenizer; tok.padding_side = "left"
def P(name, split): return [r.prompt for r in builtin_prompts(name, split=split)]
train_h = P("harmful", "train"); train_b = P("benign", "train") + P("borderline", "train")
evals = {"dev_h": (P("harmful", "dev"), 1), "dev_b": (P("benign", "dev") + P("borderline", "dev"), 0),
 "adv": ([r.prompt for r in read_prompts(D/"advbench/harmful_behaviors.csv", harmful=True)[:100]], 1),
 "je": ([r["instruction"] for r in json.loads((D/"just_eval/example_data.json").read_text()) if r["category"]=="regular"][:100], 0)}
names = list(model.routed_modules)
cur = {}
hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: cur.__setitem__(n, a[0])) for n, m in model.routed_modules.items()]
def collect(prompts, mode):
    out = {n: [] for n in names}
    with torch.no_grad(), model.routing(mode):
        for i in range(0, len(prompts), 16):
            enc = tok([render_prompt(tok, p) for p in prompts[i:i+16]], return_tensors="pt", padding=True, add_special_tokens=False)
            model(**enc, use_cache=False)
            am = enc["attention_mask"].bool()
            am[:, :-TAIL] = False
            for n in names: out[n].append(cur[n][am].float())
    return {n: torch.cat(v) for n, v in out.items()}
def logreg(pos, neg, l2=1e-2, steps=200):
    x = torch.cat([pos, neg]).double(); y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    mu, sd = x.mean(0), x.std(0)+1e-6
    xs = (x-mu)/sd
    w = torch.zeros(x.shape[1], dtype=torch.double, requires_grad=True); b = torch.zeros(1, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad(); l = torch.nn.functional.binary_cross_entropy_with_logits(xs@w+b, y) + l2*(w*w).sum(); l.backward(); return l
    opt.step(closure)
    w2 = (w/sd).detach(); return w2, float(b - (mu*w2).sum())
ACC = []
def fit(mode):
    t = time.time()
    H, B = collect(train_h, mode), collect(train_b, mode)
    if "accum" in variant:
        ACC.append((H, B))
        H = {n: torch.cat([a[0][n] for a in ACC]) for n in names}
        B = {n: torch.cat([a[1][n] for a in ACC]) for n in names}
    for i, n in enumerate(names):
        w, c = logreg(H[n], B[n], l2=float(variant.split("l2=")[1]) if "l2=" in variant else 1e-2)
        r = model.routed_modules[n].router
        write_affine(r.unwill, w, c, seed=i); write_affine(r.glad, -w, -c, seed=i+10000)
    print("fit", mode, round(time.time()-t), flush=True)
fit("off")
import re
nref = int(re.search(r"refit(\d)", variant).group(1)) if "refit" in variant else 0
def proxy():
    r = {}
    model.enable_routing_trace()
    for k, (ps, lab) in evals.items():
        vals = []
        for i in range(0, len(ps), 16):
            model.clear_routing_trace()
            enc = tok([render_prompt(tok, p) for p in ps[i:i+16]], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad(): model(**enc, use_cache=False)
            tr = model.routing_trace()
            vals.append(torch.stack([tr[j][:, -1, 0] for j in tr]).mean(0))
        v = torch.cat(vals); r[k] = (round(float((v > 0.5).float().mean()), 3), round(float(v.mean()), 2))
    model.enable_routing_trace(False); model.clear_routing_trace()
    print("proxy u>0.5 at last token:", r, flush=True)
proxy()
for _ in range(nref):
    fit("auto"); proxy()
for h in hooks: h.remove()
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in model.router_state_dict().items()}, os.environ.get("MOGU_EXP_OUT", "runs/experiments") + f"/router_{variant}_{TAIL}.safetensors")
if "notgen" in variant: evals = {}
res = {}
for k, (ps, lab) in evals.items():
    t = time.time()
    out = generate_responses(model, tok, ps, max_new_tokens=NT, batch_size=16)
    res[k] = sum(map(is_refusal, out)) / len(ps)
    print(k, round(res[k], 3), round(time.time()-t), flush=True)
    Path(os.environ.get("MOGU_EXP_OUT", "runs/experiments") + f"/answers_{variant}_{TAIL}_{k}.json").write_text(json.dumps(list(zip(ps, out)), indent=0))
print("RESULT", variant, TAIL, res)
