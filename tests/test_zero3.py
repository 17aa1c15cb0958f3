"""DeepSpeed ZeRO-3: two CPU processes (gloo) partition the frozen backbone and train what one process trains.

Each test launches the real CLI on a tiny saved Llama, as tests/test_fsdp.py does for FSDP2: under the
2-process CPU config with `--shard-backbone zero3`, or under configs/accelerate/deepspeed_zero3.yaml itself,
where `auto` must choose ZeRO-3. The one-process run is the reference; the processes sum their gradients in
another order, so weights agree to 1e-5, not bitwise.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_distributed import ROOT, launch_cmd, make_base, make_data, metrics_rows, model_tensors, mogu_cmd, run_all
from test_fsdp import STEPS_PER_STAGE, _args, _assert_same_weights, kill_sharded_run

from mogu.errors import ConfigError
from mogu.train.sharding import launcher_zero_settings, zero3_config

pytest.importorskip("deepspeed")  # the zero3 extra; scripts/setup.sh installs it


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process; two with the backbone partitioned by `--shard-backbone zero3`; the v2 prompt gate, one
    process and two partitioned with gradient checkpointing."""
    root = tmp_path_factory.mktemp("zero3")
    base, data = make_base(root / "base"), make_data(root / "data")
    args = _args(base, data)
    gate = [*args, "--version", "v2", "--router-type", "prompt"]
    _, launched, _, gate_launched = run_all(
        mogu_cmd(*args, "--out", str(root / "one")),
        launch_cmd(*args, "--shard-backbone", "zero3", "--out", str(root / "two")),
        mogu_cmd(*gate, "--out", str(root / "gate-one")),
        launch_cmd(*gate, "--shard-backbone", "zero3", "--gradient-checkpointing", "--out", str(root / "gate-two")))
    return {"root": root, "base": base, "data": data, "log": launched.stderr, "gate_log": gate_launched.stderr}


def test_zero3_two_processes_train_the_weights_of_one_process(runs):
    root = runs["root"]
    assert "zero3: the frozen backbone is sharded over 2 processes" in runs["log"], runs["log"][-3000:]
    _assert_same_weights(root / "one" / "model", root / "two" / "model")
    one, two = metrics_rows(root / "one"), metrics_rows(root / "two")
    assert [(r["stage"], r["step"]) for r in one] == [(r["stage"], r["step"]) for r in two]
    for x, y in zip(one, two):
        if "dev" in x:
            assert x["dev"] == y["dev"]
        elif "loss" in x:
            assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, abs(x["loss"])), (x, y)


def test_zero3_each_rank_holds_half_of_the_backbone_and_run_json_records_it(runs):
    two = json.loads((runs["root"] / "two" / "run.json").read_text())["distribution"]
    assert two["processes"] == 2 and two["backbone_sharding"] == "zero3"
    total, per_rank = two["backbone_params"], two["backbone_params_per_rank"]
    assert two["zero_optimization"]["stage"] == 3 and "offload_param" not in two["zero_optimization"]
    one = json.loads((runs["root"] / "one" / "run.json").read_text())["distribution"]
    assert one["backbone_params"] == total and one["backbone_params_per_rank"] == [total]
    assert one["zero_optimization"] is None
    assert len(per_rank) == 2
    for held in per_rank:  # flat partitions, each tensor padded to a multiple of 2
        assert 0.5 * total <= held <= 0.52 * total, (held, total)


def test_zero3_prompt_gate_with_gradient_checkpointing_trains_the_weights_of_one_process(runs):
    assert "zero3: the frozen backbone is sharded" in runs["gate_log"], runs["gate_log"][-3000:]
    root = runs["root"]
    one, two = model_tensors(root / "gate-one" / "model"), model_tensors(root / "gate-two" / "model")
    assert one.keys() == two.keys() and any(k.startswith("router.") for k in one)
    for name in one:  # the gate's threshold is 0 by design: only the experts must have moved from init
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-5), (name, (one[name] - two[name]).abs().max())
        assert name.startswith("router.") or one[name].abs().sum() > 0, name
    fits = [[r for r in metrics_rows(root / d) if "gate_fit" in r] for d in ("gate-one", "gate-two")]
    assert fits[0] and fits[0] == fits[1]


