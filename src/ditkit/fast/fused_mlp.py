"""The block MLP's training step with GELU inside the matrix products' epilogues.

    forward   pre = x W₁ᵀ + b₁,  a = GELU(pre)      one product, writes a and pre (cuBLASLt GELU_AUX_BIAS)
              y = a W₂ᵀ + b₂
    backward  ∂pre = (∂y W₂) ⊙ GELU'(pre)           one product (cuBLASLt DGELU)
              ∂W₂ = ∂yᵀ a,  ∂b₂ = Σ ∂y
              ∂W₁ = ∂preᵀ x,  ∂b₁ = Σ ∂pre,  ∂x = ∂pre W₁

The other products (y's, ∂x's and the weight gradients) run through the fastest of cuBLASLt's
candidates for the shape (``ditkit.fast.tuned_linear``): at DiT-XL/2 batch-32 shapes, torch's choice
for ∂W₁ ran at 586 TFLOP/s, the fastest candidate at 695 (``benchmarks/gemm_algos.py``).  Without b₂ (``FusedMlp.forward(x, with_bias=False)``)
y comes without fc2's bias, for a caller that adds it itself (``ditkit.fast.fused_norm``: the next
norm kernel adds it and makes its gradient).

Compiled, the plain MLP's GELU is a separate pass after fc1, and in the backward a pass that reads
∂a and pre to write ∂pre.  Here those passes are gone (∂b₁ stays a sum).  a and pre are kept for
the backward, as eager autograd keeps them (measured at DiT-XL/2 batch 128: peak memory +0.15 GiB
against the compiled plain MLP).  No double backward.

``FusedMlp`` holds the same ``fc1``/``fc2`` modules as the ``Mlp`` it replaces (same Parameters,
same state dict).  The fused products run on CUDA in bf16/fp16 (under autocast: its dtype) with
sizes that are multiples of 8; otherwise, and on a CPU, the operators compute the same thing with
torch's ops (which the CPU tests compare with the plain MLP's autograd).  ``TrainSpeed.fused_mlp``.
Given fc1's input in FP8 (``x_fp8``), fc1's forward is an FP8 product (``ditkit.fast.fp8_forward``); with
``fp8_backward.enable_fp8_backward``, fc1's ∂x product is one (``ditkit.fast.fp8_backward``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.fast.fp8_backward import fp8_dx, quantize_weight_columns
from ditkit.fast.fp8_forward import fp8_linear, quantize_weight
from ditkit.fast.swap import compute_dtype, swap_modules
from ditkit.fast.tuned_linear import linear_product, lt_ready, tuned_matmul, weight_grad
from ditkit.kernels import cublaslt
from ditkit.kernels.fp8_rows import programs_per_rows, rows_fp8_and_column_sums
from ditkit.models.dit import Mlp


# The MLP is one operator with a registered backward: the GELU-gradient product (fc2's ∂x with fc1's
# GELU applied) crosses the two linears, so no per-linear autograd could fuse it.  The backward is one
# operator too (gelu_mlp_backward); only W₁'s FP8 quantization and the sum of ∂b₁'s partial sums stay
# traced, where compile fuses them.
@torch.library.custom_op("ditkit::gelu_mlp", mutates_args=(),
                         schema="(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor? b2, Tensor? xq=None, "
                                "Tensor? sx=None, Tensor? wq=None, Tensor? sw=None, bool fp8_dx=False) "
                                "-> (Tensor, Tensor, Tensor)")
def gelu_mlp(x, w1, b1, w2, b2, xq=None, sx=None, wq=None, sw=None, fp8_dx=False):
    """x (M, D) -> y (M, D) (without b₂ when it is None), and for the backward a = GELU(pre) and
    pre = x W₁ᵀ + b₁, both (M, H).  Given e4m3 xq ≈ x / sx and wq ≈ W₁ / sw (per-tensor scales, (1,) float32),
    pre = sx sw · xq wqᵀ + b₁ instead (``ditkit.fast.fp8_forward``); x and W₁ then serve the backward only.
    ``fp8_dx``: the backward's ∂x product in FP8 (``ditkit.fast.fp8_backward``)."""
    if xq is not None:
        a, pre = fp8_linear(xq, sx, wq, sw, b1, x.dtype, gelu=True)
    elif lt_ready(x, w1, b1):
        a, pre = cublaslt.linear_gelu(x, w1, b1)
    else:
        pre = torch.addmm(b1, x, w1.t())
        a = F.gelu(pre, approximate="tanh")
    return linear_product(a, w2, b2), a, pre


@gelu_mlp.register_fake
def _(x, w1, b1, w2, b2, xq=None, sx=None, wq=None, sw=None, fp8_dx=False):
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0]), x.new_empty(x.shape[0], w1.shape[0])


