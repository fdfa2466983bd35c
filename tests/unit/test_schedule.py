"""run/schedule.py: the learning-rate schedule of every training loop; every step trains, the first one too."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from graftune.run.schedule import SCHEDULES, lr_factor, make_scheduler, warmup_steps


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("warmup", [0.0, 0.1, 0.5])
def test_every_step_has_a_positive_rate_and_warm_up_reaches_the_full_rate(schedule, warmup):
    for total in range(1, 40):
        factors = [lr_factor(s, total, warmup, schedule) for s in range(total)]
        assert all(0 < f <= 1 for f in factors), (total, factors)
        w = warmup_steps(total, warmup)
        assert factors[:w] == [(s + 1) / w for s in range(w)]
        after = factors[w:]
        assert not after or after[0] == 1.0
        assert all(a >= b for a, b in itertools.pairwise(after))  # never rises after warm-up
        if schedule == "constant":
            assert set(after) <= {1.0}


def test_linear_and_cosine_decay_towards_zero():
    total, warmup = 100, 0.1
    assert lr_factor(99, total, warmup, "linear") == pytest.approx(1 / 90)
    assert lr_factor(55, total, warmup, "linear") == pytest.approx(0.5)
    assert lr_factor(55, total, warmup, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_steps(10, 0.1) == 1 and warmup_steps(11, 0.1) == 2 and warmup_steps(10, 0.0) == 0


def test_the_first_step_of_a_one_step_epoch_moves_the_weights():
    # 8 examples per class with a batch as large: one step an epoch. A warm-up that starts at 0 (as
    # transformers.get_scheduler's does) would leave the first epoch untrained.
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.0)
    scheduler = make_scheduler(optimizer, total=10, warmup=0.1)
    weight.sum().backward()
    optimizer.step()
    scheduler.step()
    assert torch.all(weight != 0)


def test_an_unknown_schedule_is_refused_before_any_step():
    with pytest.raises(ValueError, match="schedule: got 'step'"):
        make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 10, 0.1, "step")
