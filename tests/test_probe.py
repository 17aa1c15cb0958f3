"""mogu probe: per-layer feature collection, k-fold linear probes, layer selection, files and CLI."""

import json
import warnings

import pytest
import torch

from mogu import MoGUConfig, MoGUModel
from mogu.errors import ConfigError, DataError, MoGUError, UnknownFamilyError
from mogu.train.probe import (DEFAULT_SELECTION, METRICS, POOLINGS, ProbeReport, collect_layer_features, probe_layers,
                        run_probe, select_layers)
from tiny_models import FAMILY_CONFIGS, randomize_added, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = ["How do I bake sourdough bread at home?", "Hi", "Explain how to pick a lock to break into a house.",
           "What is the capital of France?", "Write a poem about the sea and the wind in winter."]


# -- selection ---------------------------------------------------------------------------------
def _report(mean_acc, last_acc=None, auroc=None):
    """A synthetic report; ``mean_acc`` etc. are lists indexed by layer."""
    rows = []
    for i, acc in enumerate(mean_acc):
        la = last_acc[i] if last_acc else acc
        au = auroc[i] if auroc else acc
        rows.append({"layer": i,
                     "mean": {"accuracy": acc, "accuracy_std": 0.01, "balanced_accuracy": acc,
                              "balanced_accuracy_std": 0.01, "auroc": au, "auroc_std": 0.01},
                     "last": {"accuracy": la, "accuracy_std": 0.02, "balanced_accuracy": la,
                              "balanced_accuracy_std": 0.02, "auroc": la, "auroc_std": 0.02}})
    return ProbeReport(layers=rows, n_harmful=40, n_benign=60, folds=5, seed=0, model="tiny", target_modules=["o_proj"])


ACC = [0.6, 0.9, 0.7, 0.95, 0.9, 0.8]


def test_select_top_k_sorted_ascending():
    assert select_layers(_report(ACC), top_k=1) == [3]
    assert select_layers(_report(ACC), top_k=3) == [1, 3, 4]
    assert select_layers(_report(ACC), top_k=100) == list(range(len(ACC)))


def test_select_ties_go_to_the_lower_layer():
    # Layers 1 and 4 tie at 0.9; the second slot goes to layer 1.
    assert select_layers(_report(ACC), top_k=2) == [1, 3]
    assert select_layers(_report([0.8, 0.8, 0.8]), top_k=2) == [0, 1]


def test_select_threshold_and_both():
    r = _report(ACC)
    assert select_layers(r, threshold=0.8) == [1, 3, 4, 5]
    assert select_layers(r, threshold=0.9) == [1, 3, 4]  # >= is inclusive
    assert select_layers(r, threshold=0.8, top_k=2) == [1, 3]  # top k among those passing
    assert select_layers(r, threshold=0.94, top_k=3) == [3]


def test_select_threshold_fallback_warns():
    with pytest.warns(UserWarning, match="falling back"):
        assert select_layers(_report(ACC), threshold=0.99) == [3]
    with pytest.warns(UserWarning, match="falling back"):
        assert select_layers(_report(ACC), threshold=0.99, top_k=3) == [3]


def test_select_pooling_and_metric():
    r = _report(ACC, last_acc=[0.99, 0.5, 0.5, 0.5, 0.5, 0.98], auroc=[0.5, 0.5, 0.99, 0.5, 0.5, 0.5])
    assert select_layers(r, pooling="last", top_k=2) == [0, 5]
    assert select_layers(r, metric="auroc", top_k=1) == [2]


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": True}, "top_k"),
    ({"threshold": 1.5}, "threshold"), ({"threshold": -0.1}, "threshold"), ({"threshold": "0.5"}, "threshold"),
    ({"pooling": "max", "top_k": 1}, "pooling"), ({"metric": "f1", "top_k": 1}, "metric"),
    ({}, "top_k and/or threshold"),
])
def test_select_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        select_layers(_report(ACC), **kwargs)


def test_default_selection_and_recorded_selection():
    r = _report(ACC)
    assert set(DEFAULT_SELECTION) == {"pooling", "metric", "top_k", "threshold"}
    assert DEFAULT_SELECTION["pooling"] in POOLINGS and DEFAULT_SELECTION["metric"] in METRICS
    assert r.selected_layers == select_layers(r, **DEFAULT_SELECTION)
    assert r.select(top_k=2) == [1, 3]
    assert r.selection == {**DEFAULT_SELECTION, "top_k": 2, "layers": [1, 3]}
    assert r.selected_layers == [1, 3]