def test_zero3_under_the_deepspeed_zero3_launcher_config_auto_partitions_the_backbone(runs):
    """configs/accelerate/deepspeed_zero3.yaml as shipped (2 processes): `auto` reads its ZeRO stage 3."""
    out = runs["root"] / "launcher"
    cmd = launch_cmd(*_args(runs["base"], runs["data"]), "--mixed-precision", "no", "--out", str(out))
    i = cmd.index("--config_file")
    cmd[i + 1:i + 2] = [str(ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"), "--num_processes", "2"]
    launched = run_all(cmd)[0]
    assert "zero3: the frozen backbone is sharded over 2 processes" in launched.stderr, launched.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["distribution"]["backbone_sharding"] == "zero3"
    _assert_same_weights(runs["root"] / "one" / "model", out / "model")


def test_zero3_with_parameters_offloaded_to_the_cpu_trains_the_weights_of_one_process(runs, tmp_path, monkeypatch):
    """A launcher DeepSpeed config that offloads the partitioned parameters (`offload_param: cpu`, what a 70B
    on few GPUs needs): passed through to DeepSpeed, recorded in run.json, and the same weights. On a CPU-only
    machine the offload target is the device itself, so this pins the settings' path, not a memory saving."""
    ds_config = tmp_path / "ds_offload.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu",
                                                                                          "pin_memory": False}}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` exports for a DeepSpeed config
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_config))
    out = runs["root"] / "offload"
    launched = run_all(launch_cmd(*_args(runs["base"], runs["data"]), "--out", str(out)))[0]
    assert "zero3: the frozen backbone is sharded over 2 processes" in launched.stderr, launched.stderr[-3000:]
    distribution = json.loads((out / "run.json").read_text())["distribution"]
    assert distribution["backbone_sharding"] == "zero3"
    assert distribution["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    _assert_same_weights(runs["root"] / "one" / "model", out / "model")


def test_zero3_killed_run_resumes_on_one_process_to_the_same_weights(runs):
    """SIGKILL a partitioned 2-process run mid-stage, resume it on 1 process: the weights of the 1-process run."""
    crashed = runs["root"] / "crashed"
    args = [*_args(runs["base"], runs["data"]), "--out", str(crashed)]
    killed_at = kill_sharded_run(runs["root"], args, "zero3")

    run_all(mogu_cmd(*args, "--resume"))
    _assert_same_weights(runs["root"] / "one" / "model", crashed / "model")
    rows = metrics_rows(crashed)
    for stage in ("glad", "unwill", "router"):
        steps = [r["step"] for r in rows if r["stage"] == stage and "loss" in r]
        assert steps == list(range(1, STEPS_PER_STAGE + 1)), (stage, steps, killed_at)


@pytest.mark.parametrize("shard", ["zero3", "fsdp2"])
def test_sharded_run_whose_last_batch_leaves_a_process_without_rows_trains_the_weights_of_one_process(runs, shard):
    """9 glad rows in batches of 8: the last batch's one row goes to process 1, and process 0, with none, must
    still join every layer's gather (zero-weighted micro-batches) instead of hanging."""
    root = runs["root"]
    args = [*_args(runs["base"], runs["data"]), "--glad-max-examples", "9", "--stages", "glad"]
    run_all(mogu_cmd(*args, "--out", str(root / f"short-one-{shard}")),
            launch_cmd(*args, "--shard-backbone", shard, "--out", str(root / f"short-two-{shard}")), timeout=300)
    one, two = (model_tensors(root / f"short-{k}-{shard}" / "model") for k in ("one", "two"))
    glad = [k for k in one if k.startswith("glad.")]
    assert glad and all(one[k].abs().sum() > 0 for k in glad)
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-5), (name, (one[name] - two[name]).abs().max())
    steps = [r["step"] for r in metrics_rows(root / f"short-two-{shard}") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # 2 batches an epoch, 2 epochs


def test_zero3_config_keeps_the_launchers_partitioning_settings_and_drops_its_optimizer_ones():
    cfg = zero3_config({"stage": 3, "offload_param": {"device": "cpu", "buffer_size": "auto"},
                        "offload_optimizer": {"device": "cpu"}, "stage3_prefetch_bucket_size": "auto",
                        "stage3_max_live_parameters": 10 ** 8, "stage3_param_persistence_threshold": 10 ** 5})
    ours = {"stage3_param_persistence_threshold": 0, "memory_efficient_linear": False}
    assert cfg["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"},
                                        "stage3_max_live_parameters": 10 ** 8, **ours}
    assert zero3_config(None)["zero_optimization"] == {"stage": 3, **ours}
    with pytest.raises(ConfigError, match="stage 2"):
        zero3_config({"stage": 2})
    with pytest.raises(ConfigError, match="zero_quantized_nontrainable_weights"):
        zero3_config({"stage": 3, "zero_quantized_nontrainable_weights": True})


def test_zero3_launcher_settings_are_read_from_what_accelerate_launch_exports(monkeypatch, tmp_path):
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    assert launcher_zero_settings() is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    assert launcher_zero_settings() == {"stage": 3, "offload_param": {"device": "cpu"}}
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "nvme")
    with pytest.raises(ConfigError, match="names no offload_param_nvme_path"):
        launcher_zero_settings()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_NVME_PATH", "/local_nvme")
    assert launcher_zero_settings() == {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"}}
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert launcher_zero_settings() == {"stage": 2}
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="cannot read the launcher's DeepSpeed config"):
        launcher_zero_settings()
