"""The FID InceptionV3 against torchvision's maintained InceptionV3, where torchvision is installed
(it is not a ditkit dependency: this test is skipped without it).

torchvision's network shares the architecture and parameter names; the TF 2015 graph differs in
two places that pytorch-fid documents: pooling branches average over real pixels only (so the
border pixels of a pool branch differ) and Mixed_7c's pool branch is a max pool.  With the same
weights, everything else must agree exactly.
"""
import pytest
import torch

from ditkit.eval.inception import FIDInceptionV3

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = FIDInceptionV3().eval()
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so that BN is exercised
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    theirs = torchvision.models.Inception3(num_classes=1008, aux_logits=False, transform_input=False,
                                           init_weights=False).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same keys, same shapes
    return ours, theirs


@pytest.mark.parametrize("block, channels, pool_channels", [
    ("Mixed_5b", 192, 32), ("Mixed_5d", 288, 64), ("Mixed_6a", 288, 0), ("Mixed_6b", 768, 192),
    ("Mixed_7a", 768, 0), ("Mixed_7b", 1280, 192), ("Mixed_7c", 2048, None)])
@torch.no_grad()
def test_blocks_match_torchvision(pair, block, channels, pool_channels):
    ours, theirs = (getattr(m, block) for m in pair)
    x = torch.randn(2, channels, 9, 9).relu()
    a, b = ours(x), theirs(x)
    assert a.shape == b.shape
    if pool_channels == 0:  # reduction blocks: identical
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        return
    n_pool = 192 if pool_channels is None else pool_channels
    # every branch but the pool branch (last in the concatenation) is the same everywhere
    torch.testing.assert_close(a[:, :-n_pool], b[:, :-n_pool], rtol=1e-5, atol=1e-5)
    if pool_channels is None:  # Mixed_7c: max pool in the TF graph, average in torchvision
        assert not torch.allclose(a[:, -n_pool:], b[:, -n_pool:])
    else:  # average pools agree away from the border, where padding is not counted
        torch.testing.assert_close(a[:, -n_pool:, 1:-1, 1:-1], b[:, -n_pool:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a[:, -n_pool:, 0], b[:, -n_pool:, 0])


@torch.no_grad()
def test_stem_matches_torchvision(pair):
    ours, theirs = pair
    x = torch.randn(1, 3, 299, 299)
    stem = lambda m: m.maxpool2(m.Conv2d_4a_3x3(m.Conv2d_3b_1x1(m.maxpool1(m.Conv2d_2b_3x3(m.Conv2d_2a_3x3(m.Conv2d_1a_3x3(x)))))))
    y = stem(theirs)  # (1, 192, 35, 35)
    # our forward's stem, read through the first block's input
    captured = {}
    handle = ours.Mixed_5b.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    ours(x)
    handle.remove()
    torch.testing.assert_close(captured["x"], y, rtol=1e-5, atol=1e-5)
