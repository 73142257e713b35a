"""ditkit.utils.sdpa: the process-wide SDPA kernel preference, and that it leaves results alone."""
import pytest
import torch
import torch.nn.functional as F

from ditkit.config import load_config
from ditkit.utils.sdpa import SDPA_CHOICES, sdpa_backend, use_sdpa_backend

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


def test_context_manager_restores_the_callers_choice():
    """Sampling a grid mid-training (sample.sdpa) must leave the run's train.sdpa in force."""
    use_sdpa_backend("flash")
    with sdpa_backend("cudnn"):
        assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert tuple(getattr(torch.backends.cuda, f)() for f in FLAGS) == (True, True, False, True)
    with pytest.raises(ValueError):
        with sdpa_backend("nope"):
            pass
    assert tuple(getattr(torch.backends.cuda, f)() for f in FLAGS) == (True, True, False, True)


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
    with pytest.raises(ValueError, match="train.sdpa"):
        load_config("digits", overrides=["train.sdpa=fast"])
    with pytest.raises(ValueError, match="sample.sdpa"):
        load_config("digits", overrides=["sample.sdpa=fast"])
