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


def test_a_resume_with_another_rate_and_schedule_follows_them_at_the_step_reached():
    """follow_schedule after loading a checkpoint taken 3 steps into cosine (peak 0.3, warmup 2 of 8):
    the run's own peak 0.1 and linear schedule (warmup 2, total 6) take over at step 3, at once
    (0.1 * (6 - 3) / (6 - 2) = 0.075, what get_last_lr reports too) and for the steps after
    (step 4: 0.1 * 2 / 4 = 0.05); the optimizer's groups keep the new peak as their initial_lr."""
    from dpokit.schedule import follow_schedule

    first = make_scheduler(_optimizer(), "cosine", 2, 8)
    _lrs(first, 3)
    resumed = make_scheduler(_optimizer(), "linear", 2, 6)
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.load_state_dict(first.state_dict())
    assert resumed.last_epoch == 3 and resumed.base_lrs == [0.3]  # the checkpoint's, as loaded
    follow_schedule(resumed, 0.1)
    group = resumed.optimizer.param_groups[0]
    assert resumed.base_lrs == [0.1] and group["initial_lr"] == 0.1
    assert group["lr"] == pytest.approx(0.075) and resumed.get_last_lr() == pytest.approx([0.075])
    assert _lrs(resumed, 3) == pytest.approx([0.075, 0.05, 0.025])


def test_a_resume_with_the_same_settings_changes_nothing():
    """follow_schedule with the run's own peak and schedule leaves a resumed scheduler where the
    checkpoint left it: the rates go on exactly as without the interruption."""
    from dpokit.schedule import follow_schedule

    first = make_scheduler(_optimizer(), "linear", 2, 6)
    _lrs(first, 3)
    resumed = make_scheduler(_optimizer(), "linear", 2, 6)
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.load_state_dict(first.state_dict())
    follow_schedule(resumed, 0.3)
    # 0.3 * (6 - s) / 4 for s = 3, 4, 5
    assert _lrs(resumed, 3) == pytest.approx([0.225, 0.15, 0.075]) == _lrs(first, 3)
