"""Learning-rate schedules: linear warmup, then linear decay, half a cosine, or constant.

The same curves as transformers' ``get_scheduler`` ("linear", "cosine", "constant_with_warmup"),
written here because importing ``transformers.optimization`` imports its Trainer utilities and
through them peft and bitsandbytes: seconds of start-up for three formulas.
"""

from __future__ import annotations

import functools
import math

import torch

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """The factor on the peak learning rate before optimizer step ``step + 1`` (``step`` counts
    the steps already taken). Warmup rises from 0 over ``warmup`` steps; then ``linear`` falls to
    0 at ``total``, ``cosine`` follows half a cosine down to 0 at ``total``, ``constant`` stays 1."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}: one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return step / max(1, warmup)
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` following :func:`lr_factor` (its state saves and resumes as
    torch's schedulers do)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, kind=kind, warmup=warmup, total=total))


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, learning_rate: float) -> None:
    """After resuming ``scheduler`` and its optimizer from a checkpoint, which hold the peak rate and the
    rate of the next step as they were: take this run's peak ``learning_rate`` and schedule (its
    lambdas: kind, warmup, total steps) at the step reached. A run resumed with the same settings gets
    the same numbers; one resumed with another ``learning_rate``, schedule or ``max_steps`` follows them
    from its first step (it kept the old rate for a step, or for good)."""
    scheduler.base_lrs = [learning_rate] * len(scheduler.optimizer.param_groups)
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["initial_lr"], group["lr"] = learning_rate, rate
    scheduler._last_lr = rates
