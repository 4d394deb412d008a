"""What GraphedStep refuses before it runs or captures anything (capture itself needs CUDA:
tests/gpu/test_step_graph_cuda.py)."""
import pytest
import torch

from hybrid_distill.distill.step_graph import GraphedStep, set_graph_options


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


def test_the_trainer_sets_the_rate_type_and_capture_flag_for_the_job_it_runs():
    """A state saved by an eager job (float rate, not capturable) resumed by a graphed one, and the reverse: the
    trainer rewrites both after any load, since a graph captured with a float rate would keep it to the end."""
    optimizer = _optimizer(lr=0.25)
    set_graph_options(optimizer, 0.5, torch.device("cpu"))  # a graphed job (on CUDA it passes its GPU)
    [group] = optimizer.param_groups
    assert torch.is_tensor(group["lr"]) and group["lr"].item() == 0.25 and group["capturable"]
    assert group["initial_lr"] == 0.5  # a float base: the schedule fills the tensor without reading it back
    set_graph_options(optimizer, 0.5, None)  # an eager job resuming the graphed job's state
    assert group["lr"] == 0.25 and type(group["lr"]) is float and not group["capturable"]


def test_refuses_nested_inputs_with_a_tensor_off_the_gpu():
    """The trainer's inputs are (micro-batches, one dict of cached tensors per micro-batch): each tensor counts."""
    step = GraphedStep(_step, _optimizer(capturable=True))
    with pytest.raises(ValueError, match="the step's input is on cpu"):
        step(([], [{"teacher_hidden": torch.zeros(2)}]))
    with pytest.raises(TypeError, match="tensors, tuples, lists or dicts, not int"):
        step(([], [{"rows": 3}]))
    assert not step.captured and step.calls == {}
