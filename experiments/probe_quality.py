"""Per-layer probe quality on the routed modules' inputs (routing off): diagonal LDA vs logistic
regression, last token vs mean of the last 6, fitted on mogu's built-in train prompts and scored on the
built-in dev split, AdvBench 1-100 and Just-Eval regular 1-100 (fraction classified correctly).

    MOGU_EXPERTS=runs/demo2/train/model python experiments/probe_quality.py
"""
import json, os, sys, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mogu import MoGUModel
from mogu.train.data import builtin_prompts, read_prompts
from mogu.chat import render_prompt
torch.set_num_threads(2)
os.makedirs(os.environ.get("MOGU_EXP_OUT", "runs/experiments"), exist_ok=True)
D = Path(__file__).resolve().parents[2] / "shared" / "data"
model = MoGUModel.from_pretrained(os.environ.get("MOGU_EXPERTS", "runs/demo2/train/model"))
tok = model.tokenizer
tok.padding_side = "left"
def P(name, split): return [r.prompt for r in builtin_prompts(name, split=split)]
sets = {
 "train_h": P("harmful", "train"), "train_b": P("benign", "train") + P("borderline", "train"),
 "dev_h": P("harmful", "dev"), "dev_b": P("benign", "dev") + P("borderline", "dev"),
 "adv": [r.prompt for r in read_prompts(D/"advbench/harmful_behaviors.csv", harmful=True)[:100]],
 "je": [r["instruction"] for r in json.loads((D/"just_eval/example_data.json").read_text()) if r["category"]=="regular"][:100],
}
names = list(model.routed_modules)
cur = {}
hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: cur.__setitem__(n, a[0])) for n, m in model.routed_modules.items()]
feats = {}
t = time.time()
with torch.no_grad(), model.routing("off"):
    for k, ps in sets.items():
        out = {n: [] for n in names}; outm = {n: [] for n in names}
        for i in range(0, len(ps), 16):
            enc = tok([render_prompt(tok, p) for p in ps[i:i+16]], return_tensors="pt", padding=True, add_special_tokens=False)
            model(**enc, use_cache=False)
            for n in names:
                out[n].append(cur[n][:, -1].float())
                outm[n].append(cur[n][:, -6:].float().mean(1))
        feats[k] = ({n: torch.cat(v) for n, v in out.items()}, {n: torch.cat(v) for n, v in outm.items()})
print("features", time.time()-t)
torch.save(feats, os.path.join(os.environ.get("MOGU_EXP_OUT", "runs/experiments"), "probe_features.pt"))
def lda(pos, neg):
    pos, neg = pos.double(), neg.double()
    var = 0.5*(pos.var(0, unbiased=False)+neg.var(0, unbiased=False)) + 1e-6
    w = (pos.mean(0)-neg.mean(0))/var
    c = -0.5*((pos@w).mean()+(neg@w).mean())
    return w, c
def logreg(pos, neg, l2=1e-2, steps=300):
    x = torch.cat([pos, neg]).double(); y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    mu, sd = x.mean(0), x.std(0)+1e-6
    xs = (x-mu)/sd
    w = torch.zeros(x.shape[1], dtype=torch.double, requires_grad=True); b = torch.zeros(1, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad(); l = torch.nn.functional.binary_cross_entropy_with_logits(xs@w+b, y) + l2*(w*w).sum(); l.backward(); return l
    opt.step(closure)
    w2 = (w/sd).detach(); return w2, (b - (mu*w2).sum()).detach()
for pool in (0, 1):
    print("pool", ["last", "mean6"][pool])
    for li, n in enumerate(names):
        F = {k: v[pool][n] for k, v in feats.items()}
        row = []
        for fit in (lda, logreg):
            w, c = fit(F["train_h"], F["train_b"])
            acc = lambda k, lab: float((((F[k].double()@w+c)>0).double()==lab).double().mean())
            row.append(f"{fit.__name__}: devh {acc('dev_h',1):.2f} devb {acc('dev_b',0):.2f} adv {acc('adv',1):.2f} je {acc('je',0):.2f}")
        print(li, " | ".join(row))
