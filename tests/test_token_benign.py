"""token_benign="base": token routers score the prompt first; a prompt they lean benign on is the base model's
answer, the others get the routed prefix and the hold rule (mogu.tuner.generation)."""

from __future__ import annotations

import pytest
import torch

from mogu import MoGUConfig, MoGUModel
from mogu.errors import ConfigError
from mogu.tuner.generation import prompt_margins
from tiny_models import assert_batch_equals_single, left_pad, randomize_added, tiny_model

ROWS = [[5, 17, 33, 9], [7, 41, 90, 12, 30, 8], [11, 12], [60, 61, 62], [20, 21, 22, 23, 24], [3, 99]]
KW = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def _split_model(family: str = "llama", token_benign: str = "base") -> MoGUModel:
    """Random experts and routers, the operating point moved to the median prompt margin: half the rows
    lean benign, half harmful."""
    torch.manual_seed(0)
    model = MoGUModel.from_base(tiny_model(family), MoGUConfig(router_hidden=16, lora_dropout=0.0,
                                                               token_benign=token_benign))
    randomize_added(model)
    model.eval()
    ids, mask = left_pad(ROWS)
    margins = prompt_margins(model, ids, mask)
    strategy = model.routing_strategy
    # u - g falls by about 2 * delta * sigmoid' per layer; search the shift that splits the rows in two.
    point, lo, hi = strategy.operating_point(), -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        strategy.set_operating_point(point, mid)
        flagged = int((prompt_margins(model, ids, mask) > 0).sum())
        if flagged == len(ROWS) // 2:
            break
        lo, hi = (mid, hi) if flagged > len(ROWS) // 2 else (lo, mid)
    assert int((prompt_margins(model, ids, mask) > 0).sum()) == len(ROWS) // 2, margins
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_token_benign_base_answers_benign_leaning_prompts_as_the_base_and_the_rest_as_routed(family):
    model = _split_model(family)
    base = tiny_model(family)
    ids, mask = left_pad(ROWS)
    flagged = prompt_margins(model, ids, mask) > 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **KW)
        timing = dict(model.last_generate_timing)
        plain = base.generate(input_ids=ids[~flagged], attention_mask=mask[~flagged], **KW)
        model.config.token_benign = "routed"
        routed = model.generate(input_ids=ids[flagged], attention_mask=mask[flagged], **KW)
    assert timing["prompt_flagged"] == flagged.tolist()
    width = ids.shape[1]
    assert out[~flagged][:, width:plain.shape[1]].tolist() == plain[:, width:].tolist()
    assert out[flagged][:, width:routed.shape[1]].tolist() == routed[:, width:].tolist()
    assert not any(h for h, f in zip(timing["held"], flagged.tolist()) if not f)  # a base row is never held


def test_token_benign_base_batch_equals_single_items():
    model = _split_model()
    assert_batch_equals_single(model, ROWS, route_tokens=3)


def test_token_benign_applies_only_with_the_hold_handoff():
    model = _split_model()
    reference = _split_model(token_benign="routed")
    ids, mask = left_pad(ROWS)
    with torch.no_grad():
        fixed = model.generate(input_ids=ids, attention_mask=mask, handoff="fixed", **KW)
        want = reference.generate(input_ids=ids, attention_mask=mask, handoff="fixed", **KW)
    assert torch.equal(fixed, want) and "prompt_flagged" not in model.last_generate_timing


def test_unknown_token_benign_is_a_config_error():
    with pytest.raises(ConfigError, match="token_benign"):
        MoGUConfig(token_benign="glad").validate()


def test_prompt_margins_of_a_padded_row_equal_its_margin_alone_with_absolute_positions():
    model = _split_model("gpt2")
    ids, mask = left_pad(ROWS)
    batched = prompt_margins(model, ids, mask)
    for i, row in enumerate(ROWS):
        alone = prompt_margins(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
        assert torch.allclose(batched[i], alone[0], atol=1e-5), (i, batched[i], alone[0])


def test_prompt_margins_leave_the_routing_trace_alone():
    model = _split_model()
    ids, mask = left_pad(ROWS)
    model.enable_routing_trace(True)
    model.clear_routing_trace()
    prompt_margins(model, ids, mask)
    assert model.routing_trace() == {} and model.routing_trace_enabled
