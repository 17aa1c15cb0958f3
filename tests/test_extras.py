"""Optional dependencies as extras: the core imports and trains without them, and a feature that needs
one says which extra to install, in one line."""

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from mogu.errors import MoGUError
from mogu.extras import EXTRAS, MissingExtraError, has_extra, missing_modules, require_extra

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = sorted({m for mods in EXTRAS.values() for m in mods})


def run_without(modules, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``modules`` fails."""
    block = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run([sys.executable, "-c", block + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT / "tests", timeout=300)


def test_every_extra_is_declared_in_pyproject_and_all_installs_every_one():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    # `all` is every extra but quant, which costs every adapter save a bitsandbytes import, and zero3, a large
    # package only multi-process training on DeepSpeed needs (pyproject.toml).
    assert extras["all"] == [f"mogu[{','.join(e for e in EXTRAS if e not in ('quant', 'zero3'))}]"]
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("fastapi", "uvicorn", "openai", "sacrebleu", "matplotlib", "gguf", "deepspeed"):
        assert not any(d.startswith(name) for d in core), f"{name} is optional and must not be a core dependency"
    assert 'pip install -q -e ".[all,quant,zero3,test]"' in (ROOT / "scripts" / "setup.sh").read_text()


def test_a_missing_extra_is_one_line_that_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert missing_modules("serve") == ["fastapi"] and not has_extra("serve") and has_extra("serve", "uvicorn")
    with pytest.raises(MissingExtraError) as err:
        require_extra("serve")
    message = str(err.value)
    assert "\n" not in message and "pip install 'mogu[serve]'" in message and "fastapi" in message
    assert isinstance(err.value, MoGUError) and isinstance(err.value, ImportError)
    require_extra("eval")  # installed here ([all,test]): no error
    with pytest.raises(KeyError, match="unknown extra"):
        require_extra("nope")


def test_core_imports_builds_trains_and_generates_without_any_extra():
    out = run_without(OPTIONAL, """
        import torch
        import mogu, mogu.cli, mogu.train.recipes, mogu.train.stages, mogu.train.probe, mogu.eval.runner
        from mogu import MoGUConfig, MoGUModel
        from mogu.train.losses import router_loss
        from tiny_models import tiny_model, tiny_tokenizer
        tok = tiny_tokenizer()
        model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(), tokenizer=tok)
        enc = tok(["hello there"], return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        assert ids.shape[1] == enc["input_ids"].shape[1] + 3
        print("core ok")
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "core ok" in out.stdout


@pytest.mark.parametrize("blocked,code,extra", [
    (["fastapi"], "import mogu.serve", "serve"),
    (["sacrebleu"], "from mogu.eval.report import base_agreement; base_agreement([{'benchmark': 'b', 'id': 1, 'response': 'x'}], [])", "eval"),
    (["openai"], "from mogu.eval.judges import OpenAIJudge; OpenAIJudge(model='m', base_url='http://127.0.0.1:9/v1')", "eval"),
    (["bitsandbytes"], "from mogu.tuner.loading import load_base_model; load_base_model('gpt2', quantization='4bit')",
     "quant"),
])
def test_each_feature_names_its_missing_extra(blocked, code, extra):
    out = run_without(blocked, f"""
        from mogu.extras import MissingExtraError
        try:
            {code}
        except MissingExtraError as e:
            print("MISSING:", e)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"MISSING:" in out.stdout and f"pip install 'mogu[{extra}]'" in out.stdout


def test_the_cli_prints_the_missing_extra_in_one_line_and_exits_2():
    out = run_without(["fastapi", "uvicorn"], """
        import sys
        sys.argv = ["mogu", "serve", "--model", "nowhere"]
        from mogu.cli import main
        main()
    """)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'mogu[serve]'" in lines[0], out.stderr


def test_a_probe_report_saves_without_matplotlib(tmp_path):
    out = run_without(["matplotlib"], f"""
        import torch
        from pathlib import Path
        from mogu.train.probe import probe_layers
        g = torch.Generator().manual_seed(0)
        x = torch.randn(20, 8, generator=g)
        labels = [i % 2 for i in range(20)]
        x[torch.tensor(labels, dtype=torch.bool)] += 2.0
        report = probe_layers({{0: {{"mean": x, "last": x}}}}, labels, folds=2)
        path = report.save(Path({str(tmp_path)!r}))
        print(path.is_file(), (path.parent / "probe.png").exists())
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False"]
