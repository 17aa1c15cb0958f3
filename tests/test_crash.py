"""SIGKILL `mogu train` at random (seeded) steps, resume it, and compare with an uninterrupted run.

- the final weights are bit-identical to the uninterrupted run's (same seed; LoRA dropout on, so the
  saved RNG states must replay it);
- no half-written checkpoint is ever visible: at every kill each step folder, finished stage and
  saved model is complete (scratch folders are dot-named and removed on resume);
- metrics.jsonl ends with every step exactly once, row for row the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import torch
from test_distributed import env, make_base, make_data, metrics_rows, model_tensors, mogu_cmd, run_all

from mogu.io import MARKER_FILE

CHECKPOINT_FILES = {"trainable.safetensors", "optimizer.pt", "rng.pt", "state.json"}
STAGES = ("glad", "unwill", "router")
STEPS = {"glad": 6, "unwill": 6, "router": 6}  # 13 / 12 / 25 rows, global batch 8 / 8 / 16, 3 epochs


def _last_step(run: Path) -> int:
    """Global index (over the three stages) of the newest step in metrics.jsonl; 0 if none."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    best = 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if "loss" in row:
            offset = sum(STEPS[s] for s in STAGES[:STAGES.index(row["stage"])])
            best = max(best, offset + row["step"])
    return best


def _assert_nothing_half_written(run: Path) -> None:
    for folder in (run / "checkpoints").glob("*/*"):
        if folder.name.startswith("."):
            continue  # scratch: an atomic write in progress, or a folder being deleted
        assert folder.name.startswith("step-"), folder
        assert CHECKPOINT_FILES <= {p.name for p in folder.iterdir()}, folder
    for done in (run / "stages").glob("*/done.json"):
        assert (done.parent / "selected.safetensors").is_file() and (done.parent / "rng.pt").is_file(), done
    if (run / "model").exists():
        assert model_tensors(run / "model")


def test_sigkill_at_random_steps_then_resume_matches_an_uninterrupted_run(tmp_path):
    base, data = make_base(tmp_path / "base"), make_data(tmp_path / "data")
    args = ["train", "--data", str(data), "--model", str(base), "--router-hidden", "16", "--glad-epochs", "3",
            "--unwill-epochs", "3", "--router-epochs", "3", "--glad-lr", "0.01", "--unwill-lr", "0.01",
            "--router-lr", "0.01", "--max-response-tokens", "8", "--save-every", "2", "--threads", "1"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    uninterrupted = subprocess.Popen(mogu_cmd(*args, "--out", str(reference)), stdout=subprocess.DEVNULL,
                                     stderr=open(tmp_path / "reference.log", "w"), env=env())

    total = sum(STEPS.values())
    rng = random.Random(int(os.environ.get("MOGU_CRASH_SEED", "21")))
    targets = sorted(rng.sample(range(1, total - 2), 2))
    killed_at = []
    for i, target in enumerate(targets):
        target = max(target, (killed_at[-1] if killed_at else 0) + 1)
        resume = ["--resume"] if i else []
        with open(tmp_path / f"killed-{i}.log", "w") as log:
            proc = subprocess.Popen(mogu_cmd(*args, *resume, "--out", str(crashed)), stdout=subprocess.DEVNULL,
                                    stderr=log, env=env())
            deadline = time.monotonic() + 300
            while _last_step(crashed) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, (tmp_path / f"killed-{i}.log").read_text()[-3000:]
        killed_at.append(_last_step(crashed))
        _assert_nothing_half_written(crashed)
    print(f"killed at global steps {killed_at} of {total}")
    run_all(mogu_cmd(*args, "--resume", "--out", str(crashed)))
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert killed_at[0] < total, killed_at

    # Bit-identical weights.
    a, b = model_tensors(reference / "model"), model_tensors(crashed / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, killed_at)
    # Every step once, and the same rows (losses, dev scores) as the uninterrupted run.
    rows = metrics_rows(crashed)
    for stage in STAGES:
        assert [r["step"] for r in rows if r["stage"] == stage and "loss" in r] == list(range(1, STEPS[stage] + 1))
    assert rows == metrics_rows(reference), killed_at
    for stage in STAGES:
        assert json.loads((crashed / "stages" / stage / "done.json").read_text())["history"] == \
            json.loads((reference / "stages" / stage / "done.json").read_text())["history"]
    # The scratch left by the kills is gone; two complete checkpoints per stage remain.
    leftovers = [q for q in crashed.rglob(".*") if q.name != MARKER_FILE]  # the marker is mogu's, not scratch
    assert not leftovers, leftovers
    for stage in STAGES:
        kept = sorted(p.name for p in (crashed / "checkpoints" / stage).iterdir())
        assert kept == [f"step-{STEPS[stage] - 2:07d}", f"step-{STEPS[stage]:07d}"], kept
