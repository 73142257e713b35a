import pytest
import torch
from torch import nn

from ditkit.eval.inception import WEIGHTS_FILE, FIDInceptionV3


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """A random FIDInceptionV3 saved as a plain state dict, like pytorch-fid's file.  He-normal
    convolutions keep activations O(1) through the 94 layers (the default init lets them vanish)."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path
