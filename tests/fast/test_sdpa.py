"""ditkit.fast.sdpa: the process-wide SDPA kernel preference, and that it leaves results alone."""
import pytest
import torch
import torch.nn.functional as F

from ditkit.fast.sdpa import SDPA_CHOICES, use_sdpa_backend

FLAGS = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled", "math_sdp_enabled")


@pytest.fixture(autouse=True)
def restore_flags():
    saved = [getattr(torch.backends.cuda, f)() for f in FLAGS]
    yield
    for f, v in zip(("enable_flash_sdp", "enable_mem_efficient_sdp", "enable_cudnn_sdp", "enable_math_sdp"), saved):
        getattr(torch.backends.cuda, f)(v)


@pytest.mark.parametrize("name, expected", [
    ("flash", (True, True, False, True)), ("auto", (True, True, True, True)), ("cudnn", (False, False, True, True)),
    ("efficient", (False, True, False, True)), ("math", (False, False, False, True))])
def test_each_choice_sets_the_backend_flags(name, expected):
    use_sdpa_backend(name)
    assert tuple(getattr(torch.backends.cuda, f)() for f in FLAGS) == expected


def test_results_do_not_depend_on_the_choice():
    """On a CPU the flags select nothing; on a GPU this checks the kernels agree."""
    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    outs = []
    for name in SDPA_CHOICES:
        use_sdpa_backend(name)
        outs.append(F.scaled_dot_product_attention(q, k, v))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown SDPA backend 'fast'"):
        use_sdpa_backend("fast")
    from ditkit.fast import TrainRun, TrainSpeed, train_speed

    with pytest.raises(ValueError, match="TrainSpeed.sdpa must be one of auto, flash, cudnn, efficient, math, got 'fast'"):
        train_speed(TrainSpeed(sdpa="fast"), TrainRun(torch.device("cpu"), None))
