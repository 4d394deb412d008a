"""What the GPU tests share."""
import pytest


@pytest.fixture
def one_short_conv(monkeypatch):
    """The eager reference job runs the short conv a recorded step runs (kernels.GRAPHED_SHORT_CONV). Under the default (`auto`) the
    eager one would run PyTorch's, whose bf16 rounding differs: after 4-8 Adam steps, embedding rows and the gradient
    norm drifted past these tests' bounds (H200, session 17). Here the tests check recording and replay;
    test_mixer_kernels.py checks the two convs against each other."""
    from hybrid_distill.models.mixers import kernels

    monkeypatch.setenv("HD_SHORT_CONV", kernels.GRAPHED_SHORT_CONV)
