"""Tiny random decoder models of every supported family (hidden 32, 2 layers)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

VOCAB = 128
# The rotary families get 512 positions (no extra weights): the word-level tiny tokenizer makes some shipped
# prompts 300 tokens long, and mogu refuses a row past a model's context.
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_COMMON),
    "mistral": lambda: tf.MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: tf.Qwen2Config(**_COMMON),
    "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=8),
    "gemma": lambda: tf.GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**_COMMON, head_dim=8, sliding_window=64),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=64),
    "phi3": lambda: tf.Phi3Config(**_COMMON),
    "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0),
    "phi": lambda: tf.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gptj": lambda: tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, rotary_dim=4,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0),
}

# The module each family wraps (full name in layer 0).
EXPECTED_TARGET = {
    "falcon": "transformer.h.0.self_attention.dense",
    "gpt2": "transformer.h.0.attn.c_proj",
    "gpt_neox": "gpt_neox.layers.0.attention.dense",
    "phi": "model.layers.0.self_attn.dense",
    "opt": "model.decoder.layers.0.self_attn.out_proj",
    "gptj": "transformer.h.0.attn.out_proj",
    "bloom": "transformer.h.0.self_attention.dense",
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family]()
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def randomize_added(model, seed: int = 1, router_bias: float = 0.0):
    """Give experts and routers non-trivial random weights (fresh LoRA B is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.added_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if router_bias:
            for m in model.routed_modules.values():
                m.router.unwill.linear_2.bias.add_(router_bias)
    return model


def left_pad(rows, pad=0):
    """Token-id lists as one left-padded batch: (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return input_ids, mask


def assert_batch_equals_single(model, rows, route_tokens, max_new_tokens=8):
    """Greedy generation of the left-padded batch of ``rows`` gives each row's tokens when run alone."""
    input_ids, mask = left_pad(rows)
    batched = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, route_tokens=route_tokens)
    width = input_ids.shape[1]
    for i, r in enumerate(rows):
        single = model.generate(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                                route_tokens=route_tokens)
        assert batched[i, width:].tolist()[: single.shape[1] - len(r)] == single[0, len(r):].tolist()


class RecordingStreamer:
    """A streamer that records what generate() puts and how often it ends."""

    def __init__(self):
        self.chunks, self.ends = [], 0

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ends += 1


_TOKENIZER = None
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def tiny_tokenizer():
    """A 128-token BPE tokenizer (pad=0, bos=1, eos=2) with a chat template, trained on mogu's prompts.

    Loaded from a frozen file: the BPE trainer breaks frequency ties in hash order, so retraining
    gives different ids in each process and exact-token tests would flake across runs.
    """
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer.from_file(str(Path(__file__).parent / "fixtures" / "tiny_tokenizer.json"))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                       eos_token="</s>", unk_token="<unk>")
        fast.chat_template = CHAT_TEMPLATE
        fast.padding_side = "left"
        assert len(fast) <= VOCAB, len(fast)
        _TOKENIZER = fast
    return _TOKENIZER
