"""Reference-answer likelihood (mogu.tuner.likelihood): the logits generate() picks each answer token from.

Pinned on every family and every routing path: the teacher-forced logits' argmax is generate()'s own
greedy answer (token routers held and handed off, the gate with either benign policy, both hand-offs,
route_tokens=None); a prompt the base-benign gate passes scores exactly the base model's NLL; a flagged
prompt scores the unwilling expert's; routing off scores the base model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mogu import MoGUConfig, MoGUModel
from mogu.errors import ConfigError, MoGUError
from mogu.tuner.likelihood import answer_logits, answer_nll
from test_handoff import make as make_token_model
from tiny_models import FAMILY_CONFIGS, randomize_added, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = sorted(FAMILY_CONFIGS)


def token_model(family, lean=None):
    return make_token_model(family, lean=lean)  # test_handoff's: random experts, routers leaning one way


def gated_model(family, benign, flag: bool):
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    model = MoGUModel.from_base(base, MoGUConfig(router_type="prompt", gate_benign=benign, lora_dropout=0.0),
                                tokenizer=tiny_tokenizer())
    randomize_added(model)
    with torch.no_grad():  # every prompt flagged (threshold far below) or passed (far above)
        model.gate.threshold.fill_(-1e6 if flag else 1e6)
    return model, reference


def prompt(seed=0, length=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (length,), generator=g).tolist()


def greedy_answer(model, x, n=9, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([x]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, **kw)
    return out[0, len(x):].tolist()


def assert_argmax_is_greedy(model, x, **kw):
    answer = greedy_answer(model, x, **kw)
    logits, held = answer_logits(model, x, answer, **kw)
    assert logits.shape[0] == len(answer)
    eos = model.base_model.generation_config.eos_token_id or model.base_model.config.eos_token_id
    if eos is not None:  # min_new_tokens keeps generate from picking EOS
        logits = logits.clone()
        logits[:, torch.tensor(eos).reshape(-1)] = float("-inf")
    assert logits.argmax(-1).tolist() == answer
    return held


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lean", ["unwill", "glad", None])
def test_token_router_logits_argmax_is_generates_greedy_answer_held_or_handed_off(family, lean):
    model = token_model(family, lean)
    for handoff in ("hold", "fixed"):
        held = assert_argmax_is_greedy(model, prompt(1), route_tokens=3, handoff=handoff)
        if handoff == "fixed":
            assert not held
        elif lean is not None:
            assert held == (lean == "unwill")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("benign,handoff", [("base", "hold"), ("glad", "hold"), ("glad", "fixed"), ("base", "fixed")])
def test_gate_logits_argmax_is_generates_greedy_answer_for_flagged_and_passed_prompts(family, benign, handoff):
    for flag in (True, False):
        model, _ = gated_model(family, benign, flag)
        held = assert_argmax_is_greedy(model, prompt(2), route_tokens=3, handoff=handoff)
        assert held == (flag and handoff == "hold")


def test_route_tokens_none_scores_the_routed_model_throughout():
    model = token_model("llama")
    x = prompt(3)
    assert_argmax_is_greedy(model, x, route_tokens=None)
    answer = greedy_answer(model, x, route_tokens=None)
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([x + answer])).logits[0, len(x) - 1: -1]
    logits, held = answer_logits(model, x, answer, route_tokens=None)
    torch.testing.assert_close(logits, direct, rtol=0, atol=0)
    assert not held


@pytest.mark.parametrize("family", FAMILIES)
def test_passed_prompt_scores_exactly_the_base_nll_and_flagged_the_unwilling_experts(family):
    x, answer = prompt(4), prompt(5, 11)
    seq = torch.tensor([x + answer])
    targets = torch.tensor(answer)
    passed, reference = gated_model(family, "base", flag=False)
    with torch.no_grad():
        base_nll = F.cross_entropy(reference(input_ids=seq).logits[0, len(x) - 1: -1], targets, reduction="sum")
    got = answer_nll(passed, x, answer)
    assert got.nll == float(base_nll) and got.tokens == len(answer) and not got.held
    flagged, _ = gated_model(family, "base", flag=True)
    with torch.no_grad(), flagged.routing("unwill"):
        unwill_nll = F.cross_entropy(flagged(input_ids=seq).logits[0, len(x) - 1: -1], targets, reduction="sum")
    got = answer_nll(flagged, x, answer)
    assert got.held
    assert got.nll == pytest.approx(float(unwill_nll), rel=1e-5)
    assert got.mean == pytest.approx(got.nll / len(answer))


def test_routing_off_scores_the_base_model_and_empty_answers_score_nothing():
    model = token_model("llama")
    reference = tiny_model("llama")  # the same seed: the model before MoGU wrapped it
    x, answer = prompt(6), prompt(7, 5)
    with model.routing("off"):
        got = answer_nll(model, x, answer)
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([x + answer])).logits[0, len(x) - 1: -1]
    assert got.nll == float(F.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
    empty = answer_nll(model, x, [])
    assert empty.tokens == 0 and empty.nll == 0.0


def test_bad_arguments_get_clear_errors():
    model = token_model("llama")
    with pytest.raises(ConfigError, match="handoff"):
        answer_logits(model, prompt(), prompt(1), handoff="sometimes")
    with pytest.raises(MoGUError, match="non-empty"):
        answer_logits(model, [], prompt(1))


@pytest.mark.parametrize("lean", ["unwill", "glad"])
def test_token_benign_base_logits_argmax_is_generates_greedy_answer(lean):
    """token_benign="base": a prompt the routers lean benign on is scored as the base model's answer."""
    model = token_model("llama", lean)
    model.config.token_benign = "base"
    held = assert_argmax_is_greedy(model, prompt(1), route_tokens=3, handoff="hold")
    assert held == (lean == "unwill")
