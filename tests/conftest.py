import os
from pathlib import Path

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():  # Triton kernels (ditkit.kernels.norm) run in its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).parent / "fixtures"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def golden():
    """What the official DiT code (facebookresearch/DiT @ ed81ce2) computes, float32 on the CPU."""
    return torch.load(FIXTURES / "official_dit_reference.pt", weights_only=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="session")
def vae():
    """A randomly initialised AutoencoderKL of the real sd-vae-ft configuration."""
    diffusers = pytest.importorskip("diffusers")
    from ditkit.models.vae import SD_VAE_CONFIG

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(**SD_VAE_CONFIG).eval()


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """A random FIDInceptionV3 saved as a plain state dict, like pytorch-fid's file.  He-normal
    convolutions keep activations O(1) through the 94 layers (the default init lets them vanish)."""
    from ditkit.eval.inception import WEIGHTS_FILE, FIDInceptionV3

    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path
