"""Switches applied to a model's blocks from outside (ditkit.fast.blocks): the bf16 residual stream and
activation checkpointing change no Parameter or state-dict key, and compute what the plain model does."""
import copy

import torch

from ditkit.fast.blocks import checkpoint_blocks, residual_stream_in
from ditkit.models.dit import DiT


def _model():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    for m in model.modules():  # adaLN-Zero starts at identity: give the blocks real weights
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    return model


def test_bf16_residual_stream_under_autocast_stays_close_to_the_float32_stream():
    """The blocks' inputs are bf16 instead of autocast's float32, and the output moves by bf16 rounding only."""
    model = _model()
    fast = copy.deepcopy(model)
    assert residual_stream_in(fast, torch.bfloat16) == 1
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.arange(4)
    seen = []
    for m in (model, fast):
        m.blocks[1].register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = model(x, t, y).float(), fast(x, t, y).float()
    assert seen == [torch.float32, torch.bfloat16]
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel
    assert fast.state_dict().keys() == model.state_dict().keys()


def test_checkpointed_blocks_give_the_same_outputs_and_gradients_and_keys():
    model = _model().train()
    ckpt = copy.deepcopy(model)
    assert checkpoint_blocks(ckpt) == 3
    assert type(ckpt.blocks[0]).__name__ == "CheckpointedDiTBlock"
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    outs = []
    for m in (model, ckpt):
        torch.manual_seed(1)  # the label dropout draws
        out = m(x, t, y)
        out.square().mean().backward()
        outs.append([out.detach(), *(p.grad for p in m.parameters())])
    for a, b in zip(*outs):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b)
    assert ckpt.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():  # no recomputation outside training
        ckpt.eval()(x, t, y)
