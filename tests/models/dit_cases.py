"""A small DiT whose every path carries signal, and its output and gradients: what the tests of the fused
and tuned modules compare between a converted DiT and the plain one (or compiled and eager)."""
import copy
from collections.abc import Callable

import torch
from torch import nn

from ditkit.models.dit import build_model


def randomised(model: nn.Module, seed: int = 1) -> nn.Module:
    """``model`` with every trainable weight drawn from N(0, 0.1²): adaLN-Zero starts every block as the
    identity (a zero output), and random weights make every path and option carry signal."""
    torch.manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return model


def perturbed_dit() -> nn.Module:
    """DiT-S/8 on 16×16×4 latents, 10 classes, learned variance; adaLN-Zero's zero weights nudged off zero."""
    torch.manual_seed(0)
    model = build_model("DiT-S/8", input_size=16, in_channels=4, num_classes=10, learn_sigma=True)
    for p in model.parameters():
        p.data += 0.02 * torch.randn_like(p)
    return model


def output_and_grads(model: nn.Module, compile_it: bool = False) -> list[torch.Tensor]:
    """The output on a fixed batch and every parameter's gradient of its mean square (a zero scalar where a
    parameter gets none)."""
    torch.manual_seed(1)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([5, 500]), torch.tensor([1, 2])
    net = torch.compile(model) if compile_it else model
    out = net(x, t, y)
    out.square().mean().backward()
    return [out.detach()] + [p.grad if p.grad is not None else torch.zeros(()) for p in model.parameters()]


def assert_converted_equals_plain(*converts: Callable[[nn.Module], int]) -> None:
    """``perturbed_dit`` converted by each of ``converts`` in turn gives the plain one's output and gradients."""
    plain = perturbed_dit()
    converted = copy.deepcopy(plain)
    for convert in converts:
        convert(converted)
    for a, b in zip(output_and_grads(plain), output_and_grads(converted)):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)


def assert_compiled_equals_eager(convert: Callable[[nn.Module], int]) -> None:
    """``perturbed_dit`` converted by ``convert``, compiled, gives the eager output and gradients (in eval
    mode: no label dropout, whose random numbers compiled code draws otherwise)."""
    model = perturbed_dit().eval()
    convert(model)
    eager = output_and_grads(copy.deepcopy(model))
    for a, b in zip(eager, output_and_grads(model, compile_it=True)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
