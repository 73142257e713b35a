"""What the FP8 tests share: MLP operands, a plain DiT block and its fused twin, a block's output and gradients, the
check of e4m3 values against a reference where Triton's interpreter rounds its own way, and a small DiT whose blocks
carry signal (for the sampling layers)."""
import copy

import torch
from torch import nn

from ditkit.fast.fused_attention import convert_to_fused_attention
from ditkit.fast.fused_mlp import convert_to_fused_mlp
from ditkit.fast.fused_norm import convert_to_fused_norm
from ditkit.models.dit import DiTBlock, build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dit_with_real_weights() -> nn.Module:
    """A DiT of 3 blocks (hidden 96, 4 heads, patch 2) on 8×8×4 latents, 10 classes, in eval mode, its linears drawn
    from N(0, 0.05²): adaLN-Zero starts at identity, and the FP8 layers need blocks that carry signal."""
    torch.manual_seed(0)
    model = build_model("custom", depth=3, hidden_size=96, num_heads=4, patch_size=2, input_size=8,
                        in_channels=4, num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    return model


def mlp_operands(generator: torch.Generator, m=20, d=32, hidden=64, dtype=torch.float32) -> list[torch.Tensor]:
    """x (m, d), W₁ (hidden, d), b₁, W₂ (d, hidden), b₂ on ``DEVICE``."""
    x = torch.randn(m, d, generator=generator)
    w1, b1 = torch.randn(hidden, d, generator=generator) * 0.2, torch.randn(hidden, generator=generator) * 0.1
    w2, b2 = torch.randn(d, hidden, generator=generator) * 0.2, torch.randn(d, generator=generator) * 0.1
    return [t.to(dtype).to(DEVICE) for t in (x, w1, b1, w2, b2)]


def plain_and_fused_blocks() -> tuple[nn.Module, nn.Module]:
    """A DiT block (width 64, 4 heads) with random weights everywhere, and a copy with the fused MLP, attention and
    norm, both on ``DEVICE``."""
    torch.manual_seed(0)
    plain = DiTBlock(64, num_heads=4)
    for p in plain.parameters():  # adaLN-Zero starts at zero; random weights exercise every term
        nn.init.normal_(p, std=0.1)
    fused = nn.ModuleDict({"block": copy.deepcopy(plain)})
    convert_to_fused_mlp(fused)
    convert_to_fused_attention(fused)
    convert_to_fused_norm(fused)
    return plain.to(DEVICE), fused["block"].to(DEVICE)


def block_output_and_grads(block, x, c, gy, autocast=True) -> list[torch.Tensor]:
    """The output (under bf16 autocast unless told otherwise), ∂x, ∂c and every parameter's gradient, float32."""
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        y = block(x, c)
    y.float().backward(gy)
    return [y.detach().float(), x.grad, c.grad] + [p.grad.float() for p in block.parameters()]


def assert_e4m3_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal on a GPU.  Triton's interpreter (the CPU run) rounds to e4m3 its own way: some values land one e4m3
    step off, and where rounding up crosses a power of two it drops the carry (127 -> 64, not 128)."""
    got, want = got.float(), want.float()
    differ = got != want
    if DEVICE == "cuda":
        assert not differ.any()
        return
    step = torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=2 ** -6))) - 3)  # e4m3's spacing at want
    carry = (got * 2 == want) & (want.abs().log2() % 1 == 0)
    assert ((got - want).abs() <= step)[differ & ~carry].all()
    assert differ.float().mean() < 0.05
