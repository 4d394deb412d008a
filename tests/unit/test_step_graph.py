"""What GraphedStep refuses before it runs or captures anything (capture itself needs CUDA:
tests/gpu/test_step_graph_cuda.py)."""
import pytest
import torch

from hybrid_distill.distill.step_graph import GraphedStep


def _step(inputs):
    raise AssertionError("a refused step must not run")


def _optimizer(**options):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **options)


def test_refuses_an_optimizer_that_cannot_be_captured():
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedStep(_step, _optimizer())


def test_refuses_a_capture_without_warm_up():
    with pytest.raises(ValueError, match="at least one warm-up step"):
        GraphedStep(_step, _optimizer(capturable=True), warmup=0)


def test_refuses_inputs_off_the_gpu_before_running_the_step():
    step = GraphedStep(_step, _optimizer(capturable=True))
    with pytest.raises(ValueError, match="CUDA tensors; the step's input is on cpu"):
        step(torch.zeros(2))
    assert not step.captured
