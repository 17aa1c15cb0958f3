"""The optimizer loop every mogu trainer runs: the stages (``stages.Trainer``), task fine-tuning
(``finetune.FineTuner``) and the SFT baseline defense (``mogu.eval.defenses``).

One step is the caller's ``step_fn`` (forward and backward of one optimizer batch, gradients left in
``.grad``), then ``optimizer.step()``, ``zero_grad`` and the caller's ``after_step`` (metrics,
checkpoints, selection). What differs between the trainers (data order, micro-batching, what a
checkpoint holds, when to score) stays in the two callbacks; the order of operations, which decides
the trained weights bit for bit, is written once here.
"""

from __future__ import annotations

from typing import Any, Callable


def run_steps(optimizer, *, start: int, stop: int, step_fn: Callable[[int], dict[str, Any]],
              after_step: Callable[[int, float, dict[str, Any]], bool | None] | None = None, bar=None) -> int:
    """Optimizer steps ``start`` .. ``stop - 1``; returns the number of steps done in all (``stop``, or
    fewer when ``after_step`` returns False to end the loop early).

    ``step_fn(step)`` returns its logs with the step's ``loss`` (a float); ``after_step(steps_done, loss,
    logs)`` sees the count after the step and the other logs. ``bar`` (tqdm) advances once per step."""
    step = start
    while step < stop:
        logs = dict(step_fn(step))
        loss = float(logs.pop("loss"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        if after_step is not None and after_step(step, loss, logs) is False:
            break
    return step
