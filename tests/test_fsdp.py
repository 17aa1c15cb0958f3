"""FSDP2: two CPU processes (gloo) shard the frozen backbone and train what one process trains.

Each test launches the real CLI (`accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m mogu.cli
train ... --shard-backbone fsdp2`) on a tiny saved Llama; the one-process run is the reference. The two
processes sum their gradients in another order than one process does, so weights agree to 1e-5, not bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_crash import _last_step
from test_distributed import (env, kill_launch, launch_cmd, make_base, make_data, metrics_rows, model_tensors, mogu_cmd,
                              run_all)

from mogu.train.sharding import decoder_layers
from tiny_models import FAMILY_CONFIGS, tiny_model

ATOL = 1e-5
STEPS_PER_STAGE = 4  # 13 / 12 / 25 rows, global batch 8 / 8 / 16, 2 epochs


def _args(base: Path, data: Path) -> list[str]:
    return ["train", "--data", str(data), "--model", str(base), "--router-hidden", "16", "--lora-dropout", "0",
            "--glad-epochs", "2", "--unwill-epochs", "2", "--router-epochs", "2", "--glad-lr", "0.01",
            "--unwill-lr", "0.01", "--router-lr", "0.01", "--max-response-tokens", "8", "--save-every", "1",
            "--threads", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process, and two processes with the backbone sharded, trained side by side."""
    root = tmp_path_factory.mktemp("fsdp")
    base, data = make_base(root / "base"), make_data(root / "data")
    args = _args(base, data)
    _, launched = run_all(mogu_cmd(*args, "--out", str(root / "one")),
                          launch_cmd(*args, "--shard-backbone", "fsdp2", "--out", str(root / "two")))
    return {"root": root, "base": base, "data": data, "one": root / "one", "two": root / "two",
            "log": launched.stderr}


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = model_tensors(a_dir), model_tensors(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=ATOL), (name, (a[name] - b[name]).abs().max())
        assert a[name].abs().sum() > 0, name  # LoRA B starts at zero: every tensor trained


def test_fsdp_two_processes_train_the_weights_of_one_process(runs):
    assert "fsdp2: the frozen backbone is sharded over 2 processes" in runs["log"], runs["log"][-3000:]
    _assert_same_weights(runs["one"] / "model", runs["two"] / "model")
    one, two = metrics_rows(runs["one"]), metrics_rows(runs["two"])
    assert [(r["stage"], r["step"]) for r in one] == [(r["stage"], r["step"]) for r in two]
    for x, y in zip(one, two):
        if "dev" in x:
            assert x["dev"] == y["dev"]
        elif "loss" in x:
            assert abs(x["loss"] - y["loss"]) <= ATOL * max(1.0, abs(x["loss"])), (x, y)


def test_fsdp_each_rank_holds_half_of_the_backbone_and_run_json_records_it(runs):
    two = json.loads((runs["two"] / "run.json").read_text())["distribution"]
    assert two["processes"] == 2 and two["backbone_sharding"] == "fsdp2"
    total, per_rank = two["backbone_params"], two["backbone_params_per_rank"]
    assert len(per_rank) == 2 and sum(per_rank) == total
    for held in per_rank:  # dim-0 shards: a row count that does not split evenly leaves one rank a row more
        assert 0.45 * total <= held <= 0.55 * total, (held, total)
    one = json.loads((runs["one"] / "run.json").read_text())["distribution"]
    assert one == {**one, "processes": 1, "backbone_sharding": "none", "backbone_params_per_rank": [total]}
    assert one["backbone_params"] == total


def kill_sharded_run(root: Path, args: list[str], shard: str) -> int:
    """Launch ``args`` on 2 processes with ``--shard-backbone shard``, SIGKILL the launcher and both workers in
    the unwill stage's second step, and return the last step the run logged (global over the stages)."""
    crashed = Path(args[args.index("--out") + 1])
    target = STEPS_PER_STAGE + 2  # the unwill stage's second step
    with open(root / f"killed-{shard}.log", "w") as log:
        proc = subprocess.Popen(launch_cmd(*args, "--shard-backbone", shard), stdout=subprocess.DEVNULL,
                                stderr=log, env=env(), start_new_session=True)
        deadline = time.monotonic() + 300
        while _last_step(crashed) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            kill_launch(proc)
        proc.wait()
    killed_at = _last_step(crashed)
    assert proc.returncode == -signal.SIGKILL, (root / f"killed-{shard}.log").read_text()[-3000:]
    assert killed_at < 3 * STEPS_PER_STAGE, killed_at
    return killed_at


def test_fsdp_killed_run_resumes_on_one_process_to_the_same_weights(runs):
    """SIGKILL a sharded 2-process run mid-stage, resume it on 1 process: the weights of the 1-process run."""
    crashed = runs["root"] / "crashed"
    args = [*_args(runs["base"], runs["data"]), "--out", str(crashed)]
    killed_at = kill_sharded_run(runs["root"], args, "fsdp2")

    resumed = run_all(mogu_cmd(*args, "--resume"))[0]
    assert "dropout masks will differ" in resumed.stderr  # 2 saved RNG states, 1 process: said, not hidden
    _assert_same_weights(runs["one"] / "model", crashed / "model")
    rows = metrics_rows(crashed)
    for stage in ("glad", "unwill", "router"):
        steps = [r["step"] for r in rows if r["stage"] == stage and "loss" in r]
        assert steps == list(range(1, STEPS_PER_STAGE + 1)), (stage, steps, killed_at)
    assert json.loads((crashed / "run.json").read_text())["distribution"]["processes"] == 1


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_fsdp_groups_each_decoder_layer_once(family):
    base = tiny_model(family)
    layers = decoder_layers(base)
    assert len(layers) == base.config.num_hidden_layers
    assert len({id(m) for m in layers}) == len(layers)


def test_fsdp_with_gradient_checkpointing_trains_the_weights_of_one_process(runs):
    out = runs["root"] / "two-checkpointed"
    run_all(launch_cmd(*_args(runs["base"], runs["data"]), "--shard-backbone", "fsdp2", "--gradient-checkpointing",
                       "--out", str(out)))
    _assert_same_weights(runs["one"] / "model", out / "model")