@torch.library.custom_op("ditkit::dgelu_matmul", mutates_args=(), schema="(Tensor g, Tensor w, Tensor pre) -> Tensor")
def dgelu_matmul(g, w, pre):
    """g (M, D) = ∂y, w (D, H) = W₂, pre (M, H) -> ∂pre = (g W₂) ⊙ GELU'(pre) (M, H)."""
    if lt_ready(g, w, pre):
        return cublaslt.matmul_dgelu(g, w, pre)
    return torch.ops.aten.gelu_backward(g @ w, pre, approximate="tanh")


@dgelu_matmul.register_fake
def _(g, w, pre):
    return pre.new_empty(pre.shape)


@torch.library.custom_op("ditkit::gelu_mlp_backward", mutates_args=(),
                         schema="(Tensor gy, Tensor x, Tensor w1, Tensor w2, Tensor a, Tensor pre, Tensor? wtq=None, "
                                "Tensor? sw=None, bool has_b2=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def gelu_mlp_backward(gy, x, w1, w2, a, pre, wtq=None, sw=None, has_b2=True):
    """∂y = gy (M, D) -> (∂x (M, D), ∂W₁ (H, D), ∂b₁ as column sums (P, H) float32 to be summed over dim 0, ∂W₂ (D, H),
    ∂b₂ (D,), or (0,) without b₂).  Given wtq, sw = ``quantize_weight_columns(W₁)``, ∂x is the FP8 product
    (``ditkit.fast.fp8_backward``)."""
    gw2 = weight_grad(gy, a)
    gb2 = gy.sum(0) if has_b2 else gy.new_empty(0)
    gpre = dgelu_matmul(gy, w2, pre)
    if wtq is not None:
        q, s, sums = rows_fp8_and_column_sums(gpre)
        gx = fp8_dx(q, s, wtq, sw, gpre.dtype)
    else:
        gx, sums = tuned_matmul(gpre, w1), gpre.sum(0, keepdim=True, dtype=torch.float32)
    gw1 = weight_grad(gpre, x)
    return gx, gw1, sums, gw2, gb2


@gelu_mlp_backward.register_fake
def _(gy, x, w1, w2, a, pre, wtq=None, sw=None, has_b2=True):
    (m, d), h = gy.shape, pre.shape[1]
    parts = programs_per_rows(m, gy.device)[1] if wtq is not None else 1
    return (pre.new_empty(m, x.shape[1]), pre.new_empty(h, x.shape[1]), gy.new_empty(parts, h, dtype=torch.float32),
            gy.new_empty(d, h), gy.new_empty(d if has_b2 else 0))  # ∂x and ∂W₁ in ∂pre's dtype, which is pre's


def _setup_context(ctx, inputs, output):
    x, w1, _, w2, b2, *_, fp8_dx = inputs
    _, a, pre = output
    ctx.save_for_backward(x, w1, w2, a, pre)
    ctx.mark_non_differentiable(a, pre)
    ctx.has_b2 = b2 is not None
    ctx.fp8_dx = fp8_dx


def _backward(ctx, gy, ga, gpre):
    x, w1, w2, a, pre = ctx.saved_tensors
    wq = quantize_weight_columns(w1) if ctx.fp8_dx else (None, None)  # traced: compile fuses its amax and cast
    gx, gw1, sums, gw2, gb2 = gelu_mlp_backward(gy.contiguous(), x, w1, w2, a, pre, *wq, has_b2=ctx.has_b2)
    return (gx, gw1, sums.sum(0).to(gx.dtype), gw2, gb2 if ctx.has_b2 else None,
            None, None, None, None, None)


gelu_mlp.register_autograd(_backward, setup_context=_setup_context)


class FusedMlp(Mlp):
    """``Mlp`` whose training step runs through ``gelu_mlp`` (see the module docstring); ``fp8_backward``: fc1's ∂x
    product in FP8 (``ditkit.fast.fp8_backward.enable_fp8_backward``)."""

    fp8_backward = False

    def forward(self, x: torch.Tensor, with_bias: bool = True,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x_fp8``: (x / s in e4m3, s (1,) float32), fc1's input for an FP8 forward (``ditkit.fast.fp8_forward``)."""
        lead = x.shape[:-1]
        dtype = compute_dtype(x)
        w1, b1, w2 = (p.to(dtype) for p in (self.fc1.weight, self.fc1.bias, self.fc2.weight))
        b2 = self.fc2.bias.to(dtype) if with_bias else None
        quantized = ()
        if x_fp8 is not None:
            quantized = (x_fp8[0].reshape(-1, x.shape[-1]), x_fp8[1], *quantize_weight(w1))
        y, _, _ = gelu_mlp(x.reshape(-1, x.shape[-1]).to(dtype), w1, b1, w2, b2, *quantized, fp8_dx=self.fp8_backward)
        return y.reshape(*lead, y.shape[-1])


def convert_to_fused_mlp(model: nn.Module) -> int:
    """Replace every ``Mlp`` in ``model`` by a ``FusedMlp`` holding the same layers; returns how many."""
    return swap_modules(model, {Mlp: FusedMlp})


def revert_fused_mlp(model: nn.Module) -> int:
    """Undo ``convert_to_fused_mlp``; returns how many."""
    return swap_modules(model, {FusedMlp: Mlp})
