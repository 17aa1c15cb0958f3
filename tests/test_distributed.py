"""Two CPU processes (gloo) give what one process gives: trained weights, and `mogu eval`'s files.

Both tests launch the real CLI: `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml
-m mogu.cli ...` against `python -m mogu.cli ...`, on a tiny saved model and tiny data.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mogu import MoGUConfig, MoGUModel
from mogu.train.data import build_stage_datasets, builtin_prompts
from mogu.io import MARKER_FILE
from tiny_models import randomize_added, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


# -- shared helpers (test_crash.py uses them too) ---------------------------------------------
def make_base(path: Path) -> Path:
    """A tiny Llama and its tokenizer saved as a model folder the CLI can load."""
    if not (path / "config.json").is_file():
        tiny_model("llama").save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return path


def make_data(path: Path) -> Path:
    """13 glad pairs, 12 unwill pairs, 25 router rows, 8 dev prompts."""
    if not (path / "router.jsonl").is_file():
        harmful, benign = builtin_prompts("harmful")[:17], builtin_prompts("benign")[:16]
        for recs in (harmful, benign):
            for i, r in enumerate(recs):
                r.split = "dev" if i < 4 else "train"
        build_stage_datasets(harmful, benign, path, seed=0, log=lambda m: None,
                             answer_fn=lambda ps, sample=False: [f"Here is an answer about {p.split()[0].lower()}."
                                                                 for p in ps])
    return path


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT / "src")}


def mogu_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mogu.cli", *args]


def launch_cmd(*args: str) -> list[str]:
    """`accelerate launch` with the 2-process CPU config, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).with_name("accelerate")
    head = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
    if launcher.is_file():
        head.append("launch")
    return [*head, "--config_file", str(CPU_2PROC), "--main_process_port", str(port), "-m", "mogu.cli", *args]


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every worker it started, as a machine failure would. torchrun starts each worker
    in a session of its own, so killing the launcher's process group alone leaves them running (and writing)."""
    import psutil

    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    os.killpg(proc.pid, signal.SIGKILL)
    for w in workers:
        try:
            w.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(workers, timeout=30)


def run_all(*cmds: list[str], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Run the commands side by side; fail with their output if any fails."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()) for c in cmds]
    results = []
    for cmd, p in zip(cmds, procs):
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    for r in results:
        assert r.returncode == 0, f"{' '.join(r.args)}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return results


def model_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {f"router.{k}": v for k, v in load_file(str(model_dir / "router.safetensors")).items()}
    for expert in ("glad", "unwill"):
        tensors = load_file(str(model_dir / expert / "adapter_model.safetensors"))
        out.update({f"{expert}.{k}": v for k, v in tensors.items()})
    return out


def metrics_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("elapsed_s", None)
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


# -- training --------------------------------------------------------------------------------
def test_two_processes_train_the_same_weights_as_one(workdir):
    base, data = make_base(workdir / "base"), make_data(workdir / "data")
    # The paper preset's global batches (8 pairs, 16 router rows) over 13 / 12 / 25 rows: every stage has
    # a full step (8 -> 4 + 4 per process) and a short last one, split unevenly for glad (5 -> 2 + 3) and
    # the router (9 -> 4 + 5), where averaging per-process means would be wrong. Large learning rates
    # make the weights move far, so a mis-weighted gradient would show.
    args = ["train", "--data", str(data), "--model", str(base), "--router-hidden", "16", "--lora-dropout", "0",
            "--glad-epochs", "2", "--unwill-epochs", "2", "--router-epochs", "2", "--glad-lr", "0.01",
            "--unwill-lr", "0.01", "--router-lr", "0.01", "--max-response-tokens", "8", "--save-every", "1",
            "--threads", "1"]
    one, two = workdir / "one", workdir / "two"
    _, launched = run_all(mogu_cmd(*args, "--out", str(one)), launch_cmd(*args, "--out", str(two)))
    assert "2 processes (MULTI_CPU)" in launched.stderr, launched.stderr[-3000:]

    a, b = model_tensors(one / "model"), model_tensors(two / "model")
    assert a.keys() == b.keys()
    moved = 0
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-5), (name, (a[name] - b[name]).abs().max())
        moved += int(a[name].abs().sum() > 0)
    assert moved == len(a)  # LoRA B started at zero: every tensor trained

    # Same steps, losses and dev scores; the same checkpoint selected in every stage.
    ra, rb = metrics_rows(one), metrics_rows(two)
    assert [(r["stage"], r["step"], "dev" in r) for r in ra] == [(r["stage"], r["step"], "dev" in r) for r in rb]
    for x, y in zip(ra, rb):
        if "dev" in x:
            assert x["dev"] == y["dev"]
        else:
            for k in ("loss", "ce_num", "ce_den", "ce", "mse_u", "mse_g"):
                if k in x:
                    assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (x, y)
    for stage in ("glad", "unwill", "router"):
        da = json.loads((one / "stages" / stage / "done.json").read_text())
        db = json.loads((two / "stages" / stage / "done.json").read_text())
        assert da["selection"] == db["selection"] and da["steps"] == db["steps"] == 4
    # Only the main process wrote: one run.json, no stray scratch files.
    leftovers = [q for q in two.rglob(".*") if q.name != MARKER_FILE]  # the marker is mogu's, not scratch
    assert not leftovers, leftovers