# -- probing -----------------------------------------------------------------------------------
def _synthetic(n=120, d=24, shift=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    noise = torch.randn(n, d, generator=g)
    separable = noise + shift * y[:, None].float() * (torch.arange(d) < 6).float()
    random = torch.randn(n, d, generator=g)
    return y, {0: {"mean": separable, "last": random}, 1: {"mean": random, "last": separable * 0.5}}


def test_probe_separates_separable_features_and_not_random_ones():
    y, feats = _synthetic()
    report = probe_layers(feats, y, folds=5, seed=0)
    assert report.layer_indices == [0, 1] and report.n_harmful == 60 and report.n_benign == 60
    assert report.dim == 24 and report.folds == 5
    for layer, pooling in ((0, "mean"), (1, "last")):
        s = report.layers[layer][pooling]
        assert s["accuracy"] > 0.93 and s["auroc"] > 0.97 and s["balanced_accuracy"] > 0.93, s
        assert 0 <= s["accuracy_std"] < 0.15
    for layer, pooling in ((0, "last"), (1, "mean")):
        s = report.layers[layer][pooling]
        assert 0.25 < s["accuracy"] < 0.75 and 0.25 < s["auroc"] < 0.75, s
    assert select_layers(report, pooling="mean", top_k=1) == [0]
    assert select_layers(report, pooling="last", top_k=1) == [1]
    # Seeded: the same folds and scores on a rerun.
    assert probe_layers({0: feats[0]}, y, folds=5, seed=0).layers == report.layers[:1]


def test_probe_accepts_bool_labels_and_lists():
    y, feats = _synthetic(n=40)
    report = probe_layers(feats, [bool(v) for v in y], folds=2, seed=1)
    assert report.n_harmful == 20 and report.folds == 2


def test_probe_validation():
    y, feats = _synthetic(n=40)
    with pytest.raises(DataError, match="both classes"):
        probe_layers(feats, torch.zeros(40), folds=5)
    few = torch.zeros(40)
    few[:3] = 1
    with pytest.raises(DataError, match="at least 5 prompts per class"):
        probe_layers(feats, few, folds=5)
    with pytest.raises(DataError, match="do not match"):
        probe_layers(feats, y[:30], folds=5)
    with pytest.raises(DataError, match="0 \\(benign\\) and 1"):
        probe_layers(feats, y * 2, folds=5)
    with pytest.raises(ConfigError, match="folds"):
        probe_layers(feats, y, folds=1)
    bad = {0: {"mean": feats[0]["mean"].clone(), "last": feats[0]["last"]}}
    bad[0]["mean"][0, 0] = float("nan")
    with pytest.raises(MoGUError, match="NaN"):
        probe_layers(bad, y, folds=5)
    with pytest.raises(DataError, match="no 'last' features"):
        probe_layers({0: {"mean": feats[0]["mean"]}}, y, folds=5)


# -- feature collection ------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_collect_features_every_family(family):
    tok = tiny_tokenizer()
    base = tiny_model(family)
    feats = collect_layer_features(base, tok, PROMPTS, batch_size=2)
    assert sorted(feats) == [0, 1]
    for layer, by_pool in feats.items():
        assert set(by_pool) == set(POOLINGS)
        for x in by_pool.values():
            assert x.shape == (len(PROMPTS), 32) and x.dtype == torch.float32 and x.device.type == "cpu"
            assert torch.isfinite(x).all()
        assert not torch.allclose(by_pool["last"], by_pool["mean"])
    assert not any(m._forward_pre_hooks for m in base.modules())
    # A MoGU model with active experts and routers gives the base model's features (routing off).
    mogu = randomize_added(MoGUModel.from_base(base, MoGUConfig(), tokenizer=tok), router_bias=2.0)
    mogu.set_routing("unwill")
    routed = collect_layer_features(mogu, tok, PROMPTS, batch_size=3)
    assert mogu.routing_mode == "unwill"
    for layer in feats:
        for p in POOLINGS:
            torch.testing.assert_close(routed[layer][p], feats[layer][p], atol=1e-5, rtol=1e-4)
    assert not any(m._forward_pre_hooks for m in mogu.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_residual_features_are_each_decoder_layers_output_hidden_state(family):
    """``read="residual"``: the residual stream a decoder layer outputs, at the prompt's last token, which is
    Hugging Face's ``hidden_states[i + 1]`` for all but the last layer (whose output the final norm follows)."""
    from mogu.chat import render_prompt

    tok, base = tiny_tokenizer(), tiny_model(family)
    feats = collect_layer_features(base, tok, PROMPTS[:1], batch_size=1, read="residual")
    assert sorted(feats) == [0, 1] and not any(m._forward_hooks for m in base.modules())
    enc = tok([render_prompt(tok, PROMPTS[0])], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hidden = base(**enc, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats[0]["last"][0], hidden[1][0, -1].float(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(feats[0]["last"], collect_layer_features(base, tok, PROMPTS[:1])[0]["last"])
    with pytest.raises(ConfigError, match="read must be one of"):
        collect_layer_features(base, tok, PROMPTS[:1], read="attention")


def test_collect_features_do_not_depend_on_batching_or_padding():
    tok = tiny_tokenizer()
    base = tiny_model("llama")
    tok.padding_side = "right"
    try:
        whole = collect_layer_features(base, tok, PROMPTS, batch_size=len(PROMPTS))
        assert tok.padding_side == "right"  # restored
    finally:
        tok.padding_side = "left"
    single = collect_layer_features(base, tok, PROMPTS, batch_size=1)
    for layer in whole:
        for p in POOLINGS:
            torch.testing.assert_close(whole[layer][p], single[layer][p], atol=1e-5, rtol=1e-4)


def test_collect_features_mogu_subset_and_routing_matters():
    tok = tiny_tokenizer()
    base = tiny_model("llama")
    plain = collect_layer_features(base, tok, PROMPTS[:3])
    mogu = randomize_added(MoGUModel.from_base(base, MoGUConfig(routed_layers=[0]), tokenizer=tok), router_bias=2.0)
    feats = collect_layer_features(mogu, tok, PROMPTS[:3])
    assert sorted(feats) == [0, 1]  # unrouted layers are probed too
    torch.testing.assert_close(feats[1]["mean"], plain[1]["mean"], atol=1e-5, rtol=1e-4)
    # The experts do change layer 1's input when routing is on, so "off" is what made them equal.
    enc = tok(["Hi there"], return_tensors="pt")
    with torch.no_grad(), mogu.routing("auto"):
        on = mogu(**enc).logits
    with torch.no_grad(), mogu.routing("off"):
        off = mogu(**enc).logits
    assert not torch.allclose(on, off, atol=1e-4)


def test_collect_features_target_override_and_unknown_family():
    tok = tiny_tokenizer()
    feats = collect_layer_features(tiny_model("llama"), tok, PROMPTS[:2], target_modules=["self_attn.q_proj"])
    assert feats[0]["last"].shape == (2, 32)
    with pytest.raises(ConfigError, match="no projection matches"):
        collect_layer_features(tiny_model("llama"), tok, PROMPTS[:2], target_modules=["nope"])
    with pytest.raises(ConfigError, match="more than one module"):
        collect_layer_features(tiny_model("llama"), tok, PROMPTS[:2], target_modules=["q_proj", "o_proj"])
    import transformers as tf

    biogpt = tf.BioGptForCausalLM(tf.BioGptConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64))
    with pytest.raises(UnknownFamilyError, match="target_modules"):
        collect_layer_features(biogpt, tok, PROMPTS[:2])
    with pytest.raises(DataError, match="no prompts"):
        collect_layer_features(tiny_model("llama"), tok, [])


def test_run_probe_end_to_end_on_a_tiny_model():
    from mogu.chat import render_prompt
    from mogu.train.data import builtin_prompts

    # The tiny GPT-2 has 128 positions; its word-level tokenizer makes a few shipped prompts longer.
    tok = tiny_tokenizer()

    def fits(prompt: str) -> bool:
        return len(tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]) <= 128

    harmful = [r.prompt for r in builtin_prompts("harmful", "train") if fits(r.prompt)]
    benign = [r.prompt for r in builtin_prompts("benign", "train") if fits(r.prompt)]
    report = run_probe(tiny_model("gpt2"), tok, harmful, benign, folds=3, limit=12, seed=0,
                       model_id="tiny-gpt2", selection={"top_k": 1})
    assert report.n_harmful == 12 and report.n_benign == 12 and report.folds == 3
    assert report.target_modules == ["attn.c_proj"] and report.model == "tiny-gpt2"
    assert len(report.selection["layers"]) == 1 and report.selection["pooling"] == DEFAULT_SELECTION["pooling"]
    with pytest.raises(DataError, match="at least 5 prompts per class"):
        run_probe(tiny_model("gpt2"), tiny_tokenizer(), harmful[:3], benign, folds=5)


def test_a_prompt_past_the_models_context_is_a_data_error_naming_it():
    prompts = ["Hi there", " ".join(["word"] * 200), "Hello"]
    with pytest.raises(DataError, match=r"prompt 1 is \d+ tokens .* context of 128"):
        collect_layer_features(tiny_model("gpt2"), tiny_tokenizer(), prompts, batch_size=2)


# -- files -------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    y, feats = _synthetic(n=40)
    report = probe_layers(feats, y, folds=4, seed=3, model="tiny", target_modules=["o_proj"])
    report.select(top_k=1)
    path = report.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "probe.json"
    png = (tmp_path / "ckpt" / "probe.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temp files left
    for where in (tmp_path / "ckpt", path):
        loaded = ProbeReport.load(where)
        assert loaded == report
    assert json.loads(path.read_text())["format"] == "mogu-probe"
    md = report.to_markdown()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + len(report.layers)
    assert "Selected layers [0]" in md and "✓" in md


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="no such probe file"):
        ProbeReport.load(tmp_path)
    bad = tmp_path / "probe.json"
    bad.write_text('{"layers": [\n  {"layer": 0,\n')
    with pytest.raises(DataError, match="malformed JSON at line"):
        ProbeReport.load(tmp_path)
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        ProbeReport.load(bad)
    good = _report(ACC).to_dict()
    bad.write_text(json.dumps({k: v for k, v in good.items() if k != "n_benign"}))
    with pytest.raises(DataError, match="missing field 'n_benign'"):
        ProbeReport.load(bad)
    broken = json.loads(json.dumps(good))
    del broken["layers"][2]["mean"]["auroc"]
    bad.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"layers\[2\] mean.auroc"):
        ProbeReport.load(bad)
    bad.write_text(json.dumps({**good, "format": "something-else"}))
    with pytest.raises(DataError, match="not a probe report"):
        ProbeReport.load(bad)
    bad.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(DataError, match="newer"):
        ProbeReport.load(bad)


# -- CLI ---------------------------------------------------------------------------------------
def _mogu_cli(*args):
    from typer.testing import CliRunner

    from mogu.cli import app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(app, list(args))


def test_cli_probe_on_a_tiny_model_folder(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    out = tmp_path / "probe"
    result = _mogu_cli("probe", "--model", str(base_dir), "--out", str(out), "--limit", "10", "--folds", "2",
                       "--top-k", "1")
    assert result.exit_code == 0, result.output
    assert (out / "probe.png").stat().st_size > 1000
    report = ProbeReport.load(out)
    assert report.n_harmful == 10 and report.n_benign == 10 and report.folds == 2
    assert report.model == str(base_dir) and report.target_modules == ["o_proj"]
    assert report.selection["top_k"] == 1 and len(report.selection["layers"]) == 1
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["limit"] == 10 and run["args"]["selection"]["top_k"] == 1
    assert "| layer |" in result.stdout and f"selected layers: {report.selection['layers'][0]}" in result.stdout


def test_cli_probe_on_a_checkpoint_with_threshold_fallback(tmp_path):
    from typer.testing import CliRunner

    from mogu.cli import app

    base_dir = tmp_path / "base"
    tiny_model("gpt2").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    MoGUModel.from_base(str(base_dir), MoGUConfig()).save_pretrained(tmp_path / "ckpt")
    # Both labels on the same prompts: no layer can separate them, so no layer reaches AUROC 1.0.
    (tmp_path / "h.txt").write_text("\n".join(f"how do I bake bread number {i}" for i in range(8)))
    (tmp_path / "b.txt").write_text("\n".join(f"how do I bake bread number {i}" for i in range(8)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(app, ["probe", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "p"),
                                          "--harmful", str(tmp_path / "h.txt"), "--benign", str(tmp_path / "b.txt"),
                                          "--folds", "2", "--threshold", "1.0", "--metric", "auroc",
                                          "--pooling", "last"])
    assert result.exit_code == 0, result.output
    assert "warning: no layer reaches auroc >= 1.0" in result.output  # the CLI shows the fallback as one line
    report = ProbeReport.load(tmp_path / "p")
    # 15% of each file is held out as dev, as in `mogu data build`.
    assert report.n_harmful == 7 and report.n_benign == 7
    assert report.model == str(base_dir) and report.extra["is_mogu_checkpoint"] is True
    assert report.selection["threshold"] == 1.0 and report.selection["top_k"] is None
    assert len(report.selection["layers"]) == 1  # the fallback: the single best layer


@pytest.mark.parametrize("args, match", [(["--threshold", "2"], "--threshold must be in [0, 1]"),
                                         (["--pooling", "max"], "--pooling must be one of")])
def test_cli_probe_option_errors(tmp_path, args, match):
    from typer.testing import CliRunner

    from mogu.cli import app

    result = CliRunner().invoke(app, ["probe", "--out", str(tmp_path / "p"), *args])
    assert result.exit_code != 0 and isinstance(result.exception, MoGUError) and match in str(result.exception)
    assert not (tmp_path / "p").exists()


def test_cli_probe_help():
    result = _mogu_cli("probe", "--help")
    assert result.exit_code == 0 and "--top-k" in result.output and "--threshold" in result.output
