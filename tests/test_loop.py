"""The one optimizer loop (mogu.train.loop.run_steps) the stages, fine-tuning and the SFT baseline share."""

import torch

from mogu.train.loop import run_steps


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(4, generator=g))
    xs = torch.randn(6, 4, generator=g)
    return w, xs, torch.optim.AdamW([w], lr=0.1)


def test_run_steps_is_step_backward_then_optimizer_step_and_zero_grad_exactly():
    w, xs, opt = _problem()
    ref_w, _, ref_opt = _problem()
    seen = []

    def step_fn(step):
        loss = (xs[step] @ w) ** 2
        loss.backward()
        return {"loss": loss.item(), "extra": step}

    done = run_steps(opt, start=0, stop=6, step_fn=step_fn,
                     after_step=lambda n, loss, logs: seen.append((n, loss, logs)))
    for step in range(6):  # the hand-written loop every trainer ran before
        loss = (xs[step] @ ref_w) ** 2
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    assert done == 6 and torch.equal(w, ref_w) and w.grad is None
    assert [n for n, _, _ in seen] == [1, 2, 3, 4, 5, 6] and seen[2][2] == {"extra": 2}


def test_run_steps_resumes_from_start_and_after_step_false_ends_the_loop():
    w, xs, opt = _problem()
    calls = []

    def step_fn(step):
        calls.append(step)
        ((xs[step] @ w) ** 2).backward()
        return {"loss": 0.0}

    assert run_steps(opt, start=2, stop=6, step_fn=step_fn, after_step=lambda n, *_: n < 4) == 4
    assert calls == [2, 3]
    assert run_steps(opt, start=5, stop=5, step_fn=step_fn) == 5 and calls == [2, 3]
