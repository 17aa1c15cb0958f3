"""The routing-strategy interface (mogu.tuner.routing): registries, the strategies' contracts, and no
router-type branches left outside it."""

import re
from pathlib import Path

import pytest
import torch

from mogu import MoGUConfig, MoGUModel
from mogu.errors import ConfigError, MoGUError
from mogu.train.calibration import shift_router_bias
from mogu.tuner.config import HANDOFFS, ROUTER_TYPES
from mogu.tuner.layer import PrefixScore
from mogu.tuner.routing import (HANDOFF_POLICIES, ROUTING_STRATEGIES, FixedHandoff, HoldRefusal, PromptGateRouting,
                                TokenRouters, handoff_policy)
from tiny_models import randomize_added, tiny_model, tiny_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "mogu"


def make(router_type: str, family: str = "llama") -> MoGUModel:
    model = MoGUModel.from_base(tiny_model(family), MoGUConfig(router_type=router_type, gate_benign="glad"),
                                tokenizer=tiny_tokenizer())
    randomize_added(model)
    return model


def test_every_router_type_and_handoff_name_has_a_registered_strategy():
    assert set(ROUTING_STRATEGIES) == set(ROUTER_TYPES)
    assert set(HANDOFF_POLICIES) == set(HANDOFFS)
    assert ROUTING_STRATEGIES["token"] is TokenRouters and ROUTING_STRATEGIES["prompt"] is PromptGateRouting


@pytest.mark.parametrize("router_type,cls,per_prompt", [("token", TokenRouters, False), ("prompt", PromptGateRouting, True)])
def test_the_model_routes_through_its_router_types_strategy(router_type, cls, per_prompt):
    model = make(router_type)
    strategy = model.routing_strategy
    assert type(strategy) is cls and strategy.model is model
    assert strategy.decides_per_prompt is per_prompt and strategy.trains_by_gradient is (not per_prompt)
    # The strategy owns the routing parameters and their saved form.
    assert [id(p) for p in model.router_parameters()] == [id(p) for p in strategy.parameters()]
    assert model.router_state_dict().keys() == strategy.state_dict().keys()
    if per_prompt:
        assert model.gate is strategy.gate and strategy.gate in model.modules()
    else:
        assert model.gate is None


def test_routing_decision_is_pinned_weights_for_the_gate_and_none_for_token_routers():
    x = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    token, gate = make("token"), make("prompt")
    assert token.routing_decision(x) is None  # token routers decide per token
    weights = gate.routing_decision(x)
    assert weights.shape == (3, 2) and torch.equal(weights, gate.routing_weights(x))
    with gate.routing("glad"):
        assert gate.routing_decision(x) is None  # a fixed expert: nothing to decide
    with gate.pin_routing(torch.tensor([[1.0, 0.0]])):
        assert gate.routing_decision(x) is None and torch.equal(gate.pinned_routing, torch.tensor([[1.0, 0.0]]))
    assert gate.pinned_routing is None
    with pytest.raises(MoGUError, match="router_type='prompt'"):
        token.routing_weights(x)
    with pytest.raises(MoGUError, match="router_type='prompt'"):
        with token.pin_routing(torch.tensor([[1.0, 0.0]])):
            pass


@pytest.mark.parametrize("router_type", ["token", "prompt"])
def test_operating_point_moves_by_delta_and_restores_bit_exactly(router_type):
    model = make(router_type)
    strategy = model.routing_strategy
    before = {k: v.clone() for k, v in model.router_state_dict().items()}
    snapshot = strategy.operating_point()
    strategy.set_operating_point(snapshot, 0.75)
    moved = model.router_state_dict()
    assert any(not torch.equal(moved[k], before[k]) for k in before)
    strategy.set_operating_point(snapshot)
    assert all(torch.equal(model.router_state_dict()[k], before[k]) for k in before)
    # shift_toward_glad(d) == set_operating_point(current, d) == the calibration shift
    strategy.shift_toward_glad(0.5)
    once = {k: v.clone() for k, v in model.router_state_dict().items()}
    strategy.set_operating_point(snapshot)
    shift_router_bias(model, 0.5)
    assert all(torch.equal(model.router_state_dict()[k], once[k]) for k in once)
    if router_type == "prompt":
        assert float(model.gate.threshold) == pytest.approx(float(snapshot) + 0.5)
    else:
        module = next(iter(model.routed_modules.values()))
        torch.testing.assert_close(module.router.glad.linear_2.bias, snapshot[0][1] + 0.5, rtol=0, atol=0)
        torch.testing.assert_close(module.router.unwill.linear_2.bias, snapshot[0][0] - 0.5, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="finite"):
        strategy.shift_toward_glad(float("nan"))


def test_fixed_handoff_holds_no_row_and_hold_keeps_the_rows_routing_judged_harmful():
    pinned = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert handoff_policy("fixed").held_rows(pinned, None, 3).tolist() == [False, False, False]
    assert handoff_policy("hold").held_rows(pinned, None, 3).tolist() == [True, False, True]
    # num_return_sequences: each prompt's decision repeats for its returned rows
    assert HoldRefusal().held_rows(pinned[:2], None, 4).tolist() == [True, True, False, False]
    score = PrefixScore()
    # token routers: the mean u - g over layers and routed tokens, read at each step's last position
    score.add(torch.tensor([[[0.7]], [[0.2]]]), torch.tensor([[[0.3]], [[0.4]]]))
    assert HoldRefusal().held_rows(None, score, 2).tolist() == [True, False]
    assert isinstance(handoff_policy("fixed"), FixedHandoff) and not FixedHandoff.scores_prefix
    with pytest.raises(ConfigError, match="handoff must be one of"):
        handoff_policy("never")


def test_unknown_router_type_is_a_config_error():
    with pytest.raises(ConfigError, match="router_type"):
        MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_type="tokens"))


def test_no_router_type_branches_outside_the_routing_strategies():
    """Model, generation, training, calibration and serve ask the strategy; none tests for a gate."""
    pattern = re.compile(r"\bgate is (not )?None|router_type == ['\"]|getattr\([^)]*['\"]gate['\"]")
    offenders = []
    for path in SRC.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert offenders == []
