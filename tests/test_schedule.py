"""Learning-rate schedules: the same factors as transformers' get_scheduler, step by step."""

import pytest
import torch

from dpokit.schedule import lr_factor, make_scheduler

HF_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def _lrs(scheduler, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10), (4, 7), (0, 1)])
def test_schedules_equal_transformers(kind, warmup, total):
    from transformers import get_scheduler

    ours = _lrs(make_scheduler(_optimizer(), kind, warmup, total), total + 2)
    theirs = _lrs(get_scheduler(HF_NAMES[kind], _optimizer(), num_warmup_steps=warmup, num_training_steps=total), total + 2)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_factors_by_hand():
    assert [lr_factor(s, "linear", 2, 6) for s in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [lr_factor(s, "cosine", 0, 4) for s in range(5)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6)
    assert [lr_factor(s, "constant", 2, 6) for s in range(4)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        lr_factor(0, "step", 0, 4)


def test_resume_continues_the_schedule():
    first = make_scheduler(_optimizer(), "cosine", 2, 8)
    _lrs(first, 3)
    resumed = make_scheduler(_optimizer(), "cosine", 2, 8)
    resumed.load_state_dict(first.state_dict())
    assert _lrs(resumed, 5) == pytest.approx(_lrs(first, 5))
