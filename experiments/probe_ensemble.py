"""Probes of all layers together (average of per-layer logits, or one probe on concatenated features):
the fraction of each set flagged harmful. Run probe_quality.py first (it caches the features).

    python experiments/probe_ensemble.py
"""
import os
from pathlib import Path
import torch
exec(open(str(Path(__file__).with_name("probe_quality.py"))).read().split("def lda")[0].split("model = MoGUModel")[0])
feats = torch.load(os.path.join(os.environ.get("MOGU_EXP_OUT", "runs/experiments"), "probe_features.pt"))
exec("def lda" + open(str(Path(__file__).with_name("probe_quality.py"))).read().split("def lda")[1].split("for pool in")[0])
for pool in (0, 1):
    names = list(feats["train_h"][pool])
    for fit in (lda, logreg):
        # average of per-layer logits
        S = {k: 0 for k in feats}
        for n in names:
            w, c = fit(feats["train_h"][pool][n], feats["train_b"][pool][n])
            for k in feats:
                z = feats[k][pool][n].double() @ w + c
                S[k] = S[k] + z / z.std() if False else S[k] + z
        print(pool, fit.__name__, "avg-logit", {k: round(float(((S[k] > 0).double()).mean()), 3) for k in feats})
    X = {k: torch.cat([feats[k][pool][n] for n in names], 1) for k in feats}
    for l2 in (1e-3, 1e-2, 1e-1):
        w, c = logreg(X["train_h"], X["train_b"], l2=l2)
        print(pool, "concat logreg", l2, {k: round(float((((X[k].double() @ w + c) > 0).double()).mean()), 3) for k in feats})