# -- evaluation ------------------------------------------------------------------------------
def _normalised(out: Path) -> dict[str, object]:
    """The eval files with their timings removed (per-chunk `seconds`, `wall_s`, the report's wall time)."""
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    for g in gens:
        g.pop("seconds")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("wall_s")
    for cells in metrics["cells"].values():
        for cell in cells.values():
            cell.pop("seconds_per_prompt")
    report = [line for line in (out / "report.md").read_text().splitlines() if not line.startswith("Wall time")]
    return {"generations": gens, "judgements": (out / "judgements.jsonl").read_bytes(), "metrics": metrics,
            "report": report}


def test_two_process_eval_writes_the_files_of_one(workdir):
    base = make_base(workdir / "base")
    ckpt = workdir / "mogu"
    if not (ckpt / "mogu_config.json").is_file():
        model = MoGUModel.from_base(str(base), MoGUConfig(router_hidden=16))
        randomize_added(model)
        model.save_pretrained(ckpt)
    args = ["eval", "--model", str(ckpt), "--defenses", "none,mogu", "--benchmarks", "advbench,just_eval",
            "--data-dir", str(FIXTURES), "--limit", "3", "--max-new-tokens", "6", "--batch-size", "2",
            "--threads", "1"]
    one, two = workdir / "eval-one", workdir / "eval-two"
    _, launched = run_all(mogu_cmd(*args, "--out", str(one)), launch_cmd(*args, "--out", str(two)))
    # The chunks went round-robin: process 1 generated the second and fourth.
    # Searched anywhere in a line: the other process's progress bar (no newline) can precede it.
    rank1 = re.findall(r"\[rank 1\]\s+(\S+) x (\S+): 3/3", launched.stderr)
    assert rank1 == [("none", "just_eval"), ("mogu", "just_eval")], launched.stderr[-3000:]
    a, b = _normalised(one), _normalised(two)
    assert len(a["generations"]) == 12
    assert a == b
    # generations.jsonl differs from one process's only in the timings, line by line.
    assert [line.split('"seconds"')[0] for line in (one / "generations.jsonl").read_text().splitlines()] == \
        [line.split('"seconds"')[0] for line in (two / "generations.jsonl").read_text().splitlines()]
    assert not list(two.glob("generations.shard-*"))


def test_eval_resume_folds_in_the_shards_of_a_killed_multi_process_run(tmp_path):
    """A killed 2-process run leaves per-process shards (one cut mid-line): the rerun keeps their rows."""
    from mogu.eval import defenses as defenses_mod
    from mogu.eval.runner import EvalConfig, EvalRunner

    tok = tiny_tokenizer()
    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_hidden=16), tokenizer=tok)
    randomize_added(model)
    cfg = EvalConfig(model="tiny", out=tmp_path / "ref", defenses=["none", "mogu"], benchmarks=["advbench"],
                     data_dir=str(FIXTURES), limit=4, max_new_tokens=4, batch_size=2, chunk_size=2,
                     routing_examples=1)
    EvalRunner(cfg, model=model, tokenizer=tok, log=lambda m: None).run()
    ref = (cfg.out / "generations.jsonl").read_text().splitlines(keepends=True)
    assert len(ref) == 8

    out = tmp_path / "resumed"
    out.mkdir()
    # Process 0 had finished its chunks 0 and 2, process 1 only chunk 1 and was cut writing chunk 3.
    (out / "generations.shard-00000.jsonl").write_text(ref[0] + ref[1] + ref[4] + ref[5])
    (out / "generations.shard-00001.jsonl").write_text(ref[2] + ref[3] + ref[6][:40])
    calls = []
    real_build = defenses_mod.build_defense

    def counting_build(name, **kw):
        d = real_build(name, **kw)
        real_generate = d.generate

        def generate(prompts, **gkw):
            calls.append((name, len(prompts)))
            return real_generate(prompts, **gkw)

        d.generate = generate
        return d

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(defenses_mod, "build_defense", counting_build)
        cfg2 = EvalConfig(**{**cfg.__dict__, "out": out})
        EvalRunner(cfg2, model=model, tokenizer=tok, log=lambda m: None).run()
    assert calls == [("mogu", 2)]  # only the chunk nobody finished
    def strip(lines):
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]

    assert strip((out / "generations.jsonl").read_text().splitlines()) == strip(ref)
    assert not list(out.glob("generations.shard-*"))
