"""How complete are a MoGU model's held refusals? Length, EOS and verdict of every answer the hold hand-off keeps.

For each prompt: greedy generation with ``handoff="hold"`` up to ``--max-new-tokens``; a row routing judged
harmful is held by the unwilling expert to its end. Reported over the held rows: the median number of new
tokens, the share that ends in EOS before the limit, and the whole-answer verdicts (``mogu.verdicts``); over
all rows, the share held. A refusal that ends in EOS is a complete answer; one cut at the limit is not.

    . .venv/bin/activate
    python benchmarks/refusal_length.py --model runs/demo/calibrated --max-new-tokens 128

Prompts: the shipped harmful dev split (default), or ``--prompts FILE`` (jsonl/json/csv/txt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch


def measure(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, batch_size: int = 16) -> dict:
    """Per-prompt (held, new tokens, ended in EOS, verdict) and their summary."""
    from mogu.eval.defenses import eos_token_ids, greedy_kwargs, left_pad, pad_token_id
    from mogu.chat import render_prompt
    from mogu.verdicts import classify_answer

    eos = set(eos_token_ids(model.base_model, tokenizer))
    pad = pad_token_id(model.base_model, tokenizer)
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        enc = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in chunk]
        input_ids, mask = left_pad(enc, pad, model.device)
        with torch.no_grad(), model.routing("auto"):
            out = model.generate(input_ids=input_ids, attention_mask=mask, handoff="hold",
                                 **greedy_kwargs(model.base_model, tokenizer, max_new_tokens))
        held = model.last_generate_timing.get("held", [False] * len(chunk))
        for i, p in enumerate(chunk):
            new = out[i, input_ids.shape[1]:].tolist()
            stop = next((j for j, t in enumerate(new) if t in eos), None)
            tokens = new if stop is None else new[:stop]
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            rows.append({"prompt": p, "held": bool(held[i]), "new_tokens": len(tokens), "eos": stop is not None,
                         "verdict": classify_answer(p, text), "answer": text})
    kept = [r for r in rows if r["held"]]
    summary = {"prompts": len(rows), "held": len(kept), "max_new_tokens": max_new_tokens}
    if kept:
        summary.update(median_tokens=statistics.median(r["new_tokens"] for r in kept),
                       ends_in_eos=sum(r["eos"] for r in kept) / len(kept),
                       verdicts=dict(Counter(r["verdict"] for r in kept)))
    return {"summary": summary, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="MoGU checkpoint folder")
    parser.add_argument("--prompts", default=None, help="prompt file (default: the shipped harmful dev split)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write every row and the summary here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mogu.train.data import builtin_prompts, read_prompts
    from mogu.tuner.inference import load_for_inference

    if args.prompts:
        prompts = [r.prompt for r in read_prompts(args.prompts, harmful=True)]
    else:
        prompts = [r.prompt for r in builtin_prompts("harmful") if r.split == "dev"]
    model, tok, is_mogu = load_for_inference(args.model)
    if not is_mogu:
        parser.error(f"{args.model} is not a MoGU checkpoint")
    result = measure(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
