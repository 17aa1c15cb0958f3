"""benchmarks/speed.py: the smoke path runs end to end and reports every setting (no timing asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("mogu_speed_benchmark", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_every_setting(speed, tmp_path):
    out = tmp_path / "speed.json"
    assert speed.main(["--tiny", "--repeats", "1", "--new-tokens", "8", "--xlora-new-tokens", "2",
                       "--batch-sizes", "1,3", "--threads", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = {(r["setting"], r["batch"]): r for r in payload["results"]}
    for batch in (1, 3):
        for name in (speed.BASE, speed.MOGU_M, speed.MOGU_ALL, speed.MOGU_GATE):
            r = rows[(name, batch)]
            assert r["new_tokens"] == 8 and r["tokens_per_s"] > 0 and r["x_base"] > 0
        assert rows[(speed.BASE, batch)]["x_base"] == 1.0
        assert (speed.XLORA, batch) in rows  # timed, or reported unavailable with the reason
    assert [h["batch"] for h in payload["handoff"]] == [1, 3]
    assert payload["environment"]["device"] == "cpu" and payload["environment"]["dtype"] == "float32"


def test_shared_weights_copy_shares_tensors_and_stays_unwrapped(speed):
    from mogu import MoGUConfig, MoGUModel

    base = speed.tiny_base()
    copy = speed.shared_weights_copy(base)
    for (name, p), (_, q) in zip(base.named_parameters(), copy.named_parameters()):
        assert p is q, name
    MoGUModel.from_base(copy, MoGUConfig(r=4, lora_alpha=8))
    assert not any("lora" in name for name, _ in base.named_modules())  # the original is not wrapped
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(base(ids).logits, speed.tiny_base()(ids).logits, rtol=0, atol=0)


def test_argument_errors(speed):
    with pytest.raises(SystemExit):
        speed.parse_args(["--tiny", "--shape", "llama-3-8b"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--batch-sizes", "9"])  # chat prompts: at most 8
    assert speed.parse_args(["--tiny", "--batch-sizes", "32"]).batch_sizes == [32]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            speed.parse_args(["--tiny", "--device", "cuda"])
