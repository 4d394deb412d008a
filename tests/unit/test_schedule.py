import math

import pytest
import torch

from hybrid_distill.distill.schedule import lr_multiplier


def test_warmup_rises_linearly_from_zero_to_one():
    assert lr_multiplier(0, 100, 10, "cosine", 0.1) == 0.0
    assert lr_multiplier(5, 100, 10, "cosine", 0.1) == 0.5
    assert lr_multiplier(10, 100, 10, "cosine", 0.1) == 1.0


def test_cosine_midpoint_and_end():
    # decay runs from step 10 to step 110: the midpoint is step 60
    assert lr_multiplier(60, 110, 10, "cosine", 0.1) == pytest.approx(0.55, abs=1e-15)
    assert lr_multiplier(35, 110, 10, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert lr_multiplier(110, 110, 10, "cosine", 0.1) == pytest.approx(0.1, abs=1e-15)
    assert lr_multiplier(500, 110, 10, "cosine", 0.1) == pytest.approx(0.1, abs=1e-15)


def test_linear_decay():
    assert lr_multiplier(0, 100, 0, "linear", 0.0) == 1.0
    assert lr_multiplier(25, 100, 0, "linear", 0.0) == 0.75
    assert lr_multiplier(50, 100, 0, "linear", 0.2) == pytest.approx(0.6, abs=1e-15)
    assert lr_multiplier(100, 100, 0, "linear", 0.2) == pytest.approx(0.2, abs=1e-15)


def test_constant_after_warmup():
    assert lr_multiplier(2, 100, 4, "constant", 0.1) == 0.5
    assert lr_multiplier(4, 100, 4, "constant", 0.1) == 1.0
    assert lr_multiplier(100, 100, 4, "constant", 0.1) == 1.0


def test_drives_lambda_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, 4, 2, "linear", 0.0))
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == [0.0, 1.0, 2.0, 1.0, 0.0]


@pytest.mark.parametrize("schedule, ratio", [("cosin", 0.1), ("cosine", 1.5)])
def test_rejects_bad_arguments(schedule, ratio):
    with pytest.raises(ValueError, match="schedule|min_lr_ratio"):
        lr_multiplier(0, 10, 0, schedule, ratio)
