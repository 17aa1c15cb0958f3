"""Baseline defenses (mogu.eval.defenses): one interface, batching, and each defense's own behaviour."""

import copy
import json

import pytest
import torch

from mogu import MoGUConfig, MoGUModel
from mogu.errors import ConfigError
from mogu.eval.defenses import (DEFENSES, ICD_PROMPT, ICD_RESPONSE, SELF_REMINDER_SUFFIX, SELF_REMINDER_SYSTEM,
                                Defense, SelfExamination, build_defense, encode_text, register_defense,
                                render_conversation, safedecoding_candidates, safedecoding_choose)
from mogu.train.stages import generate_responses
from mogu.chat import render_prompt
from tiny_models import VOCAB, randomize_added, tiny_model, tiny_tokenizer

PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the wind at night, in four short lines",
           "Tell me how to pick a lock"]
FAMILIES = ["llama", "gpt2"]
ALL = ["none", "self_reminder", "icd", "self_examination", "retokenization", "safedecoding", "sft", "mogu"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run far faster on one thread, above all on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_model(family, seed=0):
    if family != "gpt2":
        return tiny_model(family, seed)
    import transformers as tf

    # tiny_model's GPT-2 has 128 positions; the self-reminder and ICD prompts need more.
    torch.manual_seed(seed)
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()


def make(family, *, randomize=True, seed=0):
    """(MoGU model on a tiny base, an untouched copy of that base, tokenizer)."""
    tok = tiny_tokenizer()
    base = base_model(family, seed)
    reference = copy.deepcopy(base)
    mogu = MoGUModel.from_base(base, MoGUConfig(router_hidden=16, lora_dropout=0.0, route_tokens=2), tokenizer=tok)
    if randomize:
        randomize_added(mogu)
    mogu.eval()
    return mogu, reference, tok


def write_router_set(path, n=8):
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"prompt": f"How do I make a weapon number {i}?", "response": "I'm sorry, but I cannot help.",
                         "label": 1})
        else:
            rows.append({"prompt": f"Write a short poem about bread {i}", "response": "Bread is warm and good.",
                         "label": 0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plain_greedy(model, tok, prompt, max_new_tokens):
    enc = tok(render_prompt(tok, prompt), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def build(name, mogu, tok, tmp_path, **params):
    extra = {}
    if name == "sft":
        extra = dict(data=str(write_router_set(tmp_path / "router.jsonl")), cache_dir=str(tmp_path / "cache"),
                     steps=2, batch_size=4)
    return build_defense(name, model=mogu.base_model, tokenizer=tok, mogu_model=mogu, **{**extra, **params})


# -- the shared contract --------------------------------------------------------------------------
def test_registry_holds_every_defense():
    assert set(ALL) <= set(DEFENSES)
    for name in ALL:
        assert DEFENSES[name].name == name and issubclass(DEFENSES[name], Defense)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ALL)
def test_contract_batching_and_params(family, name, tmp_path):
    mogu, _, tok = make(family)
    defense = build(name, mogu, tok, tmp_path)
    batched = defense.generate(PROMPTS, max_new_tokens=6, batch_size=3)
    assert len(batched) == 3 and all(isinstance(r, str) for r in batched)
    singles = [defense.generate([p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == singles
    assert defense.generate(PROMPTS, max_new_tokens=6, batch_size=2) == batched  # batch size is irrelevant
    assert defense.generate([], max_new_tokens=6) == []
    params = defense.params()
    json.dumps(params)
    assert set(type(defense).PARAMS) <= set(params)
    assert mogu.routing_mode == "auto"  # left as it was


def test_registry_errors_and_parameter_coercion(tmp_path):
    mogu, reference, tok = make("llama")
    with pytest.raises(ConfigError, match="unknown defense 'nope'; known: .*icd.*none.*safedecoding"):
        build_defense("nope", model=reference, tokenizer=tok)
    with pytest.raises(ConfigError, match="unknown parameter.*alhpa.*known: .*alpha"):
        build_defense("safedecoding", model=reference, tokenizer=tok, mogu_model=mogu, alhpa=2)
    with pytest.raises(ConfigError, match="alpha must be a float"):
        build_defense("safedecoding", model=reference, tokenizer=tok, mogu_model=mogu, alpha="lots")
    with pytest.raises(ConfigError, match="num_common_tokens"):
        build_defense("safedecoding", model=reference, tokenizer=tok, mogu_model=mogu, top_k=3, num_common_tokens=5)
    with pytest.raises(ConfigError, match="needs an expert"):
        build_defense("safedecoding", model=reference, tokenizer=tok)
    with pytest.raises(ConfigError, match="dropout"):
        build_defense("retokenization", model=reference, tokenizer=tok, dropout=1.5)
    with pytest.raises(ConfigError, match="needs a MoGU model"):
        build_defense("mogu", model=reference, tokenizer=tok)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        build_defense("none", model=reference)
    d = build_defense("safedecoding", model=reference, tokenizer=tok, mogu_model=mogu, alpha="2.5", top_k="8")
    assert d.params()["alpha"] == 2.5 and d.params()["top_k"] == 8 and d.params()["expert"] == "mogu:unwill"


def test_register_defense_adds_to_the_registry():
    @register_defense("test_only_echo")
    class Echo(Defense):
        PARAMS = {"tag": "x"}

    try:
        mogu, reference, tok = make("llama")
        d = build_defense("test_only_echo", model=reference, tokenizer=tok, tag="y")
        assert isinstance(d, Echo) and d.name == "test_only_echo" and d.params() == {"tag": "y"}
    finally:
        DEFENSES.pop("test_only_echo")


# -- none and the prompt-side baselines --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_none_is_plain_greedy_generation(family):
    mogu, reference, tok = make(family)
    expected = [plain_greedy(reference, tok, p, 8) for p in PROMPTS]
    assert build_defense("none", model=reference, tokenizer=tok).generate(PROMPTS, max_new_tokens=8) == expected
    # A MoGU model (or its wrapped base) is run with routing off: exactly the base model.
    assert build_defense("none", model=mogu, tokenizer=tok).generate(PROMPTS, max_new_tokens=8) == expected
    assert build_defense("none", model=mogu.base_model, tokenizer=tok).generate(PROMPTS, max_new_tokens=8) == expected
    routed = generate_responses(mogu, tok, PROMPTS, max_new_tokens=8, route_tokens=None)
    assert routed != expected  # the routed model does differ, so the equality above means something


def _captured_inputs(defense, prompt):
    seen = []
    handle = defense.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    try:
        defense.generate([prompt], max_new_tokens=1)
    finally:
        handle.remove()
    return seen[0]


def test_self_reminder_and_icd_reach_the_model():
    mogu, reference, tok = make("llama")
    prompt = PROMPTS[0]
    sr = build_defense("self_reminder", model=reference, tokenizer=tok)
    assert sr.conversation([{"role": "user", "content": prompt}]) == [{"role": "system", "content": SELF_REMINDER_SYSTEM},
                                       {"role": "user", "content": prompt + SELF_REMINDER_SUFFIX}]
    text = sr.render(prompt)
    assert SELF_REMINDER_SYSTEM in text and prompt + SELF_REMINDER_SUFFIX in text
    assert _captured_inputs(sr, prompt) == encode_text(tok, text)

    icd = build_defense("icd", model=reference, tokenizer=tok)
    text = icd.render(prompt)
    assert text.index(ICD_PROMPT) < text.index(ICD_RESPONSE) < text.index(prompt)
    assert _captured_inputs(icd, prompt) == encode_text(tok, text)
    assert [m["role"] for m in icd.conversation([{"role": "user", "content": prompt}])] == ["user", "assistant", "user"]

    none = build_defense("none", model=reference, tokenizer=tok)
    assert _captured_inputs(none, prompt) == encode_text(tok, render_prompt(tok, prompt))


def test_system_prompt_falls_back_to_the_user_turn():
    tok = copy.deepcopy(tiny_tokenizer())
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "hello"}]
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    assert render_conversation(tok, messages) == "<s>user: SYS\n\nhello\n<s>assistant: "
    # A template that silently drops system messages gets the same treatment.
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")
    assert render_conversation(tok, messages) == "<s>user: SYS\n\nhello\n<s>assistant: "
    tok.chat_template = None
    assert render_conversation(tok, messages) == "System: SYS\nUser: hello\nAssistant: "


def test_self_examination_replaces_flagged_answers_and_counts(monkeypatch):
    mogu, reference, tok = make("llama")
    plain = build_defense("none", model=reference, tokenizer=tok).generate(PROMPTS, max_new_tokens=6)
    d = build_defense("self_examination", model=reference, tokenizer=tok)
    seen = []

    def fake_check(outputs, *, batch_size=8, progress=False):
        seen.append(list(outputs))
        return ["Yes, this is harmful", "No, this is not harmful", "YES"][: len(outputs)]

    monkeypatch.setattr(d, "check", fake_check)
    out = d.generate(PROMPTS, max_new_tokens=6)
    assert seen == [plain]  # the check reads the model's own answers
    assert out == ["Sorry, I cannot answer your question.", plain[1], "Sorry, I cannot answer your question."]
    assert d.stats == {"checked": 3, "replaced": 2} and d.last_flags == [True, False, True]
    d.generate(PROMPTS[:1], max_new_tokens=6)
    assert d.stats == {"checked": 4, "replaced": 3}
    assert SelfExamination.flagged("Yes, this is harmful") and not SelfExamination.flagged("No, this is not harmful")


def test_self_examination_check_is_short_and_uses_the_question():
    mogu, reference, tok = make("llama")
    d = build_defense("self_examination", model=reference, tokenizer=tok, check_max_new_tokens=3)
    calls = []
    original = reference.generate

    def spy(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape[0], kwargs["max_new_tokens"]))
        return original(*args, **kwargs)

    reference.generate = spy
    d.generate(PROMPTS, max_new_tokens=6, batch_size=8)
    assert calls == [(3, 6), (3, 3)]  # one batch of answers, one batch of checks capped at 3 tokens
    assert len(d.last_checks) == 3 and d.stats["checked"] == 3
    with pytest.raises(ConfigError, match="output"):
        build_defense("self_examination", model=reference, tokenizer=tok, check_prompt="Is it harmful?")


# -- retokenization ---------------------------------------------------------------------------------
def _bytelevel_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mogu.train.data import builtin_prompts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r.prompt for r in builtin_prompts("benign")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = tiny_tokenizer().chat_template
    return fast


RETOK_PROMPTS = PROMPTS + ["  Spaces  and\ttabs\n", "naïve café — 日本語?!",
                           "describing.\\ + similarlyNow write]( Me**"]


@pytest.mark.parametrize("make_tok", [tiny_tokenizer, _bytelevel_tokenizer], ids=["metaspace", "bytelevel"])
def test_retokenization_p0_is_the_normal_tokenization(make_tok):
    from mogu.train.data import builtin_prompts

    tok = make_tok()
    model = tiny_model("llama")
    d = build_defense("retokenization", model=model, tokenizer=tok, dropout=0.0)
    prompts = RETOK_PROMPTS + [r.prompt for r in builtin_prompts("harmful")[:40]]
    for p in prompts:
        assert d.encode(p) == encode_text(tok, render_prompt(tok, p)), p
    assert d.stats == {"prompts": len(prompts), "retokenized": 0}


@pytest.mark.parametrize("make_tok", [tiny_tokenizer, _bytelevel_tokenizer], ids=["metaspace", "bytelevel"])
def test_retokenization_dropout_changes_tokens_not_text(make_tok):
    from mogu.train.data import builtin_prompts

    tok = make_tok()
    model = tiny_model("llama")
    prompts = RETOK_PROMPTS + [r.prompt for r in builtin_prompts("harmful")[:20]]
    a = build_defense("retokenization", model=model, tokenizer=tok, seed=1)
    b = build_defense("retokenization", model=model, tokenizer=tok, seed=1)
    c = build_defense("retokenization", model=model, tokenizer=tok, seed=2)
    changed = 0
    for p in prompts:
        normal = encode_text(tok, render_prompt(tok, p))
        ids = a.encode(p)
        assert ids == b.encode(p) == a.encode(p)  # a function of (seed, prompt) only
        assert tok.decode(ids) == tok.decode(normal)
        changed += ids != normal
        # The template's own tokens are untouched: the rendering up to the prompt keeps its ids.
        prefix = render_prompt(tok, p)[: render_prompt(tok, p).index(p.split()[0])].rstrip()
        n = len(encode_text(tok, prefix)) - 1
        assert ids[:n] == normal[:n]
    assert changed >= len(prompts) // 2
    assert any(a.encode(p) != c.encode(p) for p in prompts)  # the seed matters
    assert a.params() == {"dropout": 0.2, "seed": 1}


def test_retokenization_generation_and_non_bpe_tokenizers():
    mogu, reference, tok = make("llama")
    none = build_defense("none", model=reference, tokenizer=tok).generate(PROMPTS, max_new_tokens=6)
    assert build_defense("retokenization", model=reference, tokenizer=tok,
                         dropout=0.0).generate(PROMPTS, max_new_tokens=6) == none

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    wl = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>", pad_token="<unk>")
    with pytest.raises(ConfigError, match="BPE"):
        build_defense("retokenization", model=reference, tokenizer=wl)


# -- SafeDecoding -------------------------------------------------------------------------------------
def _logits(order, vocab=20):
    """Logits whose descending order is ``order`` (then the remaining ids)."""
    rest = [t for t in range(vocab) if t not in order]
    out = torch.zeros(vocab)
    for rank, t in enumerate(list(order) + rest):
        out[t] = float(vocab - rank)
    return out


def test_safedecoding_candidate_set_on_handmade_logits():
    base = _logits([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    # Smallest k' with >= c common tokens: at k'=3 the common set is {0, 1}.
    expert = _logits([1, 0, 7, 2, 3, 4, 5, 6, 8, 9])
    assert safedecoding_candidates(base, expert, top_k=10, num_common_tokens=2).tolist() == [0, 1]
    assert safedecoding_candidates(base, expert, top_k=10, num_common_tokens=3).tolist() == [0, 1, 2]
    # No k' <= top_k reaches c: the intersection at top_k.
    expert = _logits([10, 11, 12, 13, 0, 14, 15, 16, 17, 3])
    assert safedecoding_candidates(base, expert, top_k=10, num_common_tokens=5).tolist() == [0, 3]
    # Empty intersection: the base top-1.
    expert = _logits([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    assert safedecoding_candidates(base, expert, top_k=10, num_common_tokens=5).tolist() == [0]
    # Identical rankings: the top c.
    assert safedecoding_candidates(base, base.clone(), top_k=10, num_common_tokens=5).tolist() == [0, 1, 2, 3, 4]
    # The choice: p_base + alpha (p_expert - p_base) over the candidates.
    b = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    e = torch.log(torch.tensor([0.2, 0.7, 0.1]))
    assert safedecoding_choose(b, e, alpha=0.0, top_k=3, num_common_tokens=3) == 0
    assert safedecoding_choose(b, e, alpha=3.0, top_k=3, num_common_tokens=3) == 1
    assert safedecoding_choose(b, e, alpha=0.2, top_k=3, num_common_tokens=3) == 0  # 0.44 vs 0.38
    # Only the common top-1 is a candidate: the expert's preference for token 2 cannot win.
    e = torch.log(torch.tensor([0.4, 0.25, 0.35]))
    assert safedecoding_candidates(b, e, top_k=3, num_common_tokens=1).tolist() == [0]
    assert safedecoding_choose(b, e, alpha=50.0, top_k=3, num_common_tokens=1) == 0
    assert safedecoding_choose(b, e, alpha=50.0, top_k=3, num_common_tokens=3) == 2


FULL = dict(top_k=VOCAB, num_common_tokens=VOCAB)  # every token is a candidate


@pytest.mark.parametrize("family", FAMILIES)
def test_safedecoding_alpha_zero_is_base_greedy(family):
    mogu, reference, tok = make(family)
    none = build_defense("none", model=reference, tokenizer=tok).generate(PROMPTS, max_new_tokens=8)
    sd = build_defense("safedecoding", model=reference, tokenizer=tok, mogu_model=mogu, alpha=0.0, **FULL)
    assert sd.generate(PROMPTS, max_new_tokens=8) == none
    assert sd.generate(PROMPTS, max_new_tokens=1) == build_defense("none", model=reference, tokenizer=tok).generate(
        PROMPTS, max_new_tokens=1)
    # An untrained (zero) expert changes nothing, whatever alpha.
    fresh, reference, tok = make(family, randomize=False)
    sd = build_defense("safedecoding", model=reference, tokenizer=tok, mogu_model=fresh)
    assert sd.generate(PROMPTS, max_new_tokens=8) == none


def _last_logits(mogu, ids, mode):
    with torch.no_grad(), mogu.routing(mode):
        return mogu(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_safedecoding_follows_a_confident_expert(family):
    """A re-computation of the first m steps (uncached forwards, the formula), and the expert's argmax
    wins wherever it is a candidate and confident enough that no other candidate can outscore it."""
    mogu, reference, tok = make(family)
    final_norm = mogu.base_model.transformer.ln_f if family == "gpt2" else mogu.base_model.model.norm
    with torch.no_grad():  # sharpen both distributions: most steps get a confident expert
        for p in final_norm.parameters():
            p.mul_(300.0)
    alpha, m = 50.0, 2
    sd = build_defense("safedecoding", model=mogu, tokenizer=tok, alpha=alpha, first_m=m)
    got = sd.generate_ids(PROMPTS, max_new_tokens=m)
    confident = 0
    for prompt, ids in zip(PROMPTS, got):
        seq = encode_text(tok, render_prompt(tok, prompt))
        for step in range(m):
            b, e = _last_logits(mogu, seq, "off"), _last_logits(mogu, seq, "unwill")
            cands = safedecoding_candidates(b, e, 10, 5)
            pb, pe = torch.softmax(b, -1), torch.softmax(e, -1)
            scores = (pb[cands] + alpha * (pe[cands] - pb[cands])).clamp(min=1e-8)
            expected = int(cands[scores.argmax()])
            assert ids[step] == expected
            top = int(e.argmax())
            # score(x) <= alpha * p_e(x) <= alpha * (1 - p_e(top)) for every other x (alpha > 1)
            if top in cands.tolist() and alpha * pe[top] - (alpha - 1) * pb[top] > alpha * (1 - pe[top]):
                assert expected == top
                confident += 1
            seq = seq + [expected]
    assert confident >= 1
    assert mogu.routing_mode == "auto"
    # Every token a candidate: a confident expert's greedy tokens come out exactly.
    sd = build_defense("safedecoding", model=mogu, tokenizer=tok, alpha=alpha, first_m=m, **FULL)
    got = sd.generate_ids(PROMPTS, max_new_tokens=m)
    for prompt, ids in zip(PROMPTS, got):
        seq = encode_text(tok, render_prompt(tok, prompt))
        for step in range(m):
            b, e = _last_logits(mogu, seq, "off"), _last_logits(mogu, seq, "unwill")
            pb, pe = torch.softmax(b, -1), torch.softmax(e, -1)
            top = int(e.argmax())
            if alpha * pe[top] - (alpha - 1) * pb[top] > alpha * (1 - pe[top]):
                assert ids[step] == top
            seq = seq + [ids[step]]


def test_safedecoding_handoff_continues_with_the_base_model():
    mogu, reference, tok = make("llama")
    sd = build_defense("safedecoding", model=reference, tokenizer=tok, mogu_model=mogu, first_m=2, alpha=3.0)
    prefix = sd.generate_ids(PROMPTS, max_new_tokens=2)
    full = sd.generate_ids(PROMPTS, max_new_tokens=7)
    for p, pre, ids in zip(PROMPTS, prefix, full):
        assert ids[:2] == pre
        prompt_ids = encode_text(tok, render_prompt(tok, p)) + pre
        x = torch.tensor([prompt_ids])
        cont = reference.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False,
                                  pad_token_id=0)
        assert ids == pre + cont[0, len(prompt_ids):].tolist()


def test_safedecoding_with_a_peft_expert_adapter(tmp_path):
    mogu, reference, tok = make("llama")
    mogu.export_adapter("unwill", tmp_path / "unwill")
    via_mogu = build_defense("safedecoding", model=mogu, tokenizer=tok).generate(PROMPTS, max_new_tokens=6)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    sd = build_defense("safedecoding", model=reference, tokenizer=tok, expert_adapter=str(tmp_path / "unwill"))
    assert sd.params()["expert"] == str(tmp_path / "unwill")
    assert sd.generate(PROMPTS, max_new_tokens=6) == via_mogu
    # The adapter is gone again: the base model is untouched and answers as before.
    assert reference.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())
    assert not any("lora" in n for n, _ in reference.named_modules())
    none = build_defense("none", model=reference, tokenizer=tok).generate(PROMPTS, max_new_tokens=6)
    assert none == build_defense("none", model=mogu, tokenizer=tok).generate(PROMPTS, max_new_tokens=6)
    with pytest.raises(ConfigError, match="not a PEFT adapter"):
        build_defense("safedecoding", model=reference, tokenizer=tok, expert_adapter=str(tmp_path))


def test_safedecoding_rows_that_stop_early_stay_stopped():
    mogu, reference, tok = make("llama")
    sd = build_defense("safedecoding", model=reference, tokenizer=tok, mogu_model=mogu, **FULL, alpha=0.0)
    first = sd.generate_ids(PROMPTS, max_new_tokens=1)
    sd.model.generation_config.eos_token_id = first[1][0]  # row 1's first token now ends it
    out = sd.generate_ids(PROMPTS, max_new_tokens=6)
    assert out[1] == first[1]
    assert all(len(ids) == 6 for i, ids in enumerate(out) if first[1][0] not in ids)
    assert [sd.generate_ids([p], max_new_tokens=6)[0] for p in PROMPTS] == out


# -- SFT ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_trains_caches_and_reuses_a_lora(family, tmp_path):
    mogu, reference, tok = make(family)
    data = write_router_set(tmp_path / "router.jsonl")
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    flags = {n: p.requires_grad for n, p in reference.named_parameters()}
    kw = dict(model=reference, tokenizer=tok, data=str(data), cache_dir=str(tmp_path / "cache"), steps=3,
              batch_size=4, lr=1e-2)
    first = build_defense("sft", **kw)
    assert first.trained and not first.reused and len(first.train_log) == 3
    folder = first.adapter_path
    assert folder.parent == tmp_path / "cache" and (folder / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    target = "c_proj" if family == "gpt2" else "o_proj"
    assert weights and all("lora_" in k and target in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # B moved off its zero init
    # Only the LoRA changed: the base weights, flags and modules are as before.
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())
    assert {n: p.requires_grad for n, p in reference.named_parameters()} == flags
    out = first.generate(PROMPTS, max_new_tokens=6)
    assert not any("lora" in n for n, _ in reference.named_modules())

    second = build_defense("sft", **kw)
    assert not second.trained and second.reused and second.adapter_path == folder and second.train_log == []
    assert second.generate(PROMPTS, max_new_tokens=6) == out
    params = second.params()
    assert params["adapter_path"] == str(folder) and len(params["data_sha256"]) == 64
    assert params["target_modules"] == [("attn.c_proj" if family == "gpt2" else "o_proj")]
    # A different step count is a different adapter.
    assert build_defense("sft", **{**kw, "steps": 2}).adapter_path != folder
    # adapter=PATH loads a trained folder directly.
    loaded = build_defense("sft", model=reference, tokenizer=tok, adapter=str(folder))
    assert not loaded.trained and loaded.generate(PROMPTS, max_new_tokens=6) == out
    # The same LoRA on the MoGU-wrapped base (routing layers set aside while it runs).
    assert build_defense("sft", model=mogu, tokenizer=tok, adapter=str(folder)).generate(
        PROMPTS, max_new_tokens=6) == out
    assert len(mogu.routed_modules) == 2 and mogu.routing_mode == "auto"


def test_sft_needs_data_or_an_adapter(tmp_path):
    mogu, reference, tok = make("llama")
    with pytest.raises(ConfigError, match="data=PATH"):
        build_defense("sft", model=reference, tokenizer=tok)
    with pytest.raises(ConfigError, match="does not exist"):
        build_defense("sft", model=reference, tokenizer=tok, data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="not a PEFT adapter"):
        build_defense("sft", model=reference, tokenizer=tok, adapter=str(tmp_path))
    with pytest.raises(ConfigError, match="steps"):
        build_defense("sft", model=reference, tokenizer=tok, data="x", steps=0)
    # A data folder from `mogu data build` works too.
    write_router_set(tmp_path / "router.jsonl")
    d = build_defense("sft", model=reference, tokenizer=tok, data=str(tmp_path), cache_dir=str(tmp_path / "c"),
                      steps=1)
    assert d.trained


# -- MoGU ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_mogu_defense_equals_mogu_generate(family):
    mogu, reference, tok = make(family)
    d = build_defense("mogu", model=reference, tokenizer=tok, mogu_model=mogu)
    expected = generate_responses(mogu, tok, PROMPTS, max_new_tokens=8, mode="auto")
    assert d.generate(PROMPTS, max_new_tokens=8) == expected
    assert d.params()["route_tokens"] == 2
    d = build_defense("mogu", model=mogu, tokenizer=tok, route_tokens=None)
    assert d.params()["route_tokens"] is None
    assert d.generate(PROMPTS, max_new_tokens=8) == generate_responses(mogu, tok, PROMPTS, max_new_tokens=8,
                                                                       route_tokens=None)
    assert build_defense("mogu", mogu_model=mogu, route_tokens="4").params()["route_tokens"] == 4


def test_mogu_defense_gate_benign_option_is_validated_and_leaves_the_config_as_it_was(tmp_path):
    mogu, _, tok = make("llama")
    with pytest.raises(ConfigError, match="gate_benign"):
        build("mogu", mogu, tok, tmp_path, gate_benign="nobody")
    assert mogu.config.gate_benign == "base"  # the default
    defense = build("mogu", mogu, tok, tmp_path, gate_benign="glad")
    assert defense.params()["gate_benign"] == "glad"
    defense.generate(PROMPTS[:1], max_new_tokens=2)
    assert mogu.config.gate_benign == "base"  # restored after generating
    assert build("mogu", mogu, tok, tmp_path).params()["gate_benign"] == "base"  # the config's


def test_mogu_defense_gate_turns_alone_option_parses_true_false_and_leaves_the_config_as_it_was(tmp_path):
    mogu, _, tok = make("llama")
    with pytest.raises(ConfigError, match="gate_turns_alone"):
        build("mogu", mogu, tok, tmp_path, gate_turns_alone="maybe")
    assert build("mogu", mogu, tok, tmp_path).params()["gate_turns_alone"] is True  # the config's default
    defense = build("mogu", mogu, tok, tmp_path, gate_turns_alone="False")
    assert defense.params()["gate_turns_alone"] is False
    seen = []
    with defense._benign_policy():
        seen.append(mogu.config.gate_turns_alone)
    assert seen == [False] and mogu.config.gate_turns_alone is True  # set while generating, then restored


# -- reference-answer likelihood ------------------------------------------------------------------
ANSWERS = ["Bread needs flour, water, salt and yeast.", "Sure.", "Here are three ideas for a short poem."]


@pytest.mark.parametrize("name", ALL)
def test_reference_nll_is_each_defenses_own_likelihood_or_a_clear_refusal(name, tmp_path):
    import math

    import torch.nn.functional as F

    from mogu.eval.defenses import encode_text
    from mogu.tuner.likelihood import answer_nll

    mogu, reference, tok = make("llama")
    defense = build(name, mogu, tok, tmp_path)
    if defense.NLL_UNAVAILABLE is not None:
        with pytest.raises(ConfigError, match="no answer likelihood"):
            defense.reference_nll(PROMPTS, ANSWERS)
        return
    stats = copy.deepcopy(defense.stats)
    scores = defense.reference_nll(PROMPTS, ANSWERS, max_answer_tokens=5)
    assert defense.stats == stats  # scoring does not count as generating
    assert mogu.routing_mode == "auto"
    for prompt, answer, s in zip(PROMPTS, ANSWERS, scores):
        answer_ids = encode_text(tok, answer)[:5]
        assert s.tokens == len(answer_ids) and math.isfinite(s.nll) and s.nll > 0
        prompt_ids = defense.encode(prompt)
        if name == "mogu":
            assert s.nll == pytest.approx(answer_nll(mogu, prompt_ids, answer_ids).nll, rel=1e-6)
        elif name != "sft":  # prompt-side defenses: the untouched base model on the prompt they render
            x = torch.tensor([prompt_ids + answer_ids])
            with torch.no_grad():
                logits = reference(input_ids=x).logits[0, len(prompt_ids) - 1: -1]
            assert s.nll == pytest.approx(float(F.cross_entropy(logits, x[0, len(prompt_ids):], reduction="sum")),
                                          rel=1e-6)
    if name == "sft":  # its LoRA changes the likelihood of the same rendered prompt and answers
        none = build("none", mogu, tok, tmp_path).reference_nll(PROMPTS, ANSWERS, max_answer_tokens=5)
        assert [s.nll for s in scores] != [s.nll for s in none]
    with pytest.raises(ConfigError, match="2 answers"):
        defense.reference_nll(PROMPTS, ANSWERS[:2])
