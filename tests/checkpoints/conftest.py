import pytest
import torch

from ditkit.models.dit import DiT

SMALL = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
             num_classes=10, learn_sigma=True)


@pytest.fixture
def small_dit():
    """A small DiT with every trainable weight moved off its (partly zero) initial value."""
    torch.manual_seed(0)
    model = DiT(**SMALL)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    y = torch.tensor([0, 3, 9, 10])  # 10 is the null class
    return x, t, y
